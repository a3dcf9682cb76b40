"""The eval-mode layer forwards that patch installs (each as a per-instance subclass's ``forward``): the released
pre-norm transformer layers of FastMETRO / TORE, METRO's BERT self-attention, and the packed-weight linear.
Each runs the module's own forward where it does not apply (training with dropout, masks it does not know)."""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from ..nn.attention import AdjacencyMultiheadAttention, few_keys_table
from ..ops.adjacency_attention import dense_attention
from ..ops.conv import conv2d
from ..ops.linear import linear, tensor_versions
from .capture import shortcut_applies


def eager_under_compile(forward):
    """``forward`` (of a patched module) run by Python even under torch.compile, in eval mode. Dynamo breaks the
    patched forwards' graphs at every mesh-mask table lookup and sparse product, and compiled that way they
    measured slower than uncompiled (0.88x at batch 1, TORE-FastMETRO-L); so compile leaves them as they are and
    compiles what is around them. In training, where the released code runs, compile traces it as usual."""
    untraced = torch.compiler.disable(forward)

    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        if not self.training and torch.compiler.is_compiling():
            return untraced(self, *args, **kwargs)
        return forward(self, *args, **kwargs)
    return run


RELEASED_CLASS = "_tore_released_class"  # set on each class patch makes: the class it subclassed


def released_class(module) -> type:
    """``module``'s class as the released code built it (``patch`` gives modules a per-instance subclass)."""
    return vars(type(module)).get(RELEASED_CLASS, type(module))


def base_forward(module):
    """The forward of the class ``patch`` subclassed (the released code's)."""
    return released_class(module).forward


@eager_under_compile
def released_forward(self, *args, **kwargs):
    """The model's own forward, run by Python under torch.compile in eval mode (see ``families.common``)."""
    return base_forward(self)(self, *args, **kwargs)


def adjacency_attention(mha):
    """An AdjacencyMultiheadAttention that holds ``mha``'s own Parameter objects and out_proj module."""
    new = AdjacencyMultiheadAttention.from_module(mha, skip_unused_weights=True)
    for name, p in mha._parameters.items():
        new._parameters[name] = p
    new._modules["out_proj"] = mha.out_proj
    return new


def broadcast(x):
    """True when ``x [L, B, E]`` is one sample broadcast over the batch (a stride-0 batch axis)."""
    return x.dim() == 3 and x.shape[1] > 1 and x.stride(1) == 0


def same_over_batch(x):
    """``x [L, B, E]`` as a batch broadcast (stride 0) when every sample holds the same values, as the released
    FastMETRO's ``repeat``-ed joint and vertex tokens do; else ``x``. The comparison stops at the first difference
    (17 us on 445 x 32 x 512 per-sample tokens; 2 ms when they are all equal, which saves the first decoder layer's
    self-attention block for all samples but one). Not under torch.compile (a data-dependent branch)."""
    if (x.dim() == 3 and x.shape[1] > 1 and not broadcast(x) and not torch.compiler.is_compiling()
            and shortcut_applies(torch.equal, x, x[:, :1].expand_as(x))):
        return x[:, :1].expand_as(x)
    return x


def _linear(x, weight, bias, rows=None):
    """:func:`~tore_kernels.ops.linear.linear` (packed weights in inference), once for a batch-broadcast ``x``."""
    if broadcast(x):
        return linear(x[:, :1], weight, bias, rows=rows).expand(-1, x.shape[1], -1)
    return linear(x, weight, bias, rows=rows)


def _projects_itself(mha, attn_mask) -> bool:
    """Whether ``_attend`` runs ``mha`` on its own in-projection (else the module's forward)."""
    return not (attn_mask is not None or mha.training or not mha._qkv_same_embed_dim or mha.bias_k is not None
                or mha.add_zero_attn or mha.batch_first or mha.in_proj_bias is None)


def _query_projection(mha, query):
    """``_attend``'s query in-projection of ``query``, ``[L, B, H, d]``."""
    return _linear(query, mha.in_proj_weight, mha.in_proj_bias, rows=(0, mha.embed_dim)).unflatten(
        -1, (mha.num_heads, -1))


