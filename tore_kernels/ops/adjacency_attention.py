"""Neighbour-list attention: softmax attention where each query row only sees the keys its mask allows.

The ``[L, S]`` mask (bool, True = blocked, as ``nn.MultiheadAttention``; or float additive with ``-inf``
= blocked) becomes a :class:`NeighbourTable` once (cached per mask tensor):

* ``shared``: columns open for every sparse row (FastMETRO's 14 joint tokens), visited by every row;
* ``index`` / ``count``: an ELL table ``[L, D]`` of the remaining allowed columns per row;
* ``dense_rows``: rows that are (nearly) fully open, computed by dense attention instead of widening
  the table to ``S`` for everyone (``count`` is -1 there).

Implementations (``backend.choose("adjacency_attention", device)``): ``cpu`` = C++ kernel in
``tore_kernels._C``; ``triton`` = Triton kernels; ``reference`` = dense masked SDPA.
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import backend
from .kernel_config import KernelConfig
from .linear import derived_weight

OP = "adjacency_attention"
backend.register(OP, cpu_path=backend.clone_path, reference=None, cpu="extension", triton="triton")

# out storage orders the kernels can write ([B, H, L, d] viewed through strides)
LAYOUT_BHLD, LAYOUT_BLHD, LAYOUT_LBHD = 0, 1, 2


@dataclass(frozen=True, eq=False)
class NeighbourTable:
    index: torch.Tensor       # [L, D] int32, padded with 0 beyond count
    count: torch.Tensor       # [L] int32, -1 for dense rows
    shared: torch.Tensor      # [P] int32 columns every sparse row attends to
    dense_rows: torch.Tensor  # [R] int64
    dense_mask: torch.Tensor  # [R, S] bool, True = blocked
    num_keys: int             # S

    @property
    def num_queries(self) -> int:
        return self.index.shape[0]

    @property
    def width(self) -> int:
        """Keys visited per sparse row at most (shared + table)."""
        return self.shared.numel() + self.index.shape[1]

    def columns(self) -> torch.Tensor:
        """[L, width] int64: the key column of each slot (padding slots point at column 0 with zero weight)."""
        shared = self.shared.long().expand(self.num_queries, -1)
        return torch.cat([shared, self.index.long()], dim=1)

    def allowed(self) -> torch.Tensor:
        """The dense [L, S] bool mask this table encodes (True = may attend)."""
        L, S = self.num_queries, self.num_keys
        allowed = torch.zeros(L, S, dtype=torch.bool, device=self.index.device)
        slot = torch.arange(self.index.shape[1], device=self.index.device)
        valid = slot[None, :] < self.count[:, None]
        rows = torch.arange(L, device=self.index.device)[:, None].expand_as(self.index)
        allowed[rows[valid], self.index.long()[valid]] = True
        sparse = self.count >= 0
        if self.shared.numel():
            allowed[sparse.nonzero()[:, :1], self.shared.long()[None, :]] = True
        allowed[self.dense_rows] = ~self.dense_mask
        return allowed

    def to(self, device: torch.device) -> "NeighbourTable":
        if self.index.device == torch.device(device):
            return self
        return NeighbourTable(*(t.to(device) for t in (self.index, self.count, self.shared, self.dense_rows,
                                                       self.dense_mask)), self.num_keys)


def _blocked(mask: torch.Tensor, strict: bool) -> torch.Tensor | None:
    """[L, S] bool True = blocked; None when a float mask carries finite non-zero biases (``strict`` raises)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [L, S], got shape {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = blocked) or floating point (-inf = blocked), got {mask.dtype}")
    if bool(torch.isnan(mask).any() | torch.isposinf(mask).any()):
        raise ValueError("mask (float additive) must not contain NaN or +inf")
    blocked = torch.isneginf(mask)
    if bool(((mask != 0) & ~blocked).any()):
        if strict:
            raise ValueError("mask (float additive) has finite non-zero values; a neighbour table only encodes "
                             "0 (allowed) and -inf (blocked): use dense attention for biased masks")
        return None
    return blocked


