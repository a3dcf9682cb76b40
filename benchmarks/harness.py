"""Side-by-side timing of tore-kernels against the eager reference, in one process.

An entry module ``benchmarks/bench_<family>.py`` registers generator functions::

    from tore_benchmarks.harness import Case, entry

    @entry("projection")
    def projection(device, quick):
        x = torch.randn(32, 6890, 3, device=device)      # inputs built once, outside the callables
        yield Case("projection", {"batch": 32}, {"eager": lambda: ref(x), "tore": lambda: fast(x)})

The first variant of a case is its baseline; every other variant gets ratio = baseline / variant
(> 1 means faster). Variants are alternated within each repetition so that drift in machine load
hits all of them alike; the median of the repetitions is reported with its IQR and min/max.

A case may give ``bytes``: the fewest bytes one call must move through memory (each input read once, each
output written once). Every variant's row then gets ``gb_per_s`` = bytes / median time, the bandwidth that
time amounts to; on CUDA the run also measures the device's own copy bandwidth (``copy_gb_per_s``), the ceiling
to read it against. On CUDA the time is taken with CUDA events around the calls (``--device cuda``).

A variant that cannot run on this machine (a peer runtime not installed) is given as ``Skipped(reason)``: its row
says ``skipped: reason`` and does not fail the run. ``Case.reps`` overrides the repetitions (slow whole-network
cases), ``Case.notes`` adds a note to a variant's row (e.g. how far its outputs are from the baseline's). Rows of
cases with a ``batch`` parameter also get ``per_s``: samples (images) per second.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

_Factory = Callable[[torch.device, bool], Iterable["Case"]]
_ENTRIES: dict[str, _Factory] = {}

# (warm-up calls, repetitions, seconds per measurement): a measurement repeats the call until it
# lasts about that long, so that sub-millisecond kernels are not timed at the clock's resolution.
SETTINGS = {False: (3, 15, 0.05), True: (1, 5, 0.01)}

CSV_FIELDS = ("timestamp", "entry", "params", "variant", "baseline", "status", "median_ms", "q1_ms", "q3_ms",
              "min_ms", "max_ms", "reps", "calls_per_rep", "ratio_vs_baseline", "per_s", "note", "bytes", "gb_per_s",
              "device", "device_name", "copy_gb_per_s", "cpu_model", "cpu_isa", "bf16_native", "torch_threads",
              "load_avg_1m", "python", "torch", "torch_cuda", "triton", "tore_kernels", "git_commit")


@dataclass(frozen=True)
class Skipped:
    """A variant that cannot run here, and why (reported in its row, not an error)."""
    reason: str


@dataclass
class Case:
    entry: str
    params: dict[str, Any]
    variants: dict[str, Callable[[], Any] | Skipped] = field(default_factory=dict)
    reps: int | None = None  # repetitions, instead of the run's setting
    notes: dict[str, str] = field(default_factory=dict)  # variant -> note for its row
    bytes: int | None = None  # the fewest bytes one call must move (inputs read once, outputs written once)

    def __post_init__(self):
        if self.bytes is not None and (not isinstance(self.bytes, int) or self.bytes <= 0):
            raise ValueError(f"Case({self.entry!r}): bytes must be a positive int or None, got {self.bytes!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"Case({self.entry!r}): params must be a dict, got {type(self.params).__name__}")
        if not isinstance(self.variants, dict) or len(self.variants) < 2:
            raise ValueError(f"Case({self.entry!r}): variants must be a dict of at least two callables "
                             "(the first is the baseline)")
        if not callable(next(iter(self.variants.values()))):
            raise TypeError(f"Case({self.entry!r}): the baseline (first variant) must be callable")
        if self.reps is not None and (not isinstance(self.reps, int) or self.reps < 1):
            raise ValueError(f"Case({self.entry!r}): reps must be a positive int or None, got {self.reps!r}")
        for name, fn in self.variants.items():
            if not callable(fn) and not isinstance(fn, Skipped):
                raise TypeError(f"Case({self.entry!r}): variant {name!r} is not callable")


def entry(name: str) -> Callable[[_Factory], _Factory]:
    """Register ``fn(device, quick) -> Iterable[Case]`` as the benchmark entry ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"entry(name): expected a non-empty string, got {name!r}")

    def register(fn: _Factory) -> _Factory:
        old = _ENTRIES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"benchmark entry {name!r} is defined twice: in {old.__module__} and {fn.__module__}")
        _ENTRIES[name] = fn
        return fn
    return register