def _attend(mha, query, key, value, attn_mask=None, projected_query=None):
    """``mha(query, key, value, attn_mask=attn_mask)[0]`` in eval mode. Masked calls go to the module (the
    neighbour-list kernel). Dense ones run SDPA on views of the in-projection (packed when inputs coincide; once for
    a batch-broadcast query; for a query that is not the key, ``projected_query`` when given) and out-project the
    ``[L, B, H, d]`` result as it is: no mask merging, no head-averaged weights, no copies. On CPU, at most
    ``OPEN_TABLE_MAX_KEYS`` keys run the kernel with every key shared instead, out-projected in the same op.
    Returns ``[L, B, E]``."""
    if not _projects_itself(mha, attn_mask):
        return mha(query, key, value=value, attn_mask=attn_mask)[0]
    E, H = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if query is key and key is value:
        q, k, v = _linear(query, w, b).unflatten(-1, (3, H, -1)).unbind(-3)
    elif query is key:  # the encoders' q = k = y + pos, v = y: one GEMM for q and k
        q, k = _linear(query, w, b, rows=(0, 2 * E)).unflatten(-1, (2, H, -1)).unbind(-3)
        v = _linear(value, w, b, rows=(2 * E, 3 * E)).unflatten(-1, (H, -1))
    else:
        q = _query_projection(mha, query) if projected_query is None else projected_query
        if key is value:
            k, v = _linear(key, w, b, rows=(E, 3 * E)).unflatten(-1, (2, H, -1)).unbind(-3)
        else:
            k = _linear(key, w, b, rows=(E, 2 * E)).unflatten(-1, (H, -1))
            v = _linear(value, w, b, rows=(2 * E, 3 * E)).unflatten(-1, (H, -1))
    if q.shape[1] != k.shape[1]:  # a broadcast query over per-sample keys
        q = q.expand(-1, k.shape[1], -1, -1)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, L|S, d] views
    table = few_keys_table(q.shape[2], k.shape[2], q.dtype, q.device)
    if table is not None and isinstance(mha, AdjacencyMultiheadAttention):  # the NSR's cross-attention to 14 joints
        return mha._attend_projected(q, k, v, table)[0]  # the kernel, every key shared
    out = dense_attention(q, k, v)  # [B, H, L, d]
    # written in q's memory order, the projection's [L, B, H, d]: a free view (SDPA copies a broadcast q)
    return linear(out.permute(2, 0, 1, 3).flatten(2), mha.out_proj.weight, mha.out_proj.bias)


def _mlp(layer, x, norm):
    relu = layer.activation is F.relu  # fused into the packed linear in inference
    h = linear(norm(x), layer.linear1.weight, layer.linear1.bias, relu=relu)
    return linear(h if relu else layer.activation(h), layer.linear2.weight, layer.linear2.bias)


def _add(x, y, own):
    """``x + y``, in place when ``x`` is a tensor this forward made and autograd does not need it."""
    return x.add_(y) if own and not torch.is_grad_enabled() else x + y


def encoder_layer_forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
    """The released pre-norm encoder layer (eval mode, no masks; otherwise the released forward runs)."""
    if self.training or src_mask is not None or src_key_padding_mask is not None:
        return base_forward(self)(self, src, src_mask=src_mask,
                                               src_key_padding_mask=src_key_padding_mask, pos=pos)
    y = self.norm1(src)
    q = y if pos is None else torch.cat([y[:1], y[1:] + pos], dim=0)  # the camera token gets no position
    x = src + _attend(self.self_attn, q, q, y)
    return _add(x, _mlp(self, x, self.norm2), True)


