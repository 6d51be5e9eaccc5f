"""The training memory plan on described nodes: what DeepSpeed 0.19 allocates per GPU under ZeRO-0/1/2/3
(checked against its own estimator functions where both count the same thing), the fit check that
refuses a plan whose model states cannot fit, naming the cheapest layout that does, and zero_stage=auto.
Models are sized on the meta device only; nothing is launched."""
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADUAL_CACHE_DIR", str(REPO / ".cache" / "gradual"))

from toolkit.train.memory import GIB, ModelStates, estimate, fit_refusal, states_for  # noqa: E402

GPU_80 = 80 * GIB
SHAPES = ("llama-3.2-1b", "llama-3-8b", "llama-3-70b")


@pytest.fixture(scope="module")
def sizes():
    from toolkit.train.plan import model_size

    return {name: model_size(f"random:{name}") for name in SHAPES}


LAYOUT_ROWS = ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-2 + optimizer offload", "ZeRO-3 + optimizer offload",
               "ZeRO-3 + optimizer and parameter offload"]


def raw_ds(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def shipped(name: str, world: int, hidden: int = 4096, zero_stage: int | None = None) -> tuple[dict, str]:
    """A shipped ds_config resolved as for GPUs (bf16, fp32 accumulation, overlap_comm), at its own
    stage or `zero_stage`, and the optimizer it runs with."""
    from toolkit.train.config import TrainConfig
    from toolkit.train.dsconfig import resolve

    stage = {} if zero_stage is None else {"zero_stage": zero_stage, "given_keys": frozenset({"zero_stage"})}
    cfg, ds = resolve(TrainConfig(ds_config=name, train_batch_size=8 * world, **stage), raw_ds(name), world,
                      on_gpu=True, deepspeed_checks=False, hidden_size=hidden)
    return ds, cfg.optimizer


def states(sizes, shape: str, ds_config: str, world: int, zero_stage: int | None = None, **changes) -> ModelStates:
    size = sizes[shape]
    ds, optimizer = shipped(ds_config, world, size.hidden, zero_stage)
    s = states_for(size.params, size.largest_param, ds, optimizer, world, size.largest_layer)
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
@pytest.mark.parametrize("world", [8, 16, 32])
@pytest.mark.parametrize("ds_config, offload, offload_params", [
    ("zero3", False, False), ("zero2_offload", True, False), ("zero3_offload", True, True)])
def test_zero3_agrees_with_deepspeeds_estimator(sizes, shape, world, ds_config, offload, offload_params):
    """Nodes of 8 GPUs; bf16 with fp32 accumulation and Adam: weights 2 + gradients 4 + master copy 4 +
    moments 8 = 18 bytes per parameter over the world, DeepSpeed's figure, plus the largest layer
    gathered (4 bytes per parameter); offload moves what it names to host memory, times 1.5."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    size = sizes[shape]
    n = size.params
    s = states(sizes, shape, ds_config, world, zero_stage=3)  # zero2_offload at stage 3: the optimizer offloaded alone
    assert (s.stage, s.offload, s.offload_params, s.bf16, s.grad_accum_fp32) == (3, offload, offload_params, True, True)
    ours = estimate(s)
    their_cpu, their_gpu, their_layer = estimate_zero3_model_states_mem_needs(
        n, size.largest_layer, num_gpus_per_node=8, num_nodes=world // 8, cpu_offload=offload,
        cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.5)
    assert ours["holder"] == "DeepSpeedZeroOptimizer_Stage3" and ours["buffers"] == their_layer == 4 * size.largest_layer
    assert ours["total"] == pytest.approx(their_gpu, abs=1)  # theirs truncated to whole bytes
    on_host = (2 if offload_params else 0) + (16 if offload else 0)
    assert ours["weights"] + ours["gradients"] + ours["optimizer"] == pytest.approx((18 - on_host) * n / world)
    if offload:
        assert 8 * ours["host"] == pytest.approx(their_cpu, abs=8) == on_host * n / (world // 8) * 1.5
    else:  # theirs: zero.Init's host copy of a layer while the model is built, not a model state
        assert ours["host"] == 0 and their_cpu == int(4 * size.largest_layer * 8 * 1.5)


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
    ("llama-3-70b", "zero2", 8, {}, ["the bf16 weights alone (131.4 GiB) sit whole on every GPU under ZeRO-0/1/2",
                                     "use ZeRO-3 + optimizer offload, ds_config=zero2_offload and zero_stage=3 "
                                     "(~20.3 GiB per GPU, ~197.1 GiB of host memory per rank, ~1.5 TiB per node)",
                                     "or at least 18 GPUs with zero_stage=3"]),
    ("llama-3-70b", "zero2", 8, {"stage": 1}, ["ZeRO-1", "zero2_offload and zero_stage=3", "18 GPUs with zero_stage=3"]),
    ("llama-3-70b", "zero2_offload", 8, {}, ["offload (it moves optimizer states only)", "use zero_stage=3 (~20.3 GiB"]),
    ("llama-3-70b", "zero2", 64, {}, ["weights alone", "use zero_stage=3 (~22.4 GiB per GPU)"]),
    ("llama-3-70b", "zero3", 8, {}, ["~151.8 GiB per GPU (70.6B parameters, ZeRO-3,", "use ZeRO-3 + optimizer offload",
                                     "or at least 18 GPUs (num_gpus, or a hostfile's nodes)"]),
    ("llama-3-70b", "zero3", 16, {}, ["~77.8 GiB per GPU", "or at least 18 GPUs (num_gpus"]),
    ("llama-3-70b", "zero3", 18, {}, None),
    ("llama-3-70b", "zero3_offload", 8, {}, None),
    ("llama-3-8b", "zero2", 8, {}, None),
    ("llama-3-8b", "zero1", 8, {}, None),  # 71.0 of 72 GiB: fits, with immediate_grad_update
    ("llama-3-8b", "zero2", 8, {"stage": 1}, ["~86.0 GiB per GPU", "use \"bf16\": {\"immediate_grad_update\": true}",
                                              "(~71.0 GiB)"]),
    ("llama-3-8b", "zero2", 1, {}, ["~135.4 GiB per GPU", "use ZeRO-2 + optimizer offload, ds_config=zero2_offload "
                                    "(~16.7 GiB per GPU", "or at least 3 GPUs (num_gpus",
                                    "or at least 2 GPUs with zero_stage=3"]),  # ZeRO-3 partitions the weights too
    ("llama-3-8b", "zero2_offload", 1, {}, None),
    ("llama-3-8b", "zero2", 8, {"stage": 0}, ["ZeRO-0", "use zero_stage=2 (~30.7 GiB per GPU)"]),
    ("llama-3.2-1b", "zero2", 1, {}, None),
])
def test_fit_check_names_the_cheapest_layout_that_fits(sizes, shape, ds_config, world, changes, expect):
    """The lowest stage first, then offload; more GPUs where only offload fits these; else a smaller model."""
    refusal = fit_refusal(states(sizes, shape, ds_config, world, **changes), GPU_80, min(world, 8))
    if expect is None:
        assert refusal is None
    else:
        assert refusal is not None and "\n" not in refusal, refusal
        assert "more than the 72.0 GiB that 90% of a 80.0 GiB GPU leaves" in refusal
        for part in expect:
            assert part in refusal, (part, refusal)
        assert refusal.count("immediate_grad_update") + refusal.count("zero_stage=2 (") < 2  # one layout named


def test_a_stated_host_memory_rules_out_the_offload_that_exceeds_it(sizes):
    """70B on 8 x 80 GiB: ZeRO-3 with the optimizer offloaded needs ~1.5 TiB of host memory per node,
    with the parameters too ~1.7 TiB."""
    zero2 = states(sizes, "llama-3-70b", "zero2", 8)
    assert "ds_config=zero2_offload and zero_stage=3" in fit_refusal(zero2, GPU_80, 8, host_bytes=1600 * GIB)
    small_host = fit_refusal(zero2, GPU_80, 8, host_bytes=1024 * GIB)
    assert small_host.endswith(": use at least 18 GPUs with zero_stage=3") and "offload," not in small_host
    offloaded = states(sizes, "llama-3-70b", "zero3_offload", 8)
    assert fit_refusal(offloaded, GPU_80, 8, host_bytes=1800 * GIB) is None
    refusal = fit_refusal(offloaded, GPU_80, 8, host_bytes=1024 * GIB)
    assert refusal.startswith("offloaded model states need ~1.7 TiB of host memory per node (70.6B parameters, "
                              "ZeRO-3 + optimizer and parameter offload, bf16, deepspeed_adam, 8 GPU(s)), more than "
                              "host_memory_gib=1024: use ")
    # more nodes share what is offloaded: ZeRO-3 alone on 18 GPUs, or with the optimizer offloaded on 13
    assert refusal.endswith(": use at least 18 GPUs with ZeRO-3, ds_config=zero3 or at least 13 GPUs with ZeRO-3 + "
                            "optimizer offload, ds_config=zero2_offload and zero_stage=3")
    assert fit_refusal(offloaded, GPU_80, 8, host_bytes=GIB).endswith(": use at least 18 GPUs with ZeRO-3, "
                                                                    "ds_config=zero3")  # nothing offloaded
    # the gathered embedding alone (3.9 GiB) outgrows 90% of a 4 GiB GPU, whatever the layout
    assert fit_refusal(offloaded, 4 * GIB, 8).endswith(": use a smaller model")


@pytest.mark.parametrize("shape, ds_config, world, expect", [
    ("llama-3.2-1b", "zero2", 8, 1),
    ("llama-3-8b", "zero2", 8, 2),  # ZeRO-1 keeps the bf16 gradients beside the fp32 buffer: 86 GiB
    ("llama-3-8b", "zero1", 8, 1),  # with immediate_grad_update: 71.0 GiB
    ("llama-3-70b", "zero2", 32, 3),
    ("llama-3-70b", "zero3_offload", 16, 3),  # offload_param runs at stage 3 only
    ("llama-3-70b", "zero2", 16, "zero_stage=auto: no stage fits: model states need ~77.8 GiB per GPU (70.6B "
                                 "parameters, ZeRO-3, bf16, adamw, 16 GPU(s))"),
])
def test_zero_stage_auto_takes_the_lowest_stage_that_fits(shape, ds_config, world, expect):
    from toolkit.train.config import TrainConfig, TrainConfigError
    from toolkit.train.plan import settle_zero_stage

    cfg = TrainConfig(ds_config=ds_config, zero_stage="auto", train_batch_size=8 * world)
    own_stage = raw_ds(ds_config)["zero_optimization"]["stage"]
    settle = (cfg, raw_ds(ds_config), world, True)
    unknown, line = settle_zero_stage(*settle, None, ds_config, f"random:{shape}")
    assert unknown.zero_stage == own_stage and "zero_stage" in unknown.given_keys
    assert line == f"zero_stage auto -> {own_stage} (GPU memory unknown: the ds_config's stage {own_stage})"
    if isinstance(expect, str):
        with pytest.raises(TrainConfigError) as err:
            settle_zero_stage(*settle, GPU_80, ds_config, f"random:{shape}", 8)
        assert str(err.value).startswith(expect) and "or at least 18 GPUs" in str(err.value)
        return
    chosen, line = settle_zero_stage(*settle, GPU_80, ds_config, f"random:{shape}", 8)
    assert chosen.zero_stage == expect
    assert line == f"zero_stage auto -> {expect} (the lowest stage whose model states fit 90% of each 80.0 GiB GPU)"


def test_the_launch_check_decides_zero_stage_auto_and_prints_every_layout(tmp_path):
    """`gradual run`'s training check (check_training) for 70B on four nodes of 8 x 80 GiB."""
    import dataclasses

    from toolkit.train.config import TrainConfig, TrainConfigError
    from toolkit.train.devices import NodeGpus
    from toolkit.train.launch import LaunchConfig, check_training

    (tmp_path / "hosts").write_text("".join(f"node{i} slots=8\n" for i in range(4)))
    launch = LaunchConfig(hostfile=str(tmp_path / "hosts"), gpu_memory_gib=80, num_gpus=8)
    checked = check_training(TrainConfig(zero_stage="auto"), launch, launching=False, model="random:llama-3-70b",
                             node=NodeGpus())
    assert checked["config"].zero_stage == checked["ds_config"]["zero_optimization"]["stage"] == 3
    memory = checked["memory"]
    assert memory[0].endswith("world size 32, 8 per node (activations not included)")
    assert memory[1] == "zero_stage auto -> 3 (the lowest stage whose model states fit 90% of each 80.0 GiB GPU)"
    rows = memory[2:9]
    assert [row.split(": weights")[0] for row in rows] == LAYOUT_ROWS
    assert [row.split(")")[-1].split(":")[-1].strip() for row in rows] == (
        ["does not fit"] * 3 + ["fits  <- chosen"] + ["does not fit", "fits", "fits"])
    assert "host memory 49.3 GiB per rank, 394.2 GiB per node" in rows[5]
    assert memory[9].startswith("fit: 40.9 GiB of the 72.0 GiB") and memory[9].endswith("fits, 39.1 GiB left for activations")
    # a stated host memory refuses the offload that exceeds it (4 nodes share the 70B's 1.7 TiB)
    small_hosts = dataclasses.replace(launch, host_memory_gib=256)
    with pytest.raises(TrainConfigError) as err:
        check_training(TrainConfig(ds_config="zero3_offload"), small_hosts, launching=False, model="random:llama-3-70b",
                       node=NodeGpus())
    assert str(err.value).startswith("offloaded model states need ~443.5 GiB of host memory per node")
    assert str(err.value).endswith("more than host_memory_gib=256: use ZeRO-3, ds_config=zero3 (~40.9 GiB per GPU)")


def test_gradual_run_dry_run_prints_the_plan_and_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    """`gradual run`'s preflight (dry run and real run alike) checks the training fit with the others."""
    from toolkit.cli import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run = ["run", "--preset", "paper", "--dry-run", "--set", "train.num_gpus=8", "--set", "train.gpu_memory_gib=80",
           "--out", str(tmp_path / "run")]
    assert main(run + ["--set", "model=random:llama-3-8b"]) == 0  # the preset's zero_stage: auto
    out = capsys.readouterr().out  # ZeRO-1 keeps every bf16 gradient beside the fp32 buffer (zero2.json): 86 GiB
    assert "== devices per node (GPU indices)\nlocalhost: 0, 1, 2, 3, 4, 5, 6, 7\n" in out
    assert "zero_stage auto -> 2 (the lowest stage whose model states fit 90% of each 80.0 GiB GPU)" in out
    assert "fit: 30.7 GiB of the 72.0 GiB that 90% of a 80.0 GiB GPU (gpu_memory_gib) leaves: fits" in out
    assert [line.split(": weights")[0] for line in out.splitlines() if line.startswith("ZeRO-")] == LAYOUT_ROWS
    assert main(run + ["--set", "model=random:llama-3-70b", "--set", "train.options.zero_stage=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.options: model states need ~263.6 GiB per GPU") and "\n" not in err
    # auto on 8 GPUs: not even ZeRO-3 fits; the refusal names what would
    assert main(run + ["--set", "model=random:llama-3-70b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.options: zero_stage=auto: no stage fits: model states need ~151.8 GiB per "
                          "GPU") and "at least 18 GPUs" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, synthetic_items):
    path = tmp_path_factory.mktemp("train-memory") / "data.jsonl"
    path.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in synthetic_items if it.split in ("train", "dev")))
    return path


