"""The released networks, rewritten from their structure (tore-model.md section 7): images in, their own backbone,
the released class layout, attribute names, constructor and forward signatures and return types. Tests and
benchmarks build these to meet ``tore_kernels.patch`` as users' models do.

=================================  ==========================================================================
class here                          released as
=================================  ==========================================================================
``ToreFastMETRO_Body_Network``     TORE ``tore/modeling_fm/bert/modeling_metro.py`` ``FastMETRO_Body_Network``
                                   (ITP + GTR; ``args.keep_ratio=None`` gives the GTR-only variant)
``FastMETRO_Body_Network``         FastMETRO ``src/modeling/model/modeling_fastmetro.py``
``FastMETRO_Hand_Network``         the same file (21 joints + 195 MANO vertices)
``ToreMETRO_Body_Network``         TORE ``tore/modeling_m/bert/modeling_metro.py`` ``METRO_Body_Network``
``METRO_Body_Network``             METRO ``metro/modeling/bert/modeling_metro.py``
``METRO``, ``METRO_Encoder``,      METRO's BERT stages (``modeling_metro.py`` / pytorch_transformers 1.x
``Bert*``                          ``modeling_bert.py``) that ``trans_encoder`` chains
``Mesh``                           the mesh sampler of ``modeling/_smpl.py``
=================================  ==========================================================================

Where this code departs from the release, on purpose:
- the adjacency and the mesh sampler come from ``mesh_topology``: FastMETRO's data files when present, else (SMPL
  only) the generated ``tore_kernels.topology.default_body_mesh()``; the release reads fixed relative paths;
- TORE's Image Token Pruner hard-codes 512 / 128 channels, which are ``model_dim_1`` / ``model_dim_1 // 4`` at the
  released defaults; here they follow ``model_dim_1`` so tiny test networks can be narrow;
- METRO's code calls ``.cuda()`` for its constant inputs; here they are made on the configured device
  (``args.device``, or the input's), so the whole forward runs on CPU too, given a stand-in ``smpl``
  (``TemplateSMPL``); TORE-METRO's ``model_name_3`` may be S / M as well as L.

Sizes: the ``*_args`` functions return the released argparse defaults (benchmarks); ``TINY_*`` overrides narrow
them through the released ``args`` fields for tests, and ``small_backbone`` maps a 56x56 image to 7x7.
"""
import argparse
import copy
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .mesh import Mesh as _ReferenceMesh
from .position_encoding import build_position_encoding
from .transformer import build_transformer

NUM_LAYERS = {"S": 1, "M": 2, "L": 3}
# METRO's config.py: the H36M 17-joint order and the 14 of them the networks predict
H36M_PELVIS = 0
H36M_J17_TO_J14 = (3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10)

FASTMETRO_DATA = os.path.normpath(os.environ.get("TORE_FASTMETRO_DATA") or os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data", "fastmetro"))
_ADJACENCY_PREFIX = {"smpl": "smpl_431_adjmat", "mano": "mano_195_adjmat"}


# ----------------------------------------------------------------------------------------------
# mesh data and the released mesh sampler
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mesh_topology(body="smpl"):
    """FastMETRO's topology for ``body`` ("smpl" / "mano") from ``FASTMETRO_DATA`` (the project's trusted copy, so
    its pickled .npz is read), or the generated default body mesh when the files are absent (SMPL only)."""
    from tore_kernels import topology
    if body not in _ADJACENCY_PREFIX:
        raise ValueError(f"body must be one of {sorted(_ADJACENCY_PREFIX)}, got {body!r}")
    if os.path.isfile(os.path.join(FASTMETRO_DATA, _ADJACENCY_PREFIX[body] + "_indices.pt")):
        return topology.load_fastmetro(FASTMETRO_DATA, body, trust_pickle=True)
    if body == "mano":
        raise FileNotFoundError(f"MANO mesh data not found in {FASTMETRO_DATA} (set TORE_FASTMETRO_DATA); "
                                "there is no generated hand mesh")
    return topology.default_body_mesh()


def attention_mask(body="smpl"):
    """The released ``adjacency == 0``: ``[V, V]`` bool, True = may not attend."""
    return mesh_topology(body).attention_mask()


class Mesh(_ReferenceMesh):
    """The released sampler: ``_U`` / ``_D`` lists of sparse matrices, one sample at a time. As released,
    ``downsample(x)`` goes ``num_downsampling`` levels (one) by default and ``upsample(x)`` one level up."""

    def __init__(self, U, D, num_downsampling=1):
        super().__init__(U, D)
        self.num_downsampling = num_downsampling

    def downsample(self, x, n1=0, n2=None):
        return super().downsample(x, n1, self.num_downsampling if n2 is None else n2)


def mesh_sampler(body="smpl"):
    topo = mesh_topology(body)
    return Mesh(topo.upsampling, topo.downsampling)


class TemplateSMPL(nn.Module):
    """A stand-in for the licensed SMPL model where METRO's forward uses it: ``smpl(pose, betas)`` gives a fixed
    ``[B, 6890, 3]`` template (pose and betas ignored) and ``get_h36m_joints(vertices)`` a ``[B, 17, 3]`` linear
    regression of it. Deterministic (seeded), so eager and patched copies see the same template."""

    def __init__(self, num_vertices=6890, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("template", 0.3 * torch.randn(num_vertices, 3, generator=g))
        regressor = torch.rand(17, num_vertices, generator=g) ** 8  # a few vertices dominate each joint
        self.register_buffer("J_regressor_h36m", regressor / regressor.sum(1, keepdim=True))

    def forward(self, pose, betas):
        return self.template.expand(pose.shape[0], -1, -1)

    def get_h36m_joints(self, vertices):
        return torch.einsum("jv,bvc->bjc", self.J_regressor_h36m.to(vertices.dtype), vertices)


# ----------------------------------------------------------------------------------------------
# backbones
# ----------------------------------------------------------------------------------------------
def _conv_bn(c_in, c_out, kernel, stride, act):
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), act()]


