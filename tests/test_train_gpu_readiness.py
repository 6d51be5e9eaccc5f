"""What a first GPU run needs, decided by plain functions that run anywhere: can this node build the
DeepSpeed op an optimizer needs. (The GPU itself is exercised by benchmarks/gpu_check.py --train.)"""
import os
import stat
from pathlib import Path

import pytest

from toolkit.train.config import TrainConfigError
from toolkit.train.ops import BuildTools, check_optimizer_build, deepspeed_adam_problem, find_build_tools


def _tool(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FULL = BuildTools(cuda_home="/opt/cuda", nvcc=True, ninja=True, cxx=True)


@pytest.mark.parametrize("offload, tools, expect", [
    (False, FULL, None),
    (False, BuildTools(cuda_home=None, nvcc=False, ninja=True, cxx=True), "this node has no CUDA toolkit"),
    (False, BuildTools(cuda_home="/usr/lib/cuda-rt", nvcc=False, ninja=True, cxx=True),
     "CUDA_HOME=/usr/lib/cuda-rt has no bin/nvcc"),
    (False, BuildTools(cuda_home="/opt/cuda", nvcc=True, ninja=False, cxx=True), "with ninja, which this node lacks"),
    (False, BuildTools(cuda_home=None, nvcc=False, ninja=False, cxx=False, prebuilt=frozenset({"fused_adam"})), None),
    (True, BuildTools(cuda_home=None, nvcc=False, ninja=True, cxx=True), None),  # CPUAdam: no nvcc needed
    (True, BuildTools(cuda_home="/opt/cuda", nvcc=True, ninja=True, cxx=False), "compiles DeepSpeedCPUAdam on every node at its first step with a C++ compiler"),
    (True, BuildTools(cuda_home=None, nvcc=False, ninja=False, cxx=False, prebuilt=frozenset({"cpu_adam"})), None),
])
def test_deepspeed_adam_needs_its_build_tools(offload, tools, expect):
    problem = deepspeed_adam_problem(offload, tools)
    if expect is None:
        assert problem is None
    else:
        assert expect in problem and "use optimizer: adamw" in problem and "\n" not in problem


def test_build_tools_are_found_the_way_torch_finds_them(tmp_path):
    bin_dir = tmp_path / "bin"
    _tool(bin_dir / "ninja"), _tool(bin_dir / "c++")
    path = {"PATH": str(bin_dir)}
    none = find_build_tools(path, prebuilt=frozenset(), default_cuda=str(tmp_path / "no-cuda"))
    assert (none.cuda_home, none.nvcc, none.ninja, none.cxx) == (None, False, True, True)
    # nvcc on PATH: its toolkit is the parent of its bin/ (through a symlink, as /usr/local/bin/nvcc often is)
    _tool(tmp_path / "cuda-13.0" / "bin" / "nvcc")
    (tmp_path / "links").mkdir()
    os.symlink(tmp_path / "cuda-13.0" / "bin" / "nvcc", tmp_path / "links" / "nvcc")
    found = find_build_tools({"PATH": f"{bin_dir}:{tmp_path / 'links'}"}, frozenset(), str(tmp_path / "no-cuda"))
    assert found.cuda_home == str(tmp_path / "cuda-13.0") and found.nvcc
    # CUDA_HOME wins; a runtime-only one (no bin/nvcc) is found but cannot compile
    (tmp_path / "runtime" / "lib64").mkdir(parents=True)
    runtime = find_build_tools({**path, "CUDA_HOME": str(tmp_path / "runtime")}, frozenset(), str(tmp_path / "x"))
    assert runtime.cuda_home == str(tmp_path / "runtime") and not runtime.nvcc
    assert "has no bin/nvcc" in deepspeed_adam_problem(False, runtime)
    assert deepspeed_adam_problem(False, found) is None
    # the fallback location
    _tool(tmp_path / "usr-local-cuda" / "bin" / "nvcc")
    default = find_build_tools(path, frozenset(), default_cuda=str(tmp_path / "usr-local-cuda"))
    assert default.cuda_home == str(tmp_path / "usr-local-cuda") and default.nvcc


def test_only_a_gpu_node_decides_and_only_for_deepspeed_adam():
    bare = BuildTools(cuda_home=None, nvcc=False, ninja=True, cxx=True)
    with pytest.raises(TrainConfigError, match="optimizer=deepspeed_adam: DeepSpeed compiles FusedAdam"):
        check_optimizer_build("deepspeed_adam", False, gpu_here=True, tools=bare)
    check_optimizer_build("deepspeed_adam", False, gpu_here=False, tools=bare)  # a login node plans, not builds
    check_optimizer_build("adamw", False, gpu_here=True, tools=bare)  # torch's fused AdamW: nothing to build
    check_optimizer_build("deepspeed_adam", True, gpu_here=True, tools=bare)  # CPUAdam: a C++ compiler suffices


def test_the_default_optimizer_is_torch_adamw_and_the_presets_use_it():
    from toolkit.gradual.config import load_pipeline_config
    from toolkit.train.config import TrainConfig

    assert TrainConfig().optimizer == "adamw"
    for preset in ("default", "paper"):
        assert load_pipeline_config(preset=preset).train.options.optimizer == "adamw"
