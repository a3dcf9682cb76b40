"""Ahead-of-time compilation report for every shipped Triton kernel configuration (no GPU needed).

Each op module with Triton kernels defines ``gpu_report_configs() -> list[KernelConfig]``: one entry per
configuration it can launch (block sizes, warps, stages per shape class and dtype). ``KernelConfig`` lives with
the kernels (``tore_kernels.ops.kernel_config``); this module only reads the configurations.

``report()`` compiles each configuration for each architecture with ``triton.compile(..., target=GPUTarget)``
and reads from the cubin (triton's bundled ``cuobjdump``) the registers, the stack frame and the local stores
(``STL``: spills), and the shared memory: the cubin's static part plus the dynamic part Triton requests at
launch (``metadata.shared``), checked against the architecture's opt-in per-block limit.
Kernels defined under ``TRITON_INTERPRET=1`` are interpreted functions and cannot compile, so in that case
the compilation runs in a child process without it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .ops.kernel_config import KernelConfig  # noqa: F401  (read here, defined with the kernels)

# Opt-in maximum shared memory per block (CUDA C Programming Guide, "Compute capabilities" table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCHS = (80, 86, 89, 90)
REGISTERS_PER_BLOCK = 64 * 1024  # 32-bit registers per block on every arch above
WARP_SIZE = 32


def op_module_names() -> list[str]:
    """Every module of the ``tore_kernels.ops`` package."""
    from tore_kernels import ops
    return [f"{ops.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(ops.__path__), key=lambda m: m.name)]


def import_modules(names: list[str]) -> dict[str, Any]:
    """name -> imported module, or the exception its import raised (reported, never swallowed silently)."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = importlib.import_module(name)
        except Exception as exc:
            out[name] = exc
    return out


def _tool(name: str) -> str:
    try:
        import triton.backends.nvidia as nvidia
        path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found (expected in triton's backends/nvidia/bin or on PATH)")
    return path


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, local and static shared bytes, and the count of local stores, from a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        cuobjdump = _tool("cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        function = usage.split("Function", 1)[-1]  # the kernel's own line, not the module-wide "Common" one
        fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", function)}
        if "REG" not in fields:
            raise RuntimeError(f"could not read the resource usage from cuobjdump:\n{usage}")
        stores = 0
        if fields.get("STACK", 0) or fields.get("LOCAL", 0):  # local stores need local memory: else skip the SASS
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
            stores = len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))
    return {"registers": fields["REG"], "stack_bytes": fields.get("STACK", 0), "local_bytes": fields.get("LOCAL", 0),
            "static_shared_bytes": fields.get("SHARED", 0), "local_stores": stores}


def compile_config(cfg: KernelConfig, arch: int) -> dict[str, Any]:
    """Compile one configuration for ``sm_<arch>`` in this process; the row of the report."""
    row: dict[str, Any] = {"config": cfg.name, "arch": arch, "num_warps": cfg.num_warps,
                           "num_stages": cfg.num_stages, "flops": cfg.flops, "bytes_fused": cfg.bytes_fused,
                           "bytes_eager": cfg.bytes_eager, "shared_limit": SHARED_LIMIT.get(arch), "problems": []}
    start = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import JITFunction

        if not isinstance(cfg.kernel, JITFunction):
            raise TypeError(f"kernel is a {type(cfg.kernel).__name__}, not a @triton.jit function "
                            "(defined under TRITON_INTERPRET=1?)")
        source = triton.compiler.ASTSource(cfg.kernel, dict(cfg.signature), dict(cfg.constexprs))
        # on a ptxas failure triton prints the whole PTX to stdout: keep it out of the report
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}",
                   compile_s=time.perf_counter() - start)
        row["problems"].append("compile failed")
        return row
    row.update(usage, compile_s=time.perf_counter() - start, error=None)
    row["shared_bytes"] = usage["static_shared_bytes"] + int(compiled.metadata.shared)
    if usage["stack_bytes"] or usage["local_bytes"] or usage["local_stores"]:
        row["problems"].append(f"spills: {usage['stack_bytes']} B stack, {usage['local_stores']} local stores")
    limit = row["shared_limit"]
    if limit is None:
        row["problems"].append(f"no known shared-memory limit for sm_{arch}")
    elif row["shared_bytes"] > limit:
        row["problems"].append(f"shared memory {row['shared_bytes']} B > {limit} B allowed per block on sm_{arch}")
    if usage["registers"] * cfg.num_warps * WARP_SIZE > REGISTERS_PER_BLOCK:
        row["problems"].append(f"{usage['registers']} registers x {cfg.num_warps * WARP_SIZE} threads "
                               f"> {REGISTERS_PER_BLOCK} per block")
    row["status"] = "fail" if row["problems"] else "ok"
    return row


def _check_archs(archs) -> tuple[int, ...]:
    archs = tuple(archs)
    bad = [a for a in archs if a not in SHARED_LIMIT]
    if bad or not archs:
        raise ValueError(f"archs: expected some of {sorted(SHARED_LIMIT)}, got {list(archs)}")
    return archs


