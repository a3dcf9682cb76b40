"""Microbenchmarks: tore-kernels vs the eager reference, side by side in one process (`tore-kernels bench`)."""
