"""TORE-FastMETRO (TORE's ``FastMETRO_Body_Network``): three transformers, the GTR's ``transformer_3`` decoding
vertex tokens under the ``[V, V]`` mesh mask, and with the ITP the inline Image Token Pruner
(``token_selector_conv2d``, ``token_selector_fc``, ``layer_norm``), which the patched ``forward(images)`` runs
fused (backbone, ``conv_1x1``, fused ITP, the rest of the released forward)."""
from __future__ import annotations

import torch
from torch import nn

from ...ops.itp import image_token_prune
from .. import bf16 as _bf16
from .. import layers
from . import common

ITP_PARTS = {"token_selector_conv2d": nn.Conv2d, "token_selector_fc": nn.Linear, "layer_norm": nn.LayerNorm}
# what the fused ITP forward reads from the model besides the transformers and the token selector
ITP_FORWARD_PARTS = {
    "conv_1x1": nn.Conv2d, "cam_token_embed": nn.Embedding, "joint_token_embed": nn.Embedding,
    "vertex_token_embed": nn.Embedding, "position_encoding_1": nn.Module, "position_encoding_2": nn.Module,
    "position_encoding_3": nn.Module, "dim_reduce_enc": nn.Linear, "dim_reduce_dec": nn.Linear,
    "cam_predictor": nn.Linear, "xyz_regressor_j": nn.Linear, "xyz_regressor_v": nn.Linear,
}
TRANSFORMERS = ("transformer_1", "transformer_2", "transformer_3")
LOOKED_FOR = ("TORE-FastMETRO (ITP + GTR): transformer_1/2/3, token_selector_conv2d (Conv2d 3x3), token_selector_fc "
              "(Linear), layer_norm (LayerNorm [N, C]), " + ", ".join(ITP_FORWARD_PARTS) + ", attention_mask [V, V], "
              "mesh_sampler (_U / _D lists of sparse matrices); TORE-FastMETRO (GTR): transformer_1/2/3, "
              "vertex_token_embed, attention_mask [V, V], mesh_sampler")


def matches(model):
    return common.module(model, "transformer_3") is not None and any(
        common.module(model, n) is not None for n in ("transformer_1", "transformer_2"))


def plan(model, bf16, problems):
    has_itp = any(common.module(model, p) is not None for p in ITP_PARTS)
    slots = [s for n in TRANSFORMERS for s in common.attention_slots(model, n, problems)]
    if not common.has_sampler(model):
        problems.append("mesh_sampler missing or without _U / _D matrices")
    embed = getattr(model, "vertex_token_embed", None)
    if not isinstance(embed, nn.Embedding):
        problems.append("vertex_token_embed missing")
    common.check_mask(model, embed.num_embeddings if isinstance(embed, nn.Embedding) else None, problems)
    if has_itp:
        for part, cls in list(ITP_PARTS.items()) + list(ITP_FORWARD_PARTS.items()):
            if not isinstance(getattr(model, part, None), cls):
                problems.append(f"{part} missing or not an {cls.__name__}")
        conv, ln = getattr(model, "token_selector_conv2d", None), getattr(model, "layer_norm", None)
        if isinstance(conv, nn.Conv2d) and (conv.kernel_size != (3, 3) or conv.padding != (1, 1)
                                            or conv.stride != (1, 1) or conv.bias is None):
            problems.append("token_selector_conv2d is not a 3x3, stride 1, padding 1 Conv2d with bias")
        if isinstance(ln, nn.LayerNorm) and (len(ln.normalized_shape) != 2 or not ln.elementwise_affine):
            problems.append("layer_norm is not an affine LayerNorm over [N, C]")
    if problems:
        return None
    p = common.Plan("TORE-FastMETRO (ITP + GTR)" if has_itp else "TORE-FastMETRO (GTR)", capturable=True)
    common.add_transformers(p, model, slots, masked=("transformer_3",))
    if isinstance(getattr(model, "joint_token_embed", None), nn.Embedding):
        common.add_query_sources(p, model, "transformer_1", ("joint_token_embed",))
    common.add_query_sources(p, model, "transformer_3", ("vertex_token_embed",))
    common.add_sampler(p, model, bf16)
    common.add_linears(p, model, bf16, keep=ITP_PARTS if has_itp else ())
    if has_itp:
        p.model_forward = (fused_itp_forward, bf16_fused_itp_forward)
        p.report.append(("forward", "inline ITP", "backbone, fused image_token_prune, broadcast token embeddings"))
    return p