def _strides(stride, stages):
    if stride < 2 or stride & (stride - 1) or stride > 2 ** stages:
        raise ValueError(f"stride must be a power of two in [2, {2 ** stages}], got {stride}")
    halvings = int(math.log2(stride))
    return [2] * halvings + [1] * (stages - halvings)


def small_backbone(out_channels=2048, stride=8, width=16):
    """A ResNet-style random CNN, ``nn.Sequential`` like the released ``resnet50().children()[:-2]``: images
    ``[B, 3, H, W]`` -> ``[B, out_channels, H / stride, W / stride]`` (stride 8 maps 56x56 to 7x7, 32 maps 224)."""
    layers, c = [], 3
    for s in _strides(stride, 5):
        layers += _conv_bn(c, width, 3, s, nn.ReLU)
        c = width
    return nn.Sequential(*layers, *_conv_bn(c, out_channels, 1, 1, nn.ReLU))


class EfficientNetStyleBackbone(nn.Module):
    """The interface of ``efficientnet_pytorch.EfficientNet`` that TORE uses: ``extract_endpoints(images)`` ->
    ``{"reduction_1": ..., ..., "reduction_6": [B, 1280, H / stride, W / stride]}`` (reduction_6 is the head
    convolution's output); ``forward(images)`` gives the classifier's ``[B, 1000]`` logits, as the library does."""

    def __init__(self, stride=8, width=16, head_channels=1280):
        super().__init__()
        strides = _strides(stride, 5)
        self._swish = nn.SiLU()
        self._conv_stem = nn.Conv2d(3, width, 3, strides[0], 1, bias=False)
        self._bn0 = nn.BatchNorm2d(width)
        self._blocks = nn.ModuleList([nn.Sequential(*_conv_bn(width, width, 3, s, nn.SiLU)) for s in strides[1:]])
        self._conv_head = nn.Conv2d(width, head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_channels)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(head_channels, 1000)

    def extract_endpoints(self, inputs):
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        endpoints = {"reduction_1": x}
        for i, block in enumerate(self._blocks):
            x = block(x)
            endpoints[f"reduction_{i + 2}"] = x
        endpoints[f"reduction_{len(self._blocks) + 2}"] = self._swish(self._bn1(self._conv_head(x)))
        return endpoints

    def forward(self, inputs):
        x = self.extract_endpoints(inputs)[f"reduction_{len(self._blocks) + 2}"]
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


def resnet50_backbone():
    """torchvision's ResNet-50 (random weights) without its pooling and classifier, as the release builds it:
    ``[B, 3, 224, 224]`` -> ``[B, 2048, 7, 7]``. Needs torchvision."""
    import torchvision
    return nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2])


def backbone_for(args, tiny):
    """The backbone a network built from ``args`` expects: EfficientNet-style when ``'efficientnet' in args.arch``,
    else ResNet-style with ``args.conv_1x1_dim`` channels (2048 for METRO); stride 8 for tiny, 32 otherwise."""
    stride = 8 if tiny else 32
    if "efficientnet" in args.arch:
        return EfficientNetStyleBackbone(stride=stride)
    return small_backbone(getattr(args, "conv_1x1_dim", 2048), stride=stride)


