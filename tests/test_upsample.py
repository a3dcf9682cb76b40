"""tore_kernels.ops.upsample.mesh_upsample and tore_kernels.nn.mesh.MeshSampler against the released
per-sample sampler (tore_reference.mesh.Mesh), on the generated default mesh and on FastMETRO's matrices."""
import os

import pytest
import torch
from isa_clones import run_under_clone

from tore_kernels import backend
from tore_kernels.nn.mesh import MeshSampler
from tore_kernels.ops.upsample import HAS_CSR_MM, mesh_upsample
from tore_kernels.topology import default_body_mesh, from_faces
from tore_reference.mesh import Mesh

# fp32: both sides accumulate <= 9 products of O(1) values; precomposing the chain only reorders the
# rounding (~1e-7 relative). fp16 / bf16 run in fp32 and round once at the end: half an ulp of the output.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2 ** -10, atol=2 ** -10), torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


@pytest.fixture(params=["cpu", "reference"])
def impl(request, device, monkeypatch):
    """On each device (see ``device``; the tensors go there): the precomposed CSR chain, then the released
    one-matrix-at-a-time products. CUDA tensors have only the latter (torch.sparse, cuSPARSE)."""
    if request.param == "cpu" and device.type != "cpu":
        pytest.skip("mesh_upsample has no CUDA kernel: CUDA tensors take the reference path (its own case)")
    monkeypatch.setenv("TORE_KERNELS_BACKEND", request.param)
    assert backend.choose("mesh_upsample", device) == request.param
    return request.param


@pytest.fixture(scope="module")
def default_pair():
    topo = default_body_mesh()
    return MeshSampler(topo), Mesh(topo.upsampling, topo.downsampling)


def reference_upsample(ref, x, n1=2, n2=0):
    for level in reversed(range(n2, n1)):  # one level at a time, as the released model calls it
        x = ref.upsample(x, n1=level + 1, n2=level)
    return x


@pytest.mark.parametrize("batch", [0, 1, 7, 32])
def test_upsample_matches_released_loop(default_pair, impl, device, batch):
    ours, ref = default_pair
    x = torch.randn(batch, 431, 3, generator=torch.Generator().manual_seed(batch)).to(device)
    out = ours.upsample(x, n1=2, n2=0)
    assert out.shape == (batch, 6890, 3) and out.dtype == torch.float32
    if batch:
        torch.testing.assert_close(out, reference_upsample(ref, x), **TOL[torch.float32])
        torch.testing.assert_close(ours.upsample(x[0], n1=2, n2=0), reference_upsample(ref, x[0]), **TOL[torch.float32])