@functools.lru_cache(maxsize=None)
def _configs_of(module_name: str) -> tuple[KernelConfig, ...]:
    configs = tuple(importlib.import_module(module_name).gpu_report_configs())
    for cfg in configs:
        if not isinstance(cfg, KernelConfig):
            raise TypeError(f"gpu_report_configs() returned a {type(cfg).__name__}, expected KernelConfig")
    return configs


def _compile_task(task: tuple[str, int, int]) -> dict[str, Any]:
    """(module, configuration index, arch) -> row; runs in a worker process when jobs > 1."""
    module_name, index, arch = task
    return {"module": module_name, **compile_config(_configs_of(module_name)[index], arch)}


def _report_here(modules: list[str], archs: tuple[int, ...], jobs: int = 1) -> list[dict[str, Any]]:
    rows: list[dict[str, Any] | None] = []
    tasks: list[tuple[int, tuple[str, int, int]]] = []  # (row slot, task)
    for name, module in import_modules(modules).items():
        if isinstance(module, Exception):
            rows.append({"module": name, "config": "-", "arch": None, "status": "error", "problems": ["import failed"],
                         "error": f"{type(module).__name__}: {module}"})
            continue
        if not hasattr(module, "gpu_report_configs"):
            continue
        try:
            configs = _configs_of(name)
        except Exception as exc:
            rows.append({"module": name, "config": "-", "arch": None, "status": "error",
                         "problems": ["gpu_report_configs() failed"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        for index in range(len(configs)):
            for arch in archs:
                tasks.append((len(rows), (name, index, arch)))
                rows.append(None)
    with contextlib.ExitStack() as stack:
        mapper = map
        if min(jobs, len(tasks)) > 1:  # ptxas is CPU-bound; spawn: never fork a process holding torch
            mapper = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"))).map
        for (slot, _), row in zip(tasks, mapper(_compile_task, [task for _, task in tasks])):
            rows[slot] = row
    return rows


def report(modules: list[str] | None = None, archs=DEFAULT_ARCHS, isolate: bool | None = None,
           jobs: int | None = None) -> list[dict[str, Any]]:
    """One row per (configuration, arch) of every module in ``modules`` (default: all of tore_kernels.ops).

    A row's ``status`` is ``ok``, ``fail`` (spills, shared memory or registers over the limit: see ``problems``)
    or ``error`` (import, configuration or compilation failed: see ``error``). No rows: no Triton kernels.
    ``isolate`` (default: when TRITON_INTERPRET=1) compiles in a child process without TRITON_INTERPRET;
    ``jobs`` compilations run in parallel (default: one per CPU).
    """
    archs = _check_archs(archs)
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")
    modules = op_module_names() if modules is None else list(modules)
    if isolate is None:
        isolate = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not isolate or not modules:
        return _report_here(modules, archs, jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-c", "import sys; from tore_kernels.gpu_report import _main; sys.exit(_main())",
               "--result-file", result, "--jobs", str(jobs), "--arch", *map(str, archs), "--modules", *modules]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(result):
            raise RuntimeError(f"the gpu-report child process failed (exit {proc.returncode}):\n"
                               f"{(proc.stderr or proc.stdout)[-4000:]}")
        with open(result) as f:
            return json.load(f)


def failed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "ok"]


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def _kib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f}"


def format_report(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no Triton kernels (no module in tore_kernels.ops defines gpu_report_configs())"
    header = ("module", "config", "arch", "warps/stages", "regs", "stack B", "STL", "smem KiB", "limit KiB",
              "flops", "bytes fused/eager", "status")
    body = []
    for r in rows:
        body.append((r["module"].rpartition(".")[2], r["config"], "-" if r["arch"] is None else f"sm_{r['arch']}",
                     f"{r['num_warps']}/{r['num_stages']}" if "num_warps" in r else "-",
                     r.get("registers", "-"), r.get("stack_bytes", "-"), r.get("local_stores", "-"),
                     _kib(r.get("shared_bytes")), _kib(r.get("shared_limit")), _count(r.get("flops")),
                     f"{_count(r.get('bytes_fused'))}/{_count(r.get('bytes_eager'))}",
                     r["status"] if r["status"] == "ok" else f"{r['status'].upper()}: {'; '.join(r['problems'])}"))
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"{r['module']} {r['config']}{'' if r['arch'] is None else ' sm_%d' % r['arch']}: {r['error']}"
              for r in rows if r.get("error")]
    if errors:
        lines += ["", "errors:"] + ["  " + e.replace("\n", "\n    ") for e in errors]
    bad = failed(rows)
    lines += ["", f"{len(rows) - len(bad)} ok, {len(bad)} failing of {len(rows)} (configuration, arch) pairs"]
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    """The child process of ``report(isolate=True)``."""
    import argparse
    parser = argparse.ArgumentParser(prog="tore_kernels.gpu_report")
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--modules", nargs="*", default=[])
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    rows = _report_here(args.modules, _check_archs(args.arch), args.jobs)
    with open(args.result_file, "w") as f:
        json.dump(rows, f)
    return 0

