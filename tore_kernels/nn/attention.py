"""AdjacencyMultiheadAttention: nn.MultiheadAttention that runs neighbour-list attention for sparse masks."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import backend
from ..ops.linear import linear
# names, not the submodule: tore_kernels.ops.adjacency_attention is also the exported function's name
from ..ops.adjacency_attention import (LAYOUT_BLHD, LAYOUT_LBHD, OP, attention_out_projected, attention_weights,
                                       attention_with_averaged_weights, attention_with_lse, mha_inference,
                                       open_table, table_or_none)

# Without a mask, attention to at most this many keys runs through the CPU kernel with every key shared by all
# queries. Measured at batch 32, 8 heads (min of 40): 431 queries x 14 keys, d 16 (the NSR's cross-attention to
# the joint tokens): 2.0 ms against SDPA's 7.0 (bf16 with AVX-512: 2.1 against 9.2); 40 x 40 keys, d 64: 2.3
# against 1.5.
OPEN_TABLE_MAX_KEYS = 16


def few_keys_table(num_queries: int, num_keys: int, dtype: torch.dtype, device: torch.device):
    """The all-open neighbour table when unmasked attention to ``num_keys`` keys is faster through the CPU kernel
    than through SDPA (fp32, or bf16 where the AVX-512 kernel runs), else None."""
    if torch.compiler.is_compiling():  # SDPA, which inductor traces, rather than a graph break for the table
        return None
    fast_dtype = dtype == torch.float32 or (dtype == torch.bfloat16 and backend.cpu_isa() == "avx512")
    if num_keys > OPEN_TABLE_MAX_KEYS or not fast_dtype or backend.choose(OP, device) != "cpu":
        return None
    return open_table(num_queries, num_keys, device)


# under torch.compile the mask's table (a cache keyed on the mask tensor) is looked up outside the graph
_table_or_none_untraced = torch.compiler.disable(table_or_none)


class AdjacencyMultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` (same constructor, parameters, state_dict, forward and return value).

    When ``attn_mask`` is a 2-D ``[L, S]`` mask sparse enough to pay (each query row sees at most a quarter of
    the keys, apart from a few dense rows) the attention runs through the neighbour table of the mask
    (:mod:`tore_kernels.ops.adjacency_attention`), built once per mask tensor. On CPU, unmasked attention to at
    most ``OPEN_TABLE_MAX_KEYS`` keys (the decoder's cross-attention to the joint tokens; fp32, or bf16 with
    AVX-512) runs through the same kernel. An all-False bool key_padding_mask counts as none. On CPU without
    autograd, the projections run on packed weights (:func:`tore_kernels.ops.linear.linear`), or, with
    AVX-512 and no weights wanted, the whole block runs in one op a sample at a time
    (:func:`tore_kernels.ops.adjacency_attention.mha_inference`).
    Everything else takes ``nn.MultiheadAttention``'s own path: key_padding_mask, is_causal, 3-D masks, float
    masks with finite biases, dropout while training, kdim/vdim != embed_dim, bias_k/add_zero_attn, unbatched
    input, and ``need_weights=True`` while gradients are being recorded.

    ``skip_unused_weights`` (constructor argument or attribute, default False): when True, forward returns
    ``(output, None)`` even if ``need_weights=True``, for callers that discard the weights (FastMETRO calls
    its attention with the default ``need_weights=True`` and keeps ``[0]``). When False, ``need_weights=True``
    returns exactly nn.MultiheadAttention's weights (head-averaged ``[B, L, S]`` or per-head ``[B, H, L, S]``).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 skip_unused_weights: bool = False):
        # nn.MultiheadAttention only asserts this (AssertionError): a ValueError naming both arguments instead
        if isinstance(embed_dim, int) and isinstance(num_heads, int) and num_heads > 0 and embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.skip_unused_weights = bool(skip_unused_weights)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, *, skip_unused_weights: bool = False):
        """A copy of ``mha`` (configuration, parameters, training mode, device and dtype)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype,
                  skip_unused_weights=skip_unused_weights)
        new.load_state_dict(mha.state_dict())
        new.train(mha.training)
        return new

    def _sparse_table(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """The neighbour table when the fast path applies, else None."""
        if (is_causal or (attn_mask is not None and attn_mask.dim() != 2) or query.dim() != 3
                or not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn
                or (self.training and self.dropout > 0.0)):
            return None
        if key.shape != value.shape or query.shape[-1] != self.embed_dim or key.shape[-1] != self.embed_dim:
            return None
        L, S = (query.shape[1], key.shape[1]) if self.batch_first else (query.shape[0], key.shape[0])
        B = query.shape[0] if self.batch_first else query.shape[1]
        if key_padding_mask is not None and not (  # FastMETRO passes all-False padding masks: no padding
                isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dtype == torch.bool
                and tuple(key_padding_mask.shape) == (B, S) and not bool(key_padding_mask.any())):
            return None
        if query.dtype != self.in_proj_weight.dtype or backend.choose(OP, query.device) == "reference":
            return None
        if attn_mask is None:  # a few keys open to every query (cross-attention to 14 joint tokens)
            table = few_keys_table(L, S, query.dtype, query.device)
            if table is None:
                return None
        else:
            if tuple(attn_mask.shape) != (L, S) or (attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype):
                return None
            table = (_table_or_none_untraced if torch.compiler.is_compiling() else table_or_none)(
                attn_mask)  # raises for a row that allows no key (a broken topology)
            if table is None or table.width * 4 > S or table.dense_rows.numel() * 8 > L:
                return None
        if need_weights and not self.skip_unused_weights and torch.is_grad_enabled() and (
                query.requires_grad or key.requires_grad or value.requires_grad or self.in_proj_weight.requires_grad):
            return None  # differentiable weights: nn.MultiheadAttention's path computes them
        return table

    def _project(self, query, key, value):
        """q [B, H, L, d] and k, v [B, H, S, d] as views of the in-projection outputs (no copies)."""
        E, H = self.embed_dim, self.num_heads
        if query is key and key is value:
            groups = ((query, 0, 3),)
        elif key is value:
            groups = ((query, 0, 1), (key, 1, 3))
        elif query is key:
            groups = ((query, 0, 2), (value, 2, 3))
        else:
            groups = ((query, 0, 1), (key, 1, 2), (value, 2, 3))
        parts = []
        for x, lo, hi in groups:
            y = linear(x, self.in_proj_weight, self.in_proj_bias, rows=(lo * E, hi * E))
            parts.extend(y.unflatten(-1, (hi - lo, H, -1)).unbind(-3))
        # [L, B, H, d] (seq first) or [B, L, H, d] (batch first) -> [B, H, L, d]
        perm = (0, 2, 1, 3) if self.batch_first else (1, 2, 0, 3)
        return tuple(p.permute(perm) for p in parts)

    def _sparse_forward(self, query, key, value, table, need_weights, average_attn_weights):
        """(output, weights or None) through the kernel, for inputs ``_sparse_table`` accepted."""
        if not need_weights and not torch.compiler.is_compiling():  # its shape predicate is not traceable
            views = (query, key, value) if self.batch_first else (t.transpose(0, 1) for t in (query, key, value))
            y = mha_inference(*views, table, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                              self.out_proj.weight, self.out_proj.bias)
            if y is not None:
                return (y if self.batch_first else y.transpose(0, 1)), None
        q, k, v = self._project(query, key, value)
        return self._attend_projected(q, k, v, table, need_weights, average_attn_weights)

    def _attend_projected(self, q, k, v, table, need_weights=False, average_attn_weights=True):
        """(output in the module's layout, weights or None) from the in-projection's q [B, H, L, d] and k, v
        [B, H, S, d] through the kernel and the output projection (fused into one op in CPU inference)."""
        d = q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        if not need_weights:
            y = attention_out_projected(q, k, v, table, scale, self.out_proj.weight, self.out_proj.bias)
            if y is not None:  # [B, L, E]
                return (y if self.batch_first else y.transpose(0, 1)), None
        layout = LAYOUT_BLHD if self.batch_first else LAYOUT_LBHD
        weights = None
        if need_weights and average_attn_weights:
            out, weights = attention_with_averaged_weights(q, k, v, table, scale, layout)
        else:
            out, lse = attention_with_lse(q, k, v, table, scale, layout)
            if need_weights:
                weights = attention_weights(q, k, table, scale, lse, average_attn_weights)
        out = out.permute(0, 2, 1, 3) if self.batch_first else out.permute(2, 0, 1, 3)
        out = linear(out.reshape(out.shape[0], out.shape[1], self.embed_dim), self.out_proj.weight,
                     self.out_proj.bias)
        return out, weights

    def _check_args(self, query, key, value, attn_mask):
        """The errors nn.MultiheadAttention would raise as AssertionError or deep inside the table build, as
        ValueError / TypeError naming the argument."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if query.shape[-1:] != (self.embed_dim,):
            raise ValueError(f"query: expected last dimension embed_dim={self.embed_dim}, got shape {tuple(query.shape)}")
        for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1:] != (dim,):
                raise ValueError(f"{name}: expected last dimension {dim}, got shape {tuple(t.shape)}")
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor):
                raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask: expected bool (True = blocked) or floating point, got {attn_mask.dtype}")
            if attn_mask.device != query.device:
                raise ValueError(f"attn_mask: expected the device of query ({query.device}), got {attn_mask.device}")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self._check_args(query, key, value, attn_mask)
        table = None
        if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor) \
                and (attn_mask is None or isinstance(attn_mask, torch.Tensor)):
            table = self._sparse_table(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if table is None:
            out, weights = super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                           need_weights=need_weights and not self.skip_unused_weights,
                                           attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                           is_causal=is_causal)
            return out, weights
        return self._sparse_forward(query, key, value, table, need_weights and not self.skip_unused_weights,
                                    average_attn_weights)