def test_each_level_and_downsample(default_pair, impl, device):
    ours, ref = default_pair
    x = torch.randn(5, 1723, 3, device=device)
    torch.testing.assert_close(ours.upsample(x), ref.upsample(x), **TOL[torch.float32])  # default 1 -> 0
    y = torch.randn(5, 6890, 3, device=device)
    torch.testing.assert_close(ours.downsample(y), ref.downsample(y), **TOL[torch.float32])  # 0 -> 2
    # one level, one matrix, the same product on CPU; cuSPARSE picks its algorithm by the dense width (the
    # reference multiplies each sample alone), so on CUDA the order of each row's few terms may differ
    exact = dict(rtol=0, atol=0) if device.type == "cpu" else TOL[torch.float32]
    torch.testing.assert_close(ours.downsample(y, n1=0, n2=1), ref.downsample(y, n1=0, n2=1), **exact)
    assert ours.upsample(x, n1=1, n2=1) is x and ours.downsample(y, n1=1, n2=1) is y


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_input(default_pair, impl, device, layout):
    ours, ref = default_pair
    base = torch.randn(431, 6, 4, device=device)
    x = {"transposed": base[..., :3].transpose(0, 1),
         "strided": torch.randn(12, 431, 3, device=device)[::2],
         "expanded": base[:, 0, :3].expand(6, 431, 3)}[layout]
    assert not x.is_contiguous()
    torch.testing.assert_close(ours.upsample(x, n1=2, n2=0), reference_upsample(ref, x.contiguous()),
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(default_pair, device, dtype):
    ours, ref = default_pair
    x = torch.randn(3, 431, 3).to(dtype).to(device)
    out = ours.upsample(x, n1=2, n2=0)
    assert out.dtype == dtype
    expected = reference_upsample(ref, x.float())
    if dtype == torch.float64:
        expected = reference_upsample(Mesh([u.double() for u in ref._U], ref._D), x)
    torch.testing.assert_close(out, expected.to(dtype), **TOL[dtype])


def test_gradients_match_released_loop(default_pair, impl, device):
    ours, ref = default_pair
    x = torch.randn(4, 431, 3, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(4, 6890, 3, device=device)
    (gx,) = torch.autograd.grad(ours.upsample(x, n1=2, n2=0), x, grad)
    (gr,) = torch.autograd.grad(reference_upsample(ref, x_ref), x_ref, grad)
    torch.testing.assert_close(gx, gr, **TOL[torch.float32])


def test_without_the_extension_op_runs_torch_sparse(default_pair, monkeypatch):
    """A build without tore_kernels._C keeps the precomposed chain as sparse CSR tensors (torch.sparse.mm)."""
    from tore_kernels.ops import upsample

    monkeypatch.setattr(upsample, "HAS_CSR_MM", False)
    monkeypatch.setattr(upsample, "_PREPARED", upsample.collections.OrderedDict())  # built afresh, then dropped
    ours, ref = default_pair
    x = torch.randn(4, 431, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = ours.upsample(x, n1=2, n2=0)
    (chain,) = upsample._PREPARED.values()
    assert all(m.layout == torch.sparse_csr for m in chain[1].forward + chain[1].backward)
    torch.testing.assert_close(out, reference_upsample(ref, x_ref), **TOL[torch.float32])
    grad = torch.randn(4, 6890, 3)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gr,) = torch.autograd.grad(reference_upsample(ref, x_ref), x_ref, grad)
    torch.testing.assert_close(gx, gr, **TOL[torch.float32])


def test_gradcheck_float64(default_pair, impl, device):
    ours, _ = default_pair
    x = torch.randn(2, 431, 3, dtype=torch.float64, device=device, requires_grad=True)
    # fast mode: the full Jacobian has 6890*3*2 rows; fast mode checks random projections of it
    assert torch.autograd.gradcheck(lambda v: ours.upsample(v, n1=2, n2=0), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda v: ours.upsample(v, n1=2, n2=0), (x,), fast_mode=True)


def test_gradcheck_full_jacobian_small_chain(impl, device):
    """Full (slow-mode) gradcheck on a small random chain, both for [B, V, C] and [V, C] inputs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 5, generator=g).masked_fill(torch.rand(9, 5, generator=g) < 0.5, 0).to_sparse()
    b = torch.randn(11, 9, generator=g).masked_fill(torch.rand(11, 9, generator=g) < 0.5, 0).to_sparse_csr()
    for shape in [(3, 5, 2), (5, 4)]:
        x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: mesh_upsample(v, [a, b]), (x,))
        columns = x if x.dim() == 2 else x.transpose(0, 1).reshape(5, -1)  # [V, B*C]
        expected = (b.to_dense().double() @ a.to_dense().double()).to(device) @ columns
        out = mesh_upsample(x, [a, b])
        if x.dim() == 3:
            out = out.transpose(0, 1).reshape(11, -1)
        torch.testing.assert_close(out, expected, **TOL[torch.float64])


def test_cache_sees_in_place_changes(impl, device):
    u = default_body_mesh().upsampling[1].clone()
    x = torch.randn(2, 431, 3, device=device)
    first = mesh_upsample(x, [u])
    u.mul_(2.0)  # bumps the version: the cached CSR copy must not be reused
    torch.testing.assert_close(mesh_upsample(x, [u]), 2 * first, **TOL[torch.float32])


@pytest.mark.parametrize("make, error, match", [
    (lambda u: (torch.zeros(2, 431, 3, dtype=torch.int64), [u]), TypeError, "x: expected a floating"),
    (lambda u: (torch.zeros(1, 2, 431, 3), [u]), ValueError, r"x: expected \[B, V, C\]"),
    (lambda u: ([[0.0] * 3] * 431, [u]), TypeError, "x: expected a torch.Tensor"),
    (lambda u: (torch.zeros(2, 430, 3), [u]), ValueError, r"matrices\[0\]: has 431 columns, expected 430"),
    (lambda u: (torch.zeros(2, 431, 3), []), TypeError, "matrices: expected a non-empty"),
    (lambda u: (torch.zeros(2, 431, 3), u), TypeError, "matrices: expected a non-empty sequence"),
    (lambda u: (torch.zeros(2, 431, 3), [u.to_dense()]), TypeError, r"matrices\[0\]: expected a sparse"),
    (lambda u: (torch.zeros(2, 431, 3), [u, u]), ValueError, r"matrices\[1\]: has 431 columns, expected 1723"),
])
def test_validation(make, error, match):
    x, matrices = make(default_body_mesh().upsampling[1])
    with pytest.raises(error, match=match):
        mesh_upsample(x, matrices)


needs_csr_mm = pytest.mark.skipif(not HAS_CSR_MM, reason="tore_kernels._C is not built")


def csr_args(rows=300, cols=50, columns=3, dtype=torch.float64):
    """(crow, col, values, rows, x) of a random CSR matrix with empty rows, and the float64 dense product."""
    torch.manual_seed(0)
    dense = (torch.randn(rows, cols, dtype=torch.float64) * (torch.rand(rows, cols) < 0.1)).to(dtype)
    dense[7] = 0
    csr = dense.to_sparse_csr()
    x = torch.randn(cols, columns, dtype=dtype)
    return (csr.crow_indices(), csr.col_indices(), csr.values(), rows, x), dense.double() @ x.double()


@needs_csr_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("columns", [1, 3, 96])  # 96: batch 32 of coordinates, split over threads
def test_csr_mm_against_float64(dtype, columns):
    args, expected = csr_args(columns=columns, dtype=dtype)
    out = torch.ops.tore_kernels.csr_mm(*args)
    assert out.dtype == dtype and out.shape == (300, columns)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    torch.library.opcheck(torch.ops.tore_kernels.csr_mm.default, args, test_utils=(
        "test_schema", "test_faketensor"))


@needs_csr_mm
@pytest.mark.parametrize("clone", backend.ISA_CLONES)
def test_csr_mm_every_isa_clone(clone):
    """The op's row loop is compiled for the baseline ISA, AVX2 and AVX-512VL, the widest that the CPU and
    ATEN_CPU_CAPABILITY allow running: its value tests rerun under each clone this CPU can execute."""
    run_under_clone(clone, __file__, "test_csr_mm_against_float64", expect_passed=6)


@needs_csr_mm
@pytest.mark.parametrize("change, match", [
    (lambda a: (a[0][:-1], *a[1:]), r"crow_indices must be an int64 \[rows \+ 1 = 301\]"),
    (lambda a: (a[0].int(), *a[1:]), r"crow_indices must be an int64"),
    (lambda a: (a[0].flip(0), *a[1:]), "crow_indices must start at 0, never decrease"),
    (lambda a: (a[0], a[1] + 50, *a[2:]), r"col_indices must lie in \[0, x.shape\[0\] = 50\)"),
    (lambda a: (a[0], a[1] - 50, *a[2:]), r"col_indices must lie in \[0, x.shape\[0\] = 50\)"),
    (lambda a: (*a[:2], a[2].float(), *a[3:]), "values must be a 1-D tensor of x's dtype"),
    (lambda a: (*a[:2], a[2][:-1], *a[3:]), "values must be a 1-D tensor of x's dtype"),
    (lambda a: (*a[:4], a[4][None]), "x must be a 2-D float32 or float64 tensor"),
    (lambda a: (*a[:4], a[4].long()), "x must be a 2-D float32 or float64 tensor"),
])
def test_csr_mm_rejects_bad_arrays(change, match):
    """Named errors, never an out-of-bounds read: the op is reachable as torch.ops.tore_kernels.csr_mm."""
    args, _ = csr_args()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tore_kernels.csr_mm(*change(args))


def test_sampler_validation(default_pair):
    ours, _ = default_pair
    with pytest.raises(TypeError, match="topology"):
        MeshSampler(object())
    with pytest.raises(ValueError, match="single-level"):
        MeshSampler(from_faces([[0, 1, 2]]))
    with pytest.raises(TypeError, match="_U and _D"):
        MeshSampler.from_sampler(object())
    with pytest.raises(ValueError, match="levels"):
        ours.upsample(torch.zeros(1, 431, 3), n1=3, n2=0)
    with pytest.raises(ValueError, match="levels"):
        ours.downsample(torch.zeros(1, 6890, 3), n1=-1, n2=1)
    assert ours.num_vertices == (6890, 1723, 431) and ours.num_downsampling == 2


def test_from_sampler_on_real_matrices(fastmetro_data, impl, device):
    ref = Mesh.from_fastmetro(os.path.join(fastmetro_data, "mesh_downsampling.npz"))
    ours = MeshSampler.from_sampler(ref)
    assert ours.num_vertices == (6890, 1723, 431)
    x = torch.randn(9, 431, 3, device=device)
    torch.testing.assert_close(ours.upsample(x, n1=2, n2=0), reference_upsample(ref, x), **TOL[torch.float32])
    torch.testing.assert_close(ours.upsample(x[0], n1=2, n2=1), ref.upsample(x[0], n1=2, n2=1), **TOL[torch.float32])
    y = torch.randn(3, 6890, 3, device=device)
    exact = dict(rtol=0, atol=0) if device.type == "cpu" else TOL[torch.float32]  # as in test_each_level_and_downsample
    torch.testing.assert_close(ours.downsample(y), ref.downsample(y), **exact)
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    grad = torch.randn(9, 6890, 3, device=device)
    (gx,) = torch.autograd.grad(ours.upsample(xg, n1=2, n2=0), xg, grad)
    (gr,) = torch.autograd.grad(reference_upsample(ref, xr), xr, grad)
    torch.testing.assert_close(gx, gr, **TOL[torch.float32])
