"""smplx integration: a real smplx.SMPL module (built from synthetic arrays on the generated default mesh: no
licensed model file) projected with tore-kernels, as examples/smplx_projection.py does, against tore_reference."""
import importlib.util
import os

import numpy as np
import pytest
import torch

import tore_reference
from tore_kernels.topology import default_body_mesh, from_smplx

smplx = pytest.importorskip("smplx")
from smplx.utils import Struct  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "smplx_projection.py")


def _example():
    spec = importlib.util.spec_from_file_location("smplx_projection", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def body():
    """An SMPL-sized smplx.SMPL (6890 vertices, 24 joints) with the default mesh's faces and random blend shapes."""
    faces = default_body_mesh().faces[0].numpy().astype(np.int64)
    V, J = 6890, 24
    rng = np.random.default_rng(0)
    data = Struct(v_template=rng.standard_normal((V, 3)) * 0.3, shapedirs=rng.standard_normal((V, 3, 10)) * 1e-2,
                  posedirs=rng.standard_normal((V, 3, 207)) * 1e-3, J_regressor=rng.random((J, V)) / V,
                  weights=rng.dirichlet(np.ones(J), V), kintree_table=np.stack([np.r_[0, np.arange(J - 1)], np.arange(J)]),
                  f=faces)
    return smplx.SMPL(model_path="", data_struct=data)


def test_example_projects_like_the_reference(body):
    torch.manual_seed(0)
    B = 3
    camera = torch.tensor([[0.9, 0.1, -0.2], [1.1, 0.0, 0.3], [0.7, -0.2, 0.0]], requires_grad=True)
    betas = torch.randn(B, 10, requires_grad=True)
    pose = torch.randn(B, 69) * 0.2
    orient = torch.randn(B, 3) * 0.2
    vertices2d, joints2d, occupancy = _example().project_body(body, camera, betas, pose, orient)

    out = body(betas=betas, body_pose=pose, global_orient=orient)
    ref_vertices = tore_reference.orthographic_projection(out.vertices, camera)
    torch.testing.assert_close(vertices2d, ref_vertices, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(joints2d, tore_reference.orthographic_projection(out.joints, camera), rtol=1e-6, atol=1e-6)
    assert torch.equal(occupancy, tore_reference.token_occupancy(ref_vertices.detach()))
    assert 0 < occupancy.sum() < occupancy.numel()  # the body covers some cells, not all

    # gradients reach the body's shape and the camera exactly as through the reference projection
    grads = torch.autograd.grad(vertices2d.square().sum() + joints2d.sum(), (betas, camera))
    ref_grads = torch.autograd.grad(ref_vertices.square().sum()
                                    + tore_reference.orthographic_projection(out.joints, camera).sum(), (betas, camera))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_topology_from_the_smplx_module(body):
    topo = from_smplx(body)
    assert topo.num_vertices == (6890,)
    assert torch.equal(topo.faces[0], torch.as_tensor(body.faces, dtype=topo.faces[0].dtype))
    degrees = topo.neighbour_counts()
    assert int(degrees.min()) >= 2  # every vertex of a closed mesh has neighbours (plus its self-loop)
