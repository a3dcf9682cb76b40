"""Swap tore-kernels into an existing TORE / FastMETRO model, in place, and undo it.

``patch(model)`` recognises the model by structure (attribute names and module types, tore-model.md), never by
class name, so models built by the released code are recognised as well as ``tore_reference``'s:

* TORE-FastMETRO with ITP and GTR: ``transformer_1/2/3`` + ``token_selector_conv2d``, ``token_selector_fc``,
  ``layer_norm`` (the inline Image Token Pruner) + ``mesh_sampler``;
* TORE-FastMETRO with GTR only: ``transformer_1/2/3`` without the token selector;
* the original FastMETRO: ``transformer_1/2`` decoding joint + vertex tokens under a ``[J+V, J+V]`` mask;
* TORE-METRO: ``transformer_3`` (the NSR, ``[V, V]`` mask) without ``transformer_1/2``, after METRO's
  ``trans_encoder`` (a BERT encoder without ``nn.MultiheadAttention``: left as it is).

What is swapped:

* every ``nn.MultiheadAttention`` of the transformers becomes an
  :class:`~tore_kernels.nn.attention.AdjacencyMultiheadAttention` sharing the very same parameter objects
  (so ``state_dict`` keys and values, optimisers and DDP buckets are unchanged). The decoder self-attentions
  that receive the mesh mask run the neighbour-list kernel; every one of them skips the head-averaged weights
  the released layers compute and discard (``[0]`` of the result), which lets PyTorch take its fused SDPA path;
* ``mesh_sampler`` becomes a batched :class:`~tore_kernels.nn.mesh.MeshSampler` over the same matrices;
* for the ITP model, the instance's class is replaced by a subclass (same name) whose ``forward`` runs the fused
  :func:`~tore_kernels.ops.itp.image_token_prune` and otherwise calls the model's own submodules, returning what
  the released forward returns. A per-instance class rather than a bound method, so that ``nn.DataParallel``
  replicas (which copy ``__dict__``) call their own submodules, and pickling / ``copy.deepcopy`` keep working.
  That forward passes the camera, joint and vertex token embeddings broadcast over the batch (stride 0);
* every ``transformer_i`` and its encoder / decoder layers get an eval-mode forward (same way; training runs the
  released code): no all-False key-padding masks or all-zero ``query_pos`` (no-ops that cost a mask merge per
  attention call and two additions per decoder layer), dense attention as SDPA on views of the in-projection
  with the output projected in place, in-place ReLU and residual additions (without autograd), and for queries
  broadcast over the batch the self-attention block and the cross-attention's query projection computed once;
* every ``nn.Linear`` (same way) and the attention projections run, in inference on CPU, oneDNN's linear on a
  weight packed once per parameter version and cached outside the model (:mod:`tore_kernels.ops.linear`), with
  the MLP's ReLU fused.

``patch(model, dtype=torch.bfloat16)`` (opt-in) also runs the forward under bf16 autocast: linears, convs and
attention in bf16 with cached bf16 (packed) weight copies; LayerNorm, the residual stream, the fused ITP, the
output heads (``_FP32_HEADS``) and the mesh upsampling in fp32; outputs fp32; parameters and ``state_dict``
untouched.

``patch`` validates everything and builds every replacement before touching the model (all-or-nothing), is
idempotent, and stores a :class:`PatchReport` on the model (``patch_report(model)``; ``verbose=True`` also logs
it). ``unpatch`` puts the original objects back. ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers are
seen through (``.module``); the wrapper is returned as given.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .nn.attention import AdjacencyMultiheadAttention, few_keys_table
from .nn.mesh import MeshSampler
from .ops.itp import image_token_prune
from .ops.linear import derived_weight, drop_derived, linear

__all__ = ["PatchReport", "patch", "unpatch", "patch_report"]

_LOG = logging.getLogger("tore_kernels")
_STATE = "_tore_kernels_patch"

_ITP_PARTS = ("token_selector_conv2d", "token_selector_fc", "layer_norm")
# what the fused ITP forward reads from the model besides the transformers and the token selector
_ITP_FORWARD_PARTS = {
    "conv_1x1": nn.Conv2d, "cam_token_embed": nn.Embedding, "joint_token_embed": nn.Embedding,
    "vertex_token_embed": nn.Embedding, "position_encoding_1": nn.Module, "position_encoding_2": nn.Module,
    "position_encoding_3": nn.Module, "dim_reduce_enc": nn.Linear, "dim_reduce_dec": nn.Linear,
    "cam_predictor": nn.Linear, "xyz_regressor_j": nn.Linear, "xyz_regressor_v": nn.Linear,
}
# the released pre-norm layers (their eval forward is replaced by one without no-op masks and copies)
_ENCODER_LAYER_PARTS = ("norm1", "norm2", "self_attn", "linear1", "linear2", "dropout", "dropout1", "dropout2")
_DECODER_LAYER_PARTS = ("norm1", "norm2", "norm3", "self_attn", "multihead_attn", "linear1", "linear2", "dropout",
                        "dropout1", "dropout2", "dropout3")
_LOOKED_FOR = (
    "TORE-FastMETRO (ITP + GTR): transformer_1/2/3, token_selector_conv2d (Conv2d 3x3), token_selector_fc (Linear), "
    "layer_norm (LayerNorm [N, C]), " + ", ".join(_ITP_FORWARD_PARTS) + ", attention_mask, mesh_sampler; "
    "TORE-FastMETRO (GTR): transformer_1/2/3, attention_mask [V, V], mesh_sampler; "
    "FastMETRO: transformer_1/2 (no transformer_3), attention_mask [J+V, J+V], mesh_sampler; "
    "TORE-METRO: transformer_3 without transformer_1/2, trans_encoder (METRO's encoder, left as is), "
    "vertex_token_embed, attention_mask [V, V], mesh_sampler. "
    "Each transformer_i must have encoder.layers[*].self_attn and decoder.layers[*].self_attn / multihead_attn "
    "(nn.MultiheadAttention); mesh_sampler must have _U and _D lists of sparse matrices")


@dataclass(frozen=True)
class PatchReport:
    """What ``patch`` recognised and swapped; ``str(report)`` is a short human-readable summary."""
    model: str
    swapped: tuple[tuple[str, str, str], ...] = field(default=())  # (attribute path, old type, new type)

    def __str__(self):
        counts: dict[str, list] = {}
        for path, old, new in self.swapped:
            # one line per attention role of a transformer: "transformer_3.decoder.self_attn (x3 layers)"
            key = f"{re.sub(r'[.]layers[.][0-9]+', '', path)}: {old} -> {new}"
            counts.setdefault(key, []).append(path)
        lines = [f"tore_kernels.patch: {self.model}"]
        lines += [f"  {key}" + (f" (x{len(paths)} layers)" if ".layers." in paths[0] else "")
                  for key, paths in counts.items()]
        return "\n".join(lines)


@dataclass
class _State:
    report: PatchReport
    originals: list  # (parent module or model, attribute name or "__class__", original object or class)
    bf16: bool = False


# ----------------------------------------------------------------------------------------------
# recognition (no side effects)
# ----------------------------------------------------------------------------------------------
def _unwrap(model):
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _attention_slots(model, name, problems):
    """[(path, parent, attribute, mha, is decoder self-attention)] of transformer ``name`` (problems noted)."""
    t = getattr(model, name, None)
    if not isinstance(t, nn.Module):
        problems.append(f"{name} missing")
        return []
    slots = []
    for part, attrs in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "multihead_attn"))):
        layers = getattr(getattr(t, part, None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            problems.append(f"{name}.{part}.layers missing or empty")
            continue
        for i, layer in enumerate(layers):
            for attr in attrs:
                mha = getattr(layer, attr, None)
                path = f"{name}.{part}.layers.{i}.{attr}"
                if not isinstance(mha, nn.MultiheadAttention):
                    problems.append(f"{path} is not an nn.MultiheadAttention")
                else:
                    slots.append((path, layer, attr, mha, part == "decoder" and attr == "self_attn"))
    return slots


def _check_mask(model, size, problems):
    mask = getattr(model, "attention_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        problems.append("attention_mask missing or not a square tensor")
    elif size is not None and mask.shape[0] != size:
        problems.append(f"attention_mask is {list(mask.shape)}, expected [{size}, {size}]")


def _recognise(model):
    """-> (kind, masked transformer names, attention slots, needs fused ITP forward) or raise ValueError."""
    problems: list[str] = []
    has_t3 = isinstance(getattr(model, "transformer_3", None), nn.Module)
    has_itp = any(isinstance(getattr(model, p, None), nn.Module) for p in _ITP_PARTS)
    # transformer_3 alone (no transformer_1/2) is the NSR after METRO's encoder
    metro = has_t3 and not any(isinstance(getattr(model, n, None), nn.Module)
                               for n in ("transformer_1", "transformer_2"))
    if metro:
        names = ("transformer_3",)
        if not isinstance(getattr(model, "trans_encoder", None), nn.Module):
            problems.append("trans_encoder (METRO's encoder) missing")
    elif has_t3:
        names = ("transformer_1", "transformer_2", "transformer_3")
    else:
        names = ("transformer_1", "transformer_2")
    slots = [s for n in names for s in _attention_slots(model, n, problems)]
    if not hasattr(getattr(model, "mesh_sampler", None), "_U") or not hasattr(model.mesh_sampler, "_D"):
        problems.append("mesh_sampler missing or without _U / _D matrices")
    vertex_embed = getattr(model, "vertex_token_embed", None)
    joint_embed = getattr(model, "joint_token_embed", None)
    if not isinstance(vertex_embed, nn.Embedding) or not (has_t3 or isinstance(joint_embed, nn.Embedding)):
        problems.append("vertex_token_embed" + ("" if has_t3 else " / joint_token_embed") + " missing")
        size = None
    else:
        size = vertex_embed.num_embeddings + (0 if has_t3 else joint_embed.num_embeddings)
    _check_mask(model, size, problems)
    if has_itp:
        kinds = {"token_selector_conv2d": nn.Conv2d, "token_selector_fc": nn.Linear, "layer_norm": nn.LayerNorm}
        for part, cls in list(kinds.items()) + list(_ITP_FORWARD_PARTS.items()):
            if not isinstance(getattr(model, part, None), cls):
                problems.append(f"{part} missing or not an {cls.__name__}")
        conv, ln = getattr(model, "token_selector_conv2d", None), getattr(model, "layer_norm", None)
        if isinstance(conv, nn.Conv2d) and (conv.kernel_size != (3, 3) or conv.padding != (1, 1)
                                            or conv.stride != (1, 1) or conv.bias is None):
            problems.append("token_selector_conv2d is not a 3x3, stride 1, padding 1 Conv2d with bias")
        if isinstance(ln, nn.LayerNorm) and (len(ln.normalized_shape) != 2 or not ln.elementwise_affine):
            problems.append("layer_norm is not an affine LayerNorm over [N, C]")
        if not has_t3 or metro:
            problems.append("transformer_1/2/3 missing (an ITP model is TORE-FastMETRO with GTR)")
    for name in names:
        for part, parts in (("encoder", _ENCODER_LAYER_PARTS), ("decoder", _DECODER_LAYER_PARTS)):
            for i, layer in enumerate(getattr(getattr(getattr(model, name, None), part, None), "layers", None) or ()):
                missing = [a for a in parts if not isinstance(getattr(layer, a, None), nn.Module)]
                if missing or not callable(getattr(layer, "activation", None)):
                    problems.append(f"{name}.{part}.layers.{i} lacks {', '.join(missing) or 'activation'}")
    if problems:
        raise ValueError(f"patch: {type(model).__name__} is not a recognised model structure. Looked for: "
                         f"{_LOOKED_FOR}. Found problems: {'; '.join(problems)}")
    if metro:
        return "TORE-METRO", ("transformer_3",), slots, False
    if has_t3:
        kind = "TORE-FastMETRO (ITP + GTR)" if has_itp else "TORE-FastMETRO (GTR)"
        return kind, ("transformer_3",), slots, has_itp
    return "FastMETRO", ("transformer_1", "transformer_2"), slots, False


def _adjacency_attention(mha):
    """An AdjacencyMultiheadAttention that holds ``mha``'s own Parameter objects and out_proj module."""
    new = AdjacencyMultiheadAttention.from_module(mha, skip_unused_weights=True)
    for name, p in mha._parameters.items():
        new._parameters[name] = p
    new._modules["out_proj"] = mha.out_proj
    return new