def example_images(batch_size, tiny, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = 56 if tiny else 224
    return torch.randn(batch_size, 3, size, size, generator=g)


# ----------------------------------------------------------------------------------------------
# released argparse defaults, and the tiny overrides tests use
# ----------------------------------------------------------------------------------------------
def _namespace(defaults, overrides):
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown args fields {unknown}; the released ones are {sorted(defaults)}")
    return argparse.Namespace(**{**defaults, **overrides})


def tore_fastmetro_args(**overrides):
    """TORE's ``run_tore_fm_bodymesh.py`` defaults (``keep_ratio`` 0.8; None builds GTR only)."""
    return _namespace(dict(
        arch="resnet50", model_name="FastMETRO_L", keep_ratio=0.8, model_dim_1=512, model_dim_2=128,
        model_dim_3=128, feedforward_dim_1=2048, feedforward_dim_2=512, feedforward_dim_3=512, conv_1x1_dim=2048,
        transformer_dropout=0.1, transformer_nhead=8, pos_type="sine"), overrides)


def fastmetro_args(**overrides):
    """FastMETRO's ``run_bodymesh.py`` / ``run_handmesh.py`` defaults."""
    return _namespace(dict(
        arch="resnet50", model_name="FastMETRO-L", model_dim_1=512, model_dim_2=128, feedforward_dim_1=2048,
        feedforward_dim_2=512, conv_1x1_dim=2048, transformer_dropout=0.1, transformer_nhead=8, pos_type="sine",
        use_learnable_upsample=False, use_smpl_param_regressor=False), overrides)


def metro_args(**overrides):
    """METRO's ``run_metro_bodymesh.py`` defaults, plus TORE-METRO's ``*_3`` fields for its NSR."""
    return _namespace(dict(
        arch="resnet50", input_feat_dim="2051,512,128", hidden_feat_dim="1024,256,128", num_hidden_layers=4,
        num_attention_heads=4, drop_out=0.1, legacy_setting=True, device=torch.device("cpu"),
        model_name_3="FastMETRO_L", feedforward_dim_3=512, transformer_dropout_3=0.1, transformer_nhead_3=8,
        pos_type_3="sine"), overrides)


TINY_TORE_FASTMETRO = dict(model_dim_1=64, model_dim_2=32, model_dim_3=32, feedforward_dim_1=64,
                           feedforward_dim_2=64, feedforward_dim_3=64, transformer_nhead=4, conv_1x1_dim=64)
TINY_FASTMETRO = dict(model_dim_1=64, model_dim_2=32, feedforward_dim_1=64, feedforward_dim_2=64,
                      transformer_nhead=4, conv_1x1_dim=64)
TINY_METRO = dict(input_feat_dim="2051,48,32", hidden_feat_dim="48,32,32", num_hidden_layers=1,
                  feedforward_dim_3=64, transformer_nhead_3=4, model_name_3="FastMETRO_S")


def _num_layers(model_name, separator):
    for size, layers in NUM_LAYERS.items():
        if f"FastMETRO{separator}{size}" in model_name:
            return layers
    raise ValueError(f"args.model_name must contain FastMETRO{separator}S / M / L, got {model_name!r}")


def _transformer_config(args, dim, feedforward, layers):
    return {"model_dim": dim, "dropout": args.transformer_dropout, "nhead": args.transformer_nhead,
            "feedforward_dim": feedforward, "num_enc_layers": layers, "num_dec_layers": layers,
            "pos_type": args.pos_type}


def _sequence(encoding, batch_size, h, w, device):
    return encoding(batch_size, h, w, device).flatten(2).permute(2, 0, 1)  # [h * w, B, E]


def _per_sample(embedding, batch_size):
    return embedding.weight.unsqueeze(1).repeat(1, batch_size, 1)  # [L, B, E]


# ----------------------------------------------------------------------------------------------
# TORE-FastMETRO
# ----------------------------------------------------------------------------------------------
class _FastMETROBase(nn.Module):
    """What TORE-FastMETRO and FastMETRO's body and hand networks share (the releases write it three times):
    ``conv_1x1``, ``transformer_1`` / ``transformer_2`` with their positional encodings and ``dim_reduce_dec``
    between them, the camera / joint / vertex token embeddings and ``cam_predictor``."""

    def __init__(self, args, backbone, mesh_sampler, num_joints, num_vertices, layers, vertex_dim):
        super().__init__()
        self.args = args
        self.backbone = backbone
        self.mesh_sampler = mesh_sampler
        self.num_joints = num_joints
        self.num_vertices = num_vertices
        self.transformer_config_1 = _transformer_config(args, args.model_dim_1, args.feedforward_dim_1, layers)
        self.transformer_config_2 = _transformer_config(args, args.model_dim_2, args.feedforward_dim_2, layers)
        self.transformer_1 = build_transformer(self.transformer_config_1)
        self.transformer_2 = build_transformer(self.transformer_config_2)
        self.dim_reduce_dec = nn.Linear(args.model_dim_1, args.model_dim_2)
        self.cam_token_embed = nn.Embedding(1, args.model_dim_1)
        self.joint_token_embed = nn.Embedding(num_joints, args.model_dim_1)
        self.vertex_token_embed = nn.Embedding(num_vertices, vertex_dim)
        self.position_encoding_1 = build_position_encoding(pos_type=args.pos_type, hidden_dim=args.model_dim_1)
        self.position_encoding_2 = build_position_encoding(pos_type=args.pos_type, hidden_dim=args.model_dim_2)
        self.cam_predictor = nn.Linear(args.model_dim_2, 3)
        self.conv_1x1 = nn.Conv2d(args.conv_1x1_dim, args.model_dim_1, kernel_size=1)


class ToreFastMETRO_Body_Network(_FastMETROBase):
    """TORE-FastMETRO. ``forward(images)`` -> ``(cam [B, 3], joints [B, 14, 3], vertices [B, 431, 3],
    [B, 1723, 3], [B, 6890, 3], token_heatmap [B, keep_num, 49])``; with ``args.keep_ratio=None`` (GTR only) the
    transformers see every image token (2-D positional encoding) and the heatmap is left out."""

    def __init__(self, args, backbone, mesh_sampler, num_joints=14, num_vertices=431):
        layers = _num_layers(args.model_name, "_")
        if "efficientnet" in args.arch:
            args.conv_1x1_dim = 1280  # the release sets it on the caller's args
        super().__init__(args, backbone, mesh_sampler, num_joints, num_vertices, layers, args.model_dim_3)
        if args.keep_ratio is not None:
            dim_1 = args.model_dim_1
            self.keep_num = int(49 * args.keep_ratio)
            self.token_selector_conv2d = nn.Conv2d(dim_1, dim_1 // 4, kernel_size=3, stride=1, padding=1)
            self.token_selector_fc = nn.Linear(dim_1 // 4, self.keep_num)
            self.layer_norm = nn.LayerNorm([self.keep_num, dim_1])
        self.transformer_config_3 = _transformer_config(args, args.model_dim_3, args.feedforward_dim_3, layers)
        self.transformer_3 = build_transformer(self.transformer_config_3)
        self.dim_reduce_enc = nn.Linear(args.model_dim_1, args.model_dim_2)
        self.position_encoding_3 = build_position_encoding(pos_type=args.pos_type, hidden_dim=args.model_dim_3)
        self.xyz_regressor_j = nn.Linear(args.model_dim_2, 3)
        self.xyz_regressor_v = nn.Linear(args.model_dim_3, 3)
        self.attention_mask = attention_mask("smpl")  # a plain attribute, as released: moved on every call

    def forward(self, images):
        device, batch_size = images.device, images.size(0)
        cam_token = _per_sample(self.cam_token_embed, batch_size)
        j_tokens = _per_sample(self.joint_token_embed, batch_size)
        v_tokens = _per_sample(self.vertex_token_embed, batch_size)
        v_attention_mask = self.attention_mask.to(device)
        if "efficientnet" in self.args.arch:
            img_features = self.backbone.extract_endpoints(images)["reduction_6"]
        else:
            img_features = self.backbone(images)
        _, _, h, w = img_features.shape
        img_features = self.conv_1x1(img_features)
        itp = self.args.keep_ratio is not None
        if itp:  # the inline Image Token Pruner (tore-model.md section 1)
            token_heatmap = F.gelu(self.token_selector_conv2d(img_features)).flatten(2).permute(0, 2, 1)
            token_heatmap = F.softmax(self.token_selector_fc(token_heatmap), dim=1).permute(0, 2, 1)  # [B, N, HW]
            img_features = self.layer_norm(token_heatmap @ img_features.flatten(2).permute(0, 2, 1))
            img_features = img_features.permute(1, 0, 2)  # [N, B, E1]
            h, w = self.keep_num, 1
        else:
            img_features = img_features.flatten(2).permute(2, 0, 1)  # [HW, B, E1]
        pos_enc_1 = _sequence(self.position_encoding_1, batch_size, h, w, device)
        pos_enc_2 = _sequence(self.position_encoding_2, batch_size, h, w, device)
        pos_enc_3 = _sequence(self.position_encoding_3, batch_size, self.num_joints, 1, device)

        cam_features_1, enc_img_features_1, j_features_1 = self.transformer_1(
            img_features, cam_token, j_tokens, pos_enc_1, attention_mask=None)
        # the release reduces the camera and the image features with the same layer
        cam_features_2, _, j_features_2 = self.transformer_2(
            self.dim_reduce_enc(enc_img_features_1), self.dim_reduce_enc(cam_features_1),
            self.dim_reduce_dec(j_features_1), pos_enc_2, attention_mask=None)
        cam_parameter = self.cam_predictor(cam_features_2).view(batch_size, 3)
        # Neural Shape Regressor: vertex queries over the joint features under the mesh mask
        _, _, v_features = self.transformer_3(j_features_2, cam_features_2, v_tokens, pos_enc_3,
                                              attention_mask=v_attention_mask)
        pred_3d_joints = self.xyz_regressor_j(j_features_2.transpose(0, 1))
        pred_3d_vertices_coarse = self.xyz_regressor_v(v_features.transpose(0, 1))
        pred_3d_vertices_mid = self.mesh_sampler.upsample(pred_3d_vertices_coarse, n1=2, n2=1)
        pred_3d_vertices_fine = self.mesh_sampler.upsample(pred_3d_vertices_mid, n1=1, n2=0)
        out = (cam_parameter, pred_3d_joints, pred_3d_vertices_coarse, pred_3d_vertices_mid, pred_3d_vertices_fine)
        return out + (token_heatmap,) if itp else out


# ----------------------------------------------------------------------------------------------
# FastMETRO
# ----------------------------------------------------------------------------------------------
class _FastMETRONetwork(_FastMETROBase):
    """FastMETRO's body and hand: ``transformer_1`` / ``transformer_2`` decode ``J + V`` joint and vertex tokens
    under the ``[J+V, J+V]`` mask."""

    def __init__(self, args, backbone, mesh_sampler, num_joints, num_vertices, body):
        super().__init__(args, backbone, mesh_sampler, num_joints, num_vertices, _num_layers(args.model_name, "-"),
                         args.model_dim_1)
        self.dim_reduce_enc_cam = nn.Linear(args.model_dim_1, args.model_dim_2)
        self.dim_reduce_enc_img = nn.Linear(args.model_dim_1, args.model_dim_2)
        self.xyz_regressor = nn.Linear(args.model_dim_2, 3)
        mask = torch.zeros(num_joints + num_vertices, num_joints + num_vertices, dtype=torch.bool)
        mask[num_joints:, num_joints:] = attention_mask(body)
        self.attention_mask = mask  # a plain attribute, as released

    def _coarse(self, images):
        """-> (pred_cam [B, 3], joints [B, J, 3], coarse vertices [B, V, 3])."""
        device, batch_size = images.device, images.size(0)
        cam_token = _per_sample(self.cam_token_embed, batch_size)
        jv_tokens = torch.cat([self.joint_token_embed.weight, self.vertex_token_embed.weight], dim=0)
        jv_tokens = jv_tokens.unsqueeze(1).repeat(1, batch_size, 1)
        attention_mask = self.attention_mask.to(device)
        img_features = self.backbone(images)
        _, _, h, w = img_features.shape
        img_features = self.conv_1x1(img_features).flatten(2).permute(2, 0, 1)  # [HW, B, E1]
        pos_enc_1 = _sequence(self.position_encoding_1, batch_size, h, w, device)
        pos_enc_2 = _sequence(self.position_encoding_2, batch_size, h, w, device)
        cam_features_1, enc_img_features_1, jv_features_1 = self.transformer_1(
            img_features, cam_token, jv_tokens, pos_enc_1, attention_mask=attention_mask)
        cam_features_2, _, jv_features_2 = self.transformer_2(
            self.dim_reduce_enc_img(enc_img_features_1), self.dim_reduce_enc_cam(cam_features_1),
            self.dim_reduce_dec(jv_features_1), pos_enc_2, attention_mask=attention_mask)
        pred_cam = self.cam_predictor(cam_features_2).view(batch_size, 3)
        pred_3d_coordinates = self.xyz_regressor(jv_features_2.transpose(0, 1))
        return pred_cam, pred_3d_coordinates[:, :self.num_joints], pred_3d_coordinates[:, self.num_joints:]


class FastMETRO_Body_Network(_FastMETRONetwork):
    """FastMETRO body. ``forward(images)`` -> dict ``pred_cam``, ``pred_3d_joints``, ``pred_3d_vertices_coarse``
    (431), ``pred_3d_vertices_intermediate`` (1723, the learned ``coarse2intermediate_upsample``),
    ``pred_3d_vertices_fine`` (6890: the mesh sampler, or ``intermediate2fine_upsample`` with
    ``args.use_learnable_upsample``). The optional SMPL parameter regressor is not rewritten."""

    def __init__(self, args, backbone, mesh_sampler, num_joints=14, num_vertices=431):
        if args.use_smpl_param_regressor:
            raise ValueError("args.use_smpl_param_regressor: the SMPL parameter regressor is not part of this rewrite")
        super().__init__(args, backbone, mesh_sampler, num_joints, num_vertices, "smpl")
        self.coarse2intermediate_upsample = nn.Linear(431, 1723)
        if args.use_learnable_upsample:
            self.intermediate2fine_upsample = nn.Linear(1723, 6890)

    def forward(self, images):
        pred_cam, pred_3d_joints, pred_3d_vertices_coarse = self._coarse(images)
        pred_3d_vertices_intermediate = self.coarse2intermediate_upsample(
            pred_3d_vertices_coarse.transpose(1, 2)).transpose(1, 2)
        if self.args.use_learnable_upsample:
            pred_3d_vertices_fine = self.intermediate2fine_upsample(
                pred_3d_vertices_intermediate.transpose(1, 2)).transpose(1, 2)
        else:
            pred_3d_vertices_fine = self.mesh_sampler.upsample(pred_3d_vertices_intermediate, n1=1, n2=0)
        return {"pred_cam": pred_cam, "pred_3d_joints": pred_3d_joints,
                "pred_3d_vertices_coarse": pred_3d_vertices_coarse,
                "pred_3d_vertices_intermediate": pred_3d_vertices_intermediate,
                "pred_3d_vertices_fine": pred_3d_vertices_fine}


class FastMETRO_Hand_Network(_FastMETRONetwork):
    """FastMETRO hand (MANO). ``forward(images)`` -> dict ``pred_cam``, ``pred_3d_joints`` (21),
    ``pred_3d_vertices_coarse`` (195), ``pred_3d_vertices_fine`` (778, one ``mesh_sampler.upsample``)."""

    def __init__(self, args, backbone, mesh_sampler, num_joints=21, num_vertices=195):
        super().__init__(args, backbone, mesh_sampler, num_joints, num_vertices, "mano")

    def forward(self, images):
        pred_cam, pred_3d_joints, pred_3d_vertices_coarse = self._coarse(images)
        return {"pred_cam": pred_cam, "pred_3d_joints": pred_3d_joints,
                "pred_3d_vertices_coarse": pred_3d_vertices_coarse,
                "pred_3d_vertices_fine": self.mesh_sampler.upsample(pred_3d_vertices_coarse)}


# ----------------------------------------------------------------------------------------------
# METRO's BERT (pytorch_transformers 1.x as METRO vendors it, with METRO's stages)
# ----------------------------------------------------------------------------------------------
class BertConfig:
    """bert-base-uncased's config, the one METRO loads and then edits per stage."""

    def __init__(self, **overrides):
        self.vocab_size = 30522
        self.hidden_size = 768
        self.num_hidden_layers = 12
        self.num_attention_heads = 12
        self.intermediate_size = 3072
        self.hidden_dropout_prob = 0.1
        self.attention_probs_dropout_prob = 0.1
        self.max_position_embeddings = 512
        self.type_vocab_size = 2
        self.initializer_range = 0.02
        self.layer_norm_eps = 1e-12
        self.output_attentions = False
        self.output_hidden_states = False
        self.__dict__.update(overrides)


def _gelu(x):  # BERT's exact (erf) GELU
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
                             f"({config.num_attention_heads})")
        self.output_attentions = config.output_attentions
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def transpose_for_scores(self, x):  # [B, L, E] -> [B, heads, L, d]
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask, head_mask=None):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size) + attention_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        if head_mask is not None:
            probs = probs * head_mask
        context = (probs @ v).permute(0, 2, 1, 3).contiguous()
        context = context.view(*context.shape[:-2], self.all_head_size)
        return (context, probs) if self.output_attentions else (context,)


class BertSelfOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + input)``; ``BertOutput`` is the same from the intermediate width."""

    def __init__(self, config, width_in=None):
        super().__init__()
        self.dense = nn.Linear(width_in or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config, config.intermediate_size)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, input_tensor, attention_mask, head_mask=None):
        self_outputs = self.self(input_tensor, attention_mask, head_mask)
        return (self.output(self_outputs[0], input_tensor),) + self_outputs[1:]


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _gelu

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask, head_mask=None):
        attention_outputs = self.attention(hidden_states, attention_mask, head_mask)
        layer_output = self.output(self.intermediate(attention_outputs[0]), attention_outputs[0])
        return (layer_output,) + attention_outputs[1:]


class BertEncoder(nn.Module):
    """-> ``(last hidden state,)`` + ``(all hidden states,)`` if ``output_hidden_states`` + ``(all attention
    probabilities,)`` if ``output_attentions``; the hidden states are the input and every layer's output."""

    def __init__(self, config):
        super().__init__()
        self.output_attentions = config.output_attentions
        self.output_hidden_states = config.output_hidden_states
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask, head_mask=None):
        head_mask = head_mask if head_mask is not None else [None] * len(self.layer)
        all_hidden_states, all_attentions = (), ()
        for i, layer in enumerate(self.layer):
            if self.output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_outputs = layer(hidden_states, attention_mask, head_mask[i])
            hidden_states = layer_outputs[0]
            if self.output_attentions:
                all_attentions += (layer_outputs[1],)
        outputs = (hidden_states,)
        if self.output_hidden_states:
            outputs += (all_hidden_states + (hidden_states,),)
        if self.output_attentions:
            outputs += (all_attentions,)
        return outputs


