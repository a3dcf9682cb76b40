"""What the model families share: the plan a family returns, the checks of the released FastMETRO transformers
(``transformer_i`` with pre-norm encoder / decoder layers of ``nn.MultiheadAttention``) and of METRO's BERT
encoder, and the swaps every family makes (attention modules, layer forwards, mesh sampler, linears)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...nn.mesh import MeshSampler
from ...ops.linear import fp32_gemm
from .. import bf16 as _bf16
from .. import layers


@dataclass
class Plan:
    """Everything one ``patch`` call will change, built without touching the model."""
    kind: str
    swaps: list = field(default_factory=list)     # (parent module, attribute, new object)
    forwards: list = field(default_factory=list)  # (module, forward function): a per-instance subclass each
    report: list = field(default_factory=list)    # (attribute path, old, new)
    model_forward: tuple | None = None            # (fp32 forward, bf16 forward) of the model itself, if replaced
    capturable: bool = False                      # its forward takes images only: patch(compile=True) applies


ENCODER_LAYER_PARTS = ("norm1", "norm2", "self_attn", "linear1", "linear2", "dropout", "dropout1", "dropout2")
DECODER_LAYER_PARTS = ("norm1", "norm2", "norm3", "self_attn", "multihead_attn", "linear1", "linear2", "dropout",
                       "dropout1", "dropout2", "dropout3")
TRANSFORMER_LOOKED_FOR = ("each transformer_i with encoder.layers[*].self_attn and decoder.layers[*].self_attn / "
                          "multihead_attn (nn.MultiheadAttention) in pre-norm layers (" + ", ".join(DECODER_LAYER_PARTS)
                          + ", activation)")
BERT_LOOKED_FOR = ("trans_encoder: METRO's BERT encoders (self-attention modules with query / key / value nn.Linear, "
                   "num_attention_heads, output_attentions, dropout)")


def module(model, name):
    m = getattr(model, name, None)
    return m if isinstance(m, nn.Module) else None


def attention_slots(model, name, problems):
    """[(path, parent, attribute, mha, is decoder self-attention)] of transformer ``name`` (problems noted)."""
    t = module(model, name)
    if t is None:
        problems.append(f"{name} missing")
        return []
    slots = []
    for part, attrs, parts in (("encoder", ("self_attn",), ENCODER_LAYER_PARTS),
                               ("decoder", ("self_attn", "multihead_attn"), DECODER_LAYER_PARTS)):
        layers_ = getattr(getattr(t, part, None), "layers", None)
        if not isinstance(layers_, nn.ModuleList) or len(layers_) == 0:
            problems.append(f"{name}.{part}.layers missing or empty")
            continue
        for i, layer in enumerate(layers_):
            for attr in attrs:
                mha = getattr(layer, attr, None)
                path = f"{name}.{part}.layers.{i}.{attr}"
                if not isinstance(mha, nn.MultiheadAttention):
                    problems.append(f"{path} is not an nn.MultiheadAttention")
                else:
                    slots.append((path, layer, attr, mha, part == "decoder" and attr == "self_attn"))
            missing = [a for a in parts if not isinstance(getattr(layer, a, None), nn.Module)]
            if missing or not callable(getattr(layer, "activation", None)):
                problems.append(f"{name}.{part}.layers.{i} lacks {', '.join(missing) or 'activation'}")
    return slots


def check_mask(model, size, problems):
    mask = getattr(model, "attention_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        problems.append("attention_mask missing or not a square tensor")
    elif size is not None and mask.shape[0] != size:
        problems.append(f"attention_mask is {list(mask.shape)}, expected [{size}, {size}]")


def has_sampler(model):
    sampler = getattr(model, "mesh_sampler", None)
    return hasattr(sampler, "_U") and hasattr(sampler, "_D")


def add_transformers(plan, model, slots, masked):
    """The attention modules of ``slots`` (sharing their parameters), and the eval forwards of their transformers
    and layers. ``masked``: the transformers whose decoder self-attention gets the mesh mask."""
    for path, parent, attr, mha, masked_self in slots:
        plan.swaps.append((parent, attr, layers.adjacency_attention(mha)))
        plan.report.append((path, type(mha).__name__, "AdjacencyMultiheadAttention ("
                            + ("mesh mask" if masked_self and path.split(".")[0] in masked else "weights skipped")
                            + ")"))
    for name in sorted({path.split(".")[0] for path, *_ in slots}):
        t = getattr(model, name)
        plan.forwards.append((t, layers.transformer_forward))
        plan.forwards += [(layer, layers.encoder_layer_forward) for layer in t.encoder.layers]
        plan.forwards += [(layer, layers.decoder_layer_forward) for layer in t.decoder.layers]
        plan.report.append((f"{name}.forward", "Transformer.forward", "eval: no no-op masks / zero query_pos; layers "
                            "run SDPA on projection views, in-place ReLU and residuals, broadcast queries once"))


def add_query_sources(plan, model, transformer, embeddings):
    """Tell ``transformer``'s first decoder layer that its queries are the rows of ``embeddings`` (names of the
    model's nn.Embedding modules, in order): its self-attention block is then computed once per parameter version."""
    layer = module(model, transformer).decoder.layers[0]
    plan.swaps.append((layer, layers.QUERY_SOURCES, tuple(getattr(model, e).weight for e in embeddings)))
    plan.report.append((f"{transformer}.decoder.layers.0", "self-attention block per call", "computed once while "
                        f"its queries are {' + '.join(embeddings)} (checked per call) and the parameters unchanged"))