# ----------------------------------------------------------------------------------------------
# the fused forward of TORE-FastMETRO with ITP
# ----------------------------------------------------------------------------------------------
def _sequence(encoding, batch_size, tokens, device, dtype):
    """The released call ``encoding(bs, h, w, device) -> [B, E, h, w]``, as a ``[h, B, E]`` sequence."""
    return encoding(batch_size, tokens, 1, device).flatten(2).permute(2, 0, 1).to(dtype)


def _broadcast_embedding(embedding, batch_size):
    return embedding.weight.unsqueeze(1).expand(-1, batch_size, -1)  # [L, B, E], stride 0 over B


def _fused_itp_forward(self, features):
    """The released TORE-FastMETRO forward after the backbone, with the inline ITP fused.
    ``features [B, C, H, W]`` -> ``(cam [B, 3], joints [B, J, 3], coarse [B, V, 3], mid, fine, heatmap [B, N, HW])``."""
    if not isinstance(features, torch.Tensor) or features.dim() != 4 \
            or features.shape[1] != self.conv_1x1.in_channels or not features.is_floating_point():
        raise ValueError(f"features must be a float [B, {self.conv_1x1.in_channels}, H, W] tensor, got "
                         f"{getattr(features, 'dtype', type(features).__name__)} "
                         f"{list(getattr(features, 'shape', []))}")
    batch_size = features.shape[0]
    dtype, device = features.dtype, features.device
    conv, fc, ln = self.token_selector_conv2d, self.token_selector_fc, self.layer_norm
    img_features = self.conv_1x1(features)
    with torch.autocast(device.type, enabled=False):  # under patch(dtype=bf16) too: the fused ITP runs in fp32
        img_tokens, token_heatmap = image_token_prune(img_features.to(dtype), conv.weight, conv.bias, fc.weight,
                                                      fc.bias, ln.weight, ln.bias, eps=ln.eps,
                                                      seq_first=True)  # [N, B, E1]
    n = img_tokens.shape[0]
    pos_1 = _sequence(self.position_encoding_1, batch_size, n, device, dtype)
    pos_2 = _sequence(self.position_encoding_2, batch_size, n, device, dtype)
    # the token embeddings broadcast, not repeated: the first decoder layers share their work over the batch
    cam_1, enc_img_1, j_1 = self.transformer_1(img_tokens, _broadcast_embedding(self.cam_token_embed, batch_size),
                                               _broadcast_embedding(self.joint_token_embed, batch_size), pos_1,
                                               attention_mask=None)
    cam_2, _, j_2 = self.transformer_2(self.dim_reduce_enc(enc_img_1), self.dim_reduce_enc(cam_1),
                                       self.dim_reduce_dec(j_1), pos_2, attention_mask=None)
    cam_parameter = self.cam_predictor(cam_2).view(batch_size, 3)
    pos_3 = _sequence(self.position_encoding_3, batch_size, j_2.shape[0], device, dtype)
    v_tokens = _broadcast_embedding(self.vertex_token_embed, batch_size)
    _, _, v_features = self.transformer_3(j_2, cam_2, v_tokens, pos_3,
                                          attention_mask=self.attention_mask)
    # the regressors on the sequence-first features (a row-wise map), then the small outputs transposed
    joints = self.xyz_regressor_j(j_2).transpose(0, 1)
    coarse = self.xyz_regressor_v(v_features).transpose(0, 1)
    mid = self.mesh_sampler.upsample(coarse, n1=2, n2=1)
    fine = self.mesh_sampler.upsample(mid, n1=1, n2=0)
    return cam_parameter, joints, coarse, mid, fine, token_heatmap


