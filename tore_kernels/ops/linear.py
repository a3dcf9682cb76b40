"""Inference linears with weights packed once, and the per-parameter cache they share with
``patch(dtype=torch.bfloat16)``'s bf16 weight copies and the backbone's folded convolutions.

On CPU, ``F.linear`` hands the plain ``[out, in]`` weight to the GEMM, which repacks it into its blocked layout
on every call; for the head's GEMMs (K = 128..2048, N = 128..2048) that costs 5-20 % of their time. In fp32,
MKL's packed GEMM (``torch.ops.mkl._mkl_linear``, what inductor's freezing uses) takes the weight packed once per
row count; without MKL (aarch64 builds) oneDNN's linear takes it reordered once; bf16 runs on oneDNN's. Small
products and single rows stay on ``F.linear``, which is faster there. The packed copy is derived data: it lives
outside the module (no state_dict change), is rebuilt when the parameter changes (its version counter or
storage), and dies with the parameter or with ``unpatch`` (one more copy of the weights per batch shape
meanwhile). It is used only where autograd does not need the linear (no grad mode, or no input requiring grad):
training runs ``F.linear`` unchanged. Under ``torch.compile`` it is ``F.linear`` too: inductor packs the weights
itself (``torch._inductor.config.freezing``), and the packed copy is not a graph constant it could trace. bf16
weights are packed only where the CPU computes bf16 natively (:func:`bf16_native`): elsewhere oneDNN refuses.
A few rows (one sample's joint tokens at batch 1: ``FEW_ROWS``) run the extension's ``few_rows_linear`` on weights
packed into 32-column panels, where oneDNN and MKL, blocked for many rows, are slower.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

# the one predicate (backend's), looked up here by linear and patch(dtype=bf16) so that tests can fake it
from .. import backend
from ..backend import bf16_native  # noqa: F401

# private ops (inductor's CPU linear fusion uses them): without them every call is F.linear
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_MKL = (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
        and hasattr(torch.ops.mkl, "_mkl_linear"))
_DERIVED: dict[tuple[int, str], tuple] = {}  # (id(parameter), tag) -> (weakref, (version, data_ptr), tensor)


def tensor_versions(tensors) -> tuple:
    """What a cache of values derived from ``tensors`` is keyed on: each one's version counter (bumped by in-place
    writes) and storage (changed by ``load_state_dict`` into a new tensor or ``.data =``)."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


def derived_weight(weight: torch.Tensor, tag: str, make, depends=()):
    """``make(weight.detach())``, computed once per version of ``weight`` (and of each tensor in ``depends``, which
    ``make`` also reads: e.g. the BatchNorm folded into a conv) and cached under ``tag``. The result is a normal
    tensor even when first built under ``torch.inference_mode`` (a later training step may use it).
    Under torch.compile it runs outside the graph (a cache keyed on identities would recompile per parameter)."""
    if torch.compiler.is_compiling():
        return _derived_weight_untraced(weight, tag, make, depends)
    key, i = tensor_versions((weight, *depends)), id(weight)
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
    # a copy, made without allocating Python objects: building a list of the items could start a garbage
    # collection whose weakref callbacks (a dead parameter's entry) change the table mid-iteration
    for key, hit in _DERIVED.copy().items():
        if key[0] in live and hit[0]() is live[key[0]]:
            _DERIVED.pop(key, None)


