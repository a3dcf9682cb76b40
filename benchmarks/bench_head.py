"""The whole TORE-FastMETRO head after the backbone (ITP, three transformers, NSR, regressors, upsampling):
the eager model as built by tore_reference vs the same instance after ``tore_kernels.patch``. Default sizes:
2048 backbone channels, model size L, ITP keep ratio 0.8 on a 7x7 grid, on the generated default body mesh;
eval mode, no_grad; fp32, plus ``patch(dtype=torch.bfloat16)``. ``gemm``: a plain fp32 vs bf16 matmul."""
import copy

import torch

from tore_kernels.patch import patch
from tore_kernels.topology import default_body_mesh
from tore_reference import Mesh, ToreFastMETROHead
from tore_benchmarks.harness import Case, entry


def _no_grad(model, x):
    def call():
        with torch.no_grad():
            return model(x)
    return call


@entry("head")
def head(device, quick):
    topo = default_body_mesh()
    mesh = Mesh([u.to(device) for u in topo.upsampling], [d.to(device) for d in topo.downsampling])
    torch.manual_seed(0)
    eager = ToreFastMETROHead(topo.adjacency.to_dense(), mesh, backbone_channels=2048, model_size="L",
                              keep_ratio=0.8, use_itp=True, feature_size=(7, 7)).to(device).eval()
    patched = patch(copy.deepcopy(eager))
    patched_bf16 = patch(copy.deepcopy(eager), dtype=torch.bfloat16)
    for batch in ((1, 2) if quick else (1, 16, 32)):
        x = torch.randn(batch, 2048, 7, 7, device=device)
        with torch.no_grad():
            patched(x)  # one-time work (neighbour table, sparse matrix conversion) is not what is measured
            patched_bf16(x)
        yield Case("head", {"model": "TORE-FastMETRO-L ITP+GTR", "batch": batch, "dtype": "fp32"}, {
            "eager": _no_grad(eager, x),
            "patched": _no_grad(patched, x),
            "patched bf16": _no_grad(patched_bf16, x),  # patch(dtype=torch.bfloat16): error in tests/test_patch.py
        })


@entry("gemm")
def gemm(device, quick):
    """What bf16 can give on this machine: one 2048^3 matmul, fp32 vs bf16 (oneDNN; AMX or avx512_bf16 on CPU,
    tensor cores on GPU). The ratio bounds what patch(dtype=torch.bfloat16) can gain on the head's GEMMs."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    yield Case("gemm", {"m=n=k": n}, {"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16})
