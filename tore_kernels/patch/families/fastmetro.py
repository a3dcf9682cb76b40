"""FastMETRO (``FastMETRO_Body_Network`` / ``FastMETRO_Hand_Network``): ``transformer_1/2`` decoding joint and
vertex tokens under the ``[J+V, J+V]`` mask; the released forward runs as it is, on the swapped parts."""
from __future__ import annotations

from torch import nn

from . import common

LOOKED_FOR = ("FastMETRO: transformer_1/2 (no transformer_3), joint_token_embed, vertex_token_embed, "
              "attention_mask [J+V, J+V], mesh_sampler")


def matches(model):
    return common.module(model, "transformer_3") is None and any(
        common.module(model, n) is not None for n in ("transformer_1", "transformer_2"))


def plan(model, bf16, problems):
    slots = [s for n in ("transformer_1", "transformer_2") for s in common.attention_slots(model, n, problems)]
    if not common.has_sampler(model):
        problems.append("mesh_sampler missing or without _U / _D matrices")
    if common.module(model, "token_selector_conv2d") is not None:
        problems.append("transformer_3 missing (an ITP model is TORE-FastMETRO with GTR)")
    joints, vertices = getattr(model, "joint_token_embed", None), getattr(model, "vertex_token_embed", None)
    if not isinstance(joints, nn.Embedding) or not isinstance(vertices, nn.Embedding):
        problems.append("vertex_token_embed / joint_token_embed missing")
        size = None
    else:
        size = joints.num_embeddings + vertices.num_embeddings
    common.check_mask(model, size, problems)
    if problems:
        return None
    p = common.Plan("FastMETRO", capturable=True)
    common.add_transformers(p, model, slots, masked=("transformer_1", "transformer_2"))
    common.add_query_sources(p, model, "transformer_1", ("joint_token_embed", "vertex_token_embed"))
    common.add_sampler(p, model, bf16)
    common.add_linears(p, model, bf16)
    return p
