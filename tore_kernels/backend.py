"""The one place that decides which implementation of an op runs.

Implementations:
  reference  plain eager torch, correct everywhere (the fallback)
  cpu        the fast CPU path (C++ in tore_kernels._C, or vectorised torch)
  cuda       a CUDA C++ kernel in tore_kernels._C
  triton     a Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1

By default a CUDA tensor gets triton, else cuda, else reference; a CPU tensor gets cpu, else
reference. ``TORE_KERNELS_BACKEND=reference|cpu|cuda|triton`` forces one; where the forced one
cannot run (not built, wrong device) the default is used with one warning per op.

CPU kernels in tore_kernels._C are compiled per x86 SIMD ISA ("clones": baseline, avx2, avx512) and run the widest
the CPU has and ATEN_CPU_CAPABILITY allows (``cpu_isa()``); aarch64 gets the portable build. Where an op's C++
kernel is slower than torch's own ops on some ISA, the op's module picks torch's there and says so through
``register(..., cpu_path=...)`` (printed by `tore-kernels info` and `bench`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
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


_TRACE = threading.local()  # .capturing: True while this thread traces a forward for patch(compile=True)


def capturing() -> bool:
    """Whether this thread is tracing a patched forward into patch(compile=True)'s graph: the ops then take the
    plain torch calls that inductor fuses and prepacks itself."""
    return getattr(_TRACE, "capturing", False)


@contextlib.contextmanager
def capture_tracing():
    """:func:`capturing` is True in this thread inside the block."""
    _TRACE.capturing = True
    try:
        yield
    finally:
        _TRACE.capturing = False


def triton_interpret() -> bool:
    """Triton kernels run on CPU tensors only if TRITON_INTERPRET=1 was set before they were defined."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


ISA_CLONES = ("baseline", "avx2", "avx512")  # narrowest first
ISA_NAMES = {"baseline": "baseline", "avx2": "AVX2", "avx512": "AVX-512"}


@functools.lru_cache(maxsize=None)
def _isa() -> tuple[str | None, str | None]:
    if _C is None or not hasattr(torch.ops.tore_kernels, "cpu_isa"):
        return None, None
    return tuple(torch.ops.tore_kernels.cpu_isa())


def cpu_isa() -> str | None:
    """The SIMD clone the C++ CPU kernels run in this process: 'baseline', 'avx2' or 'avx512' (the widest the CPU
    has and ATEN_CPU_CAPABILITY allows; fixed at the first call); None without the extension."""
    return _isa()[0]


def runnable_isas() -> tuple[str, ...]:
    """The clones this CPU can execute, whatever ATEN_CPU_CAPABILITY says (read from the CPU by the extension, as
    ``cpu_isa()`` does); ('baseline',) without the extension."""
    widest = _isa()[1] or "baseline"
    return ISA_CLONES[:ISA_CLONES.index(widest) + 1]


