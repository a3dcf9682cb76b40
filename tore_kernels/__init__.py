"""tore-kernels: fused kernels for transformer-based human mesh recovery (TORE, FastMETRO, METRO)."""
from . import backend, ops

__version__ = "0.1.0"
