"""Functional form of every kernel (one module per op family)."""
from .upsample import mesh_upsample