class BertEmbeddings(nn.Module):
    """BERT's word embeddings: built (they are in released checkpoints) but never called by METRO."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x + self.token_type_embeddings(token_type_ids)))


class BertPooler(nn.Module):  # built, never called by METRO
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


def _init_bert_weights(module, config):
    """BertPreTrainedModel.init_weights: N(0, 0.02) linears and embeddings, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, config.initializer_range)
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class METRO_Encoder(nn.Module):
    """``img_embedding(img_feats) + position_embeddings``, dropout, the BERT encoder with an all-ones mask
    (additive zeros). Returns the encoder's tuple."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.img_dim = config.img_feature_dim
        self.use_img_layernorm = getattr(config, "use_img_layernorm", None)
        self.img_embedding = nn.Linear(self.img_dim, config.hidden_size, bias=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if self.use_img_layernorm:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.img_layer_norm_eps)
        self.apply(lambda m: _init_bert_weights(m, config))

    def forward(self, img_feats, input_ids=None, token_type_ids=None, attention_mask=None, position_ids=None,
                head_mask=None):
        batch_size, seq_length = img_feats.shape[:2]
        device = img_feats.device  # the release makes input_ids with .cuda()
        if position_ids is None:
            position_ids = torch.arange(seq_length, dtype=torch.long, device=device).expand(batch_size, -1)
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_length, dtype=torch.long, device=device)
        if attention_mask.dim() == 2:
            extended_attention_mask = attention_mask[:, None, None, :]
        elif attention_mask.dim() == 3:
            extended_attention_mask = attention_mask[:, None]
        else:
            raise ValueError(f"attention_mask must be [B, L] or [B, L, L], got {list(attention_mask.shape)}")
        extended_attention_mask = extended_attention_mask.to(dtype=next(self.parameters()).dtype)
        extended_attention_mask = (1.0 - extended_attention_mask) * -10000.0
        embeddings = self.position_embeddings(position_ids) + self.img_embedding(img_feats)
        if self.use_img_layernorm:
            embeddings = self.LayerNorm(embeddings)
        return self.encoder(self.dropout(embeddings), extended_attention_mask, head_mask=head_mask)


class METRO(nn.Module):
    """One ``trans_encoder`` stage: ``cls_head(bert(x)) + residual(x)``, img_feature_dim -> output_feature_dim.
    Returns that tensor, or with ``config.output_attentions`` and ``output_hidden_states`` the tuple
    ``(it, all hidden states, all attention probabilities)``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = METRO_Encoder(config)
        self.cls_head = nn.Linear(config.hidden_size, config.output_feature_dim)
        self.residual = nn.Linear(config.img_feature_dim, config.output_feature_dim)
        self.apply(lambda m: _init_bert_weights(m, config))

    def forward(self, img_feats, input_ids=None, token_type_ids=None, attention_mask=None, masked_lm_labels=None,
                next_sentence_label=None, position_ids=None, head_mask=None):
        predictions = self.bert(img_feats=img_feats, input_ids=input_ids, position_ids=position_ids,
                                token_type_ids=token_type_ids, attention_mask=attention_mask, head_mask=head_mask)
        pred_score = self.cls_head(predictions[0]) + self.residual(img_feats)
        if self.config.output_attentions and self.config.output_hidden_states:
            return pred_score, predictions[1], predictions[-1]
        return pred_score


