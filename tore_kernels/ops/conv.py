"""Inference convolutions on oneDNN with the weight reordered once per input shape.

``onednn_conv`` is the one place that calls oneDNN's convolution (the backbone's folded conv + BatchNorm, with
ReLU and residual sums fused); ``conv2d`` is ``F.conv2d`` that takes it for small fp32 inputs in inference (a
head's ``conv_1x1`` and the ITP's 3x3 conv at batch 1), where F.conv2d reorders the weight into oneDNN's layout on
every call (4 MB for a 2048 -> 512 conv, mostly out of cache in a forward). Parameters are never changed: the
reordered copies are cached outside the model per parameter version (:func:`~tore_kernels.ops.linear.derived_weight`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from .linear import derived_weight

# private ops (inductor's CPU conv fusion uses them): without them every conv is F.conv2d
HAS_ONEDNN_CONV = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                   and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
MAX_PACKED_SHAPES = 4  # weights reordered per input shape: at most this many shapes per weight, then the weight as is
# Output positions (batch x height x width) up to which conv2d takes oneDNN on the reordered weight. Measured on an
# AMD EPYC (Zen 4), the patched TORE-FastMETRO-L head side by side: batch 1 (49 positions) 1.03-1.06x, 1.05x capped
# at AVX2; batch 8 (392) level; batch 32 (1568) 0.99x, where F.conv2d's per-call reorder is small against the conv.
PACKED_CONV_POSITIONS = 392


def _output_size(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    return [(s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(x_shape[2:], padding, dilation, weight_shape[2:], stride)]


def onednn_conv(x, weight, bias, packs, stride, padding, dilation, groups, relu=False, residual=None,
                into_residual=False):
    """``relu?(conv2d(x, weight, bias) [+ residual])`` as one oneDNN convolution, on ``weight`` reordered for
    ``x``'s shape, kept in ``packs`` ({input shape: reordered weight}, at most ``MAX_PACKED_SHAPES``; beyond that
    ``weight`` itself, reordered by oneDNN on each call). Without the per-shape reorder, ResNet-50 at batch 1 was
    1.6x slower; reordered without the shape, oneDNN's guess was 1.9x slower than eager there. ``into_residual``:
    the caller gives up ``residual``, and the sum is accumulated into its memory where it is a channels_last tensor
    of the output's shape (oneDNN's sum post-op instead of a new output and a binary add). ``stride``, ``padding``,
    ``dilation``: lists of two ints. The output is channels_last."""
    args = (padding, stride, dilation, groups)
    packed = packs.get(x.shape)
    if packed is None and len(packs) < MAX_PACKED_SHAPES:
        with torch.inference_mode(False), torch.no_grad():
            packed = packs[x.shape] = torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape))
    w = weight if packed is None else packed  # the reordered copy's shape is not the weight's
    if residual is not None:
        post = ("add", 1.0, "relu" if relu else None, [], "")
        if (into_residual and residual.is_contiguous(memory_format=torch.channels_last)
                and list(residual.shape) == [x.shape[0], weight.shape[0],
                                             *_output_size(x.shape, weight.shape, stride, padding, dilation)]):
            return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, w, bias, *args, *post)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, bias, *args, *post)
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, *args, "relu" if relu else "none", [], "")


def _packs_apply(x, weight, bias, padding) -> bool:
    """Whether conv2d takes oneDNN on the reordered weight: fp32 CPU inference (no autograd, no autocast, nothing
    that traces: under patch(compile=True)'s capture inductor prepacks F.conv2d itself), a 2-d conv with numeric
    padding."""
    return (HAS_ONEDNN_CONV and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not backend.capturing() and x.dim() == 4 and weight.dim() == 4
            and not isinstance(padding, str)
            and x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and x.is_cpu and weight.is_cpu and not x.is_mkldnn and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


def _pair(v) -> list[int]:
    return [int(v)] * 2 if isinstance(v, int) else [int(a) for a in v]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; for fp32 CPU inference with at most
    ``PACKED_CONV_POSITIONS`` output positions, oneDNN's convolution on the weight reordered once per version and
    input shape, the output given back in ``x``'s layout (contiguous input: contiguous output, as F.conv2d)."""
    if not _packs_apply(x, weight, bias, padding):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    size = _output_size(x.shape, weight.shape, stride, padding, dilation)
    if not 0 < x.shape[0] * size[0] * size[1] <= PACKED_CONV_POSITIONS or x.shape[1] != weight.shape[1] * groups:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    packs = derived_weight(weight, "onednn-conv", lambda w: {})
    y = onednn_conv(x, weight.detach(), None if bias is None else bias.detach(), packs, stride, padding, dilation,
                    groups)
    return y.contiguous() if x.is_contiguous() else y