def _broadcast_embedding(embedding, batch_size):
    return embedding.weight.unsqueeze(1).expand(-1, batch_size, -1)  # [L, B, E], stride 0 over B


def backbone_features(model, images):
    """What the released forward feeds ``conv_1x1``: ``backbone.extract_endpoints(images)['reduction_6']`` when
    ``args.arch`` names an EfficientNet, else ``backbone(images)``; a model without a backbone (tore_reference's
    heads) takes the features themselves."""
    backbone = model._modules.get("backbone")
    if backbone is None:
        return images
    if "efficientnet" in str(getattr(getattr(model, "args", None), "arch", "")):
        return backbone.extract_endpoints(images)["reduction_6"]
    return backbone(images)


@layers.eager_under_compile
def fused_itp_forward(self, images):
    """The released TORE-FastMETRO ``forward(images)`` with the inline ITP fused: the backbone, ``conv_1x1``, the
    fused ITP, the three transformers, the regressors and the upsampling. Returns ``(cam [B, 3], joints [B, J, 3],
    coarse [B, V, 3], mid, fine, heatmap [B, N, HW])``."""
    features = backbone_features(self, images)
    if not isinstance(features, torch.Tensor) or features.dim() != 4 \
            or features.shape[1] != self.conv_1x1.in_channels or not features.is_floating_point():
        name = "the backbone's output" if "backbone" in self._modules else "features"
        raise ValueError(f"{name} must be a float [B, {self.conv_1x1.in_channels}, H, W] tensor, got "
                         f"{getattr(features, 'dtype', type(features).__name__)} "
                         f"{list(getattr(features, 'shape', []))}")
    batch_size = features.shape[0]
    # the ITP and the residual stream in the parameters' dtype (fp32 under patch(dtype=bf16), whose autocast makes
    # the backbone's output bf16)
    dtype, device = self.token_selector_conv2d.weight.dtype, features.device
    conv, fc, ln = self.token_selector_conv2d, self.token_selector_fc, self.layer_norm
    img_features = self.conv_1x1(features)
    with torch.autocast(device.type, enabled=False):  # under patch(dtype=bf16) too: the fused ITP runs in fp32
        img_tokens, token_heatmap = image_token_prune(img_features.to(dtype), conv.weight, conv.bias, fc.weight,
                                                      fc.bias, ln.weight, ln.bias, eps=ln.eps,
                                                      seq_first=True)  # [N, B, E1]
    n = img_tokens.shape[0]
    pos_1 = layers.position_sequence(self.position_encoding_1, batch_size, n, device, dtype)
    pos_2 = layers.position_sequence(self.position_encoding_2, batch_size, n, device, dtype)
    # the token embeddings broadcast, not repeated: the first decoder layers share their work over the batch
    cam_1, enc_img_1, j_1 = self.transformer_1(img_tokens, _broadcast_embedding(self.cam_token_embed, batch_size),
                                               _broadcast_embedding(self.joint_token_embed, batch_size), pos_1,
                                               attention_mask=None)
    cam_2, _, j_2 = self.transformer_2(self.dim_reduce_enc(enc_img_1), self.dim_reduce_enc(cam_1),
                                       self.dim_reduce_dec(j_1), pos_2, attention_mask=None)
    cam_parameter = self.cam_predictor(cam_2).view(batch_size, 3)
    pos_3 = layers.position_sequence(self.position_encoding_3, batch_size, j_2.shape[0], device, dtype)
    v_tokens = _broadcast_embedding(self.vertex_token_embed, batch_size)
    _, _, v_features = self.transformer_3(j_2, cam_2, v_tokens, pos_3,
                                          attention_mask=self.attention_mask.to(device))
    # the regressors on the sequence-first features (a row-wise map), then the small outputs transposed
    joints = self.xyz_regressor_j(j_2).transpose(0, 1)
    coarse = self.xyz_regressor_v(v_features).transpose(0, 1)
    mid = self.mesh_sampler.upsample(coarse, n1=2, n2=1)
    fine = self.mesh_sampler.upsample(mid, n1=1, n2=0)
    return cam_parameter, joints, coarse, mid, fine, token_heatmap


@layers.eager_under_compile
def bf16_fused_itp_forward(self, *args, **kwargs):
    return _bf16.in_bf16(self, fused_itp_forward, args, kwargs)
