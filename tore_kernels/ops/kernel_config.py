"""What an op module ships for the ahead-of-time compile check: one ``KernelConfig`` per Triton launch
configuration (block sizes, warps, stages per shape class and dtype), returned by its ``gpu_report_configs()``.

It lives with the kernels so that ``ops`` imports nothing from ``tore_kernels.gpu_report``, which reads them.
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

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"KernelConfig.name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.signature, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.signature.items()):
            raise TypeError(f"KernelConfig({self.name}).signature: expected dict[str, str] (argument -> Triton type)")
        missing = [k for k, v in self.signature.items() if v == "constexpr" and k not in self.constexprs]
        if missing:
            raise ValueError(f"KernelConfig({self.name}).constexprs: no value for constexpr argument(s) {missing}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"KernelConfig({self.name}).num_warps: expected a power of two in 1..32, "
                             f"got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"KernelConfig({self.name}).num_stages: expected an int >= 1, got {self.num_stages!r}")