def discover() -> dict[str, _Factory]:
    """Import every ``bench_*`` module of this package and return the registered entries by name."""
    package = sys.modules[__name__.rpartition(".")[0]] if "." in __name__ else None
    paths = package.__path__ if package is not None else [os.path.dirname(os.path.abspath(__file__))]
    prefix = package.__name__ + "." if package is not None else ""
    for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            importlib.import_module(prefix + info.name)
    return dict(_ENTRIES)


# ----------------------------------------------------------------------------------------- timing

def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """Seconds taken by ``calls`` calls of ``fn``, waiting for the device to finish."""
    if device.type == "cuda":
        def cuda_time(fn, calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def cpu_time(fn, calls):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start
    return cpu_time


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _calls_per_measurement(timer, fn, target: float) -> int:
    """Like timeit's autorange: double the calls until they take ``target`` seconds (one slow outlier
    from a busy machine then cannot make every later measurement a single call)."""
    calls = 1
    while calls < 4096:
        elapsed = timer(fn, calls)
        if elapsed >= target:
            break
        calls = min(4096, calls * 2 if elapsed < target / 4 else max(calls + 1, math.ceil(calls * target / elapsed)))
    return calls


def time_case(case: Case, device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    """Time every variant of ``case``; one result dict per variant (times in ms per call)."""
    warmup, reps, target = SETTINGS[bool(quick)]
    reps = min(reps, case.reps) if quick and case.reps else case.reps or reps
    timer = _timer(device)
    names = list(case.variants)
    calls, errors = {}, {}
    skipped = {name: fn.reason for name, fn in case.variants.items() if isinstance(fn, Skipped)}
    for name in names:  # warm up (compilation, caches, allocator) and size each measurement
        if name in skipped:
            continue
        try:
            for _ in range(warmup):
                case.variants[name]()
            calls[name] = _calls_per_measurement(timer, case.variants[name], target)
        except Exception as exc:  # recorded in the row: one broken variant does not stop the run
            errors[name] = f"{type(exc).__name__}: {exc}"
    samples: dict[str, list[float]] = {name: [] for name in calls}
    live = [name for name in names if name in calls]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(reps if live else 0):
            # rotate the order so that no variant always runs first (or right after the baseline)
            for name in live[rep % len(live):] + live[:rep % len(live)]:
                if name in errors:
                    continue
                try:
                    samples[name].append(timer(case.variants[name], calls[name]) / calls[name] * 1e3)
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
    finally:
        if gc_was_enabled:
            gc.enable()

    rows = []
    for name in names:
        row = {"entry": case.entry, "params": dict(case.params), "variant": name, "baseline": names[0],
               "status": "ok", "median_ms": None, "q1_ms": None, "q3_ms": None, "min_ms": None, "max_ms": None,
               "reps": 0, "calls_per_rep": calls.get(name, 0), "ratio_vs_baseline": None, "per_s": None,
               "note": case.notes.get(name, ""), "bytes": case.bytes, "gb_per_s": None}
        if name in skipped:
            row["status"] = "skipped: " + skipped[name]
        elif name in errors:
            row["status"] = "error: " + errors[name]
        else:
            values = sorted(samples[name])
            row.update(median_ms=statistics.median(values), q1_ms=_quantile(values, 0.25),
                       q3_ms=_quantile(values, 0.75), min_ms=values[0], max_ms=values[-1], reps=len(values))
            if case.bytes and row["median_ms"]:
                row["gb_per_s"] = case.bytes / (row["median_ms"] * 1e6)
        rows.append(row)
    base = rows[0]["median_ms"]
    for row in rows:
        if base is not None and row["median_ms"]:
            row["ratio_vs_baseline"] = base / row["median_ms"]
        if row["median_ms"] and isinstance(case.params.get("batch"), int):
            row["per_s"] = case.params["batch"] / row["median_ms"] * 1e3
    return rows


# -------------------------------------------------------------------------------------- metadata

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float | None:
    """GB/s of a device-to-device copy of ``size`` bytes (read + written), the median of 10 after a warm-up: the
    ceiling for the ``gb_per_s`` of memory-bound cases. None on CPU (not measured: noisy on a shared host)."""
    if device.type != "cuda":
        return None
    src = torch.empty(size // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer, times = _timer(device), []
    for _ in range(10):
        times.append(timer(lambda: dst.copy_(src), 1))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size / statistics.median(times) / 1e9


def environment(device: torch.device) -> dict[str, Any]:
    """What every result row is stamped with."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    try:
        import tore_kernels
        from tore_kernels import backend
        tore_version = tore_kernels.__version__
        # where the CPU rows ran: the SIMD clone of the C++ kernels, bf16 nativeness, each op's CPU path
        cpu = {"cpu_isa": backend.cpu_isa() or "none (no extension)", "bf16_native": backend.bf16_native(),
               "cpu_summary": backend.cpu_summary(),
               "cpu_paths": {op: backend.cpu_path(op) for op in backend.registered_ops()}}
    except Exception as exc:
        tore_version = f"unavailable ({type(exc).__name__})"
        cpu = {"cpu_isa": "", "bf16_native": "", "cpu_summary": "", "cpu_paths": {}}
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "copy_gb_per_s": copy_bandwidth(device),
        "cpu_model": _cpu_model(),
        **cpu,
        "torch_threads": torch.get_num_threads(),
        # other processes competing for the cores make CPU timings unreliable: keep the evidence
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "",
        "triton": triton_version,
        "tore_kernels": tore_version,
        "git_commit": _git_commit(),
    }


# ---------------------------------------------------------------------------------------- output

def _params_text(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no benchmark cases)"
    header = ("entry", "params", "variant", "median ms", "IQR ms", "min-max ms", "GB/s", "ratio", "per s", "note")
    body = []
    for r in rows:
        iqr = None if r["q1_ms"] is None else r["q3_ms"] - r["q1_ms"]
        minmax = "-" if r["min_ms"] is None else f"{r['min_ms']:.4g}-{r['max_ms']:.4g}"
        ratio = _fmt(r["ratio_vs_baseline"], ".2f") + ("x" if r["ratio_vs_baseline"] is not None else "")
        if r["status"] != "ok":
            ratio = r["status"][:90]
        gbps = _fmt(r.get("gb_per_s"), ".4g")
        if r.get("gb_per_s") and r.get("copy_gb_per_s"):
            gbps += f" ({r['gb_per_s'] / r['copy_gb_per_s']:.0%})"
        body.append((r["entry"], _params_text(r["params"]), r["variant"], _fmt(r["median_ms"], ".4g"),
                     _fmt(iqr, ".2g"), minmax, gbps, ratio, _fmt(r.get("per_s"), ".4g"), r.get("note", "")))
    # the bandwidth, throughput and note columns only where some row has one
    keep = [i for i in range(len(header)) if i < 6 or header[i] == "ratio"
            or any(line[i] not in ("", "-") for line in body)]
    header, body = tuple(header[i] for i in keep), [tuple(line[i] for i in keep) for line in body]
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_results(files: dict[str, str], rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """The CSV and JSON of ``rows`` so far (nothing when no folder was asked for), each replaced whole: a run
    stopped while writing leaves the previous complete file, never a truncated one."""
    if not files:
        return
    with open(files["csv"] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r.get(k) for k in CSV_FIELDS}, "params": json.dumps(r["params"], sort_keys=True)})
    with open(files["json"] + ".tmp", "w") as f:
        json.dump({"environment": env, "results": [{k: r[k] for k in r if k not in env} for r in rows]}, f, indent=1)
    for path in (files["csv"], files["json"]):
        os.replace(path + ".tmp", path)


# entries drawn first, in this order (the comparisons a reader looks for); the others follow in run order
HEADLINE_ENTRIES = ("peers", "head", "backbone")


def _grouped(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(entry, its rows)], headline entries first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["entry"], []).append(r)
    rank = {name: i for i, name in enumerate(HEADLINE_ENTRIES)}
    return sorted(groups.items(), key=lambda item: rank.get(item[0], len(rank)))


def _title(env: dict[str, Any]) -> str:
    return (f"tore-kernels {env['tore_kernels']}, torch {env['torch']}\n{env['device_name']}, "
            f"{env['torch_threads']} threads, load {env['load_avg_1m']}, {env['timestamp']}")


def _write_plot(path: str, rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """Speed-ups on a log axis (bars from 1x: right = faster than the baseline), one block per entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels, ratios, headers = [], [], []
    for name, group in _grouped(rows):
        bars = [r for r in group if r["variant"] != r["baseline"] and r["ratio_vs_baseline"] is not None]
        if not bars:
            continue
        headers.append(len(labels))
        labels.append(f"{name} (vs {bars[0]['baseline']})")
        ratios.append(None)
        for r in bars:
            params = _params_text({k: v for k, v in r["params"].items() if k != "dtype" or v != "fp32"})
            labels.append(f"{params}  [{r['variant']}]")
            ratios.append(r["ratio_vs_baseline"])
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.24 * max(1, len(labels))))
    values = [r for r in ratios if r is not None] or [1.0]
    for y, ratio in enumerate(ratios):
        if ratio is None:
            continue
        ax.barh(y, ratio - 1.0, left=1.0, height=0.7, color="tab:green" if ratio >= 1 else "tab:red")
        ax.text(ratio * (1.03 if ratio >= 1 else 0.97), y, f"{ratio:.3g}x", va="center",
                ha="left" if ratio >= 1 else "right", fontsize=7)
    ax.set_xscale("log")
    ratio_label = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_major_formatter(ratio_label)
    # minor ticks 2x and 5x (20x, 0.5x, ...) labelled too: a narrow range may have no major tick but 1x
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}x" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlim(min(values + [1.0]) / 1.6, max(values + [1.0]) * 1.6)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for y in headers:
        ax.get_yticklabels()[y].set_fontweight("bold")
        if y:
            ax.axhline(y - 0.5, color="grey", linewidth=0.5)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("speed-up over the baseline (baseline median / variant median), log scale; 1x = as fast")
    ax.set_title(_title(env), fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Labelled ticks 1, 2, 3, 5 (and 1.5, 7 when few) per decade within [lo, hi] for a log axis: matplotlib labels
    none inside a decade that holds no power of ten."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for steps in ((1, 1.5, 2, 3, 5, 7), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [m * 10.0 ** e for e in decades for m in steps if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= 8:
            return ticks
    return ticks


def _write_throughput_plot(path: str, rows: list[dict[str, Any]], env: dict[str, Any]) -> bool:
    """Samples (images) per second against the batch, one panel per model of the headline entries, one line per
    variant; False (nothing written) when no headline case has a batch parameter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, group in _grouped(rows):
        if name not in HEADLINE_ENTRIES:
            continue
        for r in group:
            if r.get("per_s"):
                key = f"{name}: " + _params_text({k: v for k, v in r["params"].items() if k != "batch"})
                panels.setdefault(key, {}).setdefault(r["variant"], []).append((r["params"]["batch"], r["per_s"]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (key, lines) in zip(axes[0], panels.items()):
        for variant, points in lines.items():
            points.sort()
            ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=variant,
                    linewidth=2.2 if variant.startswith("patched") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({b for points in lines.values() for b, _ in points})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yticks(_log_ticks(*ax.get_ylim()))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("batch")
        ax.set_ylabel("samples (images) per second")
        ax.set_title(key.replace(",", ", "), fontsize=8, wrap=True)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(env), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


class _Progress:
    """tqdm on a terminal when installed, else one plain line per case on stderr (CI logs)."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.count = 0
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.count}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------- run

