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


# ---------------------------------------------------------------- training precision


def test_bf16_is_native_from_ampere_on():
    from toolkit.models import bf16_native

    # P100 6.0, V100 7.0, T4 7.5 (major 7), A100 8.0, H100 9.0, B200 10.0
    assert [bf16_native(major) for major in (6, 7, 8, 9, 10)] == [False, False, True, True, True]


@pytest.mark.parametrize("requested, on_gpu, gpu_bf16, expected", [
    ("auto", True, True, True),  # Ampere or later
    ("auto", True, False, False),  # a V100 or T4: fp32 rather than fp16 loss scaling
    ("auto", True, None, True),  # GPUs not on the planning machine (a login node): assumed, the ranks decide
    ("auto", False, None, False),  # CPU ranks train in fp32
    (True, True, False, True), (False, True, True, False),  # set: kept
])
def test_training_precision(requested, on_gpu, gpu_bf16, expected):
    from toolkit.train.plan import training_bf16

    assert training_bf16(requested, on_gpu, gpu_bf16) is expected


def test_the_dry_run_plans_the_precision_the_ranks_train_in(tmp_path, tiny_model_dir, synthetic_items):
    """Nodes of two GPUs with and without bf16: `gradual train --dry-run` (plan_launch), `gradual run`'s
    preflight (check_training) and a rank on such a node (prepare) decide alike. The dry run used to
    plan bf16 on any GPU while the ranks of a pre-Ampere node trained in fp32."""
    import json

    from toolkit.train.config import TrainConfig
    from toolkit.train.devices import NodeGpus
    from toolkit.train.launch import LaunchConfig, check_training, plan_launch
    from toolkit.train.plan import prepare

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in synthetic_items if it.split in ("train", "dev")))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "out"), micro_batch_size=2)
    launch = LaunchConfig(num_gpus=2)
    for bf16 in (False, True):
        node = NodeGpus(None, 2, (80 * 2**30,) * 2, None, bf16)
        _, planned = plan_launch(cfg, launch, dry_run=True, node=node)
        checked = check_training(cfg, launch, launching=False, node=node)
        rank = prepare(cfg, 2, on_gpu=True, gpu_bf16=bf16)
        assert planned.ds_config["bf16"]["enabled"] is checked["bf16"] is rank.ds_config["bf16"]["enabled"] is bf16
        assert not any(note.startswith("bf16 assumed") for note in planned.notes)
    _, login = plan_launch(cfg, launch, dry_run=True, node=NodeGpus())  # no GPU where it is planned
    assert login.ds_config["bf16"]["enabled"] is True
    assert "bf16 assumed: the GPUs are not on this machine; ranks on GPUs without bf16 (before Ampere) train in fp32" \
        in login.notes


@pytest.mark.gpu
def test_asking_the_gpus_for_bf16_reserves_no_gpu_memory():
    """The launcher's dry run asks this node's GPUs (this_node) and must leave no allocation behind
    (torch.cuda.is_bf16_supported would allocate a tensor on a pre-Ampere GPU); the answer follows
    each GPU's compute capability."""
    import subprocess
    import sys

    code = ("import torch; from toolkit.train.devices import visible_gpus_have_bf16; bf16 = visible_gpus_have_bf16(); "
            "majors = [torch.cuda.get_device_capability(i)[0] for i in range(torch.cuda.device_count())]; "
            "print(bf16, all(m >= 8 for m in majors), torch.cuda.memory_reserved())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and out[2] == "0", out
