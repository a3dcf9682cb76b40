import os

import pytest
from hypothesis import HealthCheck, settings

# Triton decides when a kernel is defined (tore_kernels' import) whether it runs in its interpreter, so this is
# settled before any test module imports tore_kernels. Without a GPU the kernels are interpreted and take CPU
# tensors; with one they are compiled for it and take CUDA tensors (one or the other in a process, never both).
try:
    import torch
    HAS_GPU = torch.cuda.is_available()
except Exception:
    HAS_GPU = False
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Property tests (hypothesis): a fixed, derandomized run in CI; TORE_FUZZ_EXAMPLES=2000 for a long random fuzz.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=int(os.environ.get("TORE_FUZZ_EXAMPLES") or 2000), deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.load_profile("fuzz" if os.environ.get("TORE_FUZZ_EXAMPLES") else "ci")

FASTMETRO_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fastmetro")
FASTMETRO_DATA = os.path.normpath(os.environ.get("TORE_FASTMETRO_DATA", FASTMETRO_DATA))


@pytest.fixture
def fastmetro_data():
    """The folder of FastMETRO's public mesh files; tests that need it skip when it is absent."""
    if not os.path.isfile(os.path.join(FASTMETRO_DATA, "smpl_431_adjmat_indices.pt")):
        pytest.skip(f"FastMETRO mesh data not found at {FASTMETRO_DATA} (set TORE_FASTMETRO_DATA)")
    return FASTMETRO_DATA


NO_GPU = "no CUDA device on this machine"
CUDA = pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)


def _exact_fp32_on_cuda(device, monkeypatch):
    """CUDA cases are held to fp32 / fp64 references: torch's TF32 default for cuDNN convolutions (the ITP's
    backward recomputes its conv) would add ~1e-3 errors that are torch's setting, not the kernels'. (Matmuls
    default to exact fp32 already.)"""
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request, monkeypatch):
    """The device a test runs on: CPU always, CUDA where a GPU is present (skipped, with the reason, elsewhere)."""
    device = torch.device(request.param)
    _exact_fp32_on_cuda(device, monkeypatch)
    return device


_TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not TRITON_INTERPRETED, reason="the Triton kernels are compiled for the GPU in this run (TRITON_INTERPRET "
                                       "is not 1): they run in the cuda cases")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_GPU or TRITON_INTERPRETED, reason=NO_GPU if not HAS_GPU else
        "TRITON_INTERPRET=1: the Triton kernels are interpreted on CPU tensors in this run")),
]


@pytest.fixture(params=_TRITON_DEVICES)
def triton_backend(request, monkeypatch):
    """Ops forced through their Triton kernels; the device whose tensors the kernels take in this run: CPU through
    the interpreter where there is no GPU, CUDA where there is one (the other case is skipped, with the reason)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "triton")
    device = torch.device(request.param)
    _exact_fp32_on_cuda(device, monkeypatch)
    return device
