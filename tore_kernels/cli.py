"""The ``tore-kernels`` command: ``info``, ``bench``, ``gpu-report``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import tore_kernels
    from tore_kernels import backend, gpu_report

    print(f"tore-kernels {tore_kernels.__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})")
    print(f"triton       {_version('triton')}")
    if backend.HAS_EXTENSION:
        archs = ", ".join(f"sm_{a.replace('.', '')}" for a in backend.EXTENSION_CUDA_ARCHS)
        print(f"_C           built, CUDA kernels: {archs if backend.HAS_EXTENSION_CUDA else 'no (CPU kernels only)'}")
    else:
        print("_C           not built (ops run as plain torch)")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"GPU          {', '.join(names)}")
    else:
        print("GPU          none")
    print(f"CPU threads  {torch.get_num_threads()} (torch)")
    print(f"CPU ISA      {backend.cpu_summary()}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}  "
          f"{backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, '') or 'auto'}")
    modules = gpu_report.import_modules(gpu_report.op_module_names())  # registers every op with backend
    broken = {name: exc for name, exc in modules.items() if isinstance(exc, Exception)}
    table = backend.describe()
    print("\nbackend per op (CPU tensors / CUDA tensors; what the CPU one runs on this CPU):")
    if not table:
        print("  (no ops registered)")
    width = max((len(op) for op in table), default=0)
    for op, where in sorted(table.items()):
        print(f"  {op.ljust(width)}  {where['cpu']:<9} / {where['cuda']:<9}  [{where['cpu_path']}]")
    for name, exc in broken.items():
        print(f"  {name}: import failed: {type(exc).__name__}: {exc}")
    return EXIT_FAILED if broken else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from tore_benchmarks import harness
    except ImportError as exc:
        print(f"tore-kernels bench: the benchmarks package (tore_benchmarks) is not installed ({exc}); "
              "install tore-kernels from a source checkout: pip install --no-build-isolation -e \".[bench]\"",
              file=sys.stderr)
        return EXIT_FAILED
    if args.list:
        entries = harness.discover()
        print("\n".join(sorted(entries)) if entries else "no benchmark entries")
        return EXIT_OK
    try:  # before anything runs: an unusable --out must not cost a whole benchmark run
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot create the directory {args.out!r} ({exc})") from exc
    result = harness.run(args.entries or None, device=args.device, quick=args.quick, out_dir=args.out,
                         plot=args.plot, progress=not args.no_progress)
    bad = [r for r in result["results"] if r["status"].startswith("error")]  # "skipped: ..." is not a failure
    if bad:
        print(f"\n{len(bad)} benchmark row(s) failed", file=sys.stderr)
    if not result["results"]:
        print("no benchmark cases ran", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if bad else EXIT_OK


def cmd_gpu_report(args: argparse.Namespace) -> int:
    from tore_kernels import gpu_report

    rows = gpu_report.report(archs=args.arch, jobs=args.jobs)
    print(json.dumps(rows, indent=1) if args.json else gpu_report.format_report(rows))
    return EXIT_FAILED if gpu_report.failed(rows) else EXIT_OK


def _arch(text: str) -> int:
    from tore_kernels.gpu_report import SHARED_LIMIT
    value = text.lower().removeprefix("sm_").replace(".", "")
    if not value.isdigit() or int(value) not in SHARED_LIMIT:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r}; expected one of {', '.join(map(str, SHARED_LIMIT))}")
    return int(value)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from tore_kernels.gpu_report import DEFAULT_ARCHS

    parser = argparse.ArgumentParser(prog="tore-kernels", description="Fused kernels for TORE / FastMETRO / METRO.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="versions, extension build, and the backend each op uses")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="time the kernels against the eager reference")
    bench.add_argument("entries", nargs="*", metavar="ENTRY", help="entries to run (default: all; see --list)")
    bench.add_argument("--quick", action="store_true", help="few repetitions (a smoke run, for CI)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--out", default="bench-results", metavar="DIR", help="where CSV/JSON/PNG go (%(default)s)")
    bench.add_argument("--plot", action="store_true", help="also draw a PNG of the ratios (needs matplotlib)")
    bench.add_argument("--list", action="store_true", help="list the entries and exit")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("gpu-report", help="compile every Triton kernel configuration ahead of time and "
                                               "check registers, spills and shared memory (no GPU needed)")
    report.add_argument("--arch", type=_arch, nargs="+", default=list(DEFAULT_ARCHS), metavar="CC",
                        help=f"compute capabilities (default: {' '.join(map(str, DEFAULT_ARCHS))})")
    report.add_argument("--json", action="store_true", help="print the rows as JSON")
    report.add_argument("--jobs", type=_positive, default=None, metavar="N",
                        help="parallel compilations (default: one per CPU)")
    report.set_defaults(func=cmd_gpu_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("bench --device cuda: torch sees no CUDA GPU")
    try:
        return args.func(args)
    except ValueError as exc:  # bad input reaching the library (unknown entry, bad TORE_KERNELS_BACKEND, ...)
        print(f"tore-kernels {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
