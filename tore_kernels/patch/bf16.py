"""``patch(model, dtype=torch.bfloat16)``: the forward under bf16 autocast, where the CPU computes bf16 natively.

Linears, convs and attention take bf16 inputs (with fp32 accumulation in oneDNN / SDPA) on cached bf16 (packed)
weight copies; LayerNorm, softmax statistics, the residual stream, the fused ITP, the output heads
(``FP32_HEADS``) and the mesh upsampling stay fp32; outputs come back fp32; parameters and state_dict untouched.
Where the CPU has no native bf16 (no AVX512-BF16 / AMX / AVX-NE-CONVERT: oneDNN would emulate it, tens of times
slower than fp32, or refuse to pack the weights), patch runs fp32 instead, warns once and says so in the report.
"""
from __future__ import annotations

import torch

from ..nn.mesh import MeshSampler
from ..ops import linear as _linear_ops
from ..ops.linear import derived_weight, linear
from .layers import base_forward

# Linears whose outputs are the model's coordinates / camera (and the learned upsamplings of coordinates:
# FastMETRO's 431 -> 1723, METRO's 431 -> 1723 -> 6890): cheap, and bf16's 8-bit mantissa would round every
# output to ~0.4 % of its value.
FP32_HEADS = ("cam_predictor", "xyz_regressor", "xyz_regressor_j", "xyz_regressor_v", "coarse2intermediate_upsample",
              "upsampling", "upsampling2", "cam_param_fc", "cam_param_fc2", "cam_param_fc3")

FALLBACK = ("dtype=torch.bfloat16 requested, but this CPU has no native bf16 (oneDNN would emulate it, slower than "
            "fp32): running fp32")


def use_bf16() -> bool:
    """Whether patch(dtype=torch.bfloat16) runs bf16 here: the one place that decides (tests fake it)."""
    return _linear_ops.bf16_native()  # looked up on call: tests fake that one function


def to_fp32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype == torch.bfloat16 else out
    if isinstance(out, (tuple, list)):
        return type(out)(to_fp32(o) for o in out)
    if isinstance(out, dict):
        return type(out)((k, to_fp32(v)) for k, v in out.items())
    return out


def in_bf16(self, forward, args, kwargs):
    """``forward`` under bf16 autocast: linears, convs, matmuls and attention take bf16 inputs (with fp32
    accumulation in oneDNN / SDPA); LayerNorm, softmax statistics, the residual stream (fp32 + bf16 -> fp32),
    the fused ITP, the output heads and the mesh upsampling stay fp32; outputs come back as fp32."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return to_fp32(forward(self, *args, **kwargs))


def bf16_forward(self, *args, **kwargs):
    return in_bf16(self, base_forward(self), args, kwargs)


class FP32MeshSampler(MeshSampler):
    """The batched sampler with autocast off: the sparse products have no bf16 kernel, and coordinates stay fp32."""

    def upsample(self, x, n1=1, n2=0):
        with torch.autocast(x.device.type, enabled=False):
            return super().upsample(x.float(), n1, n2)

    def downsample(self, x, n1=0, n2=None):
        with torch.autocast(x.device.type, enabled=False):
            return super().downsample(x.float(), n1, n2)


def bf16_conv_forward(self, input):
    """Under patch(dtype=bf16)'s autocast, in inference, the conv takes a bf16 weight copy made once per version of
    the parameter (autocast would cast every weight again on every call); otherwise the weight itself."""
    weight, device = self.weight, self.weight.device.type
    if not torch.is_grad_enabled() and weight.dtype == torch.float32 and torch.is_autocast_enabled(device) \
            and torch.get_autocast_dtype(device) == torch.bfloat16:
        weight = derived_weight(weight, "bf16", lambda w: w.to(torch.bfloat16))
    return self._conv_forward(input, weight, self.bias)


def fp32_linear_forward(self, input):
    with torch.autocast(input.device.type, enabled=False):
        return linear(input.to(self.weight.dtype), self.weight, self.bias)

