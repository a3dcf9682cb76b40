"""Batched coarse-to-fine mesh upsampling (any fixed chain of sparse matrices, e.g. 431 -> 1723 -> 6890).

The released sampler multiplies each sample by each sparse matrix in a Python loop. Here the batch is
folded into the columns: ``x [B, V, C]`` becomes ``X [V, B*C]`` (one small copy), the whole chain is ONE
sparse-dense product ``Y = P @ X`` with ``P`` the precomposed chain in CSR, and the result is returned as
a ``[B, V', C]`` view of ``Y``. The chain is precomposed in float64 (SMPL's 6890x431 has 5 nnz per row) and
the product is ``tore_kernels::csr_mm`` (``csrc/upsample``), 16 columns of a row at a time in registers: on the
AMD EPYC (Zen 4), 2 threads, 431 -> 6890 took 36 us at batch 1 and 105-125 us at batch 32, against 50-58 us
and 2.3 ms for ``torch.sparse.mm`` on the CSR tensor (what runs without the extension; it built a sparse tensor
per call before, 100 us at batch 1). Making the output contiguous costs more than the product, so the view is
returned: call ``.contiguous()`` only where a consumer needs it.

Implementations (``backend.choose("mesh_upsample", device)``):
  cpu        precomposed CSR, custom autograd (backward = the same product with the transposed chain)
  reference  the matrices applied one after the other with ``torch.sparse.mm`` on COO (torch autograd);
             also what CUDA tensors run (cuSPARSE under torch.sparse).
"""
from __future__ import annotations

import collections
import threading
import typing
import warnings
import weakref
from typing import Sequence

import torch

from .. import backend

OP = "mesh_upsample"
backend.register(OP, cpu_path=lambda: "C++ CSR product" if HAS_CSR_MM else "torch sparse", reference=None, cpu=None)

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CACHE_SIZE = 32


def _check_inputs(x, matrices):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"x: expected a floating dtype {_FLOAT_TYPES}, got {x.dtype}")
    if x.dim() not in (2, 3) or x.shape[-1] < 1:
        raise ValueError(f"x: expected [B, V, C] or [V, C] (C >= 1), got shape {tuple(x.shape)}")
    if isinstance(matrices, torch.Tensor) or not isinstance(matrices, Sequence) or len(matrices) == 0:
        raise TypeError("matrices: expected a non-empty sequence of sparse matrices, applied in order, "
                        f"got {type(matrices).__name__}")
    rows = x.shape[-2]
    for i, m in enumerate(matrices):
        if not isinstance(m, torch.Tensor) or m.layout not in (torch.sparse_coo, torch.sparse_csr):
            raise TypeError(f"matrices[{i}]: expected a sparse COO or CSR tensor, got "
                            f"{type(m).__name__} {getattr(m, 'layout', '')}")
        if m.dim() != 2 or not m.dtype.is_floating_point:
            raise ValueError(f"matrices[{i}]: expected a 2-D floating matrix, got {m.dim()}-D {m.dtype}")
        if m.shape[1] != rows:
            what = "x's vertex count (dim -2)" if i == 0 else f"the rows of matrices[{i - 1}]"
            raise ValueError(f"matrices[{i}]: has {m.shape[1]} columns, expected {rows} = {what}")
        rows = m.shape[0]


def _coo(m: torch.Tensor) -> torch.Tensor:
    return (m.to_sparse_coo() if m.layout == torch.sparse_csr else m).coalesce()


class _Prepared:
    """A matrix chain ready to run on one device / dtype / implementation (built once, cached)."""

    def __init__(self, matrices, device, dtype, impl):
        chain = [_coo(m).to(torch.float64) for m in matrices]
        if impl == "cpu" and len(chain) > 1:  # compose in float64 so P carries no extra rounding
            composed = chain[0]
            for m in chain[1:]:
                composed = torch.sparse.mm(m, composed).coalesce()
            chain = [composed]
        self.forward = tuple(self._place(m, device, dtype, impl) for m in chain)
        self.backward = tuple(self._place(m.t().coalesce(), device, dtype, impl) for m in reversed(chain))
        self.out_rows = chain[-1].shape[0]

    @staticmethod
    def _place(m, device, dtype, impl):
        m = m.to(device=device, dtype=dtype)
        if impl != "cpu":
            return m
        m = m.to_sparse_csr()
        if not HAS_CSR_MM:
            return m
        # its arrays copied out: views of a sparse tensor would keep it in a captured graph
        return _CSR(m.crow_indices().clone(), m.col_indices().clone(), m.values().clone(), m.shape[0])


