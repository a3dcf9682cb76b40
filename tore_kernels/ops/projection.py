"""Weak-perspective projection, token occupancy and the ITP supervision loss (tore-model.md section 6).

The kernels are the custom ops ``torch.ops.tore_kernels.weak_perspective_project`` (+ ``_backward``) and
``torch.ops.tore_kernels.token_occupancy`` in ``tore_kernels._C`` (C++ CPU and CUDA side by side, sources in
``csrc/projection/``). This module registers their fake functions and autograd (so they trace under
``torch.compile`` and pass ``torch.library.opcheck``), declares them to ``backend``, and holds the plain-torch
path that runs when the extension is missing or ``TORE_KERNELS_BACKEND=reference``.
"""
from __future__ import annotations

import warnings

import torch

from .. import backend

__all__ = ["weak_perspective_project", "token_occupancy", "itp_loss"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_EPS = 1e-12  # the released loss's min-max normalisation epsilon
_MAX_CELLS = 2**31 - 2  # the kernels index cells (and one spare) with int32 (checked in C++ too)

def _portable() -> str:  # scalar C++ loops, compiled once for the CPU family (no per-ISA clones)
    return "C++ portable build"


def _projection_path() -> str:
    return "torch ops without autograd (faster there), C++ portable build with it"


backend.register("weak_perspective_project", cpu_path=_projection_path, cpu="extension", cuda="extension_cuda")
backend.register("token_occupancy", cpu_path=_portable, cpu="extension", cuda="extension_cuda")


# ---------------------------------------------------------------------------------------------------------------
# Registration of the C++ ops (only when the extension has them: it may be missing, or built before them).

HAS_EXTENSION_OPS = backend.HAS_EXTENSION and all(
    hasattr(torch.ops.tore_kernels, op) for op in ("weak_perspective_project", "token_occupancy"))
if backend.HAS_EXTENSION and not HAS_EXTENSION_OPS:
    warnings.warn("tore_kernels._C has no projection ops (built from older sources?); weak_perspective_project "
                  "and token_occupancy fall back to plain torch. Rebuild the extension.", RuntimeWarning, stacklevel=2)

if HAS_EXTENSION_OPS:
    @torch.library.register_fake("tore_kernels::weak_perspective_project")
    def _project_fake(points, camera):
        torch._check(points.dim() >= 2 and points.shape[-1] == 3 and camera.shape[-1] == 3)
        return points.new_empty((*points.shape[:-1], 2))

    @torch.library.register_fake("tore_kernels::weak_perspective_project_backward")
    def _project_backward_fake(grad, points, camera):
        return points.new_empty(points.shape), camera.new_empty(camera.shape)

    @torch.library.register_fake("tore_kernels::token_occupancy")
    def _token_occupancy_fake(points2d, grid_h, grid_w):
        torch._check(points2d.dim() == 3 and points2d.shape[-1] == 2)
        return points2d.new_empty((points2d.shape[0], grid_h, grid_w))

    def _project_setup_context(ctx, inputs, output):
        points, camera = inputs
        ctx.save_for_backward(points, camera)

    def _project_backward(ctx, grad):
        points, camera = ctx.saved_tensors
        grad_points, grad_camera = torch.ops.tore_kernels.weak_perspective_project_backward(grad, points, camera)
        return (grad_points if ctx.needs_input_grad[0] else None,
                grad_camera if ctx.needs_input_grad[1] else None)

    def _project_backward_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _project_double_backward(ctx, gg_points, gg_camera):
        # The backward is grad_points = s * (g, 0), grad_camera = (sum g . (X + t), s * sum g): its own
        # derivatives in plain torch (rarely needed, e.g. gradient penalties; themselves differentiable).
        grad, points, camera = ctx.saved_tensors
        if gg_points is None:
            gg_points = torch.zeros_like(points)
        if gg_camera is None:
            gg_camera = torch.zeros_like(camera)
        s, t = camera[..., None, :1], camera[..., None, 1:]
        gg_xy, gg_s, gg_t = gg_points[..., :2], gg_camera[..., None, :1], gg_camera[..., None, 1:]
        d_grad = s * (gg_xy + gg_t) + gg_s * (points[..., :2] + t)
        d_points = torch.nn.functional.pad(gg_s * grad, (0, 1))
        grad_sum = grad.sum(dim=-2)
        d_s = (gg_xy * grad).sum(dim=(-2, -1)) + (gg_camera[..., 1:] * grad_sum).sum(dim=-1)
        d_camera = torch.cat([d_s.unsqueeze(-1), gg_camera[..., :1] * grad_sum], dim=-1)
        return d_grad, d_points, d_camera

    torch.library.register_autograd("tore_kernels::weak_perspective_project", _project_backward,
                                    setup_context=_project_setup_context)
    torch.library.register_autograd("tore_kernels::weak_perspective_project_backward", _project_double_backward,
                                    setup_context=_project_backward_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch paths (backend "reference").

def _project_reference(points, camera):
    # Half types in float, rounded once, as the C++ kernels do.
    acc = torch.promote_types(points.dtype, torch.float32)
    cam = camera.to(acc).unsqueeze(-2)
    return (cam[..., :1] * (points[..., :2].to(acc) + cam[..., 1:])).to(points.dtype)


def _token_occupancy_reference(points2d, grid_h, grid_w):
    # Eager ops in the points' dtype: the same rounding as the released code (and the C++ kernels).
    B, P, _ = points2d.shape
    gx = (points2d[..., 0] + 1) / 2 * grid_w
    gy = (points2d[..., 1] + 1) / 2 * grid_h
    inside = (gx >= 0) & (gx < grid_w) & (gy >= 0) & (gy < grid_h)  # False for NaN
    # Points outside land in one extra, discarded cell (zeroed first: NaN and inf do not cast to long).
    rows, cols = torch.where(inside, gy, 0).floor().long(), torch.where(inside, gx, 0).floor().long()
    cell = torch.where(inside, rows * grid_w + cols, grid_h * grid_w)
    occupancy = points2d.new_zeros(B, grid_h * grid_w + 1)
    occupancy.scatter_(1, cell, 1.0)
    return occupancy[:, :-1].reshape(B, grid_h, grid_w)


# ---------------------------------------------------------------------------------------------------------------
# Public functions.

def _check_float_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_grid_size(grid_size):
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid_size)
            or grid_size[0] * grid_size[1] > _MAX_CELLS):
        raise ValueError(f"grid_size: expected two ints >= 1 with grid_h * grid_w < 2**31 (grid_h, grid_w), "
                         f"got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def weak_perspective_project(points: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """Weak-perspective projection of the released code: ``s * (X[..., :2] + (tx, ty))``.

    points [..., P, 3], camera [..., 3] = (s, tx, ty) with the same leading dims (no broadcasting), same
    float dtype and device -> [..., P, 2] in the dtype of points (float16/bfloat16 computed in float).
    Differentiable w.r.t. both inputs (twice: the backward op has its own autograd). Any strides.
    """
    _check_float_tensor("points", points)
    _check_float_tensor("camera", camera)
    if points.dim() < 2 or points.shape[-1] != 3:
        raise ValueError(f"points: expected shape [..., P, 3], got {tuple(points.shape)}")
    if camera.dim() != points.dim() - 1 or camera.shape[-1] != 3 or camera.shape[:-1] != points.shape[:-2]:
        raise ValueError(f"camera: expected shape {(*points.shape[:-2], 3)} (the leading dims of points "
                         f"{tuple(points.shape)}, then 3), got {tuple(camera.shape)}")
    if camera.dtype != points.dtype:
        raise TypeError(f"camera: expected the dtype of points ({points.dtype}), got {camera.dtype}")
    if camera.device != points.device:
        raise ValueError(f"camera: expected the device of points ({points.device}), got {camera.device}")
    # On CPU without autograd torch's three ops measured faster than the op (0.8x it, forward only, AVX-512); the
    # op pays off in training (its backward), and runs whenever TORE_KERNELS_BACKEND asks for it.
    inference = points.is_cpu and not (torch.is_grad_enabled() and (points.requires_grad or camera.requires_grad))
    if ((inference and backend.forced_backend() is None) or not HAS_EXTENSION_OPS
            or backend.choose("weak_perspective_project", points.device) == "reference"):
        return _project_reference(points, camera)
    return torch.ops.tore_kernels.weak_perspective_project(points, camera)


def token_occupancy(points2d: torch.Tensor, grid_size=(7, 7)) -> torch.Tensor:
    """Occupancy of the token grid by 2D points in [-1, 1], as the released ITP supervision builds it.

    points2d [B, P, 2] (x, y) -> [B, grid_h, grid_w] in the dtype of points2d: 1 at ``[b, floor(g_y), floor(g_x)]``
    for every point with ``g = (p + 1) / 2 * G`` inside ``[0, G)`` on both axes (each step rounded in the points'
    dtype, as eager torch does), 0 elsewhere. Points outside, infinite or NaN are dropped.
    Not differentiable: the result never requires grad (a step function of the points).
    """
    _check_float_tensor("points2d", points2d)
    if points2d.dim() != 3 or points2d.shape[-1] != 2:
        raise ValueError(f"points2d: expected shape [B, P, 2], got {tuple(points2d.shape)}")
    grid_h, grid_w = _check_grid_size(grid_size)
    points2d = points2d.detach()
    if not HAS_EXTENSION_OPS or backend.choose("token_occupancy", points2d.device) == "reference":
        return _token_occupancy_reference(points2d, grid_h, grid_w)
    return torch.ops.tore_kernels.token_occupancy(points2d, grid_h, grid_w)


def itp_loss(heatmap: torch.Tensor, points2d: torch.Tensor, has_smpl: torch.Tensor, grid_size=(7, 7)) -> torch.Tensor:
    """The released token-reduction (ITP) loss, vectorised.

    heatmap [B, N, grid_h * grid_w] is min-max normalised per (sample, cluster) over its last axis
    (``(m - min) / (max - min + 1e-12)``), weighted by ``1 - token_occupancy(points2d)`` (broadcast over N)
    and summed over the samples with ``has_smpl == 1`` (has_smpl [B], bool or numeric). Returns a scalar in
    the dtype of heatmap (float16/bfloat16 computed in float32). Differentiable w.r.t. heatmap with the
    reference's gradients: min and max send their gradient evenly to tied elements. NaN in heatmap propagates.
    """
    _check_float_tensor("heatmap", heatmap)
    _check_float_tensor("points2d", points2d)
    grid_h, grid_w = _check_grid_size(grid_size)
    if heatmap.dim() != 3 or heatmap.shape[-1] != grid_h * grid_w:
        raise ValueError(f"heatmap: expected shape [B, N, {grid_h * grid_w}] (grid_size {(grid_h, grid_w)}), "
                         f"got {tuple(heatmap.shape)}")
    B = heatmap.shape[0]
    if points2d.dim() != 3 or points2d.shape[0] != B or points2d.shape[-1] != 2:
        raise ValueError(f"points2d: expected shape [{B}, P, 2] (B of heatmap), got {tuple(points2d.shape)}")
    if not isinstance(has_smpl, torch.Tensor):
        raise TypeError(f"has_smpl: expected a torch.Tensor, got {type(has_smpl).__name__}")
    if has_smpl.shape != (B,):
        raise ValueError(f"has_smpl: expected shape [{B}] (B of heatmap), got {tuple(has_smpl.shape)}")
    if has_smpl.is_complex():
        raise TypeError(f"has_smpl: expected a bool, integer or float tensor, got {has_smpl.dtype}")
    for name, t in (("points2d", points2d), ("has_smpl", has_smpl)):
        if t.device != heatmap.device:
            raise ValueError(f"{name}: expected the device of heatmap ({heatmap.device}), got {t.device}")

    acc = heatmap.to(torch.promote_types(heatmap.dtype, torch.float32))
    # amin/amax spread the gradient evenly over ties, like the reference's full min()/max() per row
    # (and are faster here than aminmax).
    lo = acc.amin(dim=-1, keepdim=True)
    normalised = (acc - lo) / (acc.amax(dim=-1, keepdim=True) - lo + _EPS)
    free = 1 - token_occupancy(points2d, (grid_h, grid_w)).reshape(B, 1, grid_h * grid_w).to(acc.dtype)
    per_sample = (normalised * free).sum(dim=(1, 2))
    # where, not a product with the mask: a NaN in an excluded sample must not reach the loss (as in the reference).
    return torch.where(has_smpl == 1, per_sample, 0).sum().to(heatmap.dtype)
