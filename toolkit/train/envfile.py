"""The environment a multi-node launch forwards to the other nodes' ranks.

DeepSpeed's multi-node runners (pdsh, and the MPI / SLURM ones) start the remote ranks in a fresh
login environment: only variables whose names start with PYTHON, MLFLOW, MV2, UCX (and NCCL when the
launching node itself has a GPU, which a login node has not) cross over, plus the KEY=VALUE lines of
a `.deepspeed_env` file. A rank without PATH, CUDA_HOME or LD_LIBRARY_PATH cannot JIT-build a DeepSpeed
op; without the NCCL_* settings it picks another network interface; without HF_HOME it looks for
models elsewhere. This module writes one env file with what the toolkit's ranks need, merged under
the user's own `.deepspeed_env` files (their lines win), and the launch points DS_ENV_FILE at it.

`python -m toolkit.train.envfile OUT [NAME ...]` writes OUT from the current environment (extra
variable names may be given) and prints the forwarded names to stderr (launchers/train_multi_node.sh).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

FORWARDED = ("PATH", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "HF_HOME",
             "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
             "GRADUAL_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "GLOO_SOCKET_IFNAME", "RAY_AUTH_MODE")
PREFIXES = ("NCCL_", "TORCH_NCCL_")
# DeepSpeed writes a value into the remote shell command as `export K=V` (in double quotes when it has
# other characters than these): a value that a shell would expand or that breaks the quoting is left out
_SAFE = re.compile(r'[^"$`\\\n]*')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_NAME = ".deepspeed_env"


def forwarded(env: Mapping[str, str], extra: Iterable[str] = ()) -> tuple[dict[str, str], list[str]]:
    """(variables to forward, names left out because their value is unsafe in a remote shell command)."""
    names = [*FORWARDED, *extra, *sorted(k for k in env if k.startswith(PREFIXES))]
    out, unsafe = {}, []
    for name in dict.fromkeys(names):
        value = env.get(name)
        if value is None or value.strip() == "" or not _NAME.fullmatch(name):
            continue
        if _SAFE.fullmatch(value):
            out[name] = value.strip()
        else:
            unsafe.append(name)
    return out, unsafe


def relevant(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of `env` that this module forwards, whatever their values (a rank's record)."""
    return {k: env[k] for k in (*FORWARDED, *sorted(k for k in env if k.startswith(PREFIXES))) if k in env}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as DeepSpeed reads them (blank lines skipped, which DeepSpeed would choke on)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def user_env_files(env: Mapping[str, str], cwd: Path) -> list[Path]:
    """The files DeepSpeed would read without us: ~/NAME and ./NAME, NAME from $DS_ENV_FILE."""
    name = env.get("DS_ENV_FILE", DEFAULT_NAME)
    home = Path(env.get("HOME", "~")).expanduser()
    paths = [home / name, Path(cwd) / name]
    return [p for p in dict.fromkeys(paths) if p.is_file()]


def write_env_file(out: Path, env: Mapping[str, str] | None = None, extra: Iterable[str] = (),
                   cwd: Path | None = None) -> dict:
    """Write `out` (the user's env files' lines, then ours for the names they do not set); returns what
    was written: {"variables": {...}, "from_user_files": [...], "unsafe": [...]}."""
    from toolkit.io import write_text

    from .ops import with_venv_path

    env = with_venv_path(os.environ) if env is None else env  # the venv's bin/ (ninja): the same path on every node
    out = Path(out).resolve()
    user: dict[str, str] = {}
    files = [p for p in user_env_files(env, Path(cwd or os.getcwd())) if p.resolve() != out]
    for path in files:
        user.update(read_env_file(path))
    ours, unsafe = forwarded(env, extra)
    merged = {**ours, **user}
    write_text(out, "".join(f"{k}={v}\n" for k, v in merged.items()))
    return {"path": str(out), "variables": merged, "from_user_files": [str(p) for p in files], "unsafe": unsafe}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m toolkit.train.envfile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the env file to write (point DS_ENV_FILE at its absolute path)")
    p.add_argument("extra", nargs="*", help="more variable names to forward")
    args = p.parse_args(argv)
    written = write_env_file(args.out, extra=args.extra)
    note = f" (merged from {', '.join(written['from_user_files'])})" if written["from_user_files"] else ""
    print(f"[envfile] {written['path']}: {' '.join(written['variables'])}{note}", file=sys.stderr)
    if written["unsafe"]:
        print(f"[envfile] not forwarded (quotes, $, backslash or backtick in the value): "
              f"{' '.join(written['unsafe'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
