"""Mesh upsampling 431 -> 1723 -> 6890: the released per-sample loop (tore_reference.mesh.Mesh) vs
tore-kernels' batched MeshSampler. Runs on the generated default mesh; with TORE_FASTMETRO_DATA set to a
folder of FastMETRO's files (your own, trusted: its .npz is unpickled), also on SMPL's real matrices."""
import os

import torch

from tore_kernels.nn.mesh import MeshSampler
from tore_kernels.topology import default_body_mesh, load_fastmetro
from tore_reference.mesh import Mesh
from tore_benchmarks.harness import Case, entry


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def _meshes():
    topo = default_body_mesh()
    yield "default", topo
    folder = os.environ.get("TORE_FASTMETRO_DATA")
    if folder:
        yield "fastmetro-smpl", load_fastmetro(folder, "smpl", trust_pickle=True)


@entry("mesh_upsample")
def mesh_upsample(device, quick):
    for name, topo in _meshes():
        released = Mesh([u.to(device) for u in topo.upsampling], [d.to(device) for d in topo.downsampling])
        ours = MeshSampler.from_sampler(released)
        for batch in ((1, 32) if quick else (1, 16, 32)):
            x = torch.randn(batch, topo.num_vertices[-1], 3, device=device)
            ours.upsample(x, n1=2, n2=0)  # the one-time CSR conversion is not what is measured
            # bytes: x read and the [B, 6890, 3] output written once (the cached sparse chain, ~0.3 MB, left out)
            fewest = (x.numel() + batch * topo.num_vertices[0] * 3) * x.element_size()
            yield Case("mesh_upsample", {"mesh": name, "batch": batch, "levels": "431->1723->6890", "dtype": "fp32"}, {
                # the released model upsamples one level per call
                "released loop": _no_grad(lambda x=x: released.upsample(released.upsample(x, n1=2, n2=1))),
                "tore-kernels": _no_grad(lambda x=x: ours.upsample(x, n1=2, n2=0)),
                "tore-kernels, contiguous out": _no_grad(lambda x=x: ours.upsample(x, n1=2, n2=0).contiguous()),
            }, bytes=fewest)
