"""The one place that decides which implementation of an op runs.

Implementations:
  reference  plain eager torch, correct everywhere (the fallback)
  cpu        the fast CPU path (C++ in tore_kernels._C, or vectorised torch)
  cuda       a CUDA C++ kernel in tore_kernels._C
  triton     a Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1

By default a CUDA tensor gets triton, else cuda, else reference; a CPU tensor gets cpu, else
reference. ``TORE_KERNELS_BACKEND=reference|cpu|cuda|triton`` forces one; where the forced one
cannot run (not built, wrong device) the default is used with one warning per op.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

ENV_VAR = "TORE_KERNELS_BACKEND"
BACKENDS = ("reference", "cpu", "cuda", "triton")
REQUIREMENTS = (None, "extension", "extension_cuda", "triton")


def _load_extension():
    try:
        return importlib.import_module("tore_kernels._C")
    except Exception as exc:  # not built, or built against another torch: never fail the import
        warnings.warn(
            f"tore_kernels._C could not be loaded ({exc}); its ops fall back to plain torch (slower). "
            "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)
        return None


_C = _load_extension()
HAS_EXTENSION = _C is not None
HAS_EXTENSION_CUDA = bool(_C is not None and _C.with_cuda)
EXTENSION_CUDA_ARCHS = tuple(a for a in (_C.cuda_archs if _C is not None else "").split(";") if a)


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except Exception:
        return False


def triton_interpret() -> bool:
    """Triton kernels run on CPU tensors only if TRITON_INTERPRET=1 was set before they were defined."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_REGISTRY: dict[str, dict[str, str | None]] = {}
_WARNED: set[tuple[str, str, str]] = set()


def register(op: str, **implementations: str | None) -> None:
    """Declare the implementations of ``op``: name -> what it needs (None, 'extension', 'extension_cuda', 'triton')."""
    for name, need in implementations.items():
        if name not in BACKENDS:
            raise ValueError(f"register({op!r}): unknown implementation {name!r}; expected one of {BACKENDS}")
        if need not in REQUIREMENTS:
            raise ValueError(f"register({op!r}): unknown requirement {need!r}; expected one of {REQUIREMENTS}")
    _REGISTRY[op] = {"reference": None, **implementations}


def registered_ops() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _why_not(op: str, name: str, device: torch.device) -> str | None:
    """None if implementation ``name`` of ``op`` can run on ``device``, else the reason it cannot."""
    impls = _REGISTRY[op]
    if name not in impls:
        return f"{op} has no {name} implementation"
    need = impls[name]
    if need == "extension" and not HAS_EXTENSION:
        return "tore_kernels._C is not built"
    if need == "extension_cuda" and not HAS_EXTENSION_CUDA:
        return "tore_kernels._C was built without CUDA kernels"
    if need == "triton" and not has_triton():
        return "triton is not installed"
    if name == "cpu" and device.type != "cpu":
        return f"the cpu implementation does not take {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda implementation does not take {device.type} tensors"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        return f"triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 (got {device.type})"
    return None


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


def choose(op: str, device: torch.device | str, warn: bool = True) -> str:
    """The implementation of ``op`` that runs for tensors on ``device``."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered: {', '.join(_REGISTRY)}")
    device = torch.device(device)
    default = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    forced = forced_backend()
    if forced is not None:
        reason = _why_not(op, forced, device)
        if reason is None:
            return forced
        if warn and (op, forced, device.type) not in _WARNED:
            _WARNED.add((op, forced, device.type))
            warnings.warn(f"{ENV_VAR}={forced} cannot run {op} here ({reason}); using the default.",
                          RuntimeWarning, stacklevel=3)
    return next(name for name in default if _why_not(op, name, device) is None)


def describe() -> dict[str, dict[str, str]]:
    """For `tore-kernels info`: which implementation each op would use on CPU and CUDA tensors."""
    return {op: {dev: choose(op, dev, warn=False) for dev in ("cpu", "cuda")} for op in _REGISTRY}
