"""Project an SMPL body (smplx) onto TORE's token grid with tore-kernels.

    pip install smplx
    python examples/smplx_projection.py --smpl /path/to/SMPL_NEUTRAL.pkl [--downsampling /path/to/mesh_downsampling.npz]

The body's vertices and joints go through ``weak_perspective_project`` (the released camera convention,
``s * (X[..., :2] + (tx, ty))``) and the vertices through ``token_occupancy``: the grid the ITP supervision
(``itp_loss``) penalises the heatmap outside of. With FastMETRO's downsampling file the topology also gives the
431-vertex attention mask of the NSR. The SMPL model file is the user's own (not shipped: it has its own licence).
"""
import argparse

import torch

from tore_kernels.ops import token_occupancy, weak_perspective_project
from tore_kernels.topology import from_smplx


def project_body(model, camera, betas, body_pose, global_orient, grid_size=(7, 7)):
    """smplx body model + camera [B, 3] = (s, tx, ty) -> (vertices2d [B, V, 2], joints2d [B, J, 2], occupancy [B, G, G])."""
    out = model(betas=betas, body_pose=body_pose, global_orient=global_orient)
    vertices2d = weak_perspective_project(out.vertices, camera)
    joints2d = weak_perspective_project(out.joints, camera)
    return vertices2d, joints2d, token_occupancy(vertices2d, grid_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smpl", required=True, help="an SMPL model file or folder, as smplx.SMPL takes it")
    parser.add_argument("--downsampling", help="FastMETRO's mesh_downsampling.npz (pickled: trusted input only)")
    args = parser.parse_args(argv)
    import smplx

    model = smplx.SMPL(model_path=args.smpl)
    topology = from_smplx(model, args.downsampling, trust_pickle=args.downsampling is not None)
    print(f"topology {topology.name}: levels {topology.num_vertices}, attention over level {topology.adjacency_level}")
    batch = 2
    camera = torch.tensor([[0.9, 0.0, 0.2]]).expand(batch, 3).contiguous()
    vertices2d, joints2d, occupancy = project_body(model, camera, torch.zeros(batch, model.num_betas),
                                                   torch.zeros(batch, 69), torch.zeros(batch, 3))
    print(f"vertices2d {tuple(vertices2d.shape)}, joints2d {tuple(joints2d.shape)}")
    print("token cells covered by the body (sample 0):")
    print("\n".join(" ".join("#" if c else "." for c in row) for row in occupancy[0].int().tolist()))


if __name__ == "__main__":
    main()