_LOCK = threading.Lock()
_PREPARED: collections.OrderedDict = collections.OrderedDict()


def _prepared(matrices, device, dtype, impl) -> _Prepared:
    """Cached per matrix identity and version: a model pays the conversion once."""
    key = (tuple(id(m) for m in matrices), tuple(m._version for m in matrices), device, dtype, impl)
    # Built under the lock too: catch_warnings swaps the process-wide warning filters, so two threads building
    # at once could leak the warning, or leave its filter installed for good.
    with _LOCK:
        hit = _PREPARED.get(key)
        if hit is not None and all(ref() is m for ref, m in zip(hit[0], matrices)):  # ids can be reused
            _PREPARED.move_to_end(key)
            return hit[1]
        # normal tensors even under inference_mode: the cached chain is later saved for backward when training
        with warnings.catch_warnings(), torch.inference_mode(False):
            # torch flags CSR (ours, and inside sparse.mm) as beta; covered by tests
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            prepared = _Prepared(matrices, device, dtype, impl)
        _PREPARED[key] = (tuple(weakref.ref(m) for m in matrices), prepared)
        while len(_PREPARED) > _CACHE_SIZE:
            _PREPARED.popitem(last=False)
    return prepared


# P @ x on the CSR's arrays (csrc/upsample): one op on dense tensors, which a captured graph
# (patch(model, compile=True)) can hold where it cannot hold a sparse tensor, and microseconds at batch 1
HAS_CSR_MM = backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "csr_mm")
if HAS_CSR_MM:
    @torch.library.register_fake("tore_kernels::csr_mm")
    def _csr_mm_fake(crow_indices, col_indices, values, rows, x):
        return x.new_empty(rows, x.shape[1])


class _CSR(typing.NamedTuple):
    """A CSR matrix as its dense arrays (what ``tore_kernels::csr_mm`` takes)."""
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    rows: int


def _sparse_mm(m, x):
    return torch.ops.tore_kernels.csr_mm(*m, x) if isinstance(m, _CSR) else torch.sparse.mm(m, x)


class _ChainMM(torch.autograd.Function):
    """Y = M_k ... M_1 X for fixed sparse M_i; dX = M_1^T ... M_k^T dY (itself differentiable)."""

    @staticmethod
    def forward(ctx, x, forward_chain, backward_chain):
        ctx.chains = (forward_chain, backward_chain)
        for m in forward_chain:
            x = _sparse_mm(m, x)
        return x

    @staticmethod
    def backward(ctx, grad):
        forward_chain, backward_chain = ctx.chains
        return _ChainMM.apply(grad.contiguous(), backward_chain, forward_chain), None, None


def mesh_upsample(x: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply the sparse matrices ``matrices[0]``, then ``matrices[1]``, ... to every mesh of ``x``.

    ``x``: ``[B, V, C]`` or ``[V, C]`` (C = 3 for coordinates), any float dtype (float16 / bfloat16 run in
    float32 and are cast back). ``matrices``: sparse COO or CSR ``[V_1, V]``, ``[V_2, V_1]``, ... on any
    device (moved and converted once, then cached by identity: do not modify them in place afterwards
    without bumping their version). For FastMETRO's sampler, ``upsample(x, n1=2, n2=0)`` is
    ``mesh_upsample(x, [U[1], U[0]])``.

    Returns ``[B, V_k, C]`` (a non-contiguous view of a ``[V_k, B, C]`` buffer) or ``[V_k, C]``,
    differentiable with respect to ``x``.
    """
    _check_inputs(x, matrices)
    impl = backend.choose(OP, x.device)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    prepared = _prepared(tuple(matrices), x.device, dtype, impl)
    xc = x.to(dtype)
    if x.dim() == 3:  # [B, V, C] -> [V, B*C]: the batch becomes columns of one product
        B, V, C = xc.shape
        flat = xc.permute(1, 0, 2).reshape(V, B * C).contiguous()  # row-major: MKL's fast layout
    else:
        flat = xc.contiguous()
    if impl == "cpu":
        out = _ChainMM.apply(flat, prepared.forward, prepared.backward)
    else:
        out = flat
        for m in prepared.forward:
            out = torch.sparse.mm(m, out)
    if x.dim() == 3:
        out = out.view(prepared.out_rows, B, C).permute(1, 0, 2)
    return out.to(x.dtype)