def run(entries: Iterable[str] | None = None, device: str | torch.device = "cpu", quick: bool = False,
        out_dir: str | os.PathLike | None = "bench-results", plot: bool = False, progress: bool = True,
        print_table: bool = True) -> dict[str, Any]:
    """Run the named entries (all discovered ones when None) and write CSV/JSON (and PNG) to ``out_dir``. The CSV
    and JSON are rewritten after every case, so a run that is interrupted or killed keeps the cases it finished.

    Returns ``{"environment": ..., "results": [row, ...], "files": {"csv": ..., "json": ..., "png": ...}}``;
    a row's ``status`` is ``"ok"`` or ``"error: ..."``.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("plot=True needs matplotlib: pip install 'tore-kernels[bench]'")
    available = discover()
    if entries is None:
        names = sorted(available)
    else:
        names = list(dict.fromkeys(entries))
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown benchmark entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"available: {', '.join(sorted(available)) or '(none)'}")
    env = environment(device)
    files: dict[str, str] = {}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(os.fspath(out_dir), f"bench-{device.type}-{env['timestamp'].replace(':', '')}")
        files["csv"], files["json"] = stem + ".csv", stem + ".json"
    rows: list[dict[str, Any]] = []
    bar = _Progress(progress)
    try:
        for name in names:
            try:
                for case in available[name](device, quick):
                    bar.step(f"{name} {_params_text(case.params)}")
                    rows += [{**env, **row} for row in time_case(case, device, quick)]
                    _write_results(files, rows, env)  # after every case: a run cut short keeps what it measured
            except Exception as exc:  # an entry that cannot even build its cases is reported, not fatal
                rows.append({**env, "entry": name, "params": {}, "variant": "-", "baseline": "-",
                             "status": f"error: {type(exc).__name__}: {exc}", "median_ms": None, "q1_ms": None,
                             "q3_ms": None, "min_ms": None, "max_ms": None, "reps": 0, "calls_per_rep": 0,
                             "ratio_vs_baseline": None, "per_s": None, "note": "", "bytes": None, "gb_per_s": None})
        _write_results(files, rows, env)
    finally:
        bar.close()

    if out_dir is not None:
        if plot:
            files["png"] = stem + ".png"
            _write_plot(files["png"], rows, env)
            if _write_throughput_plot(stem + "-throughput.png", rows, env):
                files["throughput_png"] = stem + "-throughput.png"
    if print_table:
        print(format_table(rows))
        if env["copy_gb_per_s"]:
            print(f"\nGB/s: a case's fewest bytes over the median time; (%): of this device's measured copy bandwidth, "
                  f"{env['copy_gb_per_s']:.0f} GB/s")
        print(f"\n{env['device_name']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
              f"triton {env['triton'] or '-'}, tore-kernels {env['tore_kernels']}, "
              f"commit {env['git_commit'][:10] or '-'}")
        if env["cpu_summary"]:
            print(f"CPU ISA: {env['cpu_summary']}")
            print("CPU paths: " + ", ".join(f"{op} [{path}]" for op, path in sorted(env["cpu_paths"].items())))
        if env["load_avg_1m"] is not None and env["load_avg_1m"] > (os.cpu_count() or 1):
            print(f"note: load average {env['load_avg_1m']} on {os.cpu_count()} CPUs at the start: "
                  "other processes competed for the cores, so these timings are noisy")
        for kind, path in files.items():
            print(f"{kind}: {path}")
    return {"environment": env, "results": rows, "files": files}
