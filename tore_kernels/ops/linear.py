"""Inference linears with weights packed once for oneDNN, and the per-parameter cache they share with
``patch(dtype=torch.bfloat16)``'s bf16 weight copies.

On CPU, ``F.linear`` hands the plain ``[out, in]`` weight to the GEMM, which repacks it into its blocked layout
on every call; for the head's GEMMs (K = 128..2048, N = 128..2048) that costs 5-30 % of their time. oneDNN's
linear takes a weight reordered once (``torch.ops.mkldnn._reorder_linear_weight``) and fuses the bias and a
ReLU. The packed copy is derived data: it lives outside the module (no state_dict change), is rebuilt when the
parameter changes (its version counter or storage), and dies with the parameter or with ``unpatch`` (it doubles
the memory of the linears' weights meanwhile). It is used only where autograd does not need the linear (no grad
mode, or no input requiring grad): training runs ``F.linear`` unchanged. Under ``torch.compile`` it is
``F.linear`` too: inductor packs the weights itself (``torch._inductor.config.freezing``), and the packed copy is
not a graph constant it could trace. bf16 weights are packed only where the CPU computes bf16 natively
(:func:`bf16_native`): elsewhere oneDNN refuses to pack them.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# the one predicate (backend's), looked up here by linear and patch(dtype=bf16) so that tests can fake it
from ..backend import bf16_native  # noqa: F401

# private ops (inductor's CPU linear fusion uses them): without them every call is F.linear
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_DERIVED: dict[tuple[int, str], tuple] = {}  # (id(parameter), tag) -> (weakref, (version, data_ptr), tensor)


def derived_weight(weight: torch.Tensor, tag: str, make, depends=()):
    """``make(weight.detach())``, computed once per version of ``weight`` (and of each tensor in ``depends``, which
    ``make`` also reads: e.g. the BatchNorm folded into a conv) and cached under ``tag``. The result is a normal
    tensor even when first built under ``torch.inference_mode`` (a later training step may use it).
    Under torch.compile it runs outside the graph (a cache keyed on identities would recompile per parameter)."""
    if torch.compiler.is_compiling():
        return _derived_weight_untraced(weight, tag, make, depends)
    key, i = tuple((t._version, t.data_ptr()) for t in (weight, *depends)), id(weight)
    hit = _DERIVED.get((i, tag))
    if hit is None or hit[0]() is not weight or hit[1] != key:
        ref = weakref.ref(weight, lambda _, k=(i, tag): _DERIVED.pop(k, None))  # dropped with the parameter
        with torch.inference_mode(False), torch.no_grad():
            hit = _DERIVED[(i, tag)] = (ref, key, make(weight.detach()))
    return hit[2]


_derived_weight_untraced = torch.compiler.disable(derived_weight)


def drop_derived(tensors) -> None:
    """Forget the cached derived copies of ``tensors`` (e.g. a model's parameters after ``unpatch``)."""
    live = {id(t): t for t in tensors}
    for key, hit in list(_DERIVED.items()):
        if key[0] in live and hit[0]() is live[key[0]]:
            _DERIVED.pop(key, None)


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 2
            and x.shape[-1] == weight.shape[1] and weight.dtype in (torch.float32, torch.bfloat16)
            and x.dtype in (torch.float32, torch.bfloat16)
            and (x.dtype == weight.dtype or _bf16_autocast()) and (bias is None or bias.dtype == weight.dtype)
            and _ONEDNN and torch.backends.mkldnn.enabled and not x.is_mkldnn and not torch.compiler.is_compiling()
            and ((weight.dtype != torch.bfloat16 and not _bf16_autocast()) or bf16_native())
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           rows: tuple[int, int] | None = None, relu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight[lo:hi], bias[lo:hi])`` (``rows=(lo, hi)``, default all), then ReLU when ``relu``.

    In inference on CPU it runs oneDNN's linear on a packed copy of the weight rows cached per parameter version:
    fp32, or bf16 under CPU bf16 autocast (as F.linear would: bf16 inputs and output, fp32 accumulation).
    Otherwise (training, other devices, no oneDNN) it is ``F.linear``."""
    lo, hi = (0, weight.shape[0]) if rows is None else rows
    if _packable(x, weight, bias):
        dtype = torch.bfloat16 if _bf16_autocast() else weight.dtype
        tag = f"onednn:{dtype}:{lo}:{hi}"
        packed = derived_weight(weight, tag, lambda w: torch.ops.mkldnn._reorder_linear_weight(
            w[lo:hi].to(dtype).contiguous()))
        if bias is not None:
            bias = bias[lo:hi] if bias.dtype == dtype else derived_weight(bias, f"{dtype}:{lo}:{hi}",
                                                                          lambda b: b[lo:hi].to(dtype))
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "relu" if relu else "none", [], "")
    y = F.linear(x, weight if rows is None else weight[lo:hi],
                 bias if rows is None or bias is None else bias[lo:hi])
    return F.relu(y) if relu else y
