"""Ahead-of-time compilation report for every shipped Triton kernel configuration (no GPU needed).

Each op module with Triton kernels defines ``gpu_report_configs() -> list[KernelConfig]``: one entry per
configuration it can launch (block sizes, warps, stages per shape class and dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelConfig:
    name: str                      # e.g. "itp_forward[C=512,HW=49,N=39,fp16]"
    kernel: Any                    # the @triton.jit function
    signature: dict[str, str]      # every argument -> Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any] = field(default_factory=dict)  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 2
    # analytic cost of one launch vs the eager sequence it replaces, for the report (optional)
    flops: int | None = None
    bytes_fused: int | None = None
    bytes_eager: int | None = None
