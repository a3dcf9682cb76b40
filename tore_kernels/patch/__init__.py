"""Swap tore-kernels into an existing TORE / FastMETRO model, in place, and undo it.

``patch(model)`` recognises the model by structure (attribute names and module types, tore-model.md), never by
class name, so models built by the released code are recognised as well as ``tore_reference``'s:

* TORE-FastMETRO with ITP and GTR: ``transformer_1/2/3`` + ``token_selector_conv2d``, ``token_selector_fc``,
  ``layer_norm`` (the inline Image Token Pruner) + ``mesh_sampler``;
* TORE-FastMETRO with GTR only: ``transformer_1/2/3`` without the token selector;
* the original FastMETRO: ``transformer_1/2`` decoding joint + vertex tokens under a ``[J+V, J+V]`` mask;
* TORE-METRO: ``transformer_3`` (the NSR; its mask is whatever the forward passes, ``attention_mask_3`` in the
  release) without ``transformer_1/2``, after METRO's ``trans_encoder`` (BERT encoders);
* METRO: ``trans_encoder`` (BERT encoders over 14 joint + 431 vertex tokens) and no ``transformer_i``.

Each family is a module of :mod:`tore_kernels.patch.families` (recognise + plan its swaps); the layer forwards
they install are in :mod:`tore_kernels.patch.layers`, the bf16 parts in :mod:`tore_kernels.patch.bf16`, and a
model's ``backbone`` gets :func:`tore_kernels.patch.backbone.backbone_forwards` where that module exists.

What is swapped:

* every ``nn.MultiheadAttention`` of the transformers becomes an
  :class:`~tore_kernels.nn.attention.AdjacencyMultiheadAttention` sharing the very same parameter objects
  (so ``state_dict`` keys and values, optimisers and DDP buckets are unchanged). The decoder self-attentions
  that receive the mesh mask run the neighbour-list kernel; every one of them skips the head-averaged weights
  the released layers compute and discard (``[0]`` of the result), which lets PyTorch take its fused SDPA path;
* ``mesh_sampler`` becomes a batched :class:`~tore_kernels.nn.mesh.MeshSampler` over the same matrices;
* for the ITP model, the instance's class is replaced by a subclass (same name) whose ``forward(images)`` calls
  the model's backbone (as the release does), runs the fused :func:`~tore_kernels.ops.itp.image_token_prune` and
  otherwise the model's own submodules, returning what the released forward returns. A per-instance class
  rather than a bound method, so that ``nn.DataParallel`` replicas (which copy ``__dict__``) call their own
  submodules, and pickling / ``copy.deepcopy`` keep working.
  That forward passes the camera, joint and vertex token embeddings broadcast over the batch (stride 0);
* every ``transformer_i`` and its encoder / decoder layers get an eval-mode forward (same way; training runs the
  released code): no all-False key-padding masks or all-zero ``query_pos`` (no-ops that cost a mask merge per
  attention call and two additions per decoder layer), dense attention as SDPA on views of the in-projection
  with the output projected in place, in-place ReLU and residual additions (without autograd), and for queries
  broadcast over the batch the self-attention block and the cross-attention's query projection computed once;
* METRO's BERT self-attentions (both METRO families) run as one SDPA call where that is exact (eval, no
  head_mask, no attention probabilities);
* every ``nn.Linear`` (same way) and the attention projections run, in inference on CPU, a packed GEMM (MKL's or
  oneDNN's, whichever is faster on this CPU) on a weight packed once per parameter version and cached outside the
  model (:mod:`tore_kernels.ops.linear`), with the MLP's ReLU fused;
* the process's glibc malloc keeps freed blocks for reuse (:func:`tore_kernels.backend.tune_malloc`; process-wide,
  once, not undone by ``unpatch``; ``TORE_KERNELS_MALLOC=0`` leaves it alone).

``patch(model, dtype=torch.bfloat16)`` (opt-in) also runs the forward under bf16 autocast where the CPU computes
bf16 natively (:mod:`tore_kernels.patch.bf16`; elsewhere it runs fp32, warns once and says so in the report).
``patch(model, compile=True)`` (opt-in, fp32, the FastMETRO families) runs inference calls through one graph per call
signature, captured after a first eager call and compiled by inductor (:mod:`tore_kernels.patch.capture`).

``patch`` validates everything and builds every replacement before touching the model (all-or-nothing), is
idempotent, and stores a :class:`PatchReport` on the model (``patch_report(model)``; ``verbose=True`` also logs
it). ``unpatch`` puts the original objects back. ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers are
seen through (``.module``); the wrapper is returned as given.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import backend
from ..ops.linear import drop_derived
from . import bf16 as _bf16
from . import capture
from . import families
from . import layers
from .layers import RELEASED_CLASS

try:  # the backbone's fast forwards (tore_kernels/patch/backbone.py); without it the backbone is left as it is
    from .backbone import backbone_forwards
except ImportError:
    backbone_forwards = None

__all__ = ["PatchReport", "patch", "unpatch", "patch_report"]

_LOG = logging.getLogger("tore_kernels")
_STATE = "_tore_kernels_patch"


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
    bf16: bool = False  # what was asked for (dtype=torch.bfloat16), whether or not this CPU runs it
    compile: bool = False


def _unwrap(model):
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


_PATCHED_CLASSES: dict[tuple, type] = {}


def _rebuild_patched(original_class, forward):
    """Unpickling / deepcopy of a patched instance: an empty instance of the patched class (state follows)."""
    return object.__new__(_patched_class(original_class, forward))


def _reduce_patched(self, protocol):
    return _rebuild_patched, (layers.released_class(self), type(self).forward), self.__dict__


def _patched_class(cls, forward):
    """A subclass of ``cls`` (same name) with ``forward`` replaced; one per (class, forward). A per-instance class
    rather than a bound method, so that nn.DataParallel replicas (which copy ``__dict__``) call their own
    submodules; ``__reduce_ex__`` keeps pickling and deepcopy working without the class being importable;
    ``RELEASED_CLASS`` names ``cls`` (``layers.released_class``)."""
    key = (cls, forward)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(cls.__name__, (cls,), {
            "forward": forward, "__reduce_ex__": _reduce_patched, "__module__": cls.__module__, RELEASED_CLASS: cls,
            "__qualname__": cls.__qualname__})
    return _PATCHED_CLASSES[key]


def _plan(inner, bf16, backbone, compile):
    """The family's plan plus the backbone's forwards (first: a module gets one forward, the first planned)."""
    plan = families.plan(inner, bf16)
    net = inner._modules.get("backbone")
    if net is not None:
        under = {id(m) for m in net.modules()}
        if not backbone:  # opted out: nothing under model.backbone is touched
            plan.forwards = [(m, f) for m, f in plan.forwards if id(m) not in under]
        elif backbone_forwards is not None:
            extra = list(backbone_forwards(net))
            plan.forwards = extra + plan.forwards
            plan.report.append(("backbone", type(net).__name__, f"{len(extra)} eval-mode fast forwards"))
    seen, forwards = set(), []
    for m, f in plan.forwards:
        if id(m) not in seen:
            seen.add(id(m))
            forwards.append((m, f))
    plan.forwards = forwards
    forward = (plan.model_forward[1] if bf16 else plan.model_forward[0]) if plan.model_forward is not None else (
        _bf16.bf16_forward if bf16 else None)
    if compile:
        if not plan.capturable:
            raise ValueError(f"compile=True captures the forward of models that take images only (TORE-FastMETRO, "
                             f"FastMETRO); {plan.kind}'s forward takes other arguments: patch it without compile")
        forward = capture.captured(forward or type(inner).forward)
        plan.report.append(("forward", "per-op eager", "inference calls captured once per signature into one graph "
                            "compiled by inductor (compile=True)"))
    if forward is not None:
        plan.forwards.append((inner, forward))
    if bf16:
        plan.report.append(("forward", "fp32", "bf16 autocast (LayerNorm, softmax statistics, residuals, "
                            "ITP, upsampling and outputs in fp32)"))
    return plan


_ABSENT = object()  # the original of an attribute that patch adds


def _restore(originals):
    for parent, attr, original in reversed(originals):
        if original is _ABSENT:
            delattr(parent, attr)
        else:
            setattr(parent, attr, original)


def _apply(inner, plan, state):
    """Assign every swap of ``plan``, recording the originals; undone in full if any assignment fails."""
    try:
        for parent, attr, new in plan.swaps:
            state.originals.append((parent, attr, getattr(parent, attr, _ABSENT)))
            setattr(parent, attr, new)
        for obj, forward in plan.forwards:
            state.originals.append((obj, "__class__", type(obj)))
            obj.__class__ = _patched_class(type(obj), forward)
    except BaseException:
        _restore(state.originals)
        raise
    inner.__dict__[_STATE] = state


def patch(model: nn.Module, *, dtype: torch.dtype | None = None, backbone: bool = True, compile: bool = False,
          verbose: bool = False) -> nn.Module:
    """Swap the fused modules into ``model`` in place and return it (see the module docstring).

    ``dtype=torch.bfloat16`` (opt-in; None / torch.float32 = fp32, unchanged numerics) also runs the model's
    forward under bf16 autocast (see :mod:`tore_kernels.patch.bf16`): parameters and state_dict stay fp32, outputs
    are fp32. Where the CPU has no native bf16 it runs fp32 instead, with one warning (and the report says so).
    ``backbone=True`` (default) also gives ``model.backbone`` its eval-mode fast forwards
    (:mod:`tore_kernels.patch.backbone`, where present); ``backbone=False`` leaves everything under it untouched.
    ``compile=True`` (opt-in; TORE-FastMETRO and FastMETRO) runs inference calls on CPU (no grad) through one graph
    per call signature, captured and compiled by inductor on the first call of that signature (tens of seconds),
    then replayed without per-op overhead (:mod:`tore_kernels.patch.capture`).

    Raises TypeError if ``model`` is not an ``nn.Module``, ValueError naming what was looked for if its
    structure is not recognised (the model is then left untouched). Patching a patched model with the same
    dtype does nothing (with another dtype: ValueError, unpatch first).
    The report is ``patch_report(model)``; ``verbose=True`` also logs it at INFO on the ``tore_kernels`` logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32 or torch.bfloat16, got {dtype!r}")
    if not isinstance(backbone, bool):
        raise TypeError(f"backbone must be True or False, got {backbone!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile and dtype == torch.bfloat16:
        raise ValueError("compile=True runs fp32 graphs only (inductor rounds bf16 at other points than the eager "
                         "forward, so its graphs cannot be checked against it): use dtype=None with compile=True")
    bf16 = dtype == torch.bfloat16
    inner = _unwrap(model)
    state = inner.__dict__.get(_STATE)
    if state is not None and state.bf16 != bf16:
        raise ValueError(f"dtype: the model is already patched with dtype="
                         f"{'torch.bfloat16' if state.bf16 else 'None'}; unpatch it before patching with {dtype!r}")
    if state is not None and state.compile != compile:
        raise ValueError(f"compile: the model is already patched with compile={state.compile}; unpatch it before "
                         f"patching with compile={compile}")
    if state is None:
        if bf16:
            wrong = sorted({str(p.dtype) for p in inner.parameters()} - {"torch.float32"})
            if wrong:
                raise ValueError(f"dtype=torch.bfloat16 needs an fp32 model (it autocasts), got parameters in {wrong}")
        runs_bf16 = bf16 and _bf16.use_bf16()
        plan = _plan(inner, runs_bf16, backbone, compile)  # raises (model untouched) if not recognised
        if bf16 and not runs_bf16:
            warnings.warn(f"tore_kernels.patch: {_bf16.FALLBACK}", RuntimeWarning, stacklevel=2)
            plan.report.append(("forward", "dtype=torch.bfloat16", _bf16.FALLBACK))
        plan.report.append(("(process)", "glibc malloc", backend.tune_malloc()))
        state = _State(PatchReport(plan.kind, tuple(plan.report)), [], bf16, compile)
        _apply(inner, plan, state)
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
        _restore(state.originals)
        drop_derived(inner.parameters())  # the packed / bf16 weight copies
        layers.forget_invariants(inner.modules())
        capture.forget(inner)
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of what ``patch`` swapped in ``model`` (or its ``.module``), None if it is not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = _unwrap(model).__dict__.get(_STATE)
    return None if state is None else state.report
