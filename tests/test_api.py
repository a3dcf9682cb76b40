"""The public API is what the README promises: one call to patch a model, the ops and modules by name."""
import torch

import tore_kernels
from tore_kernels.topology import default_body_mesh
from tore_reference import Mesh, ToreFastMETROHead


def test_top_level_patch_and_unpatch_are_the_functions():
    topo = default_body_mesh()
    model = ToreFastMETROHead(topo.adjacency.to_dense(), Mesh(topo.upsampling, topo.downsampling),
                              backbone_channels=64, model_size="S", feature_size=(7, 7)).eval()
    assert tore_kernels.patch(model) is model
    assert isinstance(tore_kernels.patch_report(model), tore_kernels.PatchReport)
    assert tore_kernels.unpatch(model) is model and tore_kernels.patch_report(model) is None


def test_ops_and_modules_are_exported():
    for name in tore_kernels.ops.__all__:
        assert callable(getattr(tore_kernels.ops, name)), name
    for name in tore_kernels.nn.__all__:
        assert issubclass(getattr(tore_kernels.nn, name), object), name
    assert issubclass(tore_kernels.nn.AdjacencyMultiheadAttention, torch.nn.MultiheadAttention)