@functools.lru_cache(maxsize=None)
def bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's predicate: AVX-512 BF16 / AMX, or AVX-NE-CONVERT);
    elsewhere bf16 matrix products are emulated and far slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str | None:
    """The x86 CPU's vendor ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; None elsewhere. MKL runs its
    AVX-512 GEMM kernels only on Intel's CPUs: on AMD's its fp32 GEMM ran at 0.4x oneDNN's (AMD EPYC, AVX-512)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


MALLOC_ENV = "TORE_KERNELS_MALLOC"
MALLOC_KEEP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=None)
def tune_malloc() -> str:
    """Let glibc's malloc keep freed blocks of up to ``MALLOC_KEEP_BYTES`` for reuse, process-wide, once.

    By default glibc maps large blocks (activations from about 128 KiB, growing with use) fresh from the kernel and
    returns freed heap tops to it, so a forward pays page faults on memory it just freed: the patched
    TORE-FastMETRO-L head at batch 32 took 180 ms with this and 180-320 ms without (AMD EPYC, AVX-512), the same
    peak memory. ``patch`` calls it; ``TORE_KERNELS_MALLOC=0``, or glibc's own ``MALLOC_*`` / ``GLIBC_TUNABLES``
    malloc settings in the environment, leave malloc as it is; other C libraries are left alone. Returns what it
    did, for the patch report."""
    if os.environ.get(MALLOC_ENV, "1") == "0":
        return f"left as it is ({MALLOC_ENV}=0)"
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left as the environment's MALLOC_* / GLIBC_TUNABLES set it"
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return "left as it is (not glibc)"
    libc = ctypes.CDLL(None)
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_KEEP_BYTES) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES) == 1)
    return (f"keeps freed blocks up to {MALLOC_KEEP_BYTES >> 20} MiB for reuse ({MALLOC_ENV}=0: off)" if ok
            else "left as it is (mallopt refused)")


_REGISTRY: dict[str, dict[str, str | None]] = {}
_CPU_PATHS: dict[str, object] = {}
_WARNED: set[tuple[str, str, str]] = set()


def separate_inductor_cache() -> None:
    """Give runs under ``ATEN_CPU_CAPABILITY`` their own inductor cache (unless ``TORCHINDUCTOR_CACHE_DIR`` is set).
    Inductor's on-disk cache does not key its CPU kernels on that cap: a run capped at avx2 reused kernels compiled
    uncapped, and the reverse, and got wrong results or heap corruption (torch 2.14.1). Called when tore_kernels
    is imported: it changes nothing unless the cap is set."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import getpass
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                             f"torchinductor_{getpass.getuser()}_{cap}")


def register(op: str, *, cpu_path=None, **implementations: str | None) -> None:
    """Declare the implementations of ``op``: name -> what it needs (None, 'extension', 'extension_cuda', 'triton').
    ``cpu_path``: a callable returning what the cpu implementation runs on this CPU (e.g. "C++ AVX2 clone"),
    for `tore-kernels info` / `bench`."""
    for name, need in implementations.items():
        if name not in BACKENDS:
            raise ValueError(f"register({op!r}): unknown implementation {name!r}; expected one of {BACKENDS}")
        if need not in REQUIREMENTS:
            raise ValueError(f"register({op!r}): unknown requirement {need!r}; expected one of {REQUIREMENTS}")
    _REGISTRY[op] = {"reference": None, **implementations}
    if cpu_path is not None:
        _CPU_PATHS[op] = cpu_path


def clone_path() -> str:
    """What a C++ CPU kernel with per-ISA clones runs in this process, e.g. "C++ AVX2 clone"."""
    isa = cpu_isa()
    return f"C++ {ISA_NAMES[isa]} clone" if isa else "torch ops (no extension)"


def cpu_path(op: str) -> str:
    """What ``op``'s chosen implementation runs for CPU tensors on this CPU."""
    impl = choose(op, "cpu", warn=False)
    if impl != "cpu":
        return impl
    describe_path = _CPU_PATHS.get(op)
    if describe_path is None:
        return "torch ops" if _REGISTRY[op]["cpu"] is None else "C++"
    return describe_path()


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
    """For `tore-kernels info`: which implementation each op would use on CPU and CUDA tensors, and what the CPU
    one runs on this CPU."""
    return {op: {"cpu": choose(op, "cpu", warn=False), "cuda": choose(op, "cuda", warn=False),
                 "cpu_path": cpu_path(op)} for op in _REGISTRY}


def cpu_summary() -> str:
    """One line: the CPU's widest clone, the one running (and why, when capped), and whether bf16 is native."""
    isa = cpu_isa()
    if isa is None:
        return f"no C++ kernels (extension not built); ATen {torch.backends.cpu.get_cpu_capability()}; " \
               f"bf16 native: {'yes' if bf16_native() else 'no'}"
    widest = runnable_isas()[-1]
    capped = "" if isa == widest else f" (CPU has {ISA_NAMES[widest]}; capped by ATEN_CPU_CAPABILITY)"
    return f"C++ kernels run the {ISA_NAMES[isa]} clone{capped}; ATen {torch.backends.cpu.get_cpu_capability()}; " \
           f"bf16 native: {'yes' if bf16_native() else 'no (emulated, slower than fp32)'}"
