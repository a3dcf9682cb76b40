import os

import pytest
from hypothesis import HealthCheck, settings

# Triton decides at decoration time whether a kernel runs in its interpreter, so this must be set
# before tore_kernels is imported. With no GPU, the triton backend runs its kernels on CPU tensors.
try:
    import torch
    _has_gpu = torch.cuda.is_available()
except Exception:
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture
def triton_backend(monkeypatch):
    """Run ops through their Triton kernels (interpreted on CPU tensors when there is no GPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "triton")


_CUDA = pytest.mark.skipif(not _has_gpu, reason="no CUDA device on this machine")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request):
    """The device a test runs on: CPU always, CUDA where a GPU is present (skipped, with the reason, elsewhere)."""
    return torch.device(request.param)
