"""tore-kernels: fused kernels for transformer-based human mesh recovery (TORE, FastMETRO, METRO)."""
from . import backend, nn, ops, topology

__version__ = "0.1.0"