def decoder_layer_forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                          memory_key_padding_mask=None, pos=None, query_pos=None):
    """The released pre-norm decoder layer (eval mode; otherwise the released forward runs). When its queries
    are one set of embeddings broadcast over the batch (a stride-0 batch axis: the fused forward passes the joint
    and vertex tokens so) and ``query_pos`` is the same for every sample, the self-attention block sees identical
    tokens in every sample: it runs on one and is broadcast (at batch 32 this saves 31/32 of the first layer's
    431-token self-attention), and so does the cross-attention's query projection. When those tokens are the
    model's token embeddings, the block is computed once (``query_invariant``)."""
    if (self.training or memory_mask is not None or tgt_key_padding_mask is not None
            or memory_key_padding_mask is not None):
        return base_forward(self)(self, tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                                               tgt_key_padding_mask=tgt_key_padding_mask,
                                               memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                                               query_pos=query_pos)
    shared = broadcast(tgt) and (query_pos is None or (not torch.compiler.is_compiling() and shortcut_applies(
        torch.equal, query_pos, query_pos[:, :1].expand_as(query_pos))))  # a data-dependent check: not under compile
    t, qp = (tgt[:, :1], None if query_pos is None else query_pos[:, :1]) if shared else (tgt, query_pos)

    def self_attention_block():  # the part that sees only the queries: t, the cross-attention's query, its projection
        y = self.norm1(t)
        q = y if qp is None else y + qp
        t1 = t + _attend(self.self_attn, q, q, y, attn_mask=tgt_mask)
        query = self.norm2(t1) if qp is None else self.norm2(t1) + qp
        cross = self.multihead_attn
        return t1, query, _query_projection(cross, query) if _projects_itself(cross, None) else None

    t, query, projected = query_invariant(self, t, (qp, tgt_mask), self_attention_block)
    if shared:
        query, t = query.expand(-1, tgt.shape[1], -1), t.expand(-1, tgt.shape[1], -1)
        projected = None if projected is None else projected.expand(-1, tgt.shape[1], -1, -1)
    t = t + _attend(self.multihead_attn, query, memory if pos is None else memory + pos, memory,
                    projected_query=projected)
    return _add(t, _mlp(self, t, self.norm3), True)


# The attribute ``patch`` gives a decoder layer whose queries are the model's token embeddings: the Parameters whose
# rows, in order, are every sample's queries (FastMETRO's joint and vertex tokens; TORE's joints, its NSR's vertices).
QUERY_SOURCES = "_tore_query_sources"
# decoder layer -> (state of its parameters and sources, the query positions and mask, the block's results on them)
_INVARIANT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and shortcut_applies(torch.equal, a, b)


def _rows_of(tokens, sources) -> bool:
    """Whether the ``[L, E]`` ``tokens`` are the rows of ``sources`` one after another."""
    sizes = [p.shape[0] for p in sources]
    return sum(sizes) == tokens.shape[0] and all(_same(r, p.detach()) for r, p in zip(tokens.split(sizes), sources))


