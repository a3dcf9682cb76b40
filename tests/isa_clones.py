"""Rerunning tests under each x86 SIMD clone of the C++ CPU kernels that this CPU can execute."""
import os
import subprocess
import sys

import pytest

from tore_kernels import backend


def run_under_clone(clone, path, tests, expect_passed=None):
    """Runs ``pytest path -k tests`` in a process whose C++ kernels run ``clone``; skips where the CPU cannot."""
    if clone not in backend.runnable_isas():
        pytest.skip(f"this CPU cannot execute the {clone} clone (its widest is {backend.runnable_isas()[-1]})")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default" if clone == "baseline" else clone}
    probe = subprocess.run([sys.executable, "-c", "from tore_kernels import backend; print(backend.cpu_isa())"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.split()[-1:] == [clone], probe.stdout + probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", tests],
                         env=env, capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1:]
    assert run.returncode == 0 and " passed" in run.stdout and "failed" not in run.stdout, \
        run.stdout[-3000:] + run.stderr[-2000:]
    if expect_passed is not None:
        assert f"{expect_passed} passed" in summary[0], summary
