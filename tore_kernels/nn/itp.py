"""Drop-in Image Token Pruner: the released TORE parameters (and names), the fused forward."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.itp import image_token_prune

_PARTS = ("token_selector_conv2d", "token_selector_fc", "layer_norm")


class ImageTokenPruner(nn.Module):
    """``features [B, C, H, W] -> (tokens [B, N, C], heatmap [B, N, H*W])`` (tore-model.md section 1).

    Parameters are named as in the released model (``token_selector_conv2d``, ``token_selector_fc``,
    ``layer_norm``), so its state_dict loads unchanged. With ``seq_first=True`` the tokens come back as
    ``[N, B, C]``, the layout the transformer takes, written directly in that order by the GPU kernel.
    """

    def __init__(self, in_channels: int, num_tokens: int, grid_size=(7, 7), eps: float = 1e-5,
                 seq_first: bool = False):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 4 or in_channels % 4:
            raise ValueError(f"ImageTokenPruner: in_channels must be a positive multiple of 4, got {in_channels!r}")
        try:
            grid_size = tuple(int(g) for g in grid_size)
        except (TypeError, ValueError):  # not iterable, or items int() refuses ("ab")
            raise TypeError(f"ImageTokenPruner: grid_size must be a pair of ints (H, W), got {grid_size!r}") from None
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"ImageTokenPruner: grid_size must be a pair of positive ints (H, W), got {grid_size!r}")
        hw = grid_size[0] * grid_size[1]
        if not isinstance(num_tokens, int) or not 1 <= num_tokens <= hw:
            raise ValueError(f"ImageTokenPruner: num_tokens must be an int in [1, H*W={hw}] for grid_size "
                             f"{grid_size}, got {num_tokens!r}")
        self.in_channels, self.num_tokens, self.grid_size = in_channels, num_tokens, grid_size
        self.eps, self.seq_first = float(eps), bool(seq_first)
        self.token_selector_conv2d = nn.Conv2d(in_channels, in_channels // 4, kernel_size=3, stride=1, padding=1)
        self.token_selector_fc = nn.Linear(in_channels // 4, num_tokens)
        self.layer_norm = nn.LayerNorm([num_tokens, in_channels], eps=eps)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_tokens={self.num_tokens}, grid_size={self.grid_size}, "
                f"eps={self.eps}, seq_first={self.seq_first}")

    def forward(self, features: torch.Tensor):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"ImageTokenPruner: features must be a torch.Tensor, got {type(features).__name__}")
        expected = (self.in_channels, *self.grid_size)
        if features.dim() != 4 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"ImageTokenPruner: features must be [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(in_channels, grid_size), got shape {tuple(features.shape)}")
        weight = self.token_selector_conv2d.weight
        if features.dtype != weight.dtype or features.device != weight.device:
            raise TypeError(f"ImageTokenPruner: features must be {weight.dtype} on {weight.device} like the "
                            f"module's parameters, got {features.dtype} on {features.device}")
        return image_token_prune(features, weight, self.token_selector_conv2d.bias,
                                 self.token_selector_fc.weight, self.token_selector_fc.bias,
                                 self.layer_norm.weight, self.layer_norm.bias, eps=self.eps,
                                 seq_first=self.seq_first)

    @classmethod
    def from_model(cls, model: nn.Module, grid_size=(7, 7), seq_first: bool = False) -> "ImageTokenPruner":
        """A pruner with a copy of ``model``'s ``token_selector_conv2d``, ``token_selector_fc`` and
        ``layer_norm`` parameters (same dtype and device); ``grid_size`` is not stored in the weights."""
        missing = [name for name in _PARTS if not isinstance(getattr(model, name, None), nn.Module)]
        if missing:
            raise TypeError(f"ImageTokenPruner.from_model: model must have the modules {', '.join(_PARTS)}; "
                            f"missing {', '.join(missing)}")
        conv, fc, ln = (getattr(model, name) for name in _PARTS)
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
                and conv.stride == (1, 1) and conv.bias is not None):
            raise ValueError(f"ImageTokenPruner.from_model: token_selector_conv2d must be a 3x3, stride 1, "
                             f"padding 1 Conv2d with bias, got {conv}")
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 2 or not ln.elementwise_affine:
            raise ValueError(f"ImageTokenPruner.from_model: layer_norm must be an affine LayerNorm over "
                             f"[num_tokens, in_channels], got {ln}")
        pruner = cls(conv.in_channels, fc.out_features, grid_size=grid_size, eps=ln.eps, seq_first=seq_first)
        pruner.to(device=conv.weight.device, dtype=conv.weight.dtype)
        # load_state_dict checks every shape against the source (C/4 outputs, fc in C/4, LN [N, C])
        for name in _PARTS:
            getattr(pruner, name).load_state_dict(getattr(model, name).state_dict())
        return pruner