def build_trans_encoder(args, base_config=None):
    """What METRO's / TORE-METRO's run scripts build: one ``METRO`` stage per width of ``args.input_feat_dim``
    (outputs: the next width, 3 for the last), then the last stage switched to return its hidden states and
    attentions. ``base_config`` stands for ``BertConfig.from_pretrained(bert-base-uncased)`` (tiny tests pass a
    small ``intermediate_size`` / ``vocab_size``). -> ``(config of the last stage, nn.Sequential)``; the network
    takes that config, as the scripts pass it."""
    base_config = base_config or BertConfig()
    input_feat_dim = [int(d) for d in args.input_feat_dim.split(",")]
    hidden_feat_dim = [int(d) for d in args.hidden_feat_dim.split(",")]
    output_feat_dim = input_feat_dim[1:] + [3]
    stages = []
    for i, out_dim in enumerate(output_feat_dim):
        config = copy.copy(base_config)
        config.output_attentions = False
        config.hidden_dropout_prob = args.drop_out
        config.img_feature_dim = input_feat_dim[i]
        config.output_feature_dim = out_dim
        config.hidden_size = hidden_feat_dim[i]
        # legacy setting: bert-base's intermediate size (3072) in every stage; else 4 x hidden
        config.intermediate_size = base_config.intermediate_size if args.legacy_setting else 4 * hidden_feat_dim[i]
        config.num_hidden_layers = args.num_hidden_layers
        config.num_attention_heads = args.num_attention_heads
        stages.append(METRO(config))
    last = stages[-1]
    last.config.output_attentions = last.config.output_hidden_states = True
    last.bert.encoder.output_attentions = last.bert.encoder.output_hidden_states = True
    for layer in last.bert.encoder.layer:
        layer.attention.self.output_attentions = True
    return last.config, nn.Sequential(*stages)