def _build(blocked: torch.Tensor, dense_row_degree: int | None) -> NeighbourTable:
    L, S = blocked.shape
    allowed = ~blocked
    degree = allowed.sum(1)
    empty = (degree == 0).nonzero().flatten()
    if empty.numel():
        rows = ", ".join(str(r) for r in empty[:8].tolist()) + (", ..." if empty.numel() > 8 else "")
        raise ValueError(f"mask: query row {rows} allows no key (every column blocked); each query row needs "
                         f"at least one allowed key")
    threshold = max(64, S // 4) if dense_row_degree is None else dense_row_degree
    dense = degree > threshold
    sparse_allowed = allowed[~dense]
    shared_cols = (sparse_allowed.all(0) if sparse_allowed.shape[0] else torch.zeros(S, dtype=torch.bool,
                                                                                        device=blocked.device))
    rest = allowed & ~shared_cols[None, :] & ~dense[:, None]
    count = rest.sum(1)
    width = int(count.max()) if L else 0
    rows, cols = rest.nonzero(as_tuple=True)  # row-major: rows ascending, cols ascending within a row
    start = torch.cumsum(count, 0) - count
    index = torch.zeros(L, width, dtype=torch.int32, device=blocked.device)
    index[rows, torch.arange(rows.numel(), device=blocked.device) - start[rows]] = cols.to(torch.int32)
    count = torch.where(dense, torch.full_like(count, -1), count).to(torch.int32)
    dense_rows = dense.nonzero().flatten()
    return NeighbourTable(index.contiguous(), count.contiguous(),
                          shared_cols.nonzero().flatten().to(torch.int32).contiguous(), dense_rows,
                          blocked[dense_rows].contiguous(), S)


_CACHE: dict[tuple[int, int | None], tuple[weakref.ref, int, NeighbourTable | None]] = {}
_CACHE_LOCK = threading.Lock()


def _cached(mask: torch.Tensor, dense_row_degree: int | None, strict: bool) -> NeighbourTable | None:
    key = (id(mask), dense_row_degree)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is mask and hit[1] == mask._version:
            if hit[2] is None and strict:
                _blocked(mask, strict=True)  # raises the explanatory error
            return hit[2]
    blocked = _blocked(mask, strict)  # checks the type first (a list has no .detach); the result is a bool tensor
    # normal tensors even under inference_mode: a cached table is later saved for backward when training
    with torch.inference_mode(False):
        table = None if blocked is None else _build(blocked, dense_row_degree)
    with _CACHE_LOCK:
        try:  # drop the entry when the mask dies, so a new tensor reusing the id never hits it
            ref = weakref.ref(mask, lambda _r, key=key: _CACHE.pop(key, None))
        except TypeError:
            return table
        _CACHE[key] = (ref, mask._version, table)
    return table


def neighbour_table(mask: torch.Tensor, *, dense_row_degree: int | None = None) -> NeighbourTable:
    """The :class:`NeighbourTable` of an ``[L, S]`` attention mask (bool True = blocked, or float -inf = blocked).

    Cached per mask tensor (identity and in-place version), so a model pays for it once. Rows allowing more
    than ``dense_row_degree`` keys (default ``max(64, S // 4)``) are computed densely. Raises ValueError for
    a row that allows no key (naming it) and for float masks with finite non-zero values.
    """
    if dense_row_degree is not None and (not isinstance(dense_row_degree, int) or dense_row_degree < 1):
        raise ValueError(f"dense_row_degree must be a positive int or None, got {dense_row_degree!r}")
    return _cached(mask, dense_row_degree, strict=True)


def table_or_none(mask: torch.Tensor) -> NeighbourTable | None:
    """Like :func:`neighbour_table`, but None for a float mask with finite biases (the caller goes dense)."""
    return _cached(mask, None, strict=False)


@functools.lru_cache(maxsize=64)
def open_table(num_queries: int, num_keys: int, device: torch.device) -> NeighbourTable:
    """The table of an all-open ``[L, S]`` mask: every key shared by every query (no index columns). Normal
    tensors even when first built under inference_mode: a later call with autograd saves them for backward."""
    with torch.inference_mode(False):
        return NeighbourTable(torch.zeros(num_queries, 0, dtype=torch.int32, device=device),
                              torch.zeros(num_queries, dtype=torch.int32, device=device),
                              torch.arange(num_keys, dtype=torch.int32, device=device),
                              torch.zeros(0, dtype=torch.long, device=device),
                              torch.zeros(0, num_keys, dtype=torch.bool, device=device), num_keys)


# ----------------------------------------------------------------------------------------------- C++ op

def _out_strides(B, H, L, d, layout):
    """Strides of the [B, H, L, d] output stored in ``layout`` order."""
    return {LAYOUT_BHLD: (H * L * d, L * d, d, 1), LAYOUT_BLHD: (L * H * d, d, H * d, 1),
            LAYOUT_LBHD: (H * d, d, B * H * d, 1)}[layout]


if backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "adjacency_attention_forward"):
    def _lse_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("tore_kernels::adjacency_attention_forward")
    def _forward_fake(q, k, v, index, count, shared, scale, layout):
        B, H, L, d = q.shape
        out = q.new_empty_strided((B, H, L, d), _out_strides(B, H, L, d, layout))
        return out, q.new_empty((B, H, L), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake("tore_kernels::adjacency_attention_forward_weights")
    def _forward_weights_fake(q, k, v, index, count, shared, scale, layout):
        out, lse = _forward_fake(q, k, v, index, count, shared, scale, layout)
        return out, lse, q.new_empty((q.shape[0], q.shape[2], k.shape[2]))

    def _empty_tokens(x, B, L, N, seq_first):
        """[B, L, N], stored [L, B, N] when seq_first: the fused ops' output in their input's token order."""
        return x.new_empty((L, B, N)).permute(1, 0, 2) if seq_first else x.new_empty((B, L, N))

    @torch.library.register_fake("tore_kernels::adjacency_attention_forward_projected")
    def _forward_projected_fake(q, k, v, index, count, shared, scale, wt, bias):
        return _empty_tokens(q, q.shape[0], q.shape[2], wt.shape[1], q.stride(0) < q.stride(2))

    @torch.library.register_fake("tore_kernels::adjacency_mha_forward")
    def _mha_forward_fake(query, key, value, in_wt, in_bias, index, count, shared, num_heads, scale, out_wt,
                          out_bias):
        return _empty_tokens(query, *query.shape, query.stride(1) > query.stride(0))

    if hasattr(torch.ops.tore_kernels, "few_keys_attention"):
        @torch.library.register_fake("tore_kernels::few_keys_attention")
        def _few_keys_fake(q, k, v, scale, layout):
            return q.new_empty_strided(tuple(q.shape), _out_strides(*q.shape, layout))

    @torch.library.register_fake("tore_kernels::adjacency_attention_backward")
    def _backward_fake(grad_out, q, k, v, out, lse, index, count, shared, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            torch.empty_like(k, memory_format=torch.contiguous_format), \
            torch.empty_like(v, memory_format=torch.contiguous_format)

    @torch.library.register_fake("tore_kernels::adjacency_attention_probs")
    def _probs_fake(q, k, lse, index, count, shared, scale):
        B, H, L, _ = q.shape
        return q.new_empty((B, H, L, shared.shape[0] + index.shape[1]))

    def _setup_context(ctx, inputs, output):
        q, k, v, index, count, shared, scale, _layout = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, index, count, shared)
        ctx.scale = scale

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, index, count, shared = ctx.saved_tensors
        dq, dk, dv = torch.ops.tore_kernels.adjacency_attention_backward(
            grad_out, q, k, v, out, lse, index, count, shared, ctx.scale)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("tore_kernels::adjacency_attention_forward", _backward,
                                    setup_context=_setup_context)

    def _not_differentiable(name):
        def backward(ctx, *grads):
            raise RuntimeError(f"tore_kernels::{name} is not differentiable (the attention's weights with autograd "
                               f"run on the dense path; double backward through the attention is not supported)")
        torch.library.register_autograd(f"tore_kernels::{name}", backward,
                                        setup_context=lambda ctx, inputs, output: None)

    for _name in ("adjacency_attention_backward", "adjacency_attention_probs", "adjacency_attention_forward_weights",
                  "adjacency_attention_forward_projected", "adjacency_mha_forward"):
        _not_differentiable(_name)


# an extension built before these ops existed runs the separate steps
_HAS_PROJECTED = backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "adjacency_attention_forward_projected")
_HAS_MHA = backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "adjacency_mha_fused")
_HAS_FEW_KEYS = backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "few_keys_attention")
FEW_KEYS = 64  # the C++ kernel's kFewKeys


