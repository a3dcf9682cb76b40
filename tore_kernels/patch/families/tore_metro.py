"""TORE-METRO (TORE's ``METRO_Body_Network``): METRO's BERT encoders (``trans_encoder``) and the NSR
``transformer_3`` decoding vertex tokens under the mesh mask. The mask is whatever the forward passes
(``attention_mask_3`` in the release): the attention takes its neighbour table from the mask of each call (cached
per mask tensor and version). The BERT self-attentions run through SDPA, the linears (the learned
``upsampling`` / ``upsampling2`` too) on packed weights; a ``mesh_sampler`` attribute, where there is one, is
batched."""
from __future__ import annotations

from torch import nn

from . import common

LOOKED_FOR = ("TORE-METRO: transformer_3 without transformer_1/2, trans_encoder (METRO's BERT encoders), "
              "vertex_token_embed")


def matches(model):
    return common.module(model, "transformer_3") is not None and not any(
        common.module(model, n) is not None for n in ("transformer_1", "transformer_2"))


def plan(model, bf16, problems):
    slots = common.attention_slots(model, "transformer_3", problems)
    encoder = common.module(model, "trans_encoder")
    if encoder is None:
        problems.append("trans_encoder (METRO's encoder) missing")
    if not isinstance(getattr(model, "vertex_token_embed", None), nn.Embedding):
        problems.append("vertex_token_embed missing")
    if common.module(model, "token_selector_conv2d") is not None:
        problems.append("transformer_1/2 missing (an ITP model is TORE-FastMETRO with GTR)")
    if problems:
        return None
    p = common.Plan("TORE-METRO")
    common.add_transformers(p, model, slots, masked=("transformer_3",))
    common.add_bert(p, common.bert_self_attentions(encoder, "trans_encoder"),
                    common.bert_intermediates(encoder, "trans_encoder"))
    if common.has_sampler(model):
        common.add_sampler(p, model, bf16)
    common.add_linears(p, model, bf16)
    common.keep_eager_under_compile(p)
    return p
