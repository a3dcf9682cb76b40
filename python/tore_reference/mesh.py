"""FastMETRO's mesh sampler: coarse-to-fine upsampling with fixed sparse matrices, one sample at a time."""
import numpy as np
import torch


def scipy_to_torch_sparse(matrix):
    coo = matrix.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape).coalesce()


class Mesh:
    """``U[i]`` upsamples level i+1 to level i, ``D[i]`` downsamples level i to i+1 (level 0 = 6890 vertices)."""

    def __init__(self, U, D):
        self._U = list(U)
        self._D = list(D)

    @classmethod
    def from_fastmetro(cls, filename):
        """Load ``mesh_downsampling.npz`` (pickled scipy matrices: trusted input only)."""
        data = np.load(filename, encoding="latin1", allow_pickle=True)
        return cls([scipy_to_torch_sparse(u) for u in data["U"]], [scipy_to_torch_sparse(d) for d in data["D"]])

    def downsample(self, x, n1=0, n2=None):
        n2 = len(self._D) if n2 is None else n2
        return self._apply(x, [self._D[i] for i in range(n1, n2)])

    def upsample(self, x, n1=1, n2=0):
        return self._apply(x, [self._U[i] for i in reversed(range(n2, n1))])

    @staticmethod
    def _apply(x, matrices):
        if x.dim() < 3:  # one mesh [V, 3]
            for m in matrices:
                x = torch.spmm(m.to(device=x.device, dtype=x.dtype), x)
            return x
        out = []
        for i in range(x.shape[0]):  # the released per-sample loop
            y = x[i]
            for m in matrices:
                y = torch.spmm(m.to(device=y.device, dtype=y.dtype), y)
            out.append(y)
        return torch.stack(out, dim=0)
