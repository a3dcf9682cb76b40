"""backend.py: default choice per device, TORE_KERNELS_BACKEND, fallback with one warning, describe()."""
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch

from tore_kernels import backend


@pytest.fixture
def registry(monkeypatch):
    """A private op registry (the real ops stay untouched), with the extension and triton present."""
    monkeypatch.setattr(backend, "_REGISTRY", {})
    monkeypatch.setattr(backend, "_WARNED", set())
    monkeypatch.setattr(backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(backend, "HAS_EXTENSION_CUDA", True)
    monkeypatch.setattr(backend, "has_triton", lambda: True)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend.register("full", cpu="extension", cuda="extension_cuda", triton="triton")
    backend.register("torch_cpu", cpu=None)
    backend.register("ref_only")
    return backend


def test_defaults_per_device(registry):
    assert registry.choose("full", "cpu") == "cpu"
    assert registry.choose("full", "cuda") == "triton"
    assert registry.choose("torch_cpu", "cpu") == "cpu"
    assert registry.choose("torch_cpu", "cuda") == "reference"  # a CPU path never takes CUDA tensors
    assert registry.choose("ref_only", "cpu") == "reference"
    assert registry.choose("full", backend.torch.device("cuda", 1)) == "triton"


def test_defaults_follow_what_is_built(registry, monkeypatch):
    monkeypatch.setattr(registry, "has_triton", lambda: False)
    assert registry.choose("full", "cuda") == "cuda"
    monkeypatch.setattr(registry, "HAS_EXTENSION_CUDA", False)
    assert registry.choose("full", "cuda") == "reference"
    monkeypatch.setattr(registry, "HAS_EXTENSION", False)
    assert registry.choose("full", "cpu") == "reference"
    assert registry.choose("torch_cpu", "cpu") == "cpu"  # needs no extension


@pytest.mark.parametrize("value, expected", [("reference", "reference"), ("cpu", "cpu"), (" CPU ", "cpu"),
                                             ("auto", "cpu"), ("", "cpu")])
def test_forced_backend_on_cpu(registry, monkeypatch, value, expected):
    monkeypatch.setenv(backend.ENV_VAR, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.choose("full", "cpu") == expected


def test_forced_cuda_backends_on_cuda_tensors(registry, monkeypatch):
    for value in ("reference", "cuda", "triton"):
        monkeypatch.setenv(backend.ENV_VAR, value)
        assert registry.choose("full", "cuda") == value


def test_forced_triton_runs_cpu_tensors_only_when_interpreted(registry, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.warns(RuntimeWarning, match=r"TORE_KERNELS_BACKEND=triton cannot run full.*TRITON_INTERPRET"):
        assert registry.choose("full", "cpu") == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.choose("full", "cpu") == "triton"


def test_fallback_warns_once_per_op_and_device(registry, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.warns(RuntimeWarning, match="has no cuda implementation") as record:
        assert registry.choose("torch_cpu", "cpu") == "cpu"
        assert registry.choose("torch_cpu", "cpu") == "cpu"
    assert len(record) == 1
    with pytest.warns(RuntimeWarning, match="ref_only"):
        assert registry.choose("ref_only", "cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.choose("torch_cpu", "cpu", warn=False) == "cpu"


def test_forced_backend_that_is_not_built_falls_back(registry, monkeypatch):
    monkeypatch.setattr(registry, "HAS_EXTENSION", False)
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    with pytest.warns(RuntimeWarning, match=r"_C is not built"):
        assert registry.choose("full", "cpu") == "reference"


def test_bad_env_value_names_the_variable(registry, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"TORE_KERNELS_BACKEND='gpu'.*reference, cpu, cuda, triton"):
        registry.choose("full", "cpu")


def test_register_rejects_unknown_names(registry):
    with pytest.raises(ValueError, match="unknown implementation 'metal'"):
        registry.register("x", metal=None)
    with pytest.raises(ValueError, match="unknown requirement 'cublas'"):
        registry.register("x", cuda="cublas")
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        registry.choose("nope", "cpu")


def test_describe(registry, monkeypatch):
    registry.register("cloned", cpu_path=lambda: "C++ AVX2 clone", cpu="extension")
    assert registry.describe() == {"full": {"cpu": "cpu", "cuda": "triton", "cpu_path": "C++"},
                                   "torch_cpu": {"cpu": "cpu", "cuda": "reference", "cpu_path": "torch ops"},
                                   "ref_only": {"cpu": "reference", "cuda": "reference", "cpu_path": "reference"},
                                   "cloned": {"cpu": "cpu", "cuda": "reference", "cpu_path": "C++ AVX2 clone"}}
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert all(where == {"cpu": "reference", "cuda": "reference", "cpu_path": "reference"}
               for where in registry.describe().values())
    assert registry.registered_ops() == ("full", "torch_cpu", "ref_only", "cloned")


def test_extension_flags_are_consistent():
    assert backend.HAS_EXTENSION_CUDA <= backend.HAS_EXTENSION
    assert bool(backend.EXTENSION_CUDA_ARCHS) == backend.HAS_EXTENSION_CUDA


needs_ext = pytest.mark.skipif(not backend.HAS_EXTENSION, reason="tore_kernels._C is not built")


@needs_ext
def test_runnable_isas_match_the_cpus_features():
    """The extension reads the CPU with GCC's __builtin_cpu_supports; torch's cpuinfo library is a second,
    independent reading of the same cpuid bits (/proc/cpuinfo is not: under qemu-user it shows the host's)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        assert backend.runnable_isas() == ("baseline",) and backend.cpu_isa() == "baseline"
        return
    want = ["baseline"]
    if torch.cpu._is_avx2_supported():
        want.append("avx2")
        if torch.cpu._is_avx512_supported():
            want.append("avx512")
    assert backend.runnable_isas() == tuple(want)
    assert backend.cpu_isa() in want


@needs_ext
def test_cpu_isa_follows_aten_capability():
    """The clone the kernels run: the widest the CPU has, capped by ATEN_CPU_CAPABILITY (in a fresh process: it is
    read once). A cap is only tried where the CPU can execute it (above, torch's own kernels would die of SIGILL)."""
    caps = {"baseline": "default", "avx2": "avx2", "avx512": "avx512"}
    for clone in backend.runnable_isas():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": caps[clone]}
        out = subprocess.run([sys.executable, "-c", "from tore_kernels import backend; print(backend.cpu_isa(), "
                              "backend.runnable_isas()[-1]); print(backend.cpu_summary())"],
                             env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        first, summary = out.stdout.strip().splitlines()[-2:]
        assert first.split() == [clone, backend.runnable_isas()[-1]]
        assert f"run the {backend.ISA_NAMES[clone]} clone" in summary
        assert ("capped by ATEN_CPU_CAPABILITY" in summary) == (clone != backend.runnable_isas()[-1])


def test_bf16_native_is_onednns_predicate(monkeypatch):
    assert backend.bf16_native() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setattr(backend, "cpu_isa", lambda: "avx2")
    monkeypatch.setattr(backend, "runnable_isas", lambda: ("baseline", "avx2"))
    monkeypatch.setattr(backend, "bf16_native", lambda: False)
    assert backend.cpu_summary().endswith("bf16 native: no (emulated, slower than fp32)")
    assert backend.clone_path() == "C++ AVX2 clone"