def bf16_autocast() -> bool:
    """Whether CPU autocast to bf16 is on (``patch(dtype=torch.bfloat16)``'s forwards run under it)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# fp32 products below these sizes (rows x in x out, in x out) run F.linear: there a packed GEMM's fixed cost outweighs
# the repacking it saves (MKL's: 1.5-3x F.linear's time at 14 x 128 x 128, one sample's joint tokens, on an Intel
# Xeon; oneDNN's: 0.44-0.65x F.linear at 14 or 40 x 128 x 128 on an AMD EPYC), and so does a single row (a
# matrix-vector product). Measured with ``tore-kernels bench linear``, on AVX-512 and capped at AVX2.
SMALL_PRODUCT, SMALL_WEIGHT = 4_000_000, 128 * 512
MAX_PACKED_ROWS = 4  # MKL packs per row count M: at most this many batch shapes per weight, then F.linear

# Rows up to which fp32 products of 2 rows or more run tore_kernels::few_rows_linear, per SIMD clone, any weight.
# Measured on 2 Zen 4 cores against the best of F.linear, MKL's and oneDNN's packed GEMMs: with AVX-512 1.1-2.8x at
# 2-16 rows (weights in cache, ``tore-kernels bench linear``) and, with weights cycled through 64 MB as in a forward
# (the heads' weights do not fit the L3), 1.13-1.30x at 24-40 rows of 512 x 2048 and 2048 x 512 weights (oneDNN
# 134-192 GFLOP/s, the op 158-192); the captured TORE-FastMETRO-L head at batch 1 ran 1.02x faster with those too
# (plain patch 1.03x). Capped at AVX2 1.3-2.0x at 2-4 rows in cache, and the head ran 1.01-1.04x faster for each
# step from 4 to 16 to 40 rows of any weight (oneDNN's AVX2 GEMM: 80 GFLOP/s at 40 x 512 x 2048 in the forward).
# A single row stays on F.linear (MKL's matrix-vector product streams a weight from memory faster). Off x86 (no
# SIMD clone) never.
FEW_ROWS = {"avx512": 40, "avx2": 40}
FEW_ROWS_PANEL = 32  # output columns per packed panel (the kernel's register tile width)

HAS_FEW_ROWS = backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "few_rows_linear")
if HAS_FEW_ROWS:
    _FEW_ROWS_OP = torch.ops.tore_kernels.few_rows_linear.default

    @torch.library.register_fake("tore_kernels::few_rows_linear")
    def _few_rows_fake(x, packed, bias, relu):
        return x.new_empty(x.shape[0], packed.shape[0] * packed.shape[2])


def pack_few_rows_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (N a multiple of ``FEW_ROWS_PANEL``) as few_rows_linear's panels ``[N / 32, K, 32]``."""
    n, k = weight.shape
    return weight.reshape(n // FEW_ROWS_PANEL, FEW_ROWS_PANEL, k).transpose(1, 2).contiguous()


def _few_rows(m: int, n: int) -> bool:
    """Whether an fp32 product of ``m`` rows by a weight of ``n`` rows runs few_rows_linear on this CPU."""
    limit = FEW_ROWS.get(backend.cpu_isa()) if HAS_FEW_ROWS else None
    return limit is not None and 2 <= m <= limit and n % FEW_ROWS_PANEL == 0


@functools.lru_cache(maxsize=None)
def fp32_gemm() -> tuple[str | None, int]:
    """The packed GEMM fp32 linears run on this CPU ("mkl", "onednn" or None) and the fewest rows it takes.

    On Intel's CPUs MKL's: with AVX-512 1.1-1.4x F.linear from 14 rows; capped at AVX2 0.94-0.96x below 1280 rows
    and 1.03-1.06x at 1280, so there it waits for batched rows. Elsewhere oneDNN's: MKL (which F.linear also runs)
    takes its AVX-512 kernels only on Intel's CPUs, and on an AMD EPYC oneDNN's packed GEMM was 1.8-3.3x F.linear
    from 14 x 512 x 512 up with AVX-512 and 1.07-1.35x capped at AVX2; without MKL (aarch64 builds) too."""
    intel = backend.cpu_vendor() == "GenuineIntel"
    if _MKL and (intel or not _ONEDNN):
        return "mkl", (2 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 1024)
    return ("onednn" if _ONEDNN else None), 2


def _small(size: int, k: int, n: int, gemm: str) -> bool:
    """Whether an fp32 product of ``size`` input elements (``k`` per row) by an ``[n, k]`` weight runs F.linear:
    single rows always; for MKL small weights or small products, for oneDNN only small weights with small
    products (it was 1.8x F.linear at 431 x 128 x 128, 2.2x at 14 x 512 x 512)."""
    if size < 2 * k:
        return True
    weight, product = k * n < SMALL_WEIGHT, size * n < SMALL_PRODUCT
    return weight or product if gemm == "mkl" else k * n <= SMALL_WEIGHT and product


def _path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> str | None:
    """How ``linear`` runs: "few_rows" (fp32, a few rows: ``FEW_ROWS``), "mkl" (fp32, MKL's packed GEMM), "onednn"
    (bf16, or fp32 where oneDNN's is faster) or None (F.linear: training, other devices, small products, tracing).
    The cheap size test first: most of the head's linears are small at batch 1, and this runs before each of them."""
    if torch.compiler.is_compiling() or x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return None
    k, size = x.shape[-1], x.numel()
    bf16 = weight.dtype == torch.bfloat16 or bf16_autocast()
    gemm, min_rows = fp32_gemm()
    few_rows = not bf16 and k > 0 and _few_rows(size // k, n)
    if not bf16 and not few_rows and (gemm is None or size < min_rows * k or _small(size, k, n, gemm)):
        return None
    if not (x.is_cpu and weight.is_cpu and not x.is_mkldnn
            and weight.dtype in (torch.float32, torch.bfloat16) and x.dtype in (torch.float32, torch.bfloat16)
            and (x.dtype == weight.dtype or bf16) and (bias is None or bias.dtype == weight.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return None
    if few_rows:
        return "few_rows"
    onednn = _ONEDNN and torch.backends.mkldnn.enabled
    if bf16:
        return "onednn" if onednn and bf16_native() else None
    return "mkl" if gemm == "mkl" else "onednn" if onednn else None


def _mkl_linear(x, weight, bias, lo, hi):
    """MKL's GEMM on the weight rows packed for ``x``'s row count (cached per parameter version; F.linear for a
    row count beyond the first ``MAX_PACKED_ROWS``)."""
    k = x.shape[-1]
    m = x.numel() // k
    packs = derived_weight(weight, f"mkl:{lo}:{hi}", lambda w: {"rows": w[lo:hi].contiguous()})
    packed = packs.get(m)
    if packed is None:
        if len(packs) > MAX_PACKED_ROWS:
            return F.linear(x, packs["rows"], bias)
        with torch.inference_mode(False), torch.no_grad():
            packed = packs[m] = torch.ops.mkl._mkl_reorder_linear_weight(packs["rows"], m)
    y = torch.ops.mkl._mkl_linear(x.reshape(m, k), packed, packs["rows"], bias, m)
    return y.view(*x.shape[:-1], hi - lo)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           rows: tuple[int, int] | None = None, relu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight[lo:hi], bias[lo:hi])`` (``rows=(lo, hi)``, default all), then ReLU when ``relu``.

    In inference on CPU it runs on a packed copy of the weight rows cached per parameter version: fp32 on MKL's
    packed GEMM (oneDNN's without MKL) or, for a few rows, on few_rows_linear (see ``FEW_ROWS``), except for small
    products (see ``SMALL_PRODUCT``); bf16 under CPU bf16
    autocast on oneDNN's (as F.linear would: bf16 inputs and output, fp32 accumulation). Otherwise (training,
    other devices) it is ``F.linear``."""
    lo, hi = (0, weight.shape[0]) if rows is None else rows
    path = _path(x, weight, bias, hi - lo)
    if path == "onednn":
        dtype = torch.bfloat16 if bf16_autocast() else weight.dtype
        packed = derived_weight(weight, f"onednn:{dtype}:{lo}:{hi}", lambda w: torch.ops.mkldnn._reorder_linear_weight(
            w[lo:hi].to(dtype).contiguous()))
        if bias is not None:
            bias = bias[lo:hi] if bias.dtype == dtype else derived_weight(bias, f"{dtype}:{lo}:{hi}",
                                                                          lambda b: b[lo:hi].to(dtype))
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "relu" if relu else "none", [], "")
    if bias is not None and rows is not None:
        bias = bias[lo:hi]
    if path == "few_rows":
        packed = derived_weight(weight, f"few_rows:{lo}:{hi}", lambda w: pack_few_rows_weight(w[lo:hi]))
        if x.dim() == 2:
            return _FEW_ROWS_OP(x, packed, bias, relu)
        return _FEW_ROWS_OP(x.reshape(-1, x.shape[-1]), packed, bias, relu).view(*x.shape[:-1], hi - lo)
    if path == "mkl":
        y = _mkl_linear(x, weight, bias, lo, hi)
        return y.relu_() if relu else y
    y = F.linear(x, weight if rows is None else weight[lo:hi], bias)
    return F.relu(y) if relu else y
