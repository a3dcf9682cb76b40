"""FastMETRO's DETR-style pre-norm encoder-decoder transformer (tore-model.md section 2).

Class and attribute names follow FastMETRO's ``transformer.py`` so released state_dicts load:
``encoder.layers[i].{self_attn, linear1, linear2, norm1, norm2}``, ``encoder.norm``,
``decoder.layers[i].{self_attn, multihead_attn, linear1, linear2, norm1, norm2, norm3}``, ``decoder.norm``.
Sequence-first ``[L, B, E]`` throughout; attention modules are called with their default arguments
(need_weights=True, head-averaged weights computed and dropped) exactly as the released code does.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn


def _check_float_tensor(x, name, shape):
    """``shape`` may hold None for a free axis. Raises TypeError / ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {list(x.shape)}")


def check_attention_mask(mask, num_queries, name="attention_mask"):
    """A ``[Q, Q]`` bool mask (True = may NOT attend) or float additive mask; None means dense.
    A bool row with every key masked would make softmax produce NaN, so it is rejected."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = may not attend) or floating point, got {mask.dtype}")
    if tuple(mask.shape) != (num_queries, num_queries):
        raise ValueError(f"{name} must have shape [{num_queries}, {num_queries}], got {list(mask.shape)}")
    if mask.dtype == torch.bool and bool(mask.all(dim=1).any()):
        raise ValueError(f"{name} has a row where every key is masked (True); each query needs one allowed key")


class Transformer(nn.Module):
    """Encoder over ``[cam_token; img_features]`` and decoder of ``jv_tokens`` (queries) over the image part."""

    def __init__(self, model_dim=512, nhead=8, num_enc_layers=3, num_dec_layers=3,
                 feedforward_dim=2048, dropout=0.1, activation="relu"):
        super().__init__()
        if model_dim % nhead:
            raise ValueError(f"model_dim ({model_dim}) must be divisible by nhead ({nhead})")
        self.model_dim = model_dim
        self.nhead = nhead
        encoder_layer = TransformerEncoderLayer(model_dim, nhead, feedforward_dim, dropout, activation)
        self.encoder = TransformerEncoder(encoder_layer, num_enc_layers, nn.LayerNorm(model_dim))
        decoder_layer = TransformerDecoderLayer(model_dim, nhead, feedforward_dim, dropout, activation)
        self.decoder = TransformerDecoder(decoder_layer, num_dec_layers, nn.LayerNorm(model_dim))
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, img_features, cam_token, jv_tokens, pos_embed, attention_mask=None):
        """img_features [HW, B, E], cam_token [1, B, E], jv_tokens [Q, B, E], pos_embed [HW, B, E],
        attention_mask [Q, Q] for the decoder self-attention
        -> (cam_features [1, B, E], enc_img_features [HW, B, E], jv_features [Q, B, E])."""
        E = self.model_dim
        _check_float_tensor(img_features, "img_features", (None, None, E))
        hw, bs, _ = img_features.shape
        _check_float_tensor(cam_token, "cam_token", (1, bs, E))
        _check_float_tensor(jv_tokens, "jv_tokens", (None, bs, E))
        _check_float_tensor(pos_embed, "pos_embed", (hw, bs, E))
        check_attention_mask(attention_mask, jv_tokens.shape[0])
        device = img_features.device
        # The released code passes all-False key-padding masks; kept so the attention calls are identical.
        mask = torch.zeros((bs, hw), dtype=torch.bool, device=device)
        mem_mask = torch.cat([torch.zeros((bs, 1), dtype=torch.bool, device=device), mask], dim=1)
        memory = self.encoder(torch.cat([cam_token, img_features], dim=0), src_key_padding_mask=mem_mask, pos=pos_embed)
        cam_features, enc_img_features = memory.split([1, hw], dim=0)
        jv_features = self.decoder(jv_tokens, enc_img_features, tgt_mask=attention_mask, memory_key_padding_mask=mask,
                                   pos=pos_embed, query_pos=torch.zeros_like(jv_tokens))
        return cam_features, enc_img_features, jv_features


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.num_layers = num_layers
        self.norm = norm
        self.layers = _get_clones(encoder_layer, num_layers)

    def forward(self, src, mask=None, src_key_padding_mask=None, pos=None):
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        self.num_layers = num_layers
        self.norm = norm
        self.layers = _get_clones(decoder_layer, num_layers)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None):
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
        return output if self.norm is None else self.norm(output)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm: ``x += SelfAttn(LN1(x) + pos, LN1(x) + pos, LN1(x)); x += MLP(LN2(x))``."""

    def __init__(self, model_dim, nhead, feedforward_dim=2048, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(model_dim, nhead, dropout=dropout)
        self.linear1 = nn.Linear(model_dim, feedforward_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward_dim, model_dim)
        self.norm1 = nn.LayerNorm(model_dim)
        self.norm2 = nn.LayerNorm(model_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)

    @staticmethod
    def with_pos_embed(tensor, pos):
        # token 0 is the camera token: it gets no positional encoding
        return tensor if pos is None else torch.cat([tensor[:1], tensor[1:] + pos], dim=0)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        y = self.norm1(src)
        q = k = self.with_pos_embed(y, pos)
        src = src + self.dropout1(self.self_attn(q, k, value=y, attn_mask=src_mask,
                                                 key_padding_mask=src_key_padding_mask)[0])
        y = self.linear2(self.dropout(self.activation(self.linear1(self.norm2(src)))))
        return src + self.dropout2(y)


class TransformerDecoderLayer(nn.Module):
    """Pre-norm: masked self-attention, cross-attention to ``memory + pos``, then the MLP."""

    def __init__(self, model_dim, nhead, feedforward_dim=2048, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(model_dim, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(model_dim, nhead, dropout=dropout)
        self.linear1 = nn.Linear(model_dim, feedforward_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward_dim, model_dim)
        self.norm1 = nn.LayerNorm(model_dim)
        self.norm2 = nn.LayerNorm(model_dim)
        self.norm3 = nn.LayerNorm(model_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)

    @staticmethod
    def with_pos_embed(tensor, pos):
        return tensor if pos is None else tensor + pos

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None):
        y = self.norm1(tgt)
        q = k = self.with_pos_embed(y, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, k, value=y, attn_mask=tgt_mask,
                                                 key_padding_mask=tgt_key_padding_mask)[0])
        y = self.multihead_attn(query=self.with_pos_embed(self.norm2(tgt), query_pos),
                                key=self.with_pos_embed(memory, pos), value=memory,
                                attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = tgt + self.dropout2(y)
        y = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(y)


def _get_clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _get_activation_fn(activation):
    functions = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if activation not in functions:
        raise ValueError(f"activation must be one of {sorted(functions)}, got {activation!r}")
    return functions[activation]


def build_transformer(transformer_config):
    """The released builder: a dict with model_dim, nhead, feedforward_dim, dropout, num_enc_layers, num_dec_layers."""
    keys = ("model_dim", "nhead", "feedforward_dim", "dropout", "num_enc_layers", "num_dec_layers")
    missing = [k for k in keys if k not in transformer_config]
    if missing:
        raise ValueError(f"transformer_config is missing {missing}")
    return Transformer(**{k: transformer_config[k] for k in keys})