def query_invariant(layer, tokens, inputs, compute):
    """``compute()`` (the self-attention block of a decoder layer on one sample of queries ``tokens [L, 1, E]``
    and ``inputs``: query positions, mask), computed once while the layer's parameters, its ``QUERY_SOURCES`` and
    ``inputs`` stay the same and the tokens are the sources' rows (checked on every call, 10-20 us). Those queries
    are the model's parameters, so the block is the same in every call: the runtime form of the constant folding
    OpenVINO does at compile time (FastMETRO-L at batch 1: 445 tokens of in-projection, masked attention,
    out-projection and query projection, 4.4 ms). Only in eager inference, on a layer in eval mode."""
    sources = layer.__dict__.get(QUERY_SOURCES)
    if (sources is None or torch.is_grad_enabled() or torch.compiler.is_compiling() or tokens.dim() != 3
            or tokens.shape[1] != 1 or any(m.training for m in layer.modules()) or not _rows_of(tokens[:, 0], sources)):
        return compute()
    device = tokens.device.type
    state = (tensor_versions((*layer.parameters(), *sources)),
             torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    entry = _INVARIANT.get(layer)
    if entry is not None and entry[0] == state and all(_same(a, b) for a, b in zip(entry[1], inputs)):
        return entry[2]
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference mode too
        results = compute()
        _INVARIANT[layer] = (state, tuple(None if x is None else x.clone() for x in inputs), results)
    return results


# encoding module -> {shape and settings: its [tokens, B, E] sequence}, for encodings without parameters or buffers
_POSITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_POSITIONS = 8  # sequences kept per encoding (batch shapes x token counts)


def position_sequence(encoding, batch_size, tokens, device, dtype):
    """TORE-FastMETRO's call ``encoding(bs, h, w, device) -> [B, E, h, w]``, as a ``[h, B, E]`` sequence. An encoding
    without parameters or buffers (the released sine) depends only on the shape and its plain settings: computed
    once per shape and kept (about 20 small ops: 0.4 ms per forward at batch 1 and 2.2 ms at batch 32 on the TORE
    head, AMD EPYC Zen 4), read-only for the forwards that add it."""
    def compute():
        return encoding(batch_size, tokens, 1, device).flatten(2).permute(2, 0, 1).to(dtype)

    if torch.compiler.is_compiling() or next(encoding.parameters(), None) is not None \
            or next(encoding.buffers(), None) is not None:  # traced (a constant there anyway), or learned
        return compute()
    settings = tuple(sorted((k, v) for k, v in vars(encoding).items()
                            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))
    key = (batch_size, tokens, device, dtype, settings)
    kept = _POSITIONS.setdefault(encoding, {})
    hit = kept.get(key)
    if hit is None:
        if len(kept) >= MAX_POSITIONS:
            kept.clear()
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whatever mode the first call ran in
            hit = kept[key] = compute()
    return hit


def forget_invariants(modules) -> None:
    """Drop the cached blocks and position sequences of ``modules`` (``unpatch``)."""
    for m in modules:
        _INVARIANT.pop(m, None)
        _POSITIONS.pop(m, None)


@eager_under_compile
def transformer_forward(self, img_features, cam_token, jv_tokens, pos_embed, attention_mask=None):
    """The released ``Transformer.forward`` in eval mode without its all-False key-padding masks and all-zero
    ``query_pos`` (no-ops that cost a mask merge per attention call and two additions per decoder layer)."""
    if self.training:
        return base_forward(self)(self, img_features, cam_token, jv_tokens, pos_embed,
                                               attention_mask=attention_mask)
    x = torch.cat([cam_token, img_features], dim=0)
    for layer in self.encoder.layers:
        x = layer(x, pos=pos_embed)
    memory = x if self.encoder.norm is None else self.encoder.norm(x)
    cam_features, enc_img_features = memory.split([1, img_features.shape[0]], dim=0)
    t = same_over_batch(jv_tokens)
    for layer in self.decoder.layers:
        t = layer(t, enc_img_features, tgt_mask=attention_mask, pos=pos_embed)
    return cam_features, enc_img_features, t if self.decoder.norm is None else self.decoder.norm(t)




def packed_linear_forward(self, input):
    return linear(input, self.weight, self.bias)


def packed_conv_forward(self, input):
    """nn.Conv2d's forward through :func:`~tore_kernels.ops.conv.conv2d` (small fp32 inputs in inference on the
    weight reordered once per input shape)."""
    if self.padding_mode != "zeros":
        return self._conv_forward(input, self.weight, self.bias)
    return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def bert_self_attention_forward(self, hidden_states, attention_mask=None, head_mask=None, *args, **kwargs):
    """METRO's BERT self-attention (query / key / value linears, scores plus the additive mask, softmax, context
    ``[B, L, H * d]``, returned as a 1-tuple) as one SDPA call on packed projections. Exact where nothing else
    runs between the softmax and the product: no attention dropout in effect, no head_mask, no attention
    probabilities wanted (``output_attentions``), no ``history_state``; otherwise the released forward runs."""
    if (head_mask is not None or self.output_attentions or (self.training and self.dropout.p > 0)
            or hidden_states.dim() != 3 or any(a is not None for a in args)
            or any(v is not None for v in kwargs.values())):
        return base_forward(self)(self, hidden_states, attention_mask, head_mask, *args, **kwargs)
    heads = self.num_attention_heads
    q, k, v = (linear(hidden_states, m.weight, m.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
               for m in (self.query, self.key, self.value))  # [B, H, L, d] views
    if attention_mask is not None and not torch.compiler.is_compiling() and not bool(attention_mask.any()):
        attention_mask = None  # METRO's all-zero additive mask: SDPA's maskless (flash) kernel
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # the release's 1 / sqrt(d) scale
    return (context.transpose(1, 2).flatten(2),)


def is_erf_gelu(fn) -> bool:
    """Whether ``fn`` computes the exact (erf) GELU, as METRO's ``gelu`` (``x * 0.5 * (1 + erf(x / sqrt(2)))``) does:
    checked on values, not names, in float64 (a tanh approximation differs by ~1e-4)."""
    x = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:  # not a plain elementwise function of a tensor
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape and bool(torch.allclose(y, F.gelu(x), rtol=0,
                                                                                        atol=1e-12))


def bert_intermediate_forward(self, hidden_states):
    """METRO's ``BertIntermediate`` (dense, then its erf GELU) in eval mode with ``F.gelu``: one pass over the
    ``[B, L, 4H]`` activations where the released function makes five (at batch 32, 445 tokens, 58 M elements)."""
    if self.training:
        return base_forward(self)(self, hidden_states)
    return F.gelu(self.dense(hidden_states))
