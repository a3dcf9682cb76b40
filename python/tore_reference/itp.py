"""Image Token Pruner, eager (tore-model.md section 1). The released code runs these steps inline in
the model's forward; ``image_token_pruning`` is that inline code, ``ImageTokenPruner`` a module around it."""
import torch
import torch.nn.functional as F
from torch import nn


def image_token_pruning(features, token_selector_conv2d, token_selector_fc, layer_norm):
    """features [B, C, H, W] -> (tokens [B, N, C], heatmap [B, N, H*W])."""
    h = F.gelu(token_selector_conv2d(features))                # [B, C/4, H, W], exact GELU
    h = h.flatten(2).transpose(1, 2)                           # [B, HW, C/4], row-major space
    logits = token_selector_fc(h)                              # [B, HW, N]
    heatmap = torch.softmax(logits, dim=1).transpose(1, 2)     # [B, N, HW]: each cluster over space
    tokens = heatmap @ features.flatten(2).transpose(1, 2)     # [B, N, C]
    return layer_norm(tokens), heatmap


class ImageTokenPruner(nn.Module):
    def __init__(self, in_channels, num_tokens, eps=1e-5):
        super().__init__()
        self.token_selector_conv2d = nn.Conv2d(in_channels, in_channels // 4, kernel_size=3, stride=1, padding=1)
        self.token_selector_fc = nn.Linear(in_channels // 4, num_tokens)
        self.layer_norm = nn.LayerNorm([num_tokens, in_channels], eps=eps)

    def forward(self, features):
        return image_token_pruning(features, self.token_selector_conv2d, self.token_selector_fc, self.layer_norm)
