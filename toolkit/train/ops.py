"""Can this node build the DeepSpeed op an optimizer needs? Decided before any process group exists.

`optimizer: deepspeed_adam` runs DeepSpeed's FusedAdam (GPU) or DeepSpeedCPUAdam (optimizer offload).
Unless DeepSpeed was installed with the op prebuilt (DS_BUILD_FUSED_ADAM=1 / DS_BUILD_CPU_ADAM=1), the
first step JIT-compiles it on every node: FusedAdam with nvcc (a CUDA toolkit, found the way torch
finds it: $CUDA_HOME, $CUDA_PATH, `nvcc` on PATH, /usr/local/cuda), CPUAdam with a C++ compiler, both
with ninja. A node without them would fail minutes into the launch, after the model is loaded, with a
compiler traceback on one rank and the others hanging; this check says so in one line at the start.
torch's AdamW (`optimizer: adamw`, fused, the default) needs nothing compiled.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


@dataclass(frozen=True)
class BuildTools:
    """What a DeepSpeed JIT build finds on this node."""

    cuda_home: str | None  # the CUDA toolkit torch would use
    nvcc: bool  # <cuda_home>/bin/nvcc exists and is executable (DeepSpeed runs exactly that one)
    ninja: bool
    cxx: bool  # $CXX or c++
    prebuilt: frozenset = frozenset()  # ops compiled into the DeepSpeed install


def find_cuda_home(env: Mapping[str, str], which: Callable[[str], str | None],
                   default: str = "/usr/local/cuda") -> str | None:
    """torch.utils.cpp_extension's rule: $CUDA_HOME, $CUDA_PATH, the parent of `nvcc`'s bin/, /usr/local/cuda."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        return home
    nvcc = which("nvcc")
    if nvcc:
        return str(Path(os.path.realpath(nvcc)).parent.parent)
    return default if Path(default).exists() else None


def with_venv_path(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with this Python's bin/ first on PATH: the venv's ninja (a pip package) and console scripts
    are found by the ranks even when the venv was never activated (`.venv/bin/gradual train ...`)."""
    env = dict(env)
    here = str(Path(sys.executable).parent)
    parts = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
    if here not in parts:
        env["PATH"] = os.pathsep.join([here, *parts])
    return env


def find_build_tools(env: Mapping[str, str] | None = None, prebuilt: frozenset | None = None,
                     default_cuda: str = "/usr/local/cuda") -> BuildTools:
    """The tools this node's ranks will find (or those of `env`, whose PATH is searched)."""
    env = with_venv_path(os.environ) if env is None else env

    def which(cmd: str) -> str | None:
        return shutil.which(cmd, path=env.get("PATH", ""))

    home = find_cuda_home(env, which, default_cuda)
    nvcc = home is not None and os.access(Path(home) / "bin" / "nvcc", os.X_OK)
    if prebuilt is None:
        prebuilt = installed_ops()
    return BuildTools(cuda_home=home, nvcc=nvcc, ninja=which("ninja") is not None,  # torch runs `ninja` from PATH
                      cxx=which(env.get("CXX", "c++")) is not None, prebuilt=frozenset(prebuilt))


def installed_ops() -> frozenset:
    try:
        from deepspeed.git_version_info import installed_ops as ops
    except ImportError:
        return frozenset()
    return frozenset(name for name, built in ops.items() if built)


def deepspeed_adam_problem(offload: bool, tools: BuildTools) -> str | None:
    """Why `optimizer: deepspeed_adam` cannot run on this GPU node, or None when it can."""
    op, name = ("cpu_adam", "DeepSpeedCPUAdam") if offload else ("fused_adam", "FusedAdam")
    if op in tools.prebuilt:
        return None
    fix = ("use optimizer: adamw (torch's fused AdamW, nothing to compile; the default), or install DeepSpeed "
           f"with the op prebuilt (DS_BUILD_{op.upper()}=1 pip install deepspeed)")
    start = f"optimizer=deepspeed_adam: DeepSpeed compiles {name} on every node at its first step"
    if not tools.ninja:
        return f"{start} with ninja, which this node lacks (pip install ninja); or {fix}"
    if offload:
        return None if tools.cxx else f"{start} with a C++ compiler, which this node lacks (c++ / $CXX); or {fix}"
    if tools.cuda_home is None:
        return (f"{start} with nvcc, and this node has no CUDA toolkit (CUDA_HOME and CUDA_PATH unset, no nvcc on "
                f"PATH, no /usr/local/cuda): set CUDA_HOME (multi-node: forwarded by launchers/train_multi_node.sh), "
                f"or {fix}")
    if not tools.nvcc:
        return (f"{start} with nvcc, and CUDA_HOME={tools.cuda_home} has no bin/nvcc (a runtime-only CUDA): point "
                f"CUDA_HOME at a full CUDA toolkit, or {fix}")
    return None


def check_optimizer_build(optimizer: str, offload: bool, gpu_here: bool, tools: BuildTools | None = None) -> None:
    """Raise a one-line TrainConfigError when this GPU node cannot build the optimizer's DeepSpeed op.
    Only a node with a GPU decides (its ranks compile there); a dry run elsewhere plans without it."""
    from .config import TrainConfigError

    if optimizer != "deepspeed_adam" or not gpu_here:
        return
    problem = deepspeed_adam_problem(offload, tools or find_build_tools())
    if problem:
        raise TrainConfigError(problem)