def test_gradual_train_dry_run_shows_the_decision_and_the_launch_writes_it_for_the_ranks(data_file, tmp_path, capsys,
                                                                                          monkeypatch):
    """70B on 32 x 80 GiB GPUs (stated, none here): auto -> ZeRO-3 in the dry run and in the config every
    rank loads; the ds_config's own stage where the GPU memory is unknown."""
    import yaml

    from toolkit.cli import main
    from toolkit.train.config import load_config

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "out"
    argv = ["train", "--set", "model=random:llama-3-70b", "--set", f"data={data_file}", "--set", f"output_dir={out}",
            "--set", "zero_stage=auto", "--num-gpus", "32"]
    assert main(argv + ["--dry-run", "--gpu-memory-gib", "80"]) == 0
    text = capsys.readouterr().out
    assert "\nzero_stage auto -> 3 (the lowest stage whose model states fit 90% of each 80.0 GiB GPU)\n" in text
    rows = [line for line in text.splitlines() if line.startswith("ZeRO-")]
    assert [row.split(": weights")[0] for row in rows] == LAYOUT_ROWS
    assert rows[3].endswith(": fits  <- chosen") and rows[2].endswith(": does not fit")
    assert '"stage": 3' in text and '"stage3_prefetch_bucket_size": 60397977' in text  # 0.9 x 8192^2
    assert main(argv + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "\nzero_stage auto -> 2 (GPU memory unknown: the ds_config's stage 2)\n" in text
    assert "ZeRO-2: " in text and "  <- chosen" in text.split("ZeRO-2: ")[1].splitlines()[0]
    assert not out.exists()
    assert main(argv + ["--print-only", "--gpu-memory-gib", "80"]) == 0
    written = out / "train_config.yaml"
    assert yaml.safe_load(written.read_text())["zero_stage"] == 3 and load_config(written).zero_stage == 3


def test_a_cpu_rank_runs_zero_stage_auto_at_the_ds_configs_stage(data_file, tiny_model_dir, capsys):
    from toolkit.train.__main__ import main

    assert main(["--dry-run", "--world-size", "2", "--set", f"model={tiny_model_dir}", "--set", f"data={data_file}",
                 "--set", "output_dir=unused", "--set", "zero_stage=auto", "--set", "ds_config=zero1"]) == 0
    out = capsys.readouterr().out
    assert "\nzero_stage auto -> 1 (CPU ranks: the ds_config's stage 1)\n" in out and "zero_stage: 1\n" in out
