"""The training memory plan on described nodes: what DeepSpeed 0.19 allocates per GPU (checked against
its own estimator functions where both count the same thing) and the fit check that refuses a plan
whose model states cannot fit, naming the way out. Models are sized on the meta device only."""
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADUAL_CACHE_DIR", str(REPO / ".cache" / "gradual"))

from toolkit.train.memory import (GIB, ModelStates, estimate, fit_refusal, states_for,  # noqa: E402
                                  zero3_bytes_per_gpu)

GPU_80 = 80 * GIB
SHAPES = ("llama-3.2-1b", "llama-3-8b", "llama-3-70b")


@pytest.fixture(scope="module")
def sizes():
    from toolkit.train.plan import model_size

    return {name: model_size(f"random:{name}") for name in SHAPES}


def shipped(name: str, world: int) -> tuple[dict, str]:
    """A shipped ds_config resolved as for GPUs (bf16, fp32 accumulation, overlap_comm), and the
    optimizer it runs with."""
    from toolkit.train.config import TrainConfig
    from toolkit.train.dsconfig import resolve

    raw = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    cfg, ds = resolve(TrainConfig(ds_config=name, train_batch_size=8 * world), raw, world, on_gpu=True,
                      deepspeed_checks=False)
    return ds, cfg.optimizer


def states(sizes, shape: str, ds_config: str, world: int, **changes) -> ModelStates:
    ds, optimizer = shipped(ds_config, world)
    size = sizes[shape]
    s = states_for(size.params, size.largest_param, ds, optimizer, world)
    return ModelStates(**{**s.__dict__, **changes})


def test_the_8b_shape_is_llama_3_8b_and_the_70b_shape_llama_3_70b(sizes):
    assert sizes["llama-3-8b"].params == 8_030_261_248  # the published Llama-3-8B count
    assert sizes["llama-3-70b"].params == 70_553_706_496  # the published Llama-3-70B count
    assert sizes["llama-3-70b"].largest_param == 128256 * 8192  # an (untied) embedding


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [1, 4, 8, 64])
def test_zero2_agrees_with_deepspeeds_estimator_where_both_count_the_same(sizes, shape, world):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = sizes[shape].params
    ours = estimate(states(sizes, shape, "zero2", world))
    _, theirs = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=world, cpu_offload=False)
    # both: bf16 weights (2 N) + fp32 master copy and Adam's moments (12 N / W). Theirs adds 6 N / W of
    # gradients (a bf16 and an fp32 partition); DeepSpeed 0.19 with fp32 accumulation keeps only the
    # fp32 one (the compact partition buffer), which is all we count, and we add the reduce buckets.
    assert ours["weights"] + ours["optimizer"] == pytest.approx(theirs - 6 * n / world, abs=1)
    assert ours["gradients"] == 4 * n / world
    assert ours["buffers"] == 200_000_000 * 2 * 2  # zero2.json: two bf16 buckets (overlap_comm on GPU)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero2_offload_agrees_with_deepspeeds_estimator_where_both_count_the_same(sizes, shape, world):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    size = sizes[shape]
    n = size.params
    ours = estimate(states(sizes, shape, "zero2_offload", world))
    their_cpu, their_gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=world, cpu_offload=True)
    assert ours["weights"] == their_gpu  # the GPU keeps the bf16 weights; theirs ignores the buckets and
    assert ours["optimizer"] == ours["gradients"] == 0  # the largest-parameter copy buffer we add
    assert ours["buffers"] == 200_000_000 * 2 * 2 + size.largest_param * 2
    # host memory of the node: both count fp32 master + moments + gradients, 16 N (their max(4 W, 16) is
    # 16 up to 4 GPUs per node); theirs then multiplies by additional_buffer_factor=1.5, ours adds the
    # bf16 copy buffer of each partition and the largest parameter's (stage_1_and_2.py, offload)
    own_buffers = world * (2 * n / world + size.largest_param * 2)
    assert world * ours["host"] - own_buffers == pytest.approx(their_cpu / 1.5, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [8, 16, 64])