def _broadcast(x):
    """True when ``x [L, B, E]`` is one sample broadcast over the batch (a stride-0 batch axis)."""
    return x.dim() == 3 and x.shape[1] > 1 and x.stride(1) == 0


def _linear(x, weight, bias, rows=None):
    """:func:`~tore_kernels.ops.linear.linear` (packed weights in inference), once for a batch-broadcast ``x``."""
    if _broadcast(x):
        return linear(x[:, :1], weight, bias, rows=rows).expand(-1, x.shape[1], -1)
    return linear(x, weight, bias, rows=rows)


def _attend(mha, query, key, value, attn_mask=None):
    """``mha(query, key, value, attn_mask=attn_mask)[0]`` in eval mode. Masked calls go to the module (the
    neighbour-list kernel). Dense ones run SDPA on views of the in-projection (packed when inputs coincide; once for
    a batch-broadcast query) and out-project the ``[L, B, H, d]`` result as it is: no mask merging, no head-averaged
    weights, no copies. On CPU, at most ``OPEN_TABLE_MAX_KEYS`` keys run the kernel with every key shared instead,
    out-projected in the same op. Returns ``[L, B, E]``."""
    if attn_mask is not None or mha.training or not mha._qkv_same_embed_dim or mha.bias_k is not None \
            or mha.add_zero_attn or mha.batch_first or mha.in_proj_bias is None:
        return mha(query, key, value=value, attn_mask=attn_mask)[0]
    E, H = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if query is key and key is value:
        q, k, v = _linear(query, w, b).unflatten(-1, (3, H, -1)).unbind(-3)
    else:
        q = _linear(query, w, b, rows=(0, E)).unflatten(-1, (H, -1))
        if key is value:
            k, v = _linear(key, w, b, rows=(E, 3 * E)).unflatten(-1, (2, H, -1)).unbind(-3)
        else:
            k = _linear(key, w, b, rows=(E, 2 * E)).unflatten(-1, (H, -1))
            v = _linear(value, w, b, rows=(2 * E, 3 * E)).unflatten(-1, (H, -1))
    if q.shape[1] != k.shape[1]:  # a broadcast query over per-sample keys
        q = q.expand(-1, k.shape[1], -1, -1)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, L|S, d] views
    table = few_keys_table(q.shape[2], k.shape[2], q.dtype, q.device)
    if table is not None and isinstance(mha, AdjacencyMultiheadAttention):  # the NSR's cross-attention to 14 joints
        return mha._attend_projected(q, k, v, table)[0]  # the kernel, every key shared
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, d]
    # SDPA writes in q's memory order, the projection's [L, B, H, d]: a free view (a copy for a broadcast q)
    return linear(out.permute(2, 0, 1, 3).flatten(2), mha.out_proj.weight, mha.out_proj.bias)


