"""itp_loss (tore_kernels.ops.projection) against the released double loop in tore_reference."""
import pytest
import torch

import tore_reference
from tore_kernels import backend
from tore_kernels.ops.projection import HAS_EXTENSION_OPS, itp_loss


@pytest.fixture(params=("kernel", "reference"))
def impl(request, device, monkeypatch):
    """On each device (see ``device``; the tensors go there), the occupancy inside the loss from the C++ (CPU or
    CUDA) kernel, then from the plain-torch path."""
    name = "reference"
    if request.param == "kernel":
        if not HAS_EXTENSION_OPS:
            pytest.skip("tore_kernels._C has no projection ops")
        if device.type == "cuda" and not backend.HAS_EXTENSION_CUDA:
            pytest.skip("tore_kernels._C was built without its CUDA kernels")
        name = device.type
    monkeypatch.setenv(backend.ENV_VAR, name)
    assert backend.choose("token_occupancy", device) == name
    return name


def _inputs(B, N, P, grid=(7, 7), dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, grid[0] * grid[1], generator=g, dtype=torch.float64) * 2
    heatmap = logits.softmax(dim=-1).to(dtype)  # like the model's: a distribution over tokens per cluster
    points2d = torch.randn(B, P, 2, generator=g, dtype=torch.float64) * 0.3 + 0.2  # a body-like blob
    has_smpl = torch.arange(B) % 3 != 1  # a mix of samples with and without SMPL ground truth
    return heatmap.to(device), points2d.to(device), has_smpl.to(device)


def _loss_and_grad(fn, heatmap, *args, **kwargs):
    heatmap = heatmap.detach().clone().requires_grad_(True)
    loss = fn(heatmap, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, heatmap, allow_unused=True)
    return loss.detach(), grad if grad is not None else torch.zeros_like(heatmap)


@pytest.mark.parametrize("B,N,P", [(1, 39, 6890), (3, 39, 431), (4, 24, 17), (2, 1, 0), (3, 5, 1)])
@pytest.mark.parametrize("grid", [(7, 7), (4, 6)])
def test_matches_reference_float64(impl, device, B, N, P, grid):
    heatmap, points2d, has_smpl = _inputs(B, N, P, grid, device=device)
    loss, grad = _loss_and_grad(itp_loss, heatmap, points2d, has_smpl, grid)
    ref_loss, ref_grad = _loss_and_grad(tore_reference.itp_loss, heatmap, points2d, has_smpl, grid)
    assert loss.shape == () and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    if P and has_smpl.any():
        assert loss > 0 and (grad != 0).any()  # the inputs exercise both occupied and free cells


def test_matches_reference_float32(impl, device):
    heatmap, points2d, has_smpl = _inputs(32, 39, 6890, dtype=torch.float32, seed=1, device=device)
    loss, grad = _loss_and_grad(itp_loss, heatmap, points2d.float(), has_smpl)
    ref_loss, ref_grad = _loss_and_grad(tore_reference.itp_loss, heatmap, points2d.float(), has_smpl)
    # Same elementwise float32 operations; only the summation order differs (a few ulps of a positive sum).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_half_heatmap_computed_in_float(impl, device, dtype):
    heatmap, points2d, has_smpl = _inputs(8, 39, 500, seed=2, device=device)
    heatmap = heatmap.to(dtype)
    loss, grad = _loss_and_grad(itp_loss, heatmap, points2d, has_smpl)
    # The exact loss of the same (rounded) heatmap; ours is computed in float32 and rounded once to dtype.
    ref_loss, ref_grad = _loss_and_grad(tore_reference.itp_loss, heatmap.double(), points2d, has_smpl)
    assert loss.dtype == dtype and grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref_loss, rtol=eps, atol=0)
    # Gradients: rounded to dtype once (float32 error is far below that), relative to the row's scale.
    scale = ref_grad.abs().amax(dim=-1, keepdim=True)
    assert ((grad.double() - ref_grad).abs() <= eps * scale).all()


def test_ties_and_constant_rows_spread_gradient_like_reference(impl, device):
    heatmap, points2d, has_smpl = _inputs(3, 6, 40, seed=3, device=device)
    heatmap = heatmap.clone()
    heatmap[0, 0] = 0.02                       # constant row: max == min, the 1e-12 epsilon decides
    heatmap[0, 1, ::7] = heatmap[0, 1].max()   # tied maxima
    heatmap[1, 2, 1::5] = heatmap[1, 2].min()  # tied minima
    has_smpl = torch.ones(3, dtype=torch.bool, device=device)
    loss, grad = _loss_and_grad(itp_loss, heatmap, points2d, has_smpl)
    ref_loss, ref_grad = _loss_and_grad(tore_reference.itp_loss, heatmap, points2d, has_smpl)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grad[0, 0].abs().max() > 1e9  # the constant row's 1 / 1e-12, as in the released loss


