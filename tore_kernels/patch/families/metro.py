"""METRO (``microsoft/MeshTransformer``'s ``METRO_Body_Network`` / ``METRO_Hand_Network``): no TORE module; joint
and vertex tokens (445 for the body) through ``trans_encoder``'s BERT encoders with dense self-attention, then the
learned ``upsampling`` linear(s). The BERT self-attentions run through SDPA, every linear on packed weights."""
from __future__ import annotations

from torch import nn

from . import common

LOOKED_FOR = "METRO: " + common.BERT_LOOKED_FOR + ", upsampling (Linear), no transformer_i"


def matches(model):
    return common.module(model, "trans_encoder") is not None and not any(
        common.module(model, n) is not None for n in ("transformer_1", "transformer_2", "transformer_3"))


def plan(model, bf16, problems):
    attentions = common.bert_self_attentions(model.trans_encoder, "trans_encoder")
    if not attentions:
        problems.append("trans_encoder has no BERT self-attention (query / key / value nn.Linear, "
                        "num_attention_heads, output_attentions, dropout)")
    if type(getattr(model, "upsampling", None)) is not nn.Linear:
        problems.append("upsampling missing or not an nn.Linear")
    if problems:
        return None
    p = common.Plan("METRO")
    common.add_bert(p, attentions, common.bert_intermediates(model.trans_encoder, "trans_encoder"))
    common.add_linears(p, model, bf16)
    common.keep_eager_under_compile(p)
    return p
