"""`python -m toolkit.train.prebuild`: JIT-compile DeepSpeed's CPU ops once into TORCH_EXTENSIONS_DIR
(default: <repo>/.cache/torch_extensions), so no training launch or test pays for a compile:
shm_comm (CPU collectives, ~1 min), cpu_adam (optimizer offload, ~2 min), fused_adam (DeepSpeed's
Adam on CPU, a few min). Safe to re-run: a cached op loads in about a second. On a GPU machine the
CPU-only ops are skipped (build CUDA ops with DeepSpeed's installer, DS_BUILD_OPS=1)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder")


def default_extensions_dir() -> Path:
    return Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"


def prebuild(ops=CPU_OPS) -> tuple[dict[str, float], list[str]]:
    """Build (or load from the cache) each op: (seconds per built op, ops that failed to build)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    built, failed = {}, []
    for name in ops:
        start = time.perf_counter()
        try:
            builder = accelerator.create_op_builder(name)
        except (AttributeError, ImportError, ValueError):
            builder = None
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"[prebuild] {name}: not available on {accelerator._name}, skipped", file=sys.stderr)
            continue
        try:
            builder.load(verbose=False)
        except Exception as err:  # a compiler error: report it and build the others
            print(f"[prebuild] {name}: FAILED ({type(err).__name__}: {str(err)[:300]})", file=sys.stderr)
            failed.append(name)
            continue
        built[name] = time.perf_counter() - start
        print(f"[prebuild] {name}: ready in {built[name]:.1f}s ({os.environ['TORCH_EXTENSIONS_DIR']})",
              file=sys.stderr)
    return built, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.train.prebuild", description=__doc__)
    parser.add_argument("--op", action="append", choices=CPU_OPS, help="only this op (repeatable)")
    args = parser.parse_args(argv)
    _, failed = prebuild(tuple(args.op) if args.op else CPU_OPS)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
