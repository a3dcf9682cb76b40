"""weak_perspective_project and token_occupancy (tore_kernels.ops.projection) against tore_reference and the formula."""
import importlib
import math

import pytest
import torch

import tore_reference
from tore_kernels import backend
from tore_kernels.ops.projection import HAS_EXTENSION_OPS, token_occupancy, weak_perspective_project

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Unit roundoff of each dtype and of the type the kernels compute in (float for the half types).
UNIT = {dt: torch.finfo(dt).eps / 2 for dt in DTYPES}
ACC_UNIT = {torch.float64: UNIT[torch.float64], torch.float32: UNIT[torch.float32],
            torch.float16: UNIT[torch.float32], torch.bfloat16: UNIT[torch.float32]}
needs_extension = pytest.mark.skipif(not HAS_EXTENSION_OPS, reason="tore_kernels._C has no projection ops")


def kernel_of(device):
    """The C++ kernel's backend name for tensors on ``device`` (cpu, or cuda), skipping where _C lacks it."""
    if not HAS_EXTENSION_OPS:
        pytest.skip("tore_kernels._C has no projection ops")
    if device.type == "cuda" and not backend.HAS_EXTENSION_CUDA:
        pytest.skip("tore_kernels._C was built without its CUDA kernels")
    return device.type


@pytest.fixture(params=("kernel", "reference"))
def impl(request, device, monkeypatch):
    """Every test using it runs on each device (see ``device``) with the C++ (CPU or CUDA) kernels and with the
    plain-torch path; its tensors go to ``device``."""
    name = kernel_of(device) if request.param == "kernel" else "reference"
    monkeypatch.setenv(backend.ENV_VAR, name)
    for op in ("weak_perspective_project", "token_occupancy"):
        assert backend.choose(op, device) == name
    return name


def _inputs(lead, P, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(*lead, P, 3, generator=g, dtype=torch.float64).to(dtype)
    camera = torch.randn(*lead, 3, generator=g, dtype=torch.float64)
    camera[..., 0] = camera[..., 0].abs() + 0.5  # scales like a real camera's
    return points.to(device), camera.to(dtype).to(device)


def _assert_within(actual, exact, bound, what):
    """|actual - exact| <= bound elementwise (exact and bound in float64)."""
    err = (actual.double() - exact).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond the bound; "
                           f"worst error {err[bad].max().item():.3g} vs bound {bound.expand_as(err)[bad].min().item():.3g}")


# --------------------------------------------------------------------------------------------------------------------
# weak_perspective_project

