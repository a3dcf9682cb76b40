"""Functional form of every kernel (one module per op family)."""
from .adjacency_attention import NeighbourTable, adjacency_attention, neighbour_table
from .itp import image_token_prune
from .projection import itp_loss, token_occupancy, weak_perspective_project
from .upsample import mesh_upsample

__all__ = ["weak_perspective_project", "token_occupancy", "itp_loss", "image_token_prune", "adjacency_attention",
           "neighbour_table", "NeighbourTable", "mesh_upsample"]