# ------------------------------------------------------------------------------------------ public API

def _check_qkv(q, k, v, table: NeighbourTable):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, d], got shape {list(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got "
                            f"({t.dtype}, {t.device})")
    B, H, L, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, H={H}, S, d={d}] and equal, got {list(k.shape)}, "
                         f"{list(v.shape)}")
    if not isinstance(table, NeighbourTable):
        raise TypeError(f"table must be a NeighbourTable (from neighbour_table(mask)), got {type(table).__name__}")
    if table.num_queries != L or table.num_keys != k.shape[2]:
        raise ValueError(f"table is for [L={table.num_queries}, S={table.num_keys}] but q, k give "
                         f"[L={L}, S={k.shape[2]}]")


def _dense_attention(q, k, v, blocked, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked, scale=scale)


def _with_dense_rows(out, q, k, v, table: NeighbourTable, scale):
    """``out`` with the dense rows' attention written in, in place unless autograd records ``out`` (a copy of
    the whole output otherwise: 1.9 ms of FastMETRO-L's 445-token attention at batch 32)."""
    dense = _dense_attention(q[:, :, table.dense_rows], k, v, table.dense_mask, scale)
    if torch.is_grad_enabled() and out.requires_grad:
        return out.index_copy(2, table.dense_rows, dense)
    return out.index_copy_(2, table.dense_rows, dense)