SHAPES = [((), 5), ((1,), 7), ((3,), 1), ((0,), 5), ((2,), 0), ((2, 3), 17), ((4,), 6890)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,P", SHAPES)
def test_project_matches_formula(impl, device, dtype, lead, P):
    points, camera = _inputs(lead, P, dtype, device=device)
    out = weak_perspective_project(points, camera)
    assert out.shape == (*lead, P, 2) and out.dtype == dtype
    x, c = points.double(), camera.double().unsqueeze(-2)
    exact = c[..., :1] * (x[..., :2] + c[..., 1:])
    # One rounding to dtype, plus the float intermediate x + t (relative to |x| + |t|) for the half types.
    bound = UNIT[dtype] * exact.abs() + 2 * ACC_UNIT[dtype] * c[..., :1].abs() * (x[..., :2].abs() + c[..., 1:].abs())
    _assert_within(out, exact, bound, "projection")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,P", [(1, 6890), (3, 17), (2, 0)])  # the reference cannot take B = 0
def test_project_matches_reference(impl, device, dtype, B, P):
    points, camera = _inputs((B,), P, dtype, seed=1, device=device)
    out = weak_perspective_project(points, camera)
    ref = tore_reference.orthographic_projection(points, camera)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same two IEEE operations
    else:
        # The reference rounds x + t to the half type before scaling: one extra rounding, at most.
        x, c = points.double(), camera.double().unsqueeze(-2)
        bound = 2 * UNIT[dtype] * c[..., :1].abs() * (x[..., :2].abs() + c[..., 1:].abs())
        _assert_within(out, ref.double(), bound, "projection vs reference")


def test_project_any_strides(impl, device):
    points, camera = _inputs((4,), 33, torch.float32, seed=2, device=device)
    expected = weak_perspective_project(points, camera)
    points_t = points.transpose(0, 1).contiguous().transpose(0, 1)  # [4, 33, 3] with P-major storage
    camera_t = camera.t().contiguous().t()
    assert not points_t.is_contiguous() and not camera_t.is_contiguous()
    torch.testing.assert_close(weak_perspective_project(points_t, camera_t), expected, rtol=0, atol=0)
    wide = torch.zeros(4, 66, 5, device=device)
    wide[:, ::2, 1:4] = points
    torch.testing.assert_close(weak_perspective_project(wide[:, ::2, 1:4], camera), expected, rtol=0, atol=0)


@pytest.mark.parametrize("lead,P", [((), 4), ((3,), 5), ((2, 2), 3), ((2,), 0), ((0,), 3)])
def test_project_gradcheck(impl, device, lead, P):
    points, camera = _inputs(lead, P, torch.float64, seed=3, device=device)
    points.requires_grad_(True)
    camera.requires_grad_(True)
    assert torch.autograd.gradcheck(weak_perspective_project, (points, camera))


@pytest.mark.parametrize("lead,P", [((), 4), ((3,), 5), ((2, 2), 3)])
def test_project_gradgradcheck(device, lead, P):
    kernel_of(device)
    points, camera = _inputs(lead, P, torch.float64, seed=11, device=device)
    points.requires_grad_(True)
    camera.requires_grad_(True)
    assert torch.autograd.gradgradcheck(weak_perspective_project, (points, camera))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,P", [(3, 6890), (2, 17), (1, 1)])
def test_project_gradients_match_reference(impl, device, dtype, B, P):
    points, camera = _inputs((B,), P, dtype, seed=4, device=device)
    grad = torch.randn(B, P, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    points.requires_grad_(True)
    camera.requires_grad_(True)
    weak_perspective_project(points, camera).backward(grad.to(dtype))
    # The exact gradients of the float64 reference on the same (dtype-rounded) inputs.
    x64 = points.detach().double().requires_grad_(True)
    c64 = camera.detach().double().requires_grad_(True)
    g = grad.to(dtype).double()
    tore_reference.orthographic_projection(x64, c64).backward(g)
    s = c64.detach()[:, None, :1]
    # grad_points: s * g rounded once. grad_camera: sums over P in the op-math type (worst case P rounding
    # errors relative to the sum of absolute terms), then one rounding to dtype.
    _assert_within(points.grad, x64.grad, UNIT[dtype] * x64.grad.abs() + 1e-300, "grad points")
    terms = torch.cat([(g * (x64.detach()[..., :2] + c64.detach()[:, None, 1:])).abs().sum(-1, keepdim=True),
                       (s * g).abs()], dim=-1).sum(1)
    bound = UNIT[dtype] * c64.grad.abs() + (P + 1) * ACC_UNIT[dtype] * terms
    _assert_within(camera.grad, c64.grad, bound, "grad camera")
    assert torch.all(points.grad[..., 2] == 0)


def test_project_grad_only_where_needed(impl, device):
    points, camera = _inputs((2,), 5, torch.float64, seed=6, device=device)
    camera.requires_grad_(True)
    (gc,) = torch.autograd.grad(weak_perspective_project(points, camera).sum(), camera)
    torch.testing.assert_close(gc[:, 1:], 5 * camera.detach()[:, :1].expand(2, 2))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("lead,P", [((2,), 5), ((2, 3), 4), ((1,), 0)])
def test_project_opcheck(device, dtype, lead, P):
    kernel_of(device)
    points, camera = _inputs(lead, P, dtype, seed=7, device=device)
    torch.library.opcheck(torch.ops.tore_kernels.weak_perspective_project.default,
                          (points.requires_grad_(True), camera.requires_grad_(True)))
    grad = torch.randn(*lead, P, 2, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.tore_kernels.weak_perspective_project_backward.default,
                          (grad.requires_grad_(True), points, camera))


@pytest.mark.parametrize("points,camera,exc,match", [
    ([[1.0, 2.0, 3.0]], torch.ones(3), TypeError, "points: expected a torch.Tensor"),
    (torch.ones(4, 3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), TypeError, "points: expected float32"),
    (torch.ones(4, 3), torch.ones(3, dtype=torch.float64), TypeError, "camera: expected the dtype of points"),
    (torch.ones(4, 2), torch.ones(3), ValueError, r"points: expected shape \[..., P, 3\]"),
    (torch.ones(3), torch.ones(3), ValueError, r"points: expected shape \[..., P, 3\]"),
    (torch.ones(2, 4, 3), torch.ones(3, 3), ValueError, r"camera: expected shape \(2, 3\)"),
    (torch.ones(2, 4, 3), torch.ones(2, 2), ValueError, r"camera: expected shape \(2, 3\)"),
    (torch.ones(2, 4, 3), torch.ones(3), ValueError, "camera: expected shape"),
    (torch.ones(2, 4, 3), torch.ones(2, 3, device="meta"), ValueError, "camera: expected the device of points"),
])
def test_project_bad_inputs(impl, points, camera, exc, match):
    with pytest.raises(exc, match=match):
        weak_perspective_project(points, camera)


# --------------------------------------------------------------------------------------------------------------------
# token_occupancy

def _border_points(dtype, grid):
    """x values on and next to every cell border of a grid of `grid` cells, plus far outside / inf / NaN."""
    borders = torch.tensor([2 * k / grid - 1 for k in range(grid + 1)], dtype=torch.float64).to(dtype)
    up = torch.nextafter(borders, torch.full_like(borders, math.inf))
    down = torch.nextafter(borders, torch.full_like(borders, -math.inf))
    special = torch.tensor([0.0, -1.0, 1.0, -1.5, 1.5, 10.0, -10.0, 1e4, -1e4, math.inf, -math.inf, math.nan],
                           dtype=dtype)
    return torch.cat([borders, up, down, special])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid", [(7, 7), (5, 9), (1, 1), (4, 1)])
def test_occupancy_borders_match_reference(impl, device, dtype, grid):
    gh, gw = grid
    xs, ys = _border_points(dtype, gw), _border_points(dtype, gh)
    # Every (x, y) pair, one point per sample so each sample's grid shows exactly where that point went.
    pts = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 1, 2).to(device)
    out = token_occupancy(pts, grid)
    ref = tore_reference.token_occupancy(pts, grid)
    assert out.dtype == dtype and out.shape == (pts.shape[0], gh, gw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Sanity of the border set: some points land, some are dropped, none lands twice.
    per_sample = out.sum(dim=(1, 2))
    assert set(per_sample.tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,P", [(0, 5), (1, 0), (1, 1), (3, 17), (2, 6890)])
def test_occupancy_random_match_reference(impl, device, dtype, B, P):
    g = torch.Generator().manual_seed(8)
    # A body-like blob: dense in the middle, some points outside the crop, corner cells empty.
    pts = (torch.randn(B, P, 2, generator=g, dtype=torch.float64) * 0.3 + 0.3).to(dtype).to(device)
    out = token_occupancy(pts, (7, 7))
    torch.testing.assert_close(out, tore_reference.token_occupancy(pts, (7, 7)), rtol=0, atol=0)
    if P == 6890:
        assert 0 < out.sum() < out.numel()  # a real mix of occupied and free cells


def test_occupancy_formula_by_hand(impl, device):
    # g = (p + 1) / 2 * G with G = 7: -1 -> 0 (cell 0), 0 -> 3.5 (cell 3), 0.99 -> 6.965 (cell 6), 1 -> 7 (out).
    pts = torch.tensor([[[-1.0, 0.0]], [[0.0, -1.0]], [[0.99, 0.99]], [[1.0, 0.0]], [[0.0, 1.0]],
                        [[-1.01, 0.0]], [[math.nan, 0.0]], [[0.0, math.inf]]], device=device)
    out = token_occupancy(pts, (7, 7))
    expected = torch.zeros(8, 7, 7, device=device)
    expected[0, 3, 0] = 1  # row = y, col = x
    expected[1, 0, 3] = 1
    expected[2, 6, 6] = 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Non-square grid: x uses grid_w, y uses grid_h.
    out = token_occupancy(torch.tensor([[[0.5, -0.5]]], device=device), (2, 8))
    assert out.shape == (1, 2, 8) and out[0, 0, 6] == 1 and out.sum() == 1


def test_occupancy_strides_and_no_grad(impl, device):
    g = torch.Generator().manual_seed(9)
    pts = (torch.rand(40, 3, 2, generator=g) * 2 - 1).to(device)
    expected = token_occupancy(pts.transpose(0, 1).contiguous(), (7, 7))
    out = token_occupancy(pts.transpose(0, 1), (7, 7))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    leaf = pts.transpose(0, 1).clone().requires_grad_(True)
    out = token_occupancy(leaf * 1.0, (7, 7))
    assert not out.requires_grad  # a step function of the points: no gradient, by design


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_occupancy_opcheck(device, dtype):
    kernel_of(device)
    pts = (torch.rand(3, 11, 2) * 2.4 - 1.2).to(dtype).to(device)
    torch.library.opcheck(torch.ops.tore_kernels.token_occupancy.default, (pts, 7, 7))
    torch.library.opcheck(torch.ops.tore_kernels.token_occupancy.default, (pts[:0], 5, 3))


@pytest.mark.parametrize("points2d,grid,exc,match", [
    (torch.ones(2, 4, 2, dtype=torch.int32), (7, 7), TypeError, "points2d: expected float32"),
    (torch.ones(4, 2), (7, 7), ValueError, r"points2d: expected shape \[B, P, 2\]"),
    (torch.ones(2, 4, 3), (7, 7), ValueError, r"points2d: expected shape \[B, P, 2\]"),
    (torch.ones(2, 4, 2), (7,), ValueError, "grid_size: expected two ints"),
    (torch.ones(2, 4, 2), (0, 7), ValueError, "grid_size: expected two ints >= 1"),
    (torch.ones(2, 4, 2), (7.0, 7), ValueError, "grid_size: expected two ints"),
    (torch.ones(2, 4, 2), 7, ValueError, "grid_size: expected two ints"),
    (torch.ones(2, 4, 2), (2 ** 16, 2 ** 15), ValueError, r"grid_size: expected two ints >= 1 with grid_h \* grid_w < 2\*\*31"),
])
def test_occupancy_bad_inputs(impl, points2d, grid, exc, match):
    with pytest.raises(exc, match=match):
        token_occupancy(points2d, grid)


@needs_extension
def test_kernels_check_their_arguments():
    # The C++ ops check too (direct torch.ops calls skip the Python validation).
    with pytest.raises(ValueError, match="camera must have shape"):
        torch.ops.tore_kernels.weak_perspective_project(torch.ones(2, 4, 3), torch.ones(3, 3))
    with pytest.raises(TypeError, match="points2d must be float"):
        torch.ops.tore_kernels.token_occupancy(torch.ones(2, 4, 2, dtype=torch.int64), 7, 7)
    with pytest.raises(ValueError, match="grid_h and grid_w must be >= 1"):
        torch.ops.tore_kernels.token_occupancy(torch.ones(0, 4, 2), 2 ** 16, 2 ** 15)  # B = 0: no big output
    with pytest.raises(ValueError, match="grid_h and grid_w must be >= 1"):
        torch.ops.tore_kernels.token_occupancy(torch.ones(2, 4, 2), 0, 7)
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.tore_kernels.weak_perspective_project_backward(torch.ones(2, 4, 3), torch.ones(2, 4, 3),
                                                                 torch.ones(2, 3))


# --------------------------------------------------------------------------------------------------------------------
# torch.compile

def test_compile_fullgraph(impl, device):
    torch._dynamo.reset()

    def step(points, camera):
        x2d = weak_perspective_project(points, camera)
        return x2d, token_occupancy(x2d, (7, 7))

    compiled = torch.compile(step, fullgraph=True)
    points, camera = _inputs((3,), 29, torch.float32, seed=10, device=device)
    points.requires_grad_(True)
    camera.requires_grad_(True)
    x2d, occ = compiled(points, camera)
    x2d_eager, occ_eager = step(points, camera)
    torch.testing.assert_close(x2d, x2d_eager)
    torch.testing.assert_close(occ, occ_eager, rtol=0, atol=0)
    grads = torch.autograd.grad((x2d ** 2).sum(), (points, camera))
    grads_eager = torch.autograd.grad((x2d_eager ** 2).sum(), (points, camera))
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


def test_cpu_inference_takes_torch_ops_training_the_op(monkeypatch):
    # forward only on CPU, torch's ops measured faster than the C++ op; with autograd the op runs (its backward pays)
    projection = importlib.import_module("tore_kernels.ops.projection")
    if not projection.HAS_EXTENSION_OPS:
        pytest.skip("tore_kernels._C has no projection ops")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    calls = []
    reference = projection._project_reference
    monkeypatch.setattr(projection, "_project_reference", lambda *a: calls.append(1) or reference(*a))
    points, camera = torch.randn(2, 50, 3), torch.randn(2, 3)
    want = reference(points, camera)
    assert torch.equal(projection.weak_perspective_project(points, camera), want) and calls == [1]
    got = projection.weak_perspective_project(points.requires_grad_(), camera)
    assert calls == [1] and got.requires_grad
    torch.testing.assert_close(got.detach(), want)
