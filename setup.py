"""Builds the C++/CUDA extension ``tore_kernels._C`` (metadata lives in pyproject.toml).

Switches (environment variables):
  TORE_KERNELS_NO_EXTENSION=1  build no extension at all (the package falls back to torch code)
  TORE_KERNELS_NO_CUDA=1       C++ CPU kernels only
  TORE_KERNELS_FORCE_CUDA=1    fail unless the CUDA kernels are built
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;8.6;8.9;9.0")
  CUDA_HOME / CUDA_PATH        the CUDA toolkit root (found from nvcc otherwise)
  TORE_KERNELS_SANITIZE=1      build the C++ code with AddressSanitizer + UBSan (tests only)

Whether CUDA kernels are built never depends on a GPU being present: only on torch being a CUDA
build and a toolkit being found.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def log(msg):
    print(f"tore-kernels setup: {msg}", file=sys.stderr)


def is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(
        os.path.join(root, "include"))


def toolkit_from_nvcc(nvcc):
    """The real toolkit root behind an `nvcc` (which may be a wrapper script): nvcc's dry run prints TOP=."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "-v", "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_toolkit():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if is_toolkit(root):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = toolkit_from_nvcc(nvcc)
        if is_toolkit(root):
            return root
    candidates = sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda", "/opt/cuda"]
    return next((os.path.realpath(c) for c in candidates if is_toolkit(c)), None)


def nvcc_version(root):
    out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else None


def extensions():
    if flag("TORE_KERNELS_NO_EXTENSION"):
        log("TORE_KERNELS_NO_EXTENSION=1: building no extension")
        return [], {}
    import torch

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
    toolkit = None
    if not flag("TORE_KERNELS_NO_CUDA"):
        if torch.version.cuda is None:
            reason = "torch is a CPU-only build"
        else:
            toolkit = find_cuda_toolkit()
            reason = "no CUDA toolkit found (set CUDA_HOME)"
            if toolkit:
                have, want = nvcc_version(toolkit), tuple(int(x) for x in torch.version.cuda.split(".")[:2])
                if have is None or have[0] != want[0]:
                    reason = f"nvcc {have} in {toolkit} does not match torch's CUDA {torch.version.cuda}"
                    toolkit = None
        if toolkit:
            os.environ["CUDA_HOME"] = toolkit
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
            log(f"CUDA kernels: toolkit {toolkit}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
        elif flag("TORE_KERNELS_FORCE_CUDA"):
            raise RuntimeError(f"TORE_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        else:
            log(f"CPU kernels only: {reason}")
    else:
        log("TORE_KERNELS_NO_CUDA=1: CPU kernels only")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    openmp = ["-fopenmp"] if sys.platform == "linux" else []  # at::parallel_for uses OpenMP
    cxx = ["-O3", "-std=c++20"] + openmp
    ldflags = list(openmp)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if toolkit else ""
    macros = [("TORE_CUDA_ARCHS", f'"{archs}"'), ("Py_LIMITED_API", "0x030A0000")]
    if flag("TORE_KERNELS_SANITIZE"):
        # -fno-wrapv: python's CFLAGS carry -fwrapv, which defines signed overflow and so hides it from UBSan
        cxx = ["-O1", "-g", "-std=c++20", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
               "-fno-wrapv"] + openmp
        ldflags = ["-fsanitize=address,undefined"] + openmp
    kwargs = dict(name="tore_kernels._C", include_dirs=[os.path.join(here, "csrc")],
                  extra_link_args=ldflags, define_macros=macros, py_limited_api=True)
    if toolkit:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        macros.append(("TORE_WITH_CUDA", None))
        ext = CUDAExtension(sources=sources, extra_compile_args={
            "cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]}, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