# ----------------------------------------------------------------------------------------------
# TORE-METRO and METRO
# ----------------------------------------------------------------------------------------------
def _template(smpl, device):
    """METRO's T-pose template (root rotated by pi: the mesh upright) -> (vertices [1, 6890, 3], h36m joints)."""
    template_pose = torch.zeros((1, 72))
    template_pose[:, 0] = 3.1416
    template_vertices = smpl(template_pose.to(device), torch.zeros((1, 10)).to(device))
    return template_vertices, smpl.get_h36m_joints(template_vertices)


class _METRONetwork(nn.Module):
    """What METRO's and TORE-METRO's networks share (the releases write it twice): the backbone, ``trans_encoder``,
    the learned ``upsampling`` / ``upsampling2`` and ``conv_learn_tokens`` (one image token per encoder token)."""

    def __init__(self, args, config, backbone, trans_encoder, num_tokens):
        super().__init__()
        self.config = config
        self.config.device = args.device
        self.backbone = backbone
        self.trans_encoder = trans_encoder
        self.upsampling = nn.Linear(431, 1723)
        self.upsampling2 = nn.Linear(1723, 6890)
        self.conv_learn_tokens = nn.Conv1d(49, num_tokens, 1)

    def _tokens(self, images, ref_vertices, meta_masks, is_train):
        """-> ``[template xyz ; learned image token]`` per encoder token ``[B, T, 3 + 2048]``."""
        image_feat = self.backbone(images).view(images.size(0), 2048, -1).transpose(1, 2)  # [B, 49, 2048]
        features = torch.cat([ref_vertices, self.conv_learn_tokens(image_feat)], dim=2)
        if is_train:  # masked vertex / joint modelling: masked tokens become a constant 0.01 vector
            features = features * meta_masks + torch.ones_like(features) * 0.01 * (1 - meta_masks)
        return features


class ToreMETRO_Body_Network(_METRONetwork):
    """TORE-METRO: METRO's ``trans_encoder`` over 14 joint tokens, then the NSR ``transformer_3`` decoding 431
    vertex tokens (mask ``attention_mask_3``) over its last hidden states, learned ``upsampling`` /
    ``upsampling2``. ``forward(images, smpl, mesh_sampler, meta_masks=None, is_train=False)`` ->
    ``(cam [B, 3], joints [B, 14, 3], vertices [B, 431, 3], [B, 1723, 3], [B, 6890, 3])``."""

    def __init__(self, args, config, backbone, trans_encoder, mesh_sampler):
        super().__init__(args, config, backbone, trans_encoder, 14)
        self.num_joints = 14
        layers = _num_layers(args.model_name_3, "_")
        last_hidden = int(args.hidden_feat_dim.split(",")[-1])
        self.transformer_config_3 = {"model_dim": last_hidden, "dropout": args.transformer_dropout_3,
                                     "nhead": args.transformer_nhead_3, "feedforward_dim": args.feedforward_dim_3,
                                     "num_enc_layers": layers, "num_dec_layers": layers, "pos_type": args.pos_type_3}
        self.cam_token_embed = nn.Embedding(1, last_hidden)
        self.vertex_token_embed = nn.Embedding(431, last_hidden)
        self.transformer_3 = build_transformer(self.transformer_config_3)
        self.position_encoding_3 = build_position_encoding(pos_type=args.pos_type_3, hidden_dim=last_hidden)
        self.cam_predictor = nn.Linear(last_hidden, 3)
        self.xyz_regressor_v = nn.Linear(last_hidden, 3)
        self.attention_mask_3 = attention_mask("smpl")  # a plain attribute, as released

    def forward(self, images, smpl, mesh_sampler, meta_masks=None, is_train=False):
        batch_size = images.size(0)
        template_vertices, template_3d_joints = _template(smpl, self.config.device)
        template_pelvis = template_3d_joints[:, H36M_PELVIS, :]
        template_3d_joints = template_3d_joints[:, list(H36M_J17_TO_J14), :] - template_pelvis[:, None, :]
        ref_vertices = template_3d_joints.expand(batch_size, -1, -1)
        features = self._tokens(images, ref_vertices, meta_masks, is_train)  # [B, 14, 2051]
        if not self.config.output_attentions:
            raise ValueError("TORE-METRO reads the last trans_encoder stage's hidden states: "
                             "config.output_attentions must be True (build_trans_encoder sets it)")
        features, hidden_states, att = self.trans_encoder(features)
        joint_feature_2 = hidden_states[-1].permute(1, 0, 2)  # [14, B, E]

        cam_token = _per_sample(self.cam_token_embed, batch_size)
        v_tokens = _per_sample(self.vertex_token_embed, batch_size)
        v_attention_mask = self.attention_mask_3.to(images.device)
        pos_enc_3 = _sequence(self.position_encoding_3, batch_size, self.num_joints, 1, images.device)
        cam_features_3, _, v_features = self.transformer_3(joint_feature_2, cam_token, v_tokens, pos_enc_3,
                                                           attention_mask=v_attention_mask)
        pred_3d_joints = features
        pred_vertices_sub2 = self.xyz_regressor_v(v_features.transpose(0, 1)).transpose(1, 2)  # [B, 3, 431]
        cam_param = self.cam_predictor(cam_features_3).view(batch_size, 3)
        pred_vertices_sub = self.upsampling(pred_vertices_sub2)
        pred_vertices_full = self.upsampling2(pred_vertices_sub)
        return (cam_param, pred_3d_joints, pred_vertices_sub2.transpose(1, 2), pred_vertices_sub.transpose(1, 2),
                pred_vertices_full.transpose(1, 2))