def add_sampler(plan, model, bf16):
    sampler = (_bf16.FP32MeshSampler if bf16 else MeshSampler).from_sampler(model.mesh_sampler)
    plan.swaps.append((model, "mesh_sampler", sampler))
    plan.report.append(("mesh_sampler", type(model.mesh_sampler).__name__, "MeshSampler (batched)"))


def bert_self_attentions(encoder, prefix):
    """[(path, module)] of the BERT self-attention modules in ``encoder`` (METRO's, recognised by structure)."""
    found = []
    for name, m in encoder.named_modules():
        if (all(type(getattr(m, a, None)) is nn.Linear for a in ("query", "key", "value"))
                and isinstance(getattr(m, "num_attention_heads", None), int) and hasattr(m, "output_attentions")
                and isinstance(getattr(m, "dropout", None), nn.Dropout)):
            found.append((f"{prefix}.{name}", m))
    return found


def bert_intermediates(encoder, prefix):
    """[(path, module)] of the BERT intermediate modules in ``encoder``: ``dense`` (nn.Linear), then an
    ``intermediate_act_fn`` that computes the erf GELU (METRO's ``gelu``)."""
    return [(f"{prefix}.{name}", m) for name, m in encoder.named_modules()
            if type(getattr(m, "dense", None)) is nn.Linear and callable(getattr(m, "intermediate_act_fn", None))
            and layers.is_erf_gelu(m.intermediate_act_fn)]


_EAGER_BF16_FORWARD = layers.eager_under_compile(_bf16.bf16_forward)


def keep_eager_under_compile(plan):
    """Where fp32 GEMMs run on oneDNN (every CPU but Intel's), the METRO families' forwards stay eager under
    torch.compile in eval mode, as the FastMETRO families' always do: there ``compile(patch(model))`` measured
    0.5-0.6x ``patch(model)`` (AMD EPYC with AVX-512, ``bench head``: METRO at batch 1 324 against 179 ms, TORE-METRO
    37.7 against 19.3; likely inductor's GEMMs on MKL, whose AVX-512 code runs only on Intel's CPUs)."""
    if fp32_gemm()[0] != "mkl":
        plan.model_forward = (layers.released_forward, _EAGER_BF16_FORWARD)
        plan.report.append(("forward", "traced by torch.compile", "eager under torch.compile in eval mode (fp32 "
                            "GEMMs on oneDNN here)"))


def add_bert(plan, attentions, intermediates=()):
    plan.forwards += [(m, layers.bert_self_attention_forward) for _, m in attentions]
    plan.report += [(path, type(m).__name__, "SDPA on packed projections (no dropout, head_mask or probabilities)")
                    for path, m in attentions]
    plan.forwards += [(m, layers.bert_intermediate_forward) for _, m in intermediates]
    plan.report += [(path, type(m).__name__, "eval: F.gelu (one pass) for its erf GELU") for path, m in intermediates]


def add_linears(plan, model, bf16, keep=()):
    """Every plain nn.Linear on packed weights and nn.Conv2d on reordered ones in inference, except ``keep`` (names
    of modules a fused forward reads); with bf16 the output heads in fp32 and the convs on cached bf16 weights."""
    heads = [name for name in _bf16.FP32_HEADS if type(getattr(model, name, None)) is nn.Linear] if bf16 else []
    plan.forwards += [(getattr(model, name), _bf16.fp32_linear_forward) for name in heads]
    skip = {id(getattr(model, name, None)) for name in list(heads) + list(keep)}
    conv_forward = _bf16.bf16_conv_forward if bf16 else layers.packed_conv_forward
    plan.forwards += [(m, layers.packed_linear_forward if type(m) is nn.Linear else conv_forward)
                      for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d) and id(m) not in skip]
    plan.report.append(("Linear modules and attention projections", "F.linear", "in inference, MKL / oneDNN GEMM on "
                        "weights packed once per parameter version (F.linear for small products)"))
    if bf16:
        plan.report += [(name, "Linear", "Linear kept in fp32 under autocast") for name in heads]
        plan.report.append(("Conv2d modules", "fp32 weights", "bf16 weight copies cached per parameter version "
                            "in inference"))
    else:
        plan.report.append(("Conv2d modules", "F.conv2d", "in inference, small inputs: oneDNN on weights reordered "
                            "once per input shape"))
