"""gpu_report: ahead-of-time compilation of Triton kernel configurations for sm_80/86/89/90, no GPU needed.

conftest sets TRITON_INTERPRET=1, so the kernels below compile in a child process without it (which is
also what `tore-kernels gpu-report` does when run with TRITON_INTERPRET=1).
"""
import json
import textwrap

import pytest

pytest.importorskip("triton")

from tore_kernels import cli, gpu_report  # noqa: E402
from tore_kernels.gpu_report import KernelConfig  # noqa: E402

# A transpose goes through shared memory: a B x B fp64 tile needs 8 B^2 bytes (B = 128: 128 KiB, over the
# 99 KiB of sm_86 but within the 163 KiB of sm_80), and with one warp a 64 x 64 fp64 tile is 256 registers
# per thread: ptxas must spill.
KERNELS = '''
import triton
import triton.language as tl
from tore_kernels.gpu_report import KernelConfig

@triton.jit
def transpose(x, y, B: tl.constexpr):
    r = tl.arange(0, B)
    tile = tl.load(x + r[:, None] * B + r[None, :])
    tl.store(y + r[:, None] * B + r[None, :], tl.trans(tile))

SIG = {"x": "*fp64", "y": "*fp64", "B": "constexpr"}

def small():
    return KernelConfig("transpose[B=16]", transpose, SIG, {"B": 16}, num_warps=1, num_stages=1,
                        flops=0, bytes_fused=2 * 16 * 16 * 8, bytes_eager=4 * 16 * 16 * 8)
'''
MODULES = {
    "fake_ok_kernels": KERNELS + "\ndef gpu_report_configs():\n    return [small()]\n",
    "fake_bad_kernels": KERNELS + textwrap.dedent('''
        def gpu_report_configs():
            return [small(),
                    KernelConfig("transpose[B=128]", transpose, SIG, {"B": 128}, num_warps=8, num_stages=1),
                    KernelConfig("transpose[B=64,w1]", transpose, SIG, {"B": 64}, num_warps=1, num_stages=1),
                    KernelConfig("no_y", transpose, {"x": "*fp64", "B": "constexpr"}, {"B": 16})]
        '''),
    "fake_broken_configs": "def gpu_report_configs():\n    raise RuntimeError('shape table is empty')\n",
    "fake_no_kernels": "X = 1\n",
}


@pytest.fixture
def kernel_modules(tmp_path, monkeypatch):
    for name, text in MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for the child process
    return tmp_path


def _rows_by(rows):
    return {(r["module"], r["config"], r["arch"]): r for r in rows}


def test_report_flags_shared_memory_spills_and_errors(kernel_modules):
    rows = gpu_report.report(["fake_bad_kernels", "fake_broken_configs", "fake_no_kernels", "fake_missing_module"],
                             archs=(80, 86), jobs=2)  # the worker-pool path
    by = _rows_by(rows)
    small = by[("fake_bad_kernels", "transpose[B=16]", 86)]
    assert small["status"] == "ok" and small["problems"] == []
    assert 0 < small["registers"] <= 255 and small["stack_bytes"] == 0 and small["local_stores"] == 0
    assert small["shared_bytes"] >= 16 * 16 * 8  # the tile is staged through shared memory
    assert (small["flops"], small["bytes_fused"], small["bytes_eager"]) == (0, 4096, 8192)

    big80, big86 = by[("fake_bad_kernels", "transpose[B=128]", 80)], by[("fake_bad_kernels", "transpose[B=128]", 86)]
    assert big80["shared_bytes"] == big86["shared_bytes"] >= 128 * 128 * 8
    assert big80["status"] == "ok" and big80["shared_limit"] == 163 * 1024
    assert big86["status"] == "fail" and big86["shared_limit"] == 99 * 1024
    assert any("shared memory" in p and "sm_86" in p for p in big86["problems"])

    spill = by[("fake_bad_kernels", "transpose[B=64,w1]", 86)]
    assert spill["status"] == "fail" and spill["stack_bytes"] > 0 and spill["local_stores"] > 0
    assert any(p.startswith("spills") for p in spill["problems"])

    for arch in (80, 86):
        bad = by[("fake_bad_kernels", "no_y", arch)]
        assert bad["status"] == "error" and bad["error"]
    assert by[("fake_broken_configs", "-", None)]["error"] == "RuntimeError: shape table is empty"
    assert by[("fake_missing_module", "-", None)]["error"].startswith("ModuleNotFoundError")
    assert not any(r["module"] == "fake_no_kernels" for r in rows)
    assert len(rows) == 4 * 2 + 2

    text = gpu_report.format_report(rows)
    assert "FAIL: shared memory" in text and "FAIL: spills" in text and "ERROR: compile failed" in text
    assert f"{2 + 1} ok, {len(rows) - 3} failing" in text


def test_cli_gpu_report_exit_codes(kernel_modules, monkeypatch, capsys):
    monkeypatch.setattr(gpu_report, "op_module_names", lambda: ["fake_ok_kernels"])
    assert cli.main(["gpu-report", "--arch", "sm_86", "9.0", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "transpose[B=16]" in out and "sm_86" in out and "sm_90" in out and "2 ok, 0 failing" in out

    monkeypatch.setattr(gpu_report, "op_module_names", lambda: ["fake_bad_kernels"])
    assert cli.main(["gpu-report", "--arch", "86", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert {r["config"]: r["status"] for r in rows} == {"transpose[B=16]": "ok", "transpose[B=128]": "fail",
                                                         "transpose[B=64,w1]": "fail", "no_y": "error"}


def test_cli_gpu_report_without_kernels(monkeypatch, capsys):
    monkeypatch.setattr(gpu_report, "op_module_names", lambda: [])
    assert cli.main(["gpu-report"]) == 0
    assert "no Triton kernels" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["gpu-report", "--arch", "75"], "unknown arch '75'; expected one of 80, 86, 89, 90"),
    (["gpu-report", "--arch"], "argument --arch: expected at least one argument"),
    (["gpu-report", "--arch", "sm_8x"], "unknown arch 'sm_8x'"),
    (["gpu-report", "--bogus"], "unrecognized arguments: --bogus"),
    (["gpu-report", "--jobs", "0"], "argument --jobs: expected a positive integer, got '0'")])
def test_cli_gpu_report_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_report_rejects_unknown_arch():
    with pytest.raises(ValueError, match=r"archs: expected some of \[80, 86, 89, 90\], got \[75\]"):
        gpu_report.report([], archs=(75,))
    with pytest.raises(ValueError, match=r"jobs: expected an int >= 1, got 0"):
        gpu_report.report([], jobs=0)


def test_compile_config_refuses_an_interpreted_kernel(kernel_modules):
    import fake_ok_kernels  # imported here under TRITON_INTERPRET=1: an interpreted function
    row = gpu_report.compile_config(fake_ok_kernels.small(), 86)
    assert row["status"] == "error" and "not a @triton.jit function" in row["error"]


def test_kernel_config_validation():
    sig = {"x": "*fp32", "B": "constexpr"}
    with pytest.raises(ValueError, match="constexprs: no value for constexpr argument"):
        KernelConfig("k", None, sig)
    with pytest.raises(ValueError, match="num_warps: expected a power of two"):
        KernelConfig("k", None, sig, {"B": 4}, num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        KernelConfig("k", None, sig, {"B": 4}, num_stages=0)
    with pytest.raises(TypeError, match="signature"):
        KernelConfig("k", None, ["*fp32"])
    with pytest.raises(ValueError, match="name"):
        KernelConfig("", None, sig, {"B": 4})
