"""Weak-perspective projection and the ITP supervision loss: tore-kernels vs tore_reference (the released code).

    python -c "from tore_benchmarks.harness import run; run(['projection', 'itp_loss'])"
"""
import torch

import tore_reference
from tore_benchmarks.harness import Case, entry
from tore_kernels.ops.projection import itp_loss, weak_perspective_project

POINTS = 6890  # SMPL vertices
CLUSTERS = 39  # ITP tokens at keep ratio 0.8 on a 7 x 7 grid


def _batches(quick):
    return (1, 32) if quick else (1, 16, 32)


def _grad_of(fn, inputs):
    """Forward + backward: the gradients of fn(*inputs).sum() w.r.t. inputs."""
    return lambda: torch.autograd.grad(fn(*inputs).sum(), inputs)


@entry("projection")
def projection(device, quick):
    for batch in _batches(quick):
        g = torch.Generator().manual_seed(batch)
        points = torch.randn(batch, POINTS, 3, generator=g).to(device)
        camera = (torch.rand(batch, 3, generator=g) + 0.5).to(device)
        yield Case("projection", {"batch": batch, "points": POINTS, "pass": "forward"}, {
            "eager": lambda p=points, c=camera: tore_reference.orthographic_projection(p, c),
            "tore": lambda p=points, c=camera: weak_perspective_project(p, c),
        })
        inputs = (points.clone().requires_grad_(True), camera.clone().requires_grad_(True))
        yield Case("projection", {"batch": batch, "points": POINTS, "pass": "forward+backward"}, {
            "eager": _grad_of(tore_reference.orthographic_projection, inputs),
            "tore": _grad_of(weak_perspective_project, inputs),
        })


@entry("itp_loss")
def itp_loss_entry(device, quick):
    for batch in _batches(quick):
        g = torch.Generator().manual_seed(batch)
        heatmap = torch.randn(batch, CLUSTERS, 49, generator=g).softmax(-1).to(device)
        points2d = (torch.randn(batch, POINTS, 2, generator=g) * 0.3).to(device)  # a projected body
        has_smpl = (torch.arange(batch) % 4 != 3).to(device)
        params = {"batch": batch, "clusters": CLUSTERS, "points": POINTS}
        yield Case("itp_loss", {**params, "pass": "forward"}, {
            "eager": lambda h=heatmap, p=points2d, s=has_smpl: tore_reference.itp_loss(h, p, s),
            "tore": lambda h=heatmap, p=points2d, s=has_smpl: itp_loss(h, p, s),
        })
        h = heatmap.clone().requires_grad_(True)
        yield Case("itp_loss", {**params, "pass": "forward+backward"}, {
            "eager": lambda h=h, p=points2d, s=has_smpl: torch.autograd.grad(tore_reference.itp_loss(h, p, s), h),
            "tore": lambda h=h, p=points2d, s=has_smpl: torch.autograd.grad(itp_loss(h, p, s), h),
        })