def _mlp(layer, x, norm):
    relu = layer.activation is F.relu  # fused into the packed linear in inference
    h = linear(norm(x), layer.linear1.weight, layer.linear1.bias, relu=relu)
    return linear(h if relu else layer.activation(h), layer.linear2.weight, layer.linear2.bias)


def _add(x, y, own):
    """``x + y``, in place when ``x`` is a tensor this forward made and autograd does not need it."""
    return x.add_(y) if own and not torch.is_grad_enabled() else x + y


def _fast_encoder_forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
    """The released pre-norm encoder layer (eval mode, no masks; otherwise the released forward runs)."""
    if self.training or src_mask is not None or src_key_padding_mask is not None:
        return type(self).__bases__[0].forward(self, src, src_mask=src_mask,
                                               src_key_padding_mask=src_key_padding_mask, pos=pos)
    y = self.norm1(src)
    q = y if pos is None else torch.cat([y[:1], y[1:] + pos], dim=0)  # the camera token gets no position
    x = src + _attend(self.self_attn, q, q, y)
    return _add(x, _mlp(self, x, self.norm2), True)


def _fast_decoder_forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                          memory_key_padding_mask=None, pos=None, query_pos=None):
    """The released pre-norm decoder layer (eval mode; otherwise the released forward runs). When its queries
    are one set of embeddings broadcast over the batch (a stride-0 batch axis: the fused forward passes the joint
    and vertex tokens so) and ``query_pos`` is the same for every sample, the self-attention block sees identical tokens in every
    sample: it runs on one and is broadcast (at batch 32 this saves 31/32 of the first layer's 431-token
    self-attention), and so does the cross-attention's query projection."""
    if (self.training or memory_mask is not None or tgt_key_padding_mask is not None
            or memory_key_padding_mask is not None):
        return type(self).__bases__[0].forward(self, tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                                               tgt_key_padding_mask=tgt_key_padding_mask,
                                               memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                                               query_pos=query_pos)
    shared = _broadcast(tgt) and (query_pos is None or torch.equal(query_pos, query_pos[:, :1].expand_as(query_pos)))
    t, qp = (tgt[:, :1], None if query_pos is None else query_pos[:, :1]) if shared else (tgt, query_pos)
    y = self.norm1(t)
    q = y if qp is None else y + qp
    t = t + _attend(self.self_attn, q, q, y, attn_mask=tgt_mask)
    query = self.norm2(t) if qp is None else self.norm2(t) + qp
    if shared:
        query, t = query.expand(-1, tgt.shape[1], -1), t.expand(-1, tgt.shape[1], -1)
    t = t + _attend(self.multihead_attn, query, memory if pos is None else memory + pos, memory)
    return _add(t, _mlp(self, t, self.norm3), True)


