"""Eval-mode fast forwards for a CNN backbone: ``backbone_forwards(backbone) -> [(module, forward), ...]``.

``patch`` applies each pair as a per-instance subclass (``_patched_class``), like its other forwards. What they do,
in inference (eval mode, no autograd needed, fp32 CPU tensors without autocast, or under ``patch(dtype=bf16)``'s
CPU bf16 autocast on a CPU that computes bf16 natively, not under tracing / torch.compile):

* every ``Conv2d`` followed by an eval ``BatchNorm2d`` runs as one convolution with the BatchNorm folded into its
  weight and bias (``w * gamma / sqrt(var + eps)``, ``(b - mean) * gamma / sqrt(var + eps) + beta``), derived once
  per version of the conv's and the BatchNorm's tensors and cached outside the model
  (:func:`~tore_kernels.ops.linear.derived_weight`), in channels_last; under bf16 autocast a bf16 copy of the folded
  weight and bias, the activations bf16 throughout (autocast alone runs each conv in bf16 and each BatchNorm apart:
  ``tore-kernels bench backbone`` on an AMD EPYC with AVX512-BF16, torchvision's ResNet-50 at batch 32: 697 ms
  under autocast, 429 ms folded, 760 ms patched in fp32);
* that convolution is oneDNN's ``_convolution_pointwise`` with the following ReLU fused, and for the last conv of
  a residual block the residual addition and its ReLU fused too, accumulated into the residual's memory where
  nothing else holds it (a folded downsample's output, or a block's input inside a ``Sequential`` of blocks);
* the backbone's input is made ``channels_last`` once (oneDNN's fast layout for these convs) and its output is
  given back in the input's layout.

Recognised by structure (attribute names and types): torchvision's / HRNet's ``Bottleneck`` and ``BasicBlock``
(``conv1``, ``bn1``, ``conv2``, ``bn2``[, ``conv3``, ``bn3``], ``relu``, ``downsample``), ``nn.Sequential``
(runs of ``Conv2d``, ``BatchNorm2d``[, ``ReLU``], or of those blocks), and torchvision's ``ResNet`` (the stem,
``layer1..4``, ``avgpool``, ``fc``). Anything else keeps its own forward. Outside inference each forward is the
module's own. Parameters, buffers and ``state_dict`` are untouched; the folded copies cost one more copy of the
conv weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import bf16_native, capturing
from ..ops.conv import HAS_ONEDNN_CONV, onednn_conv
from ..ops.linear import bf16_autocast, derived_weight
from .layers import base_forward, released_class

__all__ = ["backbone_forwards"]


def _foldable(conv, bn) -> bool:
    """A plain 2-d conv (patch may have given it its conv forward) followed by a BatchNorm2d that normalises with its
    running statistics in eval mode."""
    return (released_class(conv) is nn.Conv2d and released_class(bn) is nn.BatchNorm2d
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _folded(conv, bn, dtype=torch.float32):
    """(channels_last weight, bias, {input shape: weight reordered for it}) of ``bn(conv(x))`` in eval mode, in
    ``dtype`` (folded in the parameters' fp32, then rounded), derived once per version of the tensors. A
    training-mode forward updates the running statistics without bumping their version counters (torch's batch_norm
    writes them in place), but it bumps ``num_batches_tracked``'s, which is why that buffer is in the key."""
    tensors = [t for t in (conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
               if t is not None]

    def make(weight):
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        folded = (weight * scale.reshape(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last)
        return folded, shift.detach().to(dtype).contiguous(), {}
    return derived_weight(conv.weight, f"bn-folded-onednn:{dtype}", make, depends=tensors)


def _conv_bn(conv, bn, x, relu=False, residual=None, into_residual=False):
    """``relu?(bn(conv(x)) [+ residual])`` as one oneDNN convolution on the folded weight
    (:func:`~tore_kernels.ops.conv.onednn_conv`: reordered once per input shape; ``into_residual``: the sum
    accumulated into ``residual``'s memory, which the caller gives up). Under bf16 autocast it runs in bf16 (``x``
    and ``residual`` rounded to bf16 where they are not)."""
    dtype = torch.bfloat16 if bf16_autocast() else torch.float32
    weight, bias, packs = _folded(conv, bn, dtype)
    x = x.to(dtype)
    residual = None if residual is None else residual.to(dtype)
    if capturing():  # plain ops on the folded weights: inductor fuses and prepacks them itself
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = y if residual is None else y + residual
        return F.relu(y) if relu else y
    return onednn_conv(x, weight, bias, packs, list(conv.stride), list(conv.padding), list(conv.dilation),
                       conv.groups, relu, residual, into_residual)


def _fast(module, x) -> bool:
    """Whether ``module(x)`` may take the folded path: inference on CPU, nothing that traces; fp32 without autocast,
    or bf16 autocast (fp32 or bf16 ``x``) where the CPU computes bf16 natively (elsewhere oneDNN emulates it)."""
    bf16 = bf16_autocast()
    return (HAS_ONEDNN_CONV and torch.backends.mkldnn.enabled and not module.training and isinstance(x, torch.Tensor)
            and x.device.type == "cpu" and x.dim() == 4 and not x.is_mkldnn
            and (x.dtype in (torch.float32, torch.bfloat16) and bf16_native() if bf16 else
                 x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))))


def _own(module, *args, **kwargs):
    return base_forward(module)(module, *args, **kwargs)


def _shortcut(block, x, owned):
    """(the block's residual, whether the block may write into it: made here, or ``x`` that only the caller held)"""
    ds = block.downsample
    if ds is None:
        return x, owned
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and _foldable(ds[0], ds[1]):
        return _conv_bn(ds[0], ds[1], x), True
    return ds(x), False


def _bottleneck(self, x, owned=False):
    """torchvision's / HRNet's ``Bottleneck``: 1x1, 3x3, 1x1 convs with BatchNorm, ReLU, a residual shortcut.
    ``owned``: ``x`` is a tensor nobody else holds, which the residual sum may overwrite."""
    out = _conv_bn(self.conv1, self.bn1, x, relu=True)
    out = _conv_bn(self.conv2, self.bn2, out, relu=True)
    residual, writable = _shortcut(self, x, owned)
    return _conv_bn(self.conv3, self.bn3, out, relu=True, residual=residual, into_residual=writable)


def _basic_block(self, x, owned=False):
    """torchvision's / HRNet's ``BasicBlock``: two 3x3 convs with BatchNorm, ReLU, a residual shortcut."""
    out = _conv_bn(self.conv1, self.bn1, x, relu=True)
    residual, writable = _shortcut(self, x, owned)
    return _conv_bn(self.conv2, self.bn2, out, relu=True, residual=residual, into_residual=writable)


def _bottleneck_forward(self, x):
    return _bottleneck(self, x) if _fast(self, x) else _own(self, x)


def _basic_block_forward(self, x):
    return _basic_block(self, x) if _fast(self, x) else _own(self, x)


_BLOCKS = {_bottleneck_forward: _bottleneck, _basic_block_forward: _basic_block}


def _blocks_forward(self, x):
    """An ``nn.Sequential`` of residual blocks (a ResNet's ``layer1..4``): every block after the first sums its
    residual into its input, which only this loop holds (torchvision's ResNet-50 at batch 32: 624 -> 605 ms on an
    AMD EPYC with AVX-512). Where a hook could see the blocks' tensors, each block is called as usual."""
    blocks = list(self)
    run = [_BLOCKS.get(type(b).forward) for b in blocks]
    if (not _fast(self, x) or None in run or any(b._forward_hooks or b._forward_pre_hooks for b in blocks)
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
        return _own(self, x)
    for i, (block, fn) in enumerate(zip(blocks, run)):
        x = fn(block, x, owned=i > 0)
    return x


def _run_sequential(modules, x):
    """Run ``modules`` in order with each foldable (Conv2d, BatchNorm2d[, ReLU]) run as one convolution."""
    i = 0
    while i < len(modules):
        if i + 1 < len(modules) and _foldable(modules[i], modules[i + 1]):
            relu = i + 2 < len(modules) and released_class(modules[i + 2]) is nn.ReLU
            x = _conv_bn(modules[i], modules[i + 1], x, relu=relu)
            i += 3 if relu else 2
        else:
            x = modules[i](x)
            i += 1
    return x


def _channels_last(fn, x):
    """``fn(x)`` on a channels_last copy of ``x``, the result given back in ``x``'s layout (contiguous input:
    contiguous output, as the unpatched backbone)."""
    y = fn(x.contiguous(memory_format=torch.channels_last))
    if isinstance(y, torch.Tensor) and y.dim() == 4 and x.is_contiguous():
        y = y.contiguous()
    return y


def _sequential_forward(self, x):
    if not _fast(self, x):
        return _own(self, x)
    return _run_sequential(list(self), x)


def _sequential_top_forward(self, x):
    """The backbone itself an ``nn.Sequential`` (FastMETRO's ResNet without avgpool / fc): channels_last inside."""
    if not _fast(self, x):
        return _own(self, x)
    return _channels_last(lambda t: _run_sequential(list(self), t), x)


def _resnet_top_forward(self, x):
    """torchvision's ``ResNet.forward`` (stem, layer1..4, avgpool, flatten, fc), channels_last inside."""
    if not _fast(self, x):
        return _own(self, x)

    def body(t):
        t = self.maxpool(_conv_bn(self.conv1, self.bn1, t, relu=True))
        t = self.layer4(self.layer3(self.layer2(self.layer1(t))))
        return self.fc(torch.flatten(self.avgpool(t), 1))
    return _channels_last(body, x)


def _is_block(m, convs) -> bool:
    names = [f"conv{i}" for i in range(1, convs + 1)]
    return (type(m).__name__ == ("Bottleneck" if convs == 3 else "BasicBlock")
            and all(_foldable(getattr(m, c, None), getattr(m, "bn" + c[4:], None)) for c in names)
            and not hasattr(m, f"conv{convs + 1}") and type(getattr(m, "relu", None)) is nn.ReLU
            and (getattr(m, "downsample", None) is None or isinstance(m.downsample, nn.Module)))


def _is_resnet(m) -> bool:
    parts = {"conv1": nn.Conv2d, "bn1": nn.BatchNorm2d, "relu": nn.ReLU, "maxpool": nn.Module, "avgpool": nn.Module,
             "fc": nn.Module, **{f"layer{i}": nn.Module for i in range(1, 5)}}
    return (type(m).__name__ == "ResNet" and all(isinstance(getattr(m, a, None), t) for a, t in parts.items())
            and _foldable(m.conv1, m.bn1))


def _has_fold(seq) -> bool:
    return any(_foldable(a, b) for a, b in zip(seq, list(seq)[1:]))


def backbone_forwards(backbone: nn.Module) -> list[tuple[nn.Module, object]]:
    """The ``(module, forward)`` pairs that make ``backbone`` (a CNN: ResNet, HRNet, an ``nn.Sequential`` of
    them) fast in inference; ``[]`` when nothing in it is recognised. Nothing is changed here: the caller applies
    them (``patch``'s ``_patched_class``). Raises TypeError if ``backbone`` is not an ``nn.Module``."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    plan = []
    for m in backbone.modules():
        if _is_block(m, 3):
            plan.append((m, _bottleneck_forward))
        elif _is_block(m, 2):
            plan.append((m, _basic_block_forward))
        elif m is backbone and type(m) is nn.Sequential:
            plan.append((m, _sequential_top_forward))
        elif m is backbone and _is_resnet(m):
            plan.append((m, _resnet_top_forward))
        elif type(m) is nn.Sequential and _has_fold(m):
            plan.append((m, _sequential_forward))
        elif type(m) is nn.Sequential and len(m) and all(_is_block(b, 3) or _is_block(b, 2) for b in m):
            plan.append((m, _blocks_forward))
    return plan
