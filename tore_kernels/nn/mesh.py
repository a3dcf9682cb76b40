"""A drop-in for FastMETRO's / METRO's mesh sampler (``Mesh``): same ``upsample`` / ``downsample`` calls,
batched into one sparse product per call instead of a Python loop over samples."""
from __future__ import annotations

import torch

from ..ops.upsample import mesh_upsample
from ..topology import MeshTopology


class MeshSampler:
    """``upsample(x, n1=1, n2=0)`` maps level n1 to level n2 < n1 through ``_U[n1-1], ..., _U[n2]``;
    ``downsample(x, n1=0, n2=None)`` maps level n1 to n2 > n1 through ``_D[n1], ..., _D[n2-1]``
    (``n2=None``: ``num_downsampling``). Level 0 is the full mesh. ``x`` is ``[B, V, C]`` or ``[V, C]``.

    A plain object like the released one (not an ``nn.Module``: it adds nothing to a ``state_dict``).
    Build it from a :class:`~tore_kernels.topology.MeshTopology`, or from an existing sampler with
    :meth:`from_sampler`. Batched results are ``[B, V, C]`` views (see ``mesh_upsample``).
    """

    def __init__(self, topology: MeshTopology):
        if not isinstance(topology, MeshTopology):
            raise TypeError(f"topology: expected a MeshTopology (or use MeshSampler.from_sampler), "
                            f"got {type(topology).__name__}")
        if not topology.upsampling or not topology.downsampling:
            raise ValueError(f"topology: {topology.name!r} has no upsampling/downsampling matrices "
                             "(a single-level topology cannot be sampled)")
        self._set(topology.upsampling, topology.downsampling, None)

    @classmethod
    def from_sampler(cls, sampler) -> "MeshSampler":
        """Copy the matrices of a released ``Mesh``-like object (``_U`` and ``_D`` lists of sparse tensors,
        ``num_downsampling`` if it has one). The matrices are shared, not copied."""
        if not hasattr(sampler, "_U") or not hasattr(sampler, "_D"):
            raise TypeError(f"sampler: expected a mesh sampler with _U and _D lists of sparse matrices, "
                            f"got {type(sampler).__name__}")
        obj = cls.__new__(cls)
        obj._set(sampler._U, sampler._D, getattr(sampler, "num_downsampling", None))
        return obj

    def _set(self, ups, downs, num_downsampling):
        ups, downs = list(ups), list(downs)
        if len(ups) != len(downs) or not ups:
            raise ValueError(f"sampler: expected as many upsampling as downsampling matrices (>= 1), "
                             f"got {len(ups)} and {len(downs)}")
        for i, (u, d) in enumerate(zip(ups, downs)):
            if u.dim() != 2 or d.dim() != 2 or tuple(u.shape) != tuple(d.shape)[::-1]:
                raise ValueError(f"sampler: _U[{i}] {tuple(u.shape)} and _D[{i}] {tuple(d.shape)} are not "
                                 "transposed shapes of one level pair")
            if i and u.shape[0] != ups[i - 1].shape[1]:
                raise ValueError(f"sampler: _U[{i}] has {u.shape[0]} rows, expected {ups[i - 1].shape[1]} "
                                 f"(the columns of _U[{i - 1}])")
        n = len(downs) if num_downsampling is None else int(num_downsampling)
        if not 0 <= n <= len(downs):
            raise ValueError(f"num_downsampling: expected 0..{len(downs)}, got {num_downsampling}")
        self._U, self._D, self.num_downsampling = ups, downs, n

    @property
    def num_vertices(self) -> tuple[int, ...]:
        return (self._U[0].shape[0],) + tuple(u.shape[1] for u in self._U)

    def _levels(self, name, lo, hi):
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo and hi <= len(self._U)):
            raise ValueError(f"{name}: levels must be ints in 0..{len(self._U)}, got n1/n2 = {lo}, {hi}")

    def upsample(self, x, n1: int = 1, n2: int = 0):
        self._levels("upsample", n2, n1)
        if n1 <= n2:  # nothing to apply (the released loop is empty too)
            return x
        return _apply(x, [self._U[i] for i in reversed(range(n2, n1))])

    def downsample(self, x, n1: int = 0, n2: int | None = None):
        n2 = self.num_downsampling if n2 is None else n2
        self._levels("downsample", n1, n2)
        if n2 <= n1:
            return x
        return _apply(x, [self._D[i] for i in range(n1, n2)])


def _apply(x, matrices):
    # torch.compile cannot trace sparse matrices (nor the cached chain of them): the product runs outside the graph
    return (_mesh_upsample_untraced if torch.compiler.is_compiling() else mesh_upsample)(x, matrices)


_mesh_upsample_untraced = torch.compiler.disable(mesh_upsample)