def _fast_transformer_forward(self, img_features, cam_token, jv_tokens, pos_embed, attention_mask=None):
    """The released ``Transformer.forward`` in eval mode without its all-False key-padding masks and all-zero
    ``query_pos`` (no-ops that cost a mask merge per attention call and two additions per decoder layer)."""
    if self.training:
        return type(self).__bases__[0].forward(self, img_features, cam_token, jv_tokens, pos_embed,
                                               attention_mask=attention_mask)
    x = torch.cat([cam_token, img_features], dim=0)
    for layer in self.encoder.layers:
        x = layer(x, pos=pos_embed)
    memory = x if self.encoder.norm is None else self.encoder.norm(x)
    cam_features, enc_img_features = memory.split([1, img_features.shape[0]], dim=0)
    t = jv_tokens
    for layer in self.decoder.layers:
        t = layer(t, enc_img_features, tgt_mask=attention_mask, pos=pos_embed)
    return cam_features, enc_img_features, t if self.decoder.norm is None else self.decoder.norm(t)


# ----------------------------------------------------------------------------------------------
# patch(model, dtype=torch.bfloat16): autocast around the model's forward
# ----------------------------------------------------------------------------------------------
# Linears whose outputs are the model's coordinates / camera (and FastMETRO's learned 431 -> 1723 upsampling
# of coordinates): cheap, and bf16's 8-bit mantissa would round every output to ~0.4 % of its value.
_FP32_HEADS = ("cam_predictor", "xyz_regressor", "xyz_regressor_j", "xyz_regressor_v", "coarse2intermediate_upsample")


