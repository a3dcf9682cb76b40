"""Drop-in nn.Modules over tore_kernels.ops, state_dict-compatible with the modules they replace."""
from .attention import AdjacencyMultiheadAttention
from .itp import ImageTokenPruner
from .mesh import MeshSampler

__all__ = ["AdjacencyMultiheadAttention", "ImageTokenPruner", "MeshSampler"]