def test_zero3_hint_is_deepspeeds_own_estimate(sizes, shape, world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    size = sizes[shape]
    _, theirs, _ = estimate_zero3_model_states_mem_needs(size.params, size.largest_layer, num_gpus_per_node=world,
                                                         cpu_offload=False, zero_init=True)
    assert zero3_bytes_per_gpu(size.params, size.largest_layer, world) == theirs


def test_bf16_zero1_counts_the_full_fp32_gradient_buffer(sizes):
    """ZeRO-1 in bf16 runs BF16_Optimizer: a full fp32 gradient buffer on every GPU (not a partition),
    the bf16 gradients beside it unless immediate_grad_update frees them, and a bf16 cast of the whole
    buffer in the all-reduce. The ZeRO paper's accounting (2 + 2 + 12 / W bytes) said 44 GB for 8B."""
    n = sizes["llama-3-8b"].params
    held = estimate(states(sizes, "llama-3-8b", "zero2", 8, stage=1))  # zero2.json with zero_stage=1
    freed = estimate(states(sizes, "llama-3-8b", "zero1", 8))  # zero1.json: immediate_grad_update
    assert held["holder"] == "BF16_Optimizer" and freed["holder"] == "BF16_Optimizer, immediate_grad_update"
    assert held["gradients"] == 6 * n and freed["gradients"] == 4 * n
    assert held["weights"] == freed["weights"] == 2 * n and held["buffers"] == freed["buffers"] == 2 * n
    assert held["optimizer"] == freed["optimizer"] == 12 * n / 8
    assert held["weights"] + held["gradients"] + held["optimizer"] == pytest.approx(76.3e9, rel=1e-3)
    assert (held["total"] / GIB, freed["total"] / GIB) == (pytest.approx(86.0, abs=0.1), pytest.approx(71.0, abs=0.1))


def test_offload_moves_optimizer_states_only(sizes):
    n = sizes["llama-3-8b"].params
    on_gpu = estimate(states(sizes, "llama-3-8b", "zero2", 1))
    off = estimate(states(sizes, "llama-3-8b", "zero2_offload", 1))
    assert off["weights"] == on_gpu["weights"] == 2 * n and off["optimizer"] == 0
    assert off["host"] == (4 + 8 + 4 + 2) * n + sizes["llama-3-8b"].largest_param * 2
    fp32 = estimate(states(sizes, "llama-3-8b", "zero2", 8, bf16=False))
    assert fp32["weights"] == 4 * n and fp32["gradients"] == 4 * n / 8 and fp32["buffers"] == 4 * n / 8  # step copy
    eight_bit = estimate(states(sizes, "llama-3-8b", "zero2", 8, optimizer="adamw_8bit"))
    assert eight_bit["optimizer"] == (4 + 2) * n / 8


@pytest.mark.parametrize("shape, ds_config, world, changes, expect", [
    ("llama-3-70b", "zero2", 8, {}, ["the bf16 weights alone (131.4 GiB) sit whole on every GPU", "ZeRO-3",
                                     "not supported yet", "at least 18 such GPUs", "or a smaller model"]),
    ("llama-3-70b", "zero2_offload", 8, {}, ["offload (it moves optimizer states only)", "ZeRO-3"]),
    ("llama-3-70b", "zero2", 64, {}, ["weights alone"]),
    ("llama-3-8b", "zero2", 8, {}, None),
    ("llama-3-8b", "zero1", 8, {}, None),  # 71.0 of 72 GiB: fits, with immediate_grad_update
    ("llama-3-8b", "zero2", 8, {"stage": 1}, ["~86.0 GiB per GPU", "\"immediate_grad_update\": true", "(~71.0 GiB)",
                                              "zero_stage=2 (~30.7 GiB)"]),
    ("llama-3-8b", "zero2", 1, {}, ["~135.4 GiB per GPU", "ds_config=zero2_offload (~16.7 GiB per GPU",
                                    "at least 3 GPUs"]),
    ("llama-3-8b", "zero2_offload", 1, {}, None),
    ("llama-3-8b", "zero2", 8, {"stage": 0}, ["ZeRO-0", "zero_stage=2 (~30.7 GiB)"]),
    ("llama-3.2-1b", "zero2", 1, {}, None),
])
def test_fit_check_on_described_nodes(sizes, shape, ds_config, world, changes, expect):
    refusal = fit_refusal(states(sizes, shape, ds_config, world, **changes), GPU_80, sizes[shape].largest_layer)
    if expect is None:
        assert refusal is None
    else:
        assert refusal is not None and "\n" not in refusal, refusal
        assert "more than the 72.0 GiB that 90% of a 80.0 GiB GPU leaves" in refusal
        for part in expect:
            assert part in refusal, (part, refusal)


def test_gradual_run_dry_run_prints_the_plan_and_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    """`gradual run`'s preflight (dry run and real run alike) checks the training fit with the others."""
    from toolkit.cli import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run = ["run", "--preset", "paper", "--dry-run", "--set", "train.num_gpus=8", "--set", "train.gpu_memory_gib=80",
           "--out", str(tmp_path / "run")]
    assert main(run + ["--set", "model=random:llama-3-8b"]) == 0
    out = capsys.readouterr().out
    assert "== devices per node (GPU indices)\nlocalhost: 0, 1, 2, 3, 4, 5, 6, 7\n" in out
    assert "fit: 30.7 GiB of the 72.0 GiB that 90% of a 80.0 GiB GPU (gpu_memory_gib) leaves: fits" in out
    assert main(run + ["--set", "model=random:llama-3-70b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.options: model states need ~263.6 GiB per GPU") and "\n" not in err
    assert not (tmp_path / "run").exists()
