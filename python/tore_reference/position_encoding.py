"""DETR sine positional encoding as FastMETRO / TORE use it (tore-model.md section 4).

The module keeps the released call ``encoding(batch_size, h, w, device) -> [B, E, h, w]``; the models
flatten it to a sequence, which ``sequence`` does: ``[h * w, B, E]``.
"""
import math

import torch
from torch import nn


def _check_positive_int(value, name):
    if torch.jit.is_tracing() and isinstance(value, torch.Tensor) and value.dim() == 0:
        return  # a traced size (torch.onnx.export): the tracer records sizes as 0-dim tensors
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of an all-ones ``h x w`` grid: ``num_pos_feats`` channels for y, then as many for x."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        _check_positive_int(num_pos_feats, "num_pos_feats")
        # sin of the even and cos of the odd channels are interleaved: an odd count has no partner.
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale may only be given with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, bs, h, w, device):
        """-> float32 ``[bs, 2 * num_pos_feats, h, w]``, as the released module returns it."""
        for value, name in ((bs, "bs"), (h, "h"), (w, "w")):
            _check_positive_int(value, name)
        ones = torch.ones((bs, h, w), dtype=torch.bool, device=device)
        y_embed = ones.cumsum(1, dtype=torch.float32)
        x_embed = ones.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * (i // 2) / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def sequence(self, bs, h, w=1, device=None, dtype=None):
        """Sequence-first ``[h * w, bs, E]`` (row-major over the grid), cast to ``dtype`` if given.
        The models call it with ``w = 1`` for ``h`` tokens (pruned image tokens, joints)."""
        pos = self.forward(bs, h, w, device).flatten(2).permute(2, 0, 1)
        return pos if dtype is None else pos.to(dtype)


def build_position_encoding(hidden_dim, pos_type="sine"):
    """The released builder (also callable as ``build_position_encoding(pos_type=..., hidden_dim=...)``)."""
    _check_positive_int(hidden_dim, "hidden_dim")
    if pos_type != "sine":
        raise ValueError(f"pos_type must be 'sine' (the only one FastMETRO / TORE use), got {pos_type!r}")
    if hidden_dim % 4:
        raise ValueError(f"hidden_dim must be a multiple of 4 (two halves of sin/cos pairs), got {hidden_dim}")
    return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
