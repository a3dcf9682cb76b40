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
  That forward passes the vertex queries broadcast over the batch, and ``transformer_3.decoder.layers[0]`` gets a
  forward (same way) that, in eval mode, computes the self-attention of those identical queries once.

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
from torch import nn

from .nn.attention import AdjacencyMultiheadAttention
from .nn.mesh import MeshSampler
from .ops.itp import image_token_prune

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
# the released pre-norm decoder layer, whose first instance in transformer_3 shares its self-attention over the batch
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
        else:
            layers = getattr(getattr(model.transformer_3, "decoder", None), "layers", None)
            layer = layers[0] if isinstance(layers, nn.ModuleList) and len(layers) else None
            missing = [a for a in _DECODER_LAYER_PARTS if not isinstance(getattr(layer, a, None), nn.Module)]
            if missing or not callable(getattr(layer, "activation", None)):
                problems.append(f"transformer_3.decoder.layers.0 lacks {', '.join(missing) or 'activation'}")
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


def _per_sample(embedding, batch_size):
    return embedding.weight.unsqueeze(1).repeat(1, batch_size, 1)


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
    img_tokens, token_heatmap = image_token_prune(self.conv_1x1(features), conv.weight, conv.bias, fc.weight, fc.bias,
                                                  ln.weight, ln.bias, eps=ln.eps, seq_first=True)  # [N, B, E1]
    n = img_tokens.shape[0]
    pos_1 = _sequence(self.position_encoding_1, batch_size, n, device, dtype)
    pos_2 = _sequence(self.position_encoding_2, batch_size, n, device, dtype)
    cam_1, enc_img_1, j_1 = self.transformer_1(img_tokens, _per_sample(self.cam_token_embed, batch_size),
                                               _per_sample(self.joint_token_embed, batch_size), pos_1,
                                               attention_mask=None)
    cam_2, _, j_2 = self.transformer_2(self.dim_reduce_enc(enc_img_1), self.dim_reduce_enc(cam_1),
                                       self.dim_reduce_dec(j_1), pos_2, attention_mask=None)
    cam_parameter = self.cam_predictor(cam_2).view(batch_size, 3)
    pos_3 = _sequence(self.position_encoding_3, batch_size, j_2.shape[0], device, dtype)
    # broadcast, not repeated: the first decoder layer sees the stride-0 batch axis and shares its self-attention
    v_tokens = self.vertex_token_embed.weight.unsqueeze(1).expand(-1, batch_size, -1)
    _, _, v_features = self.transformer_3(j_2, cam_2, v_tokens, pos_3,
                                          attention_mask=self.attention_mask)
    joints = self.xyz_regressor_j(j_2.transpose(0, 1))
    coarse = self.xyz_regressor_v(v_features.transpose(0, 1))
    mid = self.mesh_sampler.upsample(coarse, n1=2, n2=1)
    fine = self.mesh_sampler.upsample(mid, n1=1, n2=0)
    return cam_parameter, joints, coarse, mid, fine, token_heatmap


def _shared_query_decoder_forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                                  memory_key_padding_mask=None, pos=None, query_pos=None):
    """The released pre-norm decoder layer. When its queries are one set of embeddings broadcast over the batch
    (a stride-0 batch axis: the fused forward passes the vertex tokens so), ``query_pos`` is the same for every
    sample and dropout is off, the self-attention block sees identical tokens in every sample: it runs on one
    and is broadcast (at batch 32 this saves 31/32 of the first layer's 431-token self-attention)."""
    if (self.training or tgt.dim() != 3 or tgt.shape[1] < 2 or tgt.stride(1) != 0
            or tgt_key_padding_mask is not None
            or (query_pos is not None and not torch.equal(query_pos, query_pos[:, :1].expand_as(query_pos)))):
        return type(self).__bases__[0].forward(self, tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                                               tgt_key_padding_mask=tgt_key_padding_mask,
                                               memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                                               query_pos=query_pos)
    t = tgt[:, :1]
    qp = None if query_pos is None else query_pos[:, :1]
    y = self.norm1(t)
    q = k = y if qp is None else y + qp
    t = t + self.dropout1(self.self_attn(q, k, value=y, attn_mask=tgt_mask)[0])
    query = self.norm2(t) if qp is None else self.norm2(t) + qp
    y = self.multihead_attn(query=query.expand(-1, tgt.shape[1], -1), key=memory if pos is None else memory + pos,
                            value=memory, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
    tgt = t + self.dropout2(y)
    y = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
    return tgt + self.dropout3(y)


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
def patch(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Swap the fused modules into ``model`` in place and return it (see the module docstring).

    Raises TypeError if ``model`` is not an ``nn.Module``, ValueError naming what was looked for if its
    structure is not recognised (the model is then left untouched). Patching a patched model does nothing.
    The report is ``patch_report(model)``; ``verbose=True`` also logs it at INFO on the ``tore_kernels`` logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = _unwrap(model)
    state = inner.__dict__.get(_STATE)
    if state is None:
        kind, masked, slots, fused_itp = _recognise(inner)
        # build every replacement first: nothing is assigned until all of them exist
        sampler = MeshSampler.from_sampler(inner.mesh_sampler)
        replacements = [(path, parent, attr, mha, _adjacency_attention(mha)) for path, parent, attr, mha, _ in slots]
        swapped = [(path, type(mha).__name__, "AdjacencyMultiheadAttention ("
                    + ("mesh mask" if masked_self and path.split(".")[0] in masked else "weights skipped") + ")")
                   for path, _, _, mha, masked_self in slots]
        swapped.append(("mesh_sampler", type(inner.mesh_sampler).__name__, "MeshSampler (batched)"))
        if fused_itp:
            swapped.append(("transformer_3.decoder.layers.0.forward", "per-sample self-attention",
                            "self-attention of the broadcast vertex queries computed once"))
            swapped.append(("forward", "inline ITP", "fused image_token_prune"))
        state = _State(PatchReport(kind, tuple(swapped)), [])
        for _, parent, attr, mha, new in replacements:
            state.originals.append((parent, attr, mha))
            setattr(parent, attr, new)
        state.originals.append((inner, "mesh_sampler", inner.mesh_sampler))
        inner.mesh_sampler = sampler
        if fused_itp:
            for obj, forward in ((inner.transformer_3.decoder.layers[0], _shared_query_decoder_forward),
                                 (inner, _fused_itp_forward)):
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
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of what ``patch`` swapped in ``model`` (or its ``.module``), None if it is not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = _unwrap(model).__dict__.get(_STATE)
    return None if state is None else state.report
