"""`gradual bench sampling|train ...`: run the repository's benchmark scripts (benchmarks/*.py).

The benchmarks are not part of the installed package: they live in the checkout beside it (an
editable install), or in the folder named by $GRADUAL_BENCHMARKS_DIR. Every argument after the
benchmark's name goes to the script unchanged (`gradual bench sampling --help` shows its options).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

BENCHMARKS = {"sampling": ("bench_sampling.py", "SliCK sampling hot loop: toolkit engine vs HF generate, "
                                                "roofline, Ray scaling"),
              "train": ("bench_train.py", "DeepSpeed training throughput: ZeRO-0/1/2, checkpointing, optimizers")}


def benchmarks_dir() -> Path:
    return Path(os.environ.get("GRADUAL_BENCHMARKS_DIR") or Path(__file__).resolve().parents[1] / "benchmarks")


def load_benchmark(name: str):
    """The benchmark script as a module (imported from its file: benchmarks/ is not a package)."""
    folder = benchmarks_dir()
    path = folder / BENCHMARKS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"benchmark script not found: {path}. The benchmarks ship with the source "
                                "checkout (an editable install: pip install -e .), not with the package; "
                                "or set GRADUAL_BENCHMARKS_DIR to the checkout's benchmarks/ folder")
    spec = importlib.util.spec_from_file_location(f"gradual_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cmd_bench(args) -> int:
    module = load_benchmark(args.benchmark)
    return module.main(list(args.bench_args), prog=f"gradual bench {args.benchmark}") or 0


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: sampling hot loop, training throughput",
                                  description=__doc__)
    sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        # prefix_chars that no option uses: every argument, --help included, is passed through untouched
        p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\x01")
        p.add_argument("bench_args", nargs="*")
        p.set_defaults(func=cmd_bench)
