import os

import pytest

# Triton decides at decoration time whether a kernel runs in its interpreter, so this must be set
# before tore_kernels is imported. With no GPU, the triton backend runs its kernels on CPU tensors.
try:
    import torch
    _has_gpu = torch.cuda.is_available()
except Exception:
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