def _sparse_rows(q, k, v, table: NeighbourTable, scale: float, layout: int, impl: str):
    """Output of every sparse row (dense rows hold zeros) and the per-row log-sum-exp."""
    if impl == "triton":
        return _Attention.apply(q, k, v, table.index, table.count, table.shared, scale, layout)
    return torch.ops.tore_kernels.adjacency_attention_forward(q, k, v, table.index, table.count, table.shared,
                                                              scale, layout)


def attention_with_lse(q, k, v, table: NeighbourTable, scale: float, layout: int = LAYOUT_BHLD):
    """(out [B, H, L, d] stored in ``layout``, lse [B, H, L] for the sparse rows or None) without input checks."""
    impl = backend.choose(OP, q.device)
    table = table.to(q.device)
    if impl == "reference" or (impl == "triton" and q.dtype == torch.float64):  # Triton kernels: fp32/16/bf16
        return _dense_attention(q, k, v, ~table.allowed(), scale), None
    out, lse = _sparse_rows(q, k, v, table, scale, layout, impl)
    if table.dense_rows.numel():
        out = _with_dense_rows(out, q, k, v, table, scale)
    return out, lse


def attention_out_projected(q, k, v, table: NeighbourTable, scale: float, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor | None:
    """Inference on CPU: ``F.linear(out, weight, bias)`` of the attention output as ``[B, L, N]`` (in q's token
    order), computed by the C++ op that out-projects each block of rows while it is in cache; None where that op
    does not apply (another backend or dtype, autograd, dense rows) or is not the faster choice: the caller runs
    the two steps. The op fuses only in the AVX-512 clone; elsewhere it runs the same two steps with an unpacked
    GEMM, slower than the caller's packed linear (AVX2, batch 32: no faster than computing the weights too)."""
    tensors = (q, k, v, weight) if bias is None else (q, k, v, weight, bias)
    if not (_HAS_PROJECTED and backend.cpu_isa() == "avx512" and _cpu_inference(table, tensors)):
        return None
    wt = derived_weight(weight, "transposed", lambda w: w.t().contiguous())
    return torch.ops.tore_kernels.adjacency_attention_forward_projected(q, k, v, table.index, table.count,
                                                                       table.shared, scale, wt, bias)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, ``q`` [B, H, L, d], k / v [B, H, S, d]), output in
    q's memory order when q is a seq-first view. In inference on an AVX-512 CPU with at most ``FEW_KEYS`` keys
    (FastMETRO's cross-attention to the 49 image tokens, its encoders' 50 tokens) fp32 runs the C++ kernel that
    keeps a head's keys and values in L1: 2.0x SDPA at 445 x 49 keys, d 64, and 1.7-6.2x at d 16 and at the
    encoders' and NSR's sizes (batch 32, 8 heads, AMD EPYC; ``tore-kernels bench dense_attention``). Elsewhere
    SDPA."""
    tensors = (q, k, v)
    if not (_HAS_FEW_KEYS and q.dim() == 4 and k.dim() == 4 and 1 <= k.shape[2] <= FEW_KEYS
            and q.shape[3] % 16 == 0 and backend.cpu_isa() == "avx512" and all(t.stride(-1) == 1 for t in tensors)
            and not torch.compiler.is_compiling() and _cpu_fp32_inference(tensors)):
        return F.scaled_dot_product_attention(q, k, v)
    layout = LAYOUT_LBHD if q.stride(0) < q.stride(2) else LAYOUT_BLHD
    return torch.ops.tore_kernels.few_keys_attention(q, k, v, q.shape[-1] ** -0.5, layout)


def _cpu_fp32_inference(tensors) -> bool:
    """The CPU inference ops apply: fp32 CPU tensors, the C++ backend, no autograd."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and backend.choose(OP, tensors[0].device) == "cpu"
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _cpu_inference(table: NeighbourTable, tensors) -> bool:
    """The fused CPU inference ops apply: those of :func:`_cpu_fp32_inference`, and no dense rows."""
    return not table.dense_rows.numel() and _cpu_fp32_inference(tensors)