class METRO_Body_Network(_METRONetwork):
    """METRO: 14 joint + 431 vertex tokens ``[template xyz ; learned image token]`` through ``trans_encoder``
    (dense self-attention), learned ``upsampling`` / ``upsampling2``, a camera head on the coarse vertices.
    ``forward(images, smpl, mesh_sampler, meta_masks=None, is_train=False)`` -> ``(cam [B, 3] (squeezed, as
    released: [3] at batch 1), joints [B, 14, 3], vertices [B, 431, 3], [B, 1723, 3], [B, 6890, 3])``, plus the
    last stage's hidden states and attentions when ``config.output_attentions`` (the run scripts set it)."""

    def __init__(self, args, config, backbone, trans_encoder, mesh_sampler):
        super().__init__(args, config, backbone, trans_encoder, 431 + 14)
        self.cam_param_fc = nn.Linear(3, 1)
        self.cam_param_fc2 = nn.Linear(431, 250)
        self.cam_param_fc3 = nn.Linear(250, 3)

    def forward(self, images, smpl, mesh_sampler, meta_masks=None, is_train=False):
        batch_size = images.size(0)
        template_vertices, template_3d_joints = _template(smpl, self.config.device)
        template_vertices_sub = mesh_sampler.downsample(template_vertices)
        template_vertices_sub2 = mesh_sampler.downsample(template_vertices_sub, n1=1, n2=2)
        template_pelvis = template_3d_joints[:, H36M_PELVIS, :]
        template_3d_joints = template_3d_joints[:, list(H36M_J17_TO_J14), :]
        num_joints = template_3d_joints.shape[1]
        template_3d_joints = template_3d_joints - template_pelvis[:, None, :]
        template_vertices_sub2 = template_vertices_sub2 - template_pelvis[:, None, :]
        ref_vertices = torch.cat([template_3d_joints, template_vertices_sub2], dim=1).expand(batch_size, -1, -1)
        features = self._tokens(images, ref_vertices, meta_masks, is_train)  # [B, 445, 2051]
        if self.config.output_attentions:
            features, hidden_states, att = self.trans_encoder(features)
        else:
            features = self.trans_encoder(features)
        pred_3d_joints = features[:, :num_joints, :]
        pred_vertices_sub2 = features[:, num_joints:, :]
        x = self.cam_param_fc(pred_vertices_sub2).transpose(1, 2)  # [B, 1, 431]
        cam_param = self.cam_param_fc3(self.cam_param_fc2(x)).transpose(1, 2).squeeze()
        pred_vertices_sub = self.upsampling(pred_vertices_sub2.transpose(1, 2))
        pred_vertices_full = self.upsampling2(pred_vertices_sub)
        out = (cam_param, pred_3d_joints, pred_vertices_sub2, pred_vertices_sub.transpose(1, 2),
               pred_vertices_full.transpose(1, 2))
        return out + (hidden_states, att) if self.config.output_attentions else out


# ----------------------------------------------------------------------------------------------
# builders: the networks as the run scripts assemble them
# ----------------------------------------------------------------------------------------------
def build_tore_fastmetro(tiny=False, backbone=None, **args_overrides):
    """TORE-FastMETRO as ``run_tore_fm_bodymesh.py`` builds it (``args_overrides``: model_name, keep_ratio, arch
    ...); ``backbone`` defaults to ``backbone_for(args, tiny)``."""
    args = tore_fastmetro_args(**{**(TINY_TORE_FASTMETRO if tiny else {}), **args_overrides})
    return ToreFastMETRO_Body_Network(args, backbone or backbone_for(args, tiny), mesh_sampler("smpl"))


def build_fastmetro(hand=False, tiny=False, backbone=None, **args_overrides):
    args = fastmetro_args(**{**(TINY_FASTMETRO if tiny else {}), **args_overrides})
    cls, body = (FastMETRO_Hand_Network, "mano") if hand else (FastMETRO_Body_Network, "smpl")
    return cls(args, backbone or backbone_for(args, tiny), mesh_sampler(body))


def build_metro(tore=True, tiny=False, backbone=None, base_config=None, **args_overrides):
    """TORE-METRO (``tore=True``) or METRO as their run scripts build them; tiny uses ``TINY_METRO`` and a BERT
    config with a 64-wide intermediate layer and an 8-word vocabulary. The sampler and a ``TemplateSMPL`` are
    forward arguments: ``model(images, TemplateSMPL(), mesh_sampler("smpl"))``."""
    args = metro_args(**{**(TINY_METRO if tiny else {}), **args_overrides})
    if base_config is None and tiny:
        base_config = BertConfig(intermediate_size=64, vocab_size=8)
    config, trans_encoder = build_trans_encoder(args, base_config)
    cls = ToreMETRO_Body_Network if tore else METRO_Body_Network
    backbone = backbone or small_backbone(2048, stride=8 if tiny else 32)
    return cls(args, config, backbone, trans_encoder, mesh_sampler("smpl"))


def nontrivial_norms(model, seed=0):
    """Random LayerNorm affines and BatchNorm statistics, so that a swapped or skipped norm shows in the outputs
    (default initialisation makes them near identities). In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model
