"""Drop-in nn.Modules over tore_kernels.ops, state_dict-compatible with the modules they replace."""
from .mesh import MeshSampler