def mha_inference(query, key, value, table: NeighbourTable, num_heads: int, in_proj_weight: torch.Tensor,
                  in_proj_bias: torch.Tensor | None, out_proj_weight: torch.Tensor,
                  out_proj_bias: torch.Tensor | None) -> torch.Tensor | None:
    """Inference on CPU: nn.MultiheadAttention's output (``need_weights=False``) as ``[B, L, E]`` in query's memory
    order, from batch-first views query ``[B, L, E]``, key and value ``[B, S, E]``. One C++ op runs the whole
    block a sample at a time (in-projection, attention, out-projection), so q, k and v never go to memory. None
    where that op is not the faster choice (another CPU, backend, dtype or shape; autograd; dense rows; a batch
    that would leave threads idle; inputs whose last dimension is strided): the caller runs the separate steps."""
    tensors = [t for t in (query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias)
               if t is not None]
    if not (_HAS_MHA and _cpu_inference(table, tensors) and all(t.stride(-1) == 1 for t in (query, key, value))
            and torch.ops.tore_kernels.adjacency_mha_fused(
            query.shape[0], query.shape[2], num_heads, table.width)):
        return None
    in_wt = derived_weight(in_proj_weight, "transposed", lambda w: w.t().contiguous())
    out_wt = derived_weight(out_proj_weight, "transposed", lambda w: w.t().contiguous())
    return torch.ops.tore_kernels.adjacency_mha_forward(
        query, key, value, in_wt, in_proj_bias, table.index, table.count, table.shared, num_heads,
        1.0 / math.sqrt(query.shape[2] // num_heads), out_wt, out_proj_bias)


def adjacency_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: NeighbourTable, *,
                        scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over the keys ``table`` allows, never forming the [L, S] scores.

    q: [B, H, L, d], k / v: [B, H, S, d] (any strides: views of a projection output need no copy),
    table: :func:`neighbour_table` of the ``[L, S]`` mask. ``scale`` defaults to ``1 / sqrt(d)``.
    Differentiable in q, k, v. Returns [B, H, L, d].
    """
    _check_qkv(q, k, v, table)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return attention_with_lse(q, k, v, table, float(scale))[0]


def attention_weights(q, k, table: NeighbourTable, scale: float, lse: torch.Tensor | None,
                      average: bool) -> torch.Tensor:
    """The softmax weights scattered to [B, L, S] (head-averaged) or [B, H, L, S], as nn.MultiheadAttention
    returns them. Not differentiable (callers that need their gradient use the dense path)."""
    B, H, L, _ = q.shape
    S = table.num_keys
    table = table.to(q.device)
    with torch.no_grad():
        if lse is None:  # reference backend: dense softmax
            scores = (q @ k.transpose(-2, -1)) * scale
            weights = scores.masked_fill(~table.allowed(), float("-inf")).softmax(-1)
            return weights.mean(1) if average else weights
        probs = torch.ops.tore_kernels.adjacency_attention_probs(q, k, lse, table.index, table.count,
                                                                 table.shared, scale) \
            if q.device.type == "cpu" and backend.HAS_EXTENSION else _probs_torch(q, k, lse, table, scale)
        cols = table.columns()
        if average:
            probs = probs.mean(1)
            weights = q.new_zeros(B, L, S).scatter_add_(2, cols.expand(B, L, -1), probs)
        else:
            weights = q.new_zeros(B, H, L, S).scatter_add_(3, cols.expand(B, H, L, -1), probs)
        _dense_row_weights(weights, q, k, table, scale, average)
        return weights


def _dense_row_weights(weights, q, k, table: NeighbourTable, scale, average):
    """Writes the dense rows' softmax weights into ``weights`` ([B, L, S] averaged or [B, H, L, S])."""
    if table.dense_rows.numel():
        qd = q[:, :, table.dense_rows]
        dense = ((qd @ k.transpose(-2, -1)) * scale).masked_fill(table.dense_mask, float("-inf")).softmax(-1)
        if average:
            weights[:, table.dense_rows] = dense.mean(1)
        else:
            weights[:, :, table.dense_rows] = dense


def attention_with_averaged_weights(q, k, v, table: NeighbourTable, scale: float, layout: int = LAYOUT_BHLD):
    """(out as :func:`attention_with_lse`, head-averaged weights [B, L, S]), not differentiable. The CPU
    kernel writes the weights while it computes the output (one pass, no [B, H, L, width] intermediate)."""
    if backend.choose(OP, q.device) != "cpu":
        out, lse = attention_with_lse(q, k, v, table, scale, layout)
        return out, attention_weights(q, k, table, scale, lse, True)
    table = table.to(q.device)
    with torch.no_grad():
        out, _, weights = torch.ops.tore_kernels.adjacency_attention_forward_weights(
            q, k, v, table.index, table.count, table.shared, scale, layout)
        if table.dense_rows.numel():
            out = _with_dense_rows(out, q, k, v, table, scale)
            _dense_row_weights(weights, q, k, table, scale, True)
    return out, weights


def _probs_torch(q, k, lse, table: NeighbourTable, scale):
    """Slot probabilities [B, H, L, width] by gathering keys (used only off the CPU extension)."""
    cols = table.columns()
    keys = k[:, :, cols]                                    # [B, H, L, W, d]
    probs = torch.exp((q.unsqueeze(3) * keys).sum(-1).float() * scale - lse.unsqueeze(-1).float())
    slot = torch.arange(cols.shape[1], device=q.device)
    valid = slot[None, :] < (table.count[:, None] + table.shared.numel())
    valid &= (table.count >= 0)[:, None]
    return probs.masked_fill(~valid, 0.0).to(q.dtype)


# ------------------------------------------------------------------------------------------ Triton
# One program per (block of BLOCK_M query rows, batch * head). Slot j of row m is the key shared[j] for
# j < P (the dense-prefix block: the same columns for every row) and index[m, j - P] after; each slot
# gathers one key row per query row, so no [L, S] matrix is formed. Softmax is online (running max); the
# backward recomputes the probabilities from the forward's log-sum-exp and scatters dk / dv with fp32
# atomics.

def gpu_report_configs() -> list[KernelConfig]:
    """Every Triton configuration this module can launch (empty without triton)."""
    return _gpu_report_configs() if backend.has_triton() else []


if backend.has_triton():
    import triton
    import triton.language as tl

    NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps exp() and max() NaN-free for rows with no valid slot

    @triton.jit
    def _slot_column(shared_ptr, index_ptr, rows, j, P, W_IDX, row_ok):
        # key column of slot j for each row (j < P: shared column; else the row's table entry)
        in_table = j >= P
        col_table = tl.load(index_ptr + rows * W_IDX + (j - P), mask=row_ok & in_table, other=0)
        col_shared = tl.load(shared_ptr + tl.minimum(j, tl.maximum(P - 1, 0)), mask=(j < P) & (P > 0), other=0)
        return tl.where(in_table, col_table, col_shared)

    @triton.jit
    def _program_rows(count_ptr, H, L, D, P, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's (batch x head, batch, head), its block of query rows and head dims with their masks, and
        each row's number of keys (shared + table; 0 for dense rows). Batch x heads is grid axis 0 (up to
        2^31 - 1 programs; CUDA's axis 1 stops at 65535), the row blocks axis 1."""
        bh = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < L
        count = tl.load(count_ptr + rows, mask=row_ok, other=-1)
        return bh, bh // H, bh % H, rows, dims, row_ok, dims < D, tl.where(count >= 0, count + P, 0)

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, index_ptr, count_ptr, shared_ptr,
                        H, L, D, P, W_IDX, scale,
                        sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, so0, so1, so2, so3,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        bh, b, h, rows, dims, row_ok, dim_ok, degree = _program_rows(count_ptr, H, L, D, P, BLOCK_M, BLOCK_D)
        q = tl.load(q_ptr + b * sq0 + h * sq1 + rows[:, None] * sq2 + dims[None, :] * sq3,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale
        m_i = tl.full((BLOCK_M,), NEG, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for j in range(0, P + W_IDX):
            valid = row_ok & (j < degree)
            col = _slot_column(shared_ptr, index_ptr, rows, j, P, W_IDX, valid)
            ld = valid[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + b * sk0 + h * sk1 + col[:, None] * sk2 + dims[None, :] * sk3, mask=ld, other=0.0)
            s = tl.where(valid, tl.sum(q * k.to(tl.float32), 1), NEG)
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp(m_i - m_new)
            p = tl.where(valid, tl.exp(s - m_new), 0.0)
            v = tl.load(v_ptr + b * sv0 + h * sv1 + col[:, None] * sv2 + dims[None, :] * sv3, mask=ld, other=0.0)
            acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
            l_i = l_i * alpha + p
            m_i = m_new
        has = l_i > 0
        out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        tl.store(o_ptr + b * so0 + h * so1 + rows[:, None] * so2 + dims[None, :] * so3,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(lse_ptr + bh * L + rows, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0), mask=row_ok)

    @triton.jit
    def _backward_kernel(g_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, index_ptr, count_ptr, shared_ptr,
                         dq_ptr, dk_ptr, dv_ptr,
                         H, L, S, D, P, W_IDX, scale,
                         sg0, sg1, sg2, sg3, sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                         so0, so1, so2, so3,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # dq is [B, H, L, d] contiguous in q's dtype; dk / dv are [B, H, S, d] contiguous fp32 (atomics)
        bh, b, h, rows, dims, row_ok, dim_ok, degree = _program_rows(count_ptr, H, L, D, P, BLOCK_M, BLOCK_D)
        rd = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + b * sq0 + h * sq1 + rows[:, None] * sq2 + dims[None, :] * sq3, mask=rd, other=0.0)
        q = q.to(tl.float32)
        g = tl.load(g_ptr + b * sg0 + h * sg1 + rows[:, None] * sg2 + dims[None, :] * sg3, mask=rd, other=0.0)
        g = g.to(tl.float32)
        o = tl.load(o_ptr + b * so0 + h * so1 + rows[:, None] * so2 + dims[None, :] * so3, mask=rd, other=0.0)
        delta = tl.sum(g * o.to(tl.float32), 1)
        lse = tl.load(lse_ptr + bh * L + rows, mask=row_ok, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        kv_base = bh * S * D
        for j in range(0, P + W_IDX):
            valid = row_ok & (j < degree)
            col = _slot_column(shared_ptr, index_ptr, rows, j, P, W_IDX, valid)
            ld = valid[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + b * sk0 + h * sk1 + col[:, None] * sk2 + dims[None, :] * sk3, mask=ld, other=0.0)
            v = tl.load(v_ptr + b * sv0 + h * sv1 + col[:, None] * sv2 + dims[None, :] * sv3, mask=ld, other=0.0)
            k = k.to(tl.float32)
            p = tl.where(valid, tl.exp(tl.sum(q * k, 1) * scale - lse), 0.0)
            ds = p * (tl.sum(g * v.to(tl.float32), 1) - delta) * scale
            dq += ds[:, None] * k
            dst = kv_base + col[:, None] * D + dims[None, :]
            tl.atomic_add(dk_ptr + dst, ds[:, None] * q, mask=ld)
            tl.atomic_add(dv_ptr + dst, p[:, None] * g, mask=ld)
        tl.store(dq_ptr + bh * L * D + rows[:, None] * D + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=rd)


    def _block(d: int, L: int, backward: bool = False) -> tuple[int, int, int]:
        """(BLOCK_M, BLOCK_D, num_warps): [BLOCK_M, BLOCK_D] fp32 tiles of at most 4096 elements (2048 in the
        backward, which holds twice as many tiles live); 8 warps from 2048 elements so that nothing spills."""
        block_d = max(8, triton.next_power_of_2(d))
        budget = 2048 if backward else 4096
        block_m = max(16, min(64, budget // block_d, triton.next_power_of_2(L)))
        return block_m, block_d, 8 if block_m * block_d >= 2048 else 4



    def _forward(q, k, v, index, count, shared, scale, layout):
        B, H, L, d = q.shape
        out = torch.empty_strided((B, H, L, d), _out_strides(B, H, L, d, layout), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
        block_m, block_d, warps = _block(d, L)
        grid = (B * H, triton.cdiv(L, block_m))
        _forward_kernel[grid](q, k, v, out, lse, index, count, shared, H, L, d, shared.numel(), index.shape[1],
                              float(scale), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                              BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        return out, lse


    def _backward(grad, q, k, v, out, lse, index, count, shared, scale):
        B, H, L, d = q.shape
        S = k.shape[2]
        dq = torch.empty((B, H, L, d), dtype=q.dtype, device=q.device)
        dk = torch.zeros((B, H, S, d), dtype=torch.float32, device=q.device)
        dv = torch.zeros((B, H, S, d), dtype=torch.float32, device=q.device)
        block_m, block_d, warps = _block(d, L, backward=True)
        grid = (B * H, triton.cdiv(L, block_m))
        _backward_kernel[grid](grad, q, k, v, out, lse, index, count, shared, dq, dk, dv, H, L, S, d, shared.numel(),
                               index.shape[1], float(scale), *grad.stride(), *q.stride(), *k.stride(), *v.stride(),
                               *out.stride(), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        return dq, dk.to(k.dtype), dv.to(v.dtype)


    class _Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, index, count, shared, scale, layout):
            out, lse = _forward(q, k, v, index, count, shared, scale, layout)
            ctx.save_for_backward(q, k, v, out, lse, index, count, shared)
            ctx.scale = scale
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, grad_out, _grad_lse):
            q, k, v, out, lse, index, count, shared = ctx.saved_tensors
            dq, dk, dv = _backward(grad_out, q, k, v, out, lse, index, count, shared, ctx.scale)
            return dq, dk, dv, None, None, None, None, None


    _DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


    def _gpu_report_configs() -> list[KernelConfig]:
        """Every configuration ``_block`` can pick: head dims 8..128 (BLOCK_D 8..128), the BLOCK_M each gets for
        L >= 64, and fp32 / fp16 / bf16 inputs. (Smaller L only lowers BLOCK_M, never raises a tile.)"""
        configs = []
        for block_d in (8, 16, 32, 64, 128):
            block_m, _, warps = _block(block_d, 2048)
            for dtype, ty in _DTYPES.items():
                ptr = f"*{ty}"
                strides = {f"s{t}{i}": "i32" for t in ("q", "k", "v", "o") for i in range(4)}
                sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32", "index_ptr": "*i32",
                       "count_ptr": "*i32", "shared_ptr": "*i32", "H": "i32", "L": "i32", "D": "i32", "P": "i32",
                       "W_IDX": "i32", "scale": "fp32", **strides, "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
                consts = {"BLOCK_M": block_m, "BLOCK_D": block_d}
                configs.append(KernelConfig(f"adjacency_attention_forward[d<={block_d},{ty}]", _forward_kernel, sig,
                                            consts, num_warps=warps, num_stages=1))
                bstrides = {f"s{t}{i}": "i32" for t in ("g", "q", "k", "v", "o") for i in range(4)}
                bsig = {"g_ptr": ptr, "q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32",
                        "index_ptr": "*i32", "count_ptr": "*i32", "shared_ptr": "*i32", "dq_ptr": ptr,
                        "dk_ptr": "*fp32", "dv_ptr": "*fp32", "H": "i32", "L": "i32", "S": "i32", "D": "i32",
                        "P": "i32", "W_IDX": "i32", "scale": "fp32", **bstrides, "BLOCK_M": "constexpr",
                        "BLOCK_D": "constexpr"}
                bconsts = {"BLOCK_M": _block(block_d, 2048, backward=True)[0], "BLOCK_D": block_d}
                configs.append(KernelConfig(f"adjacency_attention_backward[d<={block_d},{ty}]", _backward_kernel,
                                            bsig, bconsts, num_warps=warps, num_stages=1))
        return configs
