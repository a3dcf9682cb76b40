"""The `tore-kernels` command (info, bench) and the benchmark harness, on a fake entry module."""
import csv
import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

import tore_benchmarks
from tore_benchmarks import harness
from tore_kernels import backend, cli, gpu_report

FAKE_ENTRIES = '''
import torch
from tore_benchmarks.harness import Case, entry

CALLS = []

@entry("fake")
def fake(device, quick):
    for n in ([16] if quick else [16, 48]):
        x = torch.randn(n, n, device=device)
        def eager():
            CALLS.append("eager")
            return (x @ x).sum()
        def fast():
            CALLS.append("fast")
            return torch.mm(x, x).sum()
        yield Case("fake", {"n": n, "dtype": "fp32"}, {"eager": eager, "fast": fast})

@entry("broken")
def broken(device, quick):
    x = torch.ones(6)
    yield Case("broken", {"n": 6}, {"eager": lambda: x + 1, "bad": lambda: x.view(7)})

@entry("interrupted")
def interrupted(device, quick):
    x = torch.ones(4)
    yield Case("interrupted", {"n": 4}, {"eager": lambda: x + 1, "fast": lambda: x.add(1)})
    raise KeyboardInterrupt  # Ctrl-C while the second case is built

@entry("no_cases")
def no_cases(device, quick):
    raise RuntimeError("cannot build inputs")
    yield
'''


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """tore_benchmarks with only bench_fake.py in it (the real entries are not run)."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "bench_fake.py").write_text(FAKE_ENTRIES)
    (folder / "helpers.py").write_text("raise AssertionError('only bench_*.py modules are imported')\n")
    monkeypatch.setattr(tore_benchmarks, "__path__", [str(folder)])
    monkeypatch.setattr(harness, "_ENTRIES", {})
    yield folder
    sys.modules.pop("tore_benchmarks.bench_fake", None)


def test_discover_imports_bench_modules_only(fake_bench):
    assert sorted(harness.discover()) == ["broken", "fake", "interrupted", "no_cases"]


def test_run_times_alternates_and_writes_csv_json(fake_bench, tmp_path):
    out = tmp_path / "out"
    result = harness.run(["fake"], device="cpu", quick=True, out_dir=out, progress=False, print_table=False)
    rows = result["results"]
    assert [(r["params"]["n"], r["variant"]) for r in rows] == [(16, "eager"), (16, "fast")]
    eager, fast = rows
    reps = harness.SETTINGS[True][1]
    for r in rows:
        assert r["status"] == "ok" and r["reps"] == reps and r["calls_per_rep"] >= 1
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
        assert r["baseline"] == "eager" and r["device"] == "cpu"
    assert eager["ratio_vs_baseline"] == 1.0
    assert fast["ratio_vs_baseline"] == pytest.approx(eager["median_ms"] / fast["median_ms"])

    # the variants alternate within the repetitions: the call log switches variant at least once per rep
    calls = sys.modules["tore_benchmarks.bench_fake"].CALLS
    assert sum(a != b for a, b in zip(calls, calls[1:])) >= reps

    with open(result["files"]["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(harness.CSV_FIELDS) and len(table) == 2
    row = table[1]
    assert json.loads(row["params"]) == {"dtype": "fp32", "n": 16}
    assert float(row["ratio_vs_baseline"]) == pytest.approx(fast["ratio_vs_baseline"])
    assert row["torch"] == torch.__version__ and row["python"] == sys.version.split()[0]
    assert int(row["torch_threads"]) == torch.get_num_threads() and row["cpu_model"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["timestamp"])
    assert row["tore_kernels"] == __import__("tore_kernels").__version__

    with open(result["files"]["json"]) as f:
        doc = json.load(f)
    assert doc["environment"]["device"] == "cpu" and len(doc["results"]) == 2
    assert doc["results"][1]["median_ms"] == pytest.approx(fast["median_ms"])
    assert "png" not in result["files"]


def test_plot(fake_bench, tmp_path):
    pytest.importorskip("matplotlib")
    result = harness.run(["fake"], quick=True, out_dir=tmp_path, plot=True, progress=False, print_table=False)
    with open(result["files"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_keeps_the_finished_cases(fake_bench, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        harness.run(["fake", "interrupted"], quick=True, out_dir=tmp_path, progress=False, print_table=False)
    csv_file, = tmp_path.glob("bench-cpu-*.csv")
    json_file, = tmp_path.glob("bench-cpu-*.json")
    assert not list(tmp_path.glob("*.tmp"))
    rows = list(csv.DictReader(csv_file.open()))
    assert [(r["entry"], r["variant"], r["status"]) for r in rows] == [
        ("fake", "eager", "ok"), ("fake", "fast", "ok"), ("interrupted", "eager", "ok"), ("interrupted", "fast", "ok")]
    assert [r["variant"] for r in json.loads(json_file.read_text())["results"]] == ["eager", "fast"] * 2


def test_plot_without_matplotlib(fake_bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(harness.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"plot=True needs matplotlib"):
        harness.run(["fake"], quick=True, out_dir=None, plot=True)


def test_full_mode_runs_every_case(fake_bench):
    rows = harness.run(["fake"], quick=False, out_dir=None, progress=False, print_table=False)["results"]
    assert [(r["params"]["n"], r["variant"]) for r in rows] == [(16, "eager"), (16, "fast"), (48, "eager"),
                                                                (48, "fast")]
    assert all(r["reps"] == harness.SETTINGS[False][1] for r in rows)


def test_broken_variant_and_entry_are_reported(fake_bench):
    rows = harness.run(["broken", "no_cases"], out_dir=None, quick=True, progress=False,
                       print_table=False)["results"]
    by = {(r["entry"], r["variant"]): r for r in rows}
    assert by[("broken", "eager")]["status"] == "ok" and by[("broken", "eager")]["median_ms"] > 0
    assert by[("broken", "bad")]["status"].startswith("error: RuntimeError")
    assert by[("broken", "bad")]["ratio_vs_baseline"] is None
    assert by[("no_cases", "-")]["status"] == "error: RuntimeError: cannot build inputs"
    table = harness.format_table(rows)
    assert "error: RuntimeError" in table and "broken" in table


def test_run_rejects_bad_arguments(fake_bench):
    with pytest.raises(ValueError, match=r"unknown benchmark entry nope; available: broken, fake, interrupted, no_cases"):
        harness.run(["nope"], out_dir=None)
    with pytest.raises(ValueError, match=r"device: expected 'cpu' or 'cuda', got 'meta'"):
        harness.run(["fake"], device="meta", out_dir=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but torch sees no CUDA GPU"):
            harness.run(["fake"], device="cuda", out_dir=None)


def test_case_and_entry_validation(monkeypatch):
    monkeypatch.setattr(harness, "_ENTRIES", {})
    with pytest.raises(ValueError, match="at least two callables"):
        harness.Case("e", {}, {"eager": lambda: None})
    with pytest.raises(TypeError, match="variant 'fast' is not callable"):
        harness.Case("e", {}, {"eager": lambda: None, "fast": 3})
    with pytest.raises(TypeError, match="params must be a dict"):
        harness.Case("e", [1], {"eager": lambda: None, "fast": lambda: None})

    @harness.entry("dup")
    def first(device, quick):
        yield from ()

    def second(device, quick):
        yield from ()
    with pytest.raises(ValueError, match="benchmark entry 'dup' is defined twice"):
        harness.entry("dup")(second)
    with pytest.raises(ValueError, match="entry\\(name\\)"):
        harness.entry("")


def test_cli_bench(fake_bench, tmp_path, capsys):
    assert cli.main(["bench", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["broken", "fake", "interrupted", "no_cases"]

    assert cli.main(["bench", "fake", "--quick", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fake\s+n=16,dtype=fp32\s+fast\s+\S+\s+\S+\s+\S+\s+\d+\.\d\dx$", out, re.MULTILINE)
    assert len(list((tmp_path / "o").glob("bench-cpu-*.csv"))) == 1

    assert cli.main(["bench", "broken", "--quick", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "1 benchmark row(s) failed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, message", [
    (["bench", "nope", "--quick"], 2, "unknown benchmark entry nope; available: broken, fake, interrupted, no_cases"),
    (["bench", "--device", "tpu"], 2, "argument --device: invalid choice: 'tpu'"),
    (["bench", "--quick=3"], 2, "ignored explicit argument"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ([], 2, "the following arguments are required: COMMAND"),
])
def test_cli_bad_arguments(fake_bench, argv, code, message, capsys):
    try:
        result = cli.main(argv)
    except SystemExit as exc:
        result = exc.code
    assert result == code
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when there is no GPU")
def test_cli_bench_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_cli_bench_without_benchmarks_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tore_benchmarks", None)
    assert cli.main(["bench", "--list"]) == 1
    assert "the benchmarks package (tore_benchmarks) is not installed" in capsys.readouterr().err


def test_cli_info(monkeypatch, capsys):
    monkeypatch.setitem(backend._REGISTRY, "zz_fake_op", {"reference": None, "cpu": None})
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})" in out
    assert f"triton       {__import__('triton').__version__ if find_spec('triton') else 'not installed'}" in out
    assert re.search(r"^tore-kernels \d+\.\d+", out, re.MULTILINE)
    assert ("_C           built" in out) == backend.HAS_EXTENSION
    for arch in backend.EXTENSION_CUDA_ARCHS:
        assert f"sm_{arch.replace('.', '')}" in out
    assert ("GPU          none" in out) != torch.cuda.is_available()
    assert re.search(r"^  zz_fake_op\s+cpu\s+/ reference\s+\[torch ops\]$", out, re.MULTILINE)
    for op, where in backend.describe().items():
        assert re.search(rf"^  {op}\s+{where['cpu']}\s+/ {where['cuda']}\s+\[{re.escape(where['cpu_path'])}\]$", out,
                         re.MULTILINE)
    assert f"CPU ISA      {backend.cpu_summary()}" in out
    if backend.HAS_EXTENSION:  # the clone the C++ kernels run, and bf16's nativeness
        assert f"run the {backend.ISA_NAMES[backend.cpu_isa()]} clone" in out
    assert f"bf16 native: {'yes' if backend.bf16_native() else 'no'}" in out

    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert cli.main(["info"]) == 0
    assert re.search(r"^  zz_fake_op\s+reference\s+/ reference\s+\[reference\]$", capsys.readouterr().out,
                     re.MULTILINE)


def test_cli_info_errors(monkeypatch, capsys):
    monkeypatch.setitem(backend._REGISTRY, "zz_fake_op", {"reference": None, "cpu": None})
    monkeypatch.setenv(backend.ENV_VAR, "fastest")
    assert cli.main(["info"]) == 2
    assert "TORE_KERNELS_BACKEND='fastest': expected one of" in capsys.readouterr().err

    monkeypatch.delenv(backend.ENV_VAR)
    monkeypatch.setattr(gpu_report, "op_module_names", lambda: ["tore_kernels.ops.zz_missing"])
    assert cli.main(["info"]) == 1
    assert "tore_kernels.ops.zz_missing: import failed: ModuleNotFoundError" in capsys.readouterr().out


def test_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "tore-kernels")
    if not os.path.exists(script):
        pytest.skip("the tore-kernels console script is not installed next to this python")
    env = {k: v for k, v in os.environ.items() if k != backend.ENV_VAR}
    proc = subprocess.run([script, "info"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backend per op" in proc.stdout
    proc = subprocess.run([script, "gpu-report", "--arch", "70"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown arch '70'" in proc.stderr


def test_case_bytes_give_bandwidth(fake_bench):
    """A case's fewest bytes become each variant's GB/s (bytes over the median), shown in the table."""
    case = harness.Case("bw", {"n": 1}, {"a": lambda: torch.ones(1000).sum(), "b": lambda: torch.ones(1000).sum()},
                        bytes=4000)
    rows = harness.time_case(case, torch.device("cpu"), quick=True)
    for r in rows:
        assert r["bytes"] == 4000 and r["gb_per_s"] == pytest.approx(4000 / (r["median_ms"] * 1e6))
    assert "GB/s" in harness.format_table(rows)
    assert harness.copy_bandwidth(torch.device("cpu")) is None  # measured on CUDA only
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="bytes must be a positive int or None"):
            harness.Case("bw", {}, dict(case.variants), bytes=bad)


def test_skipped_variant_reps_notes_and_throughput():
    x = torch.randn(8, 8)
    case = harness.Case("peers", {"model": "m", "batch": 4}, {"eager": lambda: x @ x, "fast": lambda: torch.mm(x, x),
                                                       "absent": harness.Skipped("not installed")},
                reps=2, notes={"fast": "err 1e-7"})
    rows = {r["variant"]: r for r in harness.time_case(case, torch.device("cpu"), quick=False)}
    assert rows["absent"]["status"] == "skipped: not installed" and rows["absent"]["median_ms"] is None
    assert rows["eager"]["reps"] == rows["fast"]["reps"] == 2 and rows["fast"]["note"] == "err 1e-7"
    assert rows["fast"]["per_s"] == pytest.approx(4 / rows["fast"]["median_ms"] * 1e3)
    table = harness.format_table(list(rows.values()))
    assert "skipped: not installed" in table and "err 1e-7" in table
    with pytest.raises(TypeError, match="baseline"):
        harness.Case("e", {}, {"eager": harness.Skipped("no"), "fast": lambda: None})
    with pytest.raises(ValueError, match="reps"):
        harness.Case("e", {}, {"eager": lambda: None, "fast": lambda: None}, reps=0)


def test_plots_group_headline_entries_and_draw_throughput(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for entry_name, batch, variant, ms in [("attention", 1, "eager", 2.0), ("attention", 1, "tore", 0.1),
                                           ("peers", 1, "eager", 50.0), ("peers", 1, "onnxruntime", 40.0),
                                           ("peers", 1, "patched", 30.0), ("peers", 32, "eager", 1200.0),
                                           ("peers", 32, "onnxruntime", 700.0), ("peers", 32, "patched", 400.0)]:
        rows.append({"entry": entry_name, "params": {"model": "m", "batch": batch}, "variant": variant,
                     "baseline": "eager", "median_ms": ms, "per_s": batch / ms * 1e3, "status": "ok"})
    for r in rows:
        base = next(b for b in rows if b["entry"] == r["entry"] and b["params"] == r["params"] and b["variant"] == "eager")
        r["ratio_vs_baseline"] = base["median_ms"] / r["median_ms"]
    assert [name for name, _ in harness._grouped(rows)] == ["peers", "attention"]
    env = harness.environment(torch.device("cpu"))
    harness._write_plot(str(tmp_path / "r.png"), rows, env)
    assert harness._write_throughput_plot(str(tmp_path / "t.png"), rows, env)
    assert not harness._write_throughput_plot(str(tmp_path / "n.png"), rows[:2], env)  # no headline entry
    for name in ("r.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "n.png").exists()
    # the log axis gets labels inside a decade without a power of ten, and few of them over many decades
    assert harness._log_ticks(28, 165) == [30, 50, 70, 100, 150]
    assert harness._log_ticks(1, 10000) == [1, 10, 100, 1000, 10000]