def test_gradcheck(impl, device):
    heatmap, points2d, has_smpl = _inputs(3, 4, 30, grid=(3, 4), seed=4, device=device)
    heatmap.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: itp_loss(h, points2d, has_smpl, (3, 4)), (heatmap,))


@pytest.mark.parametrize("has_smpl", [torch.tensor([1, 0, 1]), torch.tensor([1.0, 0.0, 1.0]),
                                      torch.tensor([True, False, True]), torch.tensor([2, 0, 1])])
def test_has_smpl_dtypes(impl, device, has_smpl):
    heatmap, points2d, _ = _inputs(3, 5, 60, seed=5, device=device)
    has_smpl = has_smpl.to(device)
    loss = itp_loss(heatmap, points2d, has_smpl)
    torch.testing.assert_close(loss, tore_reference.itp_loss(heatmap, points2d, has_smpl), rtol=1e-12, atol=0)


def test_excluded_samples_do_not_leak(impl, device):
    heatmap, points2d, _ = _inputs(3, 5, 60, seed=6, device=device)
    heatmap = heatmap.clone()
    heatmap[1, 2, 3] = float("nan")
    has_smpl = torch.tensor([1, 0, 1], device=device)
    loss, grad = _loss_and_grad(itp_loss, heatmap, points2d, has_smpl)
    ref_loss, ref_grad = _loss_and_grad(tore_reference.itp_loss, heatmap, points2d, has_smpl)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    # The NaN row's own gradient is 0 / NaN in the released loss too; every other element is finite.
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(grad[1, 2]).all() and torch.isfinite(grad[[0, 2]]).all() and (grad[1, [0, 1, 3, 4]] == 0).all()
    assert itp_loss(heatmap, points2d, torch.zeros(3, device=device)) == 0


def test_empty_batch_and_strides(impl, device):
    heatmap, points2d, has_smpl = _inputs(0, 39, 10, device=device)
    assert itp_loss(heatmap, points2d, has_smpl) == 0
    heatmap, points2d, has_smpl = _inputs(4, 39, 100, seed=7, device=device)
    expected = itp_loss(heatmap, points2d, has_smpl)
    heatmap_t = heatmap.transpose(0, 1).contiguous().transpose(0, 1)
    points_t = points2d.transpose(0, 1).contiguous().transpose(0, 1)
    assert not heatmap_t.is_contiguous() and not points_t.is_contiguous()
    # Only the order of the float64 sum may change with the layout.
    torch.testing.assert_close(itp_loss(heatmap_t, points_t, has_smpl[:, None].t()[0]), expected, rtol=1e-14, atol=0)


def test_compile_fullgraph(impl, device):
    torch._dynamo.reset()
    heatmap, points2d, has_smpl = _inputs(4, 39, 300, dtype=torch.float32, seed=8, device=device)
    compiled = torch.compile(itp_loss, fullgraph=True)
    loss, grad = _loss_and_grad(compiled, heatmap, points2d.float(), has_smpl)
    ref_loss, ref_grad = _loss_and_grad(tore_reference.itp_loss, heatmap, points2d.float(), has_smpl)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def _bad(**override):
    heatmap, points2d, has_smpl = _inputs(2, 3, 5)
    args = dict(heatmap=heatmap, points2d=points2d, has_smpl=has_smpl, grid_size=(7, 7))
    args.update(override)
    return args


@pytest.mark.parametrize("args,exc,match", [
    (_bad(heatmap=torch.ones(2, 3, 49, dtype=torch.int64)), TypeError, "heatmap: expected float32"),
    (_bad(heatmap=torch.ones(2, 3, 48)), ValueError, r"heatmap: expected shape \[B, N, 49\]"),
    (_bad(heatmap=torch.ones(2, 49)), ValueError, r"heatmap: expected shape \[B, N, 49\]"),
    (_bad(grid_size=(6, 7)), ValueError, r"heatmap: expected shape \[B, N, 42\]"),
    (_bad(grid_size=(7, -7)), ValueError, "grid_size: expected two ints >= 1"),
    (_bad(points2d=torch.ones(3, 5, 2)), ValueError, r"points2d: expected shape \[2, P, 2\]"),
    (_bad(points2d=torch.ones(2, 5, 3)), ValueError, r"points2d: expected shape \[2, P, 2\]"),
    (_bad(points2d=torch.ones(2, 5, 2, dtype=torch.int32)), TypeError, "points2d: expected float32"),
    (_bad(has_smpl=[1, 1]), TypeError, "has_smpl: expected a torch.Tensor"),
    (_bad(has_smpl=torch.ones(3)), ValueError, r"has_smpl: expected shape \[2\]"),
    (_bad(has_smpl=torch.ones(2, 1)), ValueError, r"has_smpl: expected shape \[2\]"),
    (_bad(has_smpl=torch.ones(2, device="meta")), ValueError, "has_smpl: expected the device of heatmap"),
])
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        itp_loss(**args)
