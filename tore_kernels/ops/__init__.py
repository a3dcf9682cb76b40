"""Functional form of every kernel (one module per op family)."""