def _to_fp32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype == torch.bfloat16 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_fp32(o) for o in out)
    if isinstance(out, dict):
        return type(out)((k, _to_fp32(v)) for k, v in out.items())
    return out


def _in_bf16(self, forward, args, kwargs):
    """``forward`` under bf16 autocast: linears, convs, matmuls and attention take bf16 inputs (with fp32
    accumulation in oneDNN / SDPA); LayerNorm, softmax statistics, the residual stream (fp32 + bf16 -> fp32),
    the fused ITP, the output heads and the mesh upsampling stay fp32; outputs come back as fp32."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return _to_fp32(forward(self, *args, **kwargs))


def _bf16_forward(self, *args, **kwargs):
    return _in_bf16(self, type(self).__bases__[0].forward, args, kwargs)


def _bf16_fused_itp_forward(self, *args, **kwargs):
    return _in_bf16(self, _fused_itp_forward, args, kwargs)


class _FP32MeshSampler(MeshSampler):
    """The batched sampler with autocast off: the sparse products have no bf16 kernel, and coordinates stay fp32."""

    def upsample(self, x, n1=1, n2=0):
        with torch.autocast(x.device.type, enabled=False):
            return super().upsample(x.float(), n1, n2)

    def downsample(self, x, n1=0, n2=None):
        with torch.autocast(x.device.type, enabled=False):
            return super().downsample(x.float(), n1, n2)


def _packed_linear_forward(self, input):
    return linear(input, self.weight, self.bias)


def _bf16_conv_forward(self, input):
    """Under patch(dtype=bf16)'s autocast, in inference, the conv takes a bf16 weight copy made once per version of
    the parameter (autocast would cast every weight again on every call); otherwise the weight itself."""
    weight, device = self.weight, self.weight.device.type
    if not torch.is_grad_enabled() and weight.dtype == torch.float32 and torch.is_autocast_enabled(device) \
            and torch.get_autocast_dtype(device) == torch.bfloat16:
        weight = derived_weight(weight, "bf16", lambda w: w.to(torch.bfloat16))
    return self._conv_forward(input, weight, self.bias)


def _fp32_linear_forward(self, input):
    with torch.autocast(input.device.type, enabled=False):
        return linear(input.to(self.weight.dtype), self.weight, self.bias)


_PATCHED_CLASSES: dict[tuple, type] = {}


def _rebuild_patched(original_class, forward):
    """Unpickling / deepcopy of a patched instance: an empty instance of the patched class (state follows)."""
    return object.__new__(_patched_class(original_class, forward))


def _reduce_patched(self, protocol):
    return _rebuild_patched, (type(self).__bases__[0], type(self).forward), self.__dict__


def _patched_class(cls, forward):
    """A subclass of ``cls`` (same name) with ``forward`` replaced; one per (class, forward). A per-instance class
    rather than a bound method, so that nn.DataParallel replicas (which copy ``__dict__``) call their own
    submodules; ``__reduce_ex__`` keeps pickling and deepcopy working without the class being importable."""
    key = (cls, forward)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(cls.__name__, (cls,), {
            "forward": forward, "__reduce_ex__": _reduce_patched, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__})
    return _PATCHED_CLASSES[key]


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def patch(model: nn.Module, *, dtype: torch.dtype | None = None, verbose: bool = False) -> nn.Module:
    """Swap the fused modules into ``model`` in place and return it (see the module docstring).

    ``dtype=torch.bfloat16`` (opt-in; None / torch.float32 = fp32, unchanged numerics) also runs the model's
    forward under bf16 autocast (see ``_in_bf16``): parameters and state_dict stay fp32, outputs are fp32.

    Raises TypeError if ``model`` is not an ``nn.Module``, ValueError naming what was looked for if its
    structure is not recognised (the model is then left untouched). Patching a patched model with the same
    dtype does nothing (with another dtype: ValueError, unpatch first).
    The report is ``patch_report(model)``; ``verbose=True`` also logs it at INFO on the ``tore_kernels`` logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32 or torch.bfloat16, got {dtype!r}")
    bf16 = dtype == torch.bfloat16
    inner = _unwrap(model)
    state = inner.__dict__.get(_STATE)
    if state is not None and state.bf16 != bf16:
        raise ValueError(f"dtype: the model is already patched with dtype="
                         f"{'torch.bfloat16' if state.bf16 else 'None'}; unpatch it before patching with {dtype!r}")
    if state is None:
        kind, masked, slots, fused_itp = _recognise(inner)
        if bf16:
            wrong = sorted({str(p.dtype) for p in inner.parameters()} - {"torch.float32"})
            if wrong:
                raise ValueError(f"dtype=torch.bfloat16 needs an fp32 model (it autocasts), got parameters in {wrong}")
        # build every replacement first: nothing is assigned until all of them exist
        sampler = (_FP32MeshSampler if bf16 else MeshSampler).from_sampler(inner.mesh_sampler)
        replacements = [(path, parent, attr, mha, _adjacency_attention(mha)) for path, parent, attr, mha, _ in slots]
        swapped = [(path, type(mha).__name__, "AdjacencyMultiheadAttention ("
                    + ("mesh mask" if masked_self and path.split(".")[0] in masked else "weights skipped") + ")")
                   for path, _, _, mha, masked_self in slots]
        swapped.append(("mesh_sampler", type(inner.mesh_sampler).__name__, "MeshSampler (batched)"))
        transformers = sorted({path.split(".")[0] for path, *_ in slots})
        swapped += [(f"{name}.forward", "Transformer.forward", "eval: no no-op masks / zero query_pos; layers run "
                     "SDPA on projection views, in-place ReLU and residuals, broadcast queries once")
                    for name in transformers]
        if fused_itp:
            swapped.append(("forward", "inline ITP", "fused image_token_prune, broadcast token embeddings"))
        heads = [name for name in _FP32_HEADS if isinstance(getattr(inner, name, None), nn.Linear)] if bf16 else []
        swapped.append(("Linear modules and attention projections", "F.linear", "oneDNN linear on weights packed "
                        "once per parameter version, in inference"))
        if bf16:
            swapped += [(name, "Linear", "Linear kept in fp32 under autocast") for name in heads]
            swapped.append(("Conv2d modules", "fp32 weights", "bf16 weight copies cached per parameter version "
                            "in inference"))
            swapped.append(("forward", "fp32", "bf16 autocast (LayerNorm, softmax statistics, residuals, "
                            "ITP, upsampling and outputs in fp32)"))
        state = _State(PatchReport(kind, tuple(swapped)), [], bf16)
        for _, parent, attr, mha, new in replacements:
            state.originals.append((parent, attr, mha))
            setattr(parent, attr, new)
        state.originals.append((inner, "mesh_sampler", inner.mesh_sampler))
        inner.mesh_sampler = sampler
        forwards = [(getattr(inner, name), _fp32_linear_forward) for name in heads]
        # the other linears run on packed weights in inference (bf16 ones under autocast), with bf16 the convs on
        # cached bf16 weights; the ITP's modules are read by the fused op
        keep = {id(getattr(inner, name, None)) for name in heads + list(_ITP_PARTS)}
        forwards += [(m, _packed_linear_forward if type(m) is nn.Linear else _bf16_conv_forward)
                     for m in inner.modules()
                     if (type(m) is nn.Linear or (bf16 and type(m) is nn.Conv2d)) and id(m) not in keep]
        for name in transformers:
            t = getattr(inner, name)
            forwards.append((t, _fast_transformer_forward))
            forwards += [(layer, _fast_encoder_forward) for layer in t.encoder.layers]
            forwards += [(layer, _fast_decoder_forward) for layer in t.decoder.layers]
        if fused_itp:
            forwards.append((inner, _bf16_fused_itp_forward if bf16 else _fused_itp_forward))
        elif bf16:
            forwards.append((inner, _bf16_forward))
        for obj, forward in forwards:
            state.originals.append((obj, "__class__", type(obj)))
            obj.__class__ = _patched_class(type(obj), forward)
        inner.__dict__[_STATE] = state
    if verbose:
        _LOG.info("%s", state.report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the exact objects ``patch`` replaced and return ``model``; a model that is not patched is
    returned unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = _unwrap(model)
    state = inner.__dict__.pop(_STATE, None)
    if state is not None:
        for parent, attr, original in reversed(state.originals):
            setattr(parent, attr, original)
        drop_derived(inner.parameters())  # the packed / bf16 weight copies
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of what ``patch`` swapped in ``model`` (or its ``.module``), None if it is not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = _unwrap(model).__dict__.get(_STATE)
    return None if state is None else state.report
