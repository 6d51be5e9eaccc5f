"""Fast checks of the trainer's front end: config + overrides, ds_config resolution, batch arithmetic,
hostfiles, the batch plan, SFT tokenisation, the dry run, `gradual train` and the launcher scripts.
No process group is started here (the real launches are in test_train_deepspeed.py)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("GRADUAL_CACHE_DIR", str(REPO / ".cache" / "gradual"))

from toolkit.data.schema import DataError  # noqa: E402
from toolkit.train.config import TrainConfigError, load_config  # noqa: E402
from toolkit.train.data import IGNORE_INDEX, BatchPlan, encode_sft  # noqa: E402
from toolkit.train.dsconfig import batch_arithmetic, read_hostfile, resolve, world_size_for  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, synthetic_items):
    d = tmp_path_factory.mktemp("train-config")
    rows = [it.to_dict() for it in synthetic_items if it.split in ("train", "dev")][:24]
    for i, row in enumerate(rows):
        row["category"] = ("HighlyKnown", "Unknown")[i % 2]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "cfg.yaml").write_text(f"model: {tiny_model_dir}\ndata: {d / 'data.jsonl'}\noutput_dir: {d / 'out'}\n"
                                "micro_batch_size: 2\nepochs: 1\nlr: 1.0e-3\n")
    return d


def cfg_with(setup, *sets, **extra):
    return load_config(setup / "cfg.yaml", list(sets), extra)


# ---------------------------------------------------------------- config and overrides


def test_yaml_and_overrides_are_typed(setup):
    cfg = cfg_with(setup, "lr=1e-4", "gradient_checkpointing=true", "categories=MaybeKnown,Unknown",
                   "dev_split=null", "zero_stage=1", "betas=0.8,0.95")
    assert cfg.lr == 1e-4 and cfg.gradient_checkpointing is True and cfg.zero_stage == 1
    assert cfg.categories == ["MaybeKnown", "Unknown"] and cfg.dev_split is None and cfg.betas == [0.8, 0.95]
    assert cfg.micro_batch_size == 2 and cfg.grad_clip == 1.0  # YAML value; explicit default clipping
    assert {"lr", "micro_batch_size", "zero_stage"} <= cfg.given_keys and "grad_clip" not in cfg.given_keys
    assert cfg_with(setup, resume=True).resume is True
    assert cfg_with(setup, resume="/x/ckpt").resume_dir == Path("/x/ckpt")


def test_flags_are_generated_from_the_config_and_win_over_yaml_and_set(setup):
    args = _train_args("--config", str(setup / "cfg.yaml"), "--set", "lr=1e-4", "--lr", "2e-4", "--epochs", "4",
                       "--no-eval-train", "--resume", "--categories", "MaybeKnown,Unknown", "--ds_config", "zero1")
    from toolkit.train.__main__ import config_from_args

    cfg = config_from_args(args)
    assert (cfg.lr, cfg.epochs, cfg.eval_train, cfg.resume, cfg.ds_config) == (2e-4, 4, False, True, "zero1")
    assert cfg.categories == ["MaybeKnown", "Unknown"] and cfg.micro_batch_size == 2  # the rest from the YAML
    with pytest.raises(TrainConfigError, match="optimizer='sgd' must be one of"):
        config_from_args(_train_args("--config", str(setup / "cfg.yaml"), "--set", "optimizer=sgd"))
    with pytest.raises(SystemExit):  # argparse knows the choices of a Literal field
        _train_args("--optimizer", "sgd")


@pytest.mark.parametrize("sets, message", [
    (["learning_rate=1"], "unknown key 'learning_rate'"),
    (["lr=fast"], "lr='fast' must be a number"),
    (["epochs=1.5"], "epochs='1.5' must be an integer"),
    (["optimizer=sgd"], "optimizer='sgd' must be one of"),
    (["grad_clip=-1"], "grad_clip=-1.0 must be >= 0"),
    (["zero_stage=4"], "zero_stage=4 must be 0, 1, 2, 3 or auto"),
    (["offload=true"], "needs optimizer: deepspeed_adam"),
    (["nokey"], "--set expects KEY=VALUE"),
])
def test_bad_config_values_name_the_key(setup, sets, message):
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cfg_with(setup, *sets)


def test_unknown_yaml_key_and_missing_required(tmp_path):
    (tmp_path / "a.yaml").write_text("model: m\ndata: d\noutput_dir: o\nbatch: 4\n")
    with pytest.raises(TrainConfigError, match="unknown key 'batch'"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("data: d\noutput_dir: o\n")
    with pytest.raises(TrainConfigError, match="'model' is required"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(TrainConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- ds_config and batch arithmetic


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero2_offload"])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_shipped_ds_configs_resolve(setup, name, on_gpu):
    cfg, ds = resolve(cfg_with(setup, f"ds_config={name}"), json.loads((REPO / "ds_configs" / f"{name}.json")
                      .read_text()), world_size=2, on_gpu=on_gpu)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is on_gpu  # bf16 on GPU, fp32 on CPU
    assert ds["zero_optimization"]["stage"] == (1 if name == "zero1" else 2)
    # GPU: bf16 weights with gradients accumulated in fp32, gradient reduction overlapped with the backward
    assert ds["data_types"] == ({"grad_accum_dtype": "fp32"} if on_gpu else {})
    assert ds["zero_optimization"]["overlap_comm"] is on_gpu
    if name == "zero2_offload":  # its optimizer section picks DeepSpeed's Adam (CPUAdam with offload)
        assert cfg.optimizer == "deepspeed_adam" and cfg.offload
        assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def _resolve(setup, ds: dict, *sets, world=2, on_gpu=False):
    return resolve(cfg_with(setup, *sets), ds, world_size=world, on_gpu=on_gpu)


def test_bf16_gradient_accumulation_dtype_follows_the_zero_stage(setup):
    auto = {"data_types": {"grad_accum_dtype": "auto"}, "zero_optimization": {"stage": 2, "overlap_comm": "auto"}}
    for stage, expect in ((0, {}), (1, {"grad_accum_dtype": "fp32"}), (2, {"grad_accum_dtype": "fp32"})):
        _, ds = _resolve(setup, auto, f"zero_stage={stage}", on_gpu=True)
        assert ds["data_types"] == expect and ds["bf16"]["enabled"]  # ZeRO-0: DeepSpeed accumulates in bf16
    _, ds = _resolve(setup, {**auto, "zero_optimization": {"stage": 2, "overlap_comm": False}}, on_gpu=True)
    assert ds["zero_optimization"]["overlap_comm"] is False  # an explicit value is kept
    _, ds = _resolve(setup, {"data_types": {"grad_accum_dtype": "bf16"}}, "zero_stage=2", on_gpu=True)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"}
    with pytest.raises(TrainConfigError, match="data_types.grad_accum_dtype=fp32 with bf16 needs ZeRO stage 1 or 2"):
        _resolve(setup, {"data_types": {"grad_accum_dtype": "fp32"}}, "zero_stage=0", on_gpu=True)


def test_explicit_ds_values_fill_defaults_and_conflicts_are_named(setup):
    cfg, ds = _resolve(setup, {"gradient_clipping": 0.5, "train_batch_size": 16})
    assert cfg.grad_clip == 0.5 and cfg.gradient_accumulation_steps == 4 and ds["gradient_accumulation_steps"] == 4
    with pytest.raises(TrainConfigError, match=r"gradient_clipping=0\.5 conflicts with the training config's grad_clip=0\.0"):
        _resolve(setup, {"gradient_clipping": 0.5}, "grad_clip=0")
    cfg, ds = _resolve(setup, {"zero_optimization": {"stage": 2}}, "zero_stage=1")  # an override, not a conflict
    assert ds["zero_optimization"]["stage"] == 1
    cfg, ds = _resolve(setup, {}, "grad_clip=0", "optimizer=adamw_8bit")
    assert ds["gradient_clipping"] == 0.0 and ds["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("ds, sets, message", [
    ({"bogus_key": 1}, [], "unknown key 'bogus_key'"),
    ({"zeroOptimization": {}}, [], "unknown key 'zeroOptimization' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stage": 2, "bogus_sub": 1}}, [], "rejected by DeepSpeed: 1 validation error"),
    ({"scheduler": {"type": "WarmupLR"}}, [], "the trainer owns the learning-rate schedule"),
    ({"fp16": {"enabled": True}}, [], "fp16 is not supported"),
    ({"optimizer": {"type": "AdamW"}}, ["optimizer=adamw"], "has an 'optimizer' section"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, [], "'zero_optimization.reduce_bucket_size'"),
    ({"train_batch_size": 6}, [], "train_batch_size=6 is not divisible by micro_batch_size=2 x world size 2"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, ["optimizer=deepspeed_adam"],
     "offload needs ZeRO stage 1, 2 or 3"),
])
def test_bad_ds_configs_fail_with_one_clear_error(setup, ds, sets, message):
    with pytest.raises(TrainConfigError) as err:
        _resolve(setup, ds, *sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batch_arithmetic(setup):
    assert batch_arithmetic(cfg_with(setup, "gradient_accumulation_steps=3"), 4) == (2, 3, 24)
    assert batch_arithmetic(cfg_with(setup, "train_batch_size=16"), 2) == (2, 4, 16)
    with pytest.raises(TrainConfigError, match="not divisible"):
        batch_arithmetic(cfg_with(setup, "train_batch_size=6"), 2)
    with pytest.raises(TrainConfigError, match=r"train_batch_size=8 != micro_batch_size=2 x gradient_accumulation_steps=1"):
        batch_arithmetic(cfg_with(setup, "train_batch_size=8", "gradient_accumulation_steps=1"), 2)


@pytest.mark.parametrize("world, micro, accum", [(1, 16, 4), (2, 16, 2), (4, 16, 1), (8, 8, 1), (16, 4, 1), (64, 1, 1)])
def test_stated_global_batch_adapts_to_the_world_size(setup, world, micro, accum):
    """The paper preset's shape: a global batch of 64 and a micro batch of at most 16 per rank."""
    cfg = cfg_with(setup, "train_batch_size=64", "max_micro_batch_size=16", micro_batch_size=None)
    assert "micro_batch_size" not in cfg.given_keys or cfg.micro_batch_size is None
    assert batch_arithmetic(cfg, world) == (micro, accum, 64)


def test_no_valid_micro_batch_is_one_clear_error(setup):
    cfg = cfg_with(setup, "train_batch_size=64", micro_batch_size=None)
    for world in (3, 128):  # 64 sequences cannot be split evenly over 3 ranks, nor over 128
        with pytest.raises(TrainConfigError) as err:
            batch_arithmetic(cfg, world)
        assert f"train_batch_size=64 cannot be split over world size {world}: no micro batch fits" in str(err.value)
    # a stated micro batch that no longer fits names the ones that do
    with pytest.raises(TrainConfigError, match=r"micro_batch_size=16 x world size 8 \(= 128\); micro batches that "
                                               r"fit: 1, 2, 4, 8 \(or leave micro_batch_size out"):
        batch_arithmetic(cfg_with(setup, "train_batch_size=64", "micro_batch_size=16"), 8)
    # stated accumulation: the micro batch is what is left
    assert batch_arithmetic(cfg_with(setup, "train_batch_size=64", "gradient_accumulation_steps=2",
                                     micro_batch_size=None), 8) == (4, 2, 64)
    with pytest.raises(TrainConfigError, match="not divisible by gradient_accumulation_steps=3 x world size 8"):
        batch_arithmetic(cfg_with(setup, "train_batch_size=64", "gradient_accumulation_steps=3",
                                  micro_batch_size=None), 8)
    # the largest micro batch that divides a rank's share (20), not merely the largest allowed (16)
    assert batch_arithmetic(cfg_with(setup, "train_batch_size=40", "max_micro_batch_size=16",
                                     micro_batch_size=None), 2) == (10, 2, 40)
    # nothing stated: micro = max_micro_batch_size, no accumulation, the global batch grows with the world
    assert batch_arithmetic(cfg_with(setup, micro_batch_size=None), 4) == (8, 1, 32)


def test_dry_run_plans_stated_gpus_on_a_machine_without_them(setup, capsys, monkeypatch):
    """`gradual train --num-gpus 8 --dry-run` on a login node: the 8-GPU plan (bf16, the arithmetic for
    8 ranks, the launcher's --num_gpus 8); the launch itself needs the GPUs."""
    from toolkit.cli import main
    from toolkit.train.launch import LaunchConfig, check_launchable

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["train", "--config", str(setup / "cfg.yaml"), "--num-gpus", "8", "--dry-run",
                 "--set", "train_batch_size=64", "--set", "micro_batch_size=null"]) == 0
    out = capsys.readouterr().out
    assert "== batch arithmetic (8 GPU rank(s))" in out
    assert "train_batch_size 64 = micro_batch_size 8 x gradient_accumulation_steps 1 x world size 8" in out
    assert "micro_batch_size derived" in out and "bf16: true" in out and "--num_gpus 8" in out
    with pytest.raises(TrainConfigError, match="num_gpus=8: this machine has no GPU; a dry run plans it"):
        check_launchable(LaunchConfig(num_gpus=8), gpus_here=0)
    with pytest.raises(TrainConfigError, match="num_gpus=8: this machine has 4 GPU"):
        check_launchable(LaunchConfig(num_gpus=8), gpus_here=4)
    check_launchable(LaunchConfig(num_gpus=8, hostfile="h"), gpus_here=0)  # the nodes check their own GPUs
    check_launchable(LaunchConfig(num_gpus=4), gpus_here=4)


def test_hostfile_and_world_size(tmp_path):
    (tmp_path / "h").write_text("# two nodes\nworker-0 slots=8\nworker-1 slots=8  # comment\n")
    hosts = read_hostfile(tmp_path / "h")
    assert dict(hosts) == {"worker-0": 8, "worker-1": 8}
    assert world_size_for(hosts, None, None) == 16 and world_size_for(hosts, 4, 1) == 4
    (tmp_path / "bad").write_text("worker-0 slots=8\nworker-1 gpus=8\n")
    with pytest.raises(TrainConfigError, match=r"bad:2: expected '<host> slots=<n>'"):
        read_hostfile(tmp_path / "bad")


def test_disk_estimate_of_a_run_and_of_a_pipeline():
    from toolkit.train.dsconfig import checkpoint_bytes, disk_estimate

    n = 8_000_000_000  # an 8B model, bf16, Adam: 2 + 12 bytes per parameter per checkpoint
    assert checkpoint_bytes(n, True, "adamw") == {"weights": 2 * n, "optimizer": 12 * n, "full": 14 * n,
                                                  "best": 2 * n}
    assert checkpoint_bytes(n, False, "adamw_8bit")["full"] == (4 + 6) * n
    one = disk_estimate(n, True, "adamw", keep_last_n=1)
    # while training: the kept checkpoint + a new one being written + the best one's weights
    assert one["stage_peak"] == 2 * 14 * n + 2 * n and one["finished_stage"] == 14 * n + 2 * n + 2 * n
    # 7 stages one after another, each leaving only its export behind (the pipeline's default) ...
    seven = disk_estimate(n, True, "adamw", keep_last_n=1, stages=7, keep_checkpoints=False)
    assert seven["total_peak"] == 6 * 2 * n + one["stage_peak"]
    # ... or everything (train.keep_checkpoints): 16 bytes per parameter more per finished stage (770 GB)
    kept = disk_estimate(n, True, "adamw", keep_last_n=1, stages=7, keep_checkpoints=True)
    assert kept["total_peak"] - seven["total_peak"] == 6 * 16 * n
    # ZeRO-3: no 16-bit weights in a checkpoint, but the best one is kept whole (its weights are the
    # optimizer's fp32 partitions): 12 bytes per parameter each
    zero3 = disk_estimate(n, True, "adamw", keep_last_n=1, stage=3)
    assert zero3["checkpoint_full"] == 12 * n and zero3["stage_peak"] == 3 * 12 * n


# ---------------------------------------------------------------- data


def test_batch_plan_gives_every_rank_the_same_batches():
    two_ranks, one_rank = BatchPlan(18, 2, 1, 2, seed=0), BatchPlan(18, 2, 2, 1, seed=0)
    assert two_ranks.steps_per_epoch == 5  # 18 items, global batch 4: the last batch wraps around
    order = two_ranks.epoch_order(0)
    assert len(order) == 20 and sorted(set(order)) == list(range(18))
    assert order == one_rank.epoch_order(0) and order != two_ranks.epoch_order(1)
    for step in range(5):
        g = two_ranks.global_indices(0, step)
        for j in range(2):  # rank j of a 2-rank world == accumulation step j of a single process
            assert two_ranks.micro_indices(g, 0, j) == one_rank.micro_indices(g, j, 0)
            assert len(two_ranks.micro_indices(g, 0, j)) == 2


def test_sft_tokenisation_masks_the_prompt(tiny_model_dir, synthetic_items):
    from toolkit.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    item = synthetic_items[0]
    ex = encode_sft(tok, item, max_len=256)
    n_prompt = ex.labels.count(IGNORE_INDEX)
    assert tok.decode(ex.input_ids[:n_prompt]) == f"Answer the following question. {item.question}\n"
    assert tok.decode(ex.input_ids[n_prompt:]) == f" {item.answer}{tok.eos_token}"
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:]) and ex.labels[-1] == tok.eos_token_id
    short = encode_sft(tok, item, max_len=n_prompt)  # the prompt loses its start, the answer stays
    assert short.truncated and len(short.input_ids) == n_prompt and short.labels[-ex.target_tokens:] == ex.labels[-ex.target_tokens:]


def test_lr_schedule_warms_up_then_decays():
    from toolkit.train.strategy import lr_lambda

    f = lr_lambda(10, 2, "linear")
    assert [round(f(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lr_lambda(10, 0, "constant")(9) == 1.0 and lr_lambda(10, 0, "cosine")(5) == pytest.approx(0.5)


# ---------------------------------------------------------------- prepare (all checks before init) and dry run


def test_prepare_errors_before_any_process_group(setup, tmp_path):
    from toolkit.train.plan import prepare

    with pytest.raises(DataError, match="no such file"):
        prepare(cfg_with(setup, f"data={tmp_path / 'nope.jsonl'}"), 2, on_gpu=False)
    with pytest.raises(TrainConfigError, match="no DeepSpeed checkpoint"):
        prepare(cfg_with(setup, resume=str(tmp_path)), 2, on_gpu=False)
    with pytest.raises(DataError, match="no training items in categories"):
        prepare(cfg_with(setup, "categories=MaybeKnown"), 2, on_gpu=False)
    ckpt = tmp_path / "out" / "checkpoints"
    (ckpt / "step000005").mkdir(parents=True)
    (ckpt / "latest").write_text("step000005")
    with pytest.raises(TrainConfigError, match="already holds checkpoints"):
        prepare(cfg_with(setup, f"output_dir={tmp_path / 'out'}"), 2, on_gpu=False)
    from toolkit.config import to_dict

    saved = to_dict(cfg_with(setup)) | {"lr": 0.5, "zero_stage": 2, "train_batch_size": 4,
                                         "gradient_accumulation_steps": 1}
    (ckpt / "step000005" / "trainer_state.json").write_text(json.dumps({"config": saved, "world_size": 2}))
    with pytest.raises(TrainConfigError, match="resume: lr was 0.5"):
        prepare(cfg_with(setup, f"output_dir={tmp_path / 'out'}", resume=True), 2, on_gpu=False)


def test_dry_run_prints_the_setup(setup, capsys):
    from toolkit.train.__main__ import main

    assert main(["--config", str(setup / "cfg.yaml"), "--dry-run", "--world-size", "2",
                 "--set", "gradient_accumulation_steps=2", "--set", "categories=HighlyKnown"]) == 0
    out = capsys.readouterr().out
    assert "train_batch_size 8 = micro_batch_size 2 x gradient_accumulation_steps 2 x world size 2" in out
    assert "labels:    [-100" in out and "prompt (" in out and "ZeRO-2:" in out and "<- chosen" in out
    assert "training items per category: HighlyKnown=" in out and '"gradient_clipping": 1.0' in out
    assert main(["--config", str(setup / "cfg.yaml"), "--dry-run", "--set", "micro_batch_size=0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {setup / 'cfg.yaml'}: micro_batch_size=0 must be >= 1"


# ---------------------------------------------------------------- gradual train and the launcher scripts


def _train_args(*argv):
    import argparse

    from toolkit.train.launch import add_train_parser

    parser = argparse.ArgumentParser(prog="gradual")
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_gradual_train_builds_the_launcher_command(setup, tmp_path):
    from toolkit.train.launch import LaunchConfig, build_command

    cmd, world, _, _ = build_command(LaunchConfig(num_accelerators=2), Path("o/train_config.yaml"), False)
    assert cmd[1:4] == ["--num_accelerators", "2", "--master_port"] and world == 2
    assert cmd[4] != "29500"  # one node: a free port, so two runs on a machine do not collide
    assert cmd[-4:] == ["--module", "toolkit.train", "--config", str(Path("o/train_config.yaml").resolve())]
    (tmp_path / "hosts").write_text("a slots=8\nb slots=8\n")
    cmd, world, _, _ = build_command(LaunchConfig(hostfile=str(tmp_path / "hosts"), node_rank=1, master_addr="10.0.0.1"),
                                  Path("c.yaml"), True)
    assert world == 16 and "--no_ssh" in cmd and cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--master_port") + 1] == "29500"  # every node must name the same port
    cmd, world, _, _ = build_command(LaunchConfig(num_gpus=4), Path("c.yaml"), True)
    assert cmd[1:3] == ["--num_gpus", "4"] and world == 4
    with pytest.raises(TrainConfigError, match="--node-rank needs --hostfile"):
        build_command(LaunchConfig(node_rank=0), Path("c.yaml"), False)


# nvidia-smi's answer on an 8-GPU node (GPU_QUERY): index, uuid, MiB used, MiB total
SMI_8 = "".join(f"{i}, GPU-{i:08x}-1111-2222-3333-444444444444, 0, 81559\n" for i in range(8))


def deepspeed_assignment(cmd: list[str], gpus_on_node: int) -> dict:
    """The GPUs DeepSpeed 0.19's own runner gives the ranks of `cmd` on one node with `gpus_on_node`
    GPUs: its argument parser and resource filters, applied as runner.main applies them (after it has
    deleted CUDA_VISIBLE_DEVICES); launch.py then sets each rank's CUDA_VISIBLE_DEVICES to them."""
    from deepspeed.launcher import runner

    args = runner.parse_args(cmd[1:])
    assert not ((args.include or args.exclude) and (args.num_gpus >= 0 or args.num_nodes >= 0))  # runner: ValueError
    active = runner.parse_inclusion_exclusion({"localhost": gpus_on_node}, args.include, args.exclude)
    return dict(runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus))


@pytest.mark.parametrize("visible, gpus_seen, num_gpus, include, ranks_get", [
    ("4,5,6,7", 4, None, "localhost:4,5,6,7", [4, 5, 6, 7]),
    ("4,5,6,7", 4, 2, "localhost:4,5", [4, 5]),
    ("6,4", 2, None, "localhost:4,6", [4, 6]),  # DeepSpeed sorts the indices
    (None, 8, None, None, list(range(8))),
    ("", 8, 2, None, [0, 1]),  # an empty mask is no mask (DeepSpeed's runner agrees)
    ("GPU-00000005-1111-2222-3333-444444444444,GPU-00000002", 2, None, "localhost:2,5", [2, 5]),  # a prefix too
])
def test_a_single_node_launch_trains_on_the_gpus_the_user_gave(visible, gpus_seen, num_gpus, include, ranks_get):
    """CUDA_VISIBLE_DEVICES=4,5,6,7 used to become `--num_gpus 4`, which DeepSpeed's runner answers with
    GPUs 0-3 (it drops the mask whenever --num_gpus is given); the probe's Ray actors honour the mask."""
    from toolkit.train.devices import NodeGpus, parse_nvidia_smi
    from toolkit.train.launch import LaunchConfig, build_command

    node = NodeGpus(visible, gpus_seen, (), tuple(parse_nvidia_smi(SMI_8, "")))
    cmd, world, hosts, devices = build_command(LaunchConfig(num_gpus=num_gpus), Path("c.yaml"), True, node)
    assert world == len(ranks_get) and hosts is None and devices == {"localhost": ranks_get}
    if include:
        assert cmd[1:3] == ["--include", include] and "--num_gpus" not in cmd
    else:
        assert cmd[1:3] == ["--num_gpus", str(len(ranks_get))]
    assert deepspeed_assignment(cmd, gpus_on_node=8) == {"localhost": ranks_get}


@pytest.mark.parametrize("visible, num_gpus, smi, message", [
    ("4,5,6,7", 8, True, "num_gpus=8: CUDA_VISIBLE_DEVICES=4,5,6,7 makes 4 GPU(s) visible"),
    ("MIG-7a1b2c3d-0000-1111-2222-333333333333", None, True, "names MIG instances: the deepspeed launcher hands "
                                                             "each rank whole GPUs by index"),
    ("GPU-00000005-1111-2222-3333-444444444444", None, False, "nvidia-smi (needed to map the UUID"),
    ("GPU-0000000f", None, True, "nvidia-smi lists no GPU(s) GPU-0000000f on this node"),
    ("3,GPU-00000005", None, True, "mixes indices and UUIDs"),
    ("4,4", None, True, "names a GPU twice"),
])
def test_gpus_the_launcher_cannot_take_are_refused_in_one_line(visible, num_gpus, smi, message):
    from toolkit.train.devices import NodeGpus, parse_nvidia_smi
    from toolkit.train.launch import LaunchConfig, build_command

    node = NodeGpus(visible, 4, (), tuple(parse_nvidia_smi(SMI_8, "")) if smi else None)
    with pytest.raises(TrainConfigError) as err:
        build_command(LaunchConfig(num_gpus=num_gpus), Path("c.yaml"), True, node)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("hostfile, launch, node, expected_world, expected_per_node", [
    ("a slots=8\nb slots=4\n", dict(num_gpus=6), ("4,5,6,7", 4), 10, 6),  # a: 6 of its 8, b: its 4
    ("a slots=2\nb slots=4\nc slots=8\n", dict(num_nodes=2), (None, 8), 6, 4),  # c is not used
    (None, dict(num_gpus=2), ("4,5,6,7", 4), 2, 2),
    (None, dict(), (None, 8), 8, 8),
])
def test_ranks_per_node_is_the_busiest_nodes_count(tmp_path, hostfile, launch, node, expected_world,
                                                   expected_per_node):
    """The memory plan holds one node's ranks: the busiest node's, whatever node 0 has."""
    from toolkit.train.devices import NodeGpus
    from toolkit.train.launch import LaunchConfig, build_command
    from toolkit.train.plan import ranks_per_node

    if hostfile:
        (tmp_path / "hosts").write_text(hostfile)
        launch["hostfile"] = str(tmp_path / "hosts")
    target = build_command(LaunchConfig(**launch), Path("c.yaml"), True, NodeGpus(*node))
    assert target.world == expected_world
    assert ranks_per_node(target.devices, target.world) == expected_per_node
    assert ranks_per_node(None, 3) == 3  # no device map: every rank on one node


def test_with_a_hostfile_the_hostfile_decides_the_gpus(tmp_path, monkeypatch):
    """DeepSpeed reads no mask with a hostfile: each node's ranks get its first slots (or num_gpus)."""
    from toolkit.train.devices import NodeGpus
    from toolkit.train.launch import LaunchConfig, build_command, launch_env

    (tmp_path / "hosts").write_text("a slots=8\nb slots=4\n")
    launch = LaunchConfig(hostfile=str(tmp_path / "hosts"), num_gpus=6)
    cmd, world, _, devices = build_command(launch, Path("c.yaml"), True, NodeGpus("4,5,6,7", 4))
    assert "--include" not in cmd and cmd[1:3] == ["--num_gpus", "6"] and world == 10
    assert devices == {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2, 3]}
    # nvidia-smi numbers GPUs in PCI bus order: a launch whose indices came from UUIDs says so to CUDA
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000005")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert launch_env(LaunchConfig())["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "CUDA_DEVICE_ORDER" not in launch_env(launch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert "CUDA_DEVICE_ORDER" not in launch_env(LaunchConfig())


def test_dry_run_prints_the_devices_and_the_memory_plan(setup, tmp_path, capsys, monkeypatch):
    """On a login node: the mask this shell has, the GPU memory stated, the 8B shape sized on the meta device."""
    from toolkit.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert main(["train", "--config", str(setup / "cfg.yaml"), "--dry-run", "--num-gpus", "3", "--gpu-memory-gib",
                 "80", "--set", "model=random:llama-3-8b", "--set", f"output_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "== devices per node (GPU indices)\nlocalhost: 4, 5, 6\n" in out and "--include localhost:4,5,6 " in out
    assert "== model-state memory per GPU: 8030.3M parameters, bf16, adamw, world size 3" in out
    assert "fit: 55.6 GiB of the 72.0 GiB that 90% of a 80.0 GiB GPU (gpu_memory_gib) leaves: fits" in out
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert main(["train", "--config", str(setup / "cfg.yaml"), "--dry-run", "--num-gpus", "8",
                 "--set", f"output_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "localhost: 0, 1, 2, 3, 4, 5, 6, 7\n" in out and "--num_gpus 8 " in out
    assert "fit: not checked, the GPU memory is unknown here" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expect", [
    (["--num-gpus", "8", "--set", "model=random:llama-3-70b"],
     "the bf16 weights alone (131.4 GiB) sit whole on every GPU under ZeRO-0/1/2"),
    (["--num-gpus", "1", "--set", "model=random:llama-3-8b"],
     "use ZeRO-2 + optimizer offload, ds_config=zero2_offload (~16.7 GiB per GPU"),
])
def test_a_plan_that_cannot_fit_is_refused_before_anything_is_written(setup, tmp_path, capsys, monkeypatch, argv,
                                                                      expect):
    from toolkit.cli import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "out"
    for extra in (["--dry-run"], ["--print-only"]):  # the dry run, and what a launch checks first
        assert main(["train", "--config", str(setup / "cfg.yaml"), *argv, "--gpu-memory-gib", "80",
                     "--set", f"output_dir={out}", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: model states need ~") and expect in err and "\n" not in err
        assert not out.exists()


def test_print_only_writes_the_config_the_ranks_read(setup, tmp_path, capsys):
    """What `gradual train` resolves (YAML + --set + flags) is what every rank loads: the keys given,
    the rest left at their defaults so explicit ds_config values can still fill them."""
    import yaml

    from toolkit.train.__main__ import config_from_args
    from toolkit.train.config import load_config

    out = tmp_path / "run"
    args = _train_args("--config", str(setup / "cfg.yaml"), "--set", "lr=1e-4", "--epochs", "2",
                       "--output-dir", str(out), "--num-accelerators", "2", "--print-only")
    assert args.func(args) == 0
    command = capsys.readouterr().err
    written = out / "train_config.yaml"
    assert f"--config {written}" in command and "--module toolkit.train" in command
    data = yaml.safe_load(written.read_text())
    assert data["lr"] == 1e-4 and data["epochs"] == 2 and data["output_dir"] == str(out)
    assert "grad_clip" not in data and "eval_batch_size" not in data  # defaults are not pinned
    assert load_config(written) == config_from_args(args)


def test_gradual_train_validates_before_launching(setup, monkeypatch, capsys):
    import toolkit.train.launch as launch

    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("launched despite bad input"))
    args = _train_args("--config", str(setup / "cfg.yaml"), "--num-accelerators", "2", "--set", "train_batch_size=6")
    with pytest.raises(TrainConfigError, match="not divisible"):
        args.func(args)
    args = _train_args("--config", str(setup / "cfg.yaml"), "--num-accelerators", "2", "--dry-run")
    assert args.func(args) == 0
    assert "--num_accelerators 2" in capsys.readouterr().out
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: 7)
    args = _train_args("--config", str(setup / "cfg.yaml"), "--num-accelerators", "2")
    assert args.func(args) == 7
    assert "[gradual train] " in capsys.readouterr().err


def test_gradual_train_bad_input_is_one_line_and_exit_2(setup, capsys):
    from toolkit.cli import main

    assert main(["train", "--config", str(setup / "cfg.yaml"), "--num-accelerators", "2",
                 "--set", "train_batch_size=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: batch arithmetic: train_batch_size=6") and "\n" not in err


@pytest.mark.parametrize("script, env, expect", [
    ("train_single_node.sh", {"NUM_GPUS": "8"}, "--num_gpus 8 --master_port 29500 --module toolkit.train"),
    ("train_cpu.sh", {}, "--num_accelerators 2 --master_port 29500 --module toolkit.train"),
    ("train_node.sh", {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "HOSTFILE": "hosts"},
     "--hostfile hosts --no_ssh --node_rank 1 --master_addr 10.0.0.1 --master_port 29500"),
    ("train_multi_node.sh", {"HOSTFILE": "hosts", "MASTER_ADDR": "10.0.0.1"},
     "--hostfile hosts --master_port 29500 --launcher pdsh --master_addr 10.0.0.1"),
])
def test_launcher_scripts_print_the_resolved_command(setup, tmp_path, script, env, expect):
    (tmp_path / "hosts").write_text("a slots=1\nb slots=1\n")
    unmasked = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    run = subprocess.run(["bash", str(REPO / "launchers" / script), str(setup / "cfg.yaml"), "--set", "lr=1e-4"],
                         cwd=tmp_path, env={**unmasked, "PRINT_ONLY": "1", **env}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert expect in run.stderr and f"--config {setup / 'cfg.yaml'} --set lr=1e-4" in run.stderr
    if script == "train_multi_node.sh":  # environment propagation to the other nodes
        assert "TORCH_EXTENSIONS_DIR=" in (tmp_path / ".deepspeed_env.gradual").read_text()


def test_multi_node_launcher_writes_the_variables_remote_ranks_need(setup, tmp_path):
    """PATH, CUDA_HOME, LD_LIBRARY_PATH, HF_HOME, NCCL_* (and the toolkit's) into the env file DeepSpeed's
    runner exports on every node; the user's own .deepspeed_env lines kept (and winning), their file
    untouched; a value a remote shell would expand left out, and said so."""
    (tmp_path / "hosts").write_text("a slots=8\nb slots=8\n")
    user_file = "HF_HOME=/shared/hf\nUSER_ONLY=yes\n\n"
    (tmp_path / ".deepspeed_env").write_text(user_file)
    env = {**os.environ, "PRINT_ONLY": "1", "HOSTFILE": "hosts", "MASTER_ADDR": "10.0.0.1", "CUDA_HOME": "/opt/cuda-12",
           "LD_LIBRARY_PATH": "/opt/cuda-12/lib64:/opt/nccl/lib", "HF_HOME": "/home/me/hf", "NCCL_DEBUG": "INFO",
           "NCCL_SOCKET_IFNAME": "ib0", "TORCH_NCCL_BLOCKING_WAIT": "1", "MY_EXTRA": "x y", "BAD_VAR": "$(id)",
           "DS_ENV_VARS": "MY_EXTRA BAD_VAR"}
    run = subprocess.run(["bash", str(REPO / "launchers" / "train_multi_node.sh"), str(setup / "cfg.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    written = tmp_path / ".deepspeed_env.gradual"
    assert f"DS_ENV_FILE={written}" in run.stderr and "not forwarded" in run.stderr and "BAD_VAR" in run.stderr
    lines = written.read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines)
    assert all(line and "=" in line for line in lines)  # DeepSpeed's reader fails on a blank line
    assert values["PATH"] == env["PATH"] or values["PATH"].endswith(env["PATH"])  # the venv's bin/ may lead
    assert values["CUDA_HOME"] == "/opt/cuda-12" and values["LD_LIBRARY_PATH"] == "/opt/cuda-12/lib64:/opt/nccl/lib"
    assert values["NCCL_DEBUG"] == "INFO" and values["NCCL_SOCKET_IFNAME"] == "ib0"
    assert values["TORCH_NCCL_BLOCKING_WAIT"] == "1" and values["MY_EXTRA"] == "x y"
    assert values["HF_HOME"] == "/shared/hf" and values["USER_ONLY"] == "yes"  # the user's file wins
    assert "TORCH_EXTENSIONS_DIR" in values and "BAD_VAR" not in values
    assert (tmp_path / ".deepspeed_env").read_text() == user_file


def test_gradual_train_with_a_hostfile_writes_the_env_file(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    (tmp_path / "hosts").write_text("a slots=2\nb slots=2\n")
    out = tmp_path / "run"
    args = _train_args("--config", str(setup / "cfg.yaml"), "--hostfile", str(tmp_path / "hosts"), "--num-gpus", "2",
                       "--output-dir", str(out), "--print-only")
    assert args.func(args) == 0
    assert f"DS_ENV_FILE={out / 'deepspeed_env'} " in capsys.readouterr().err
    assert "NCCL_IB_DISABLE=1\n" in (out / "deepspeed_env").read_text()


def test_single_node_script_refuses_num_gpus_beside_a_mask(setup, tmp_path):
    """deepspeed --num_gpus N drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1; without NUM_GPUS the mask decides."""
    script = str(REPO / "launchers" / "train_single_node.sh")
    env = {**os.environ, "PRINT_ONLY": "1", "CUDA_VISIBLE_DEVICES": "4,5"}
    run = subprocess.run(["bash", script, str(setup / "cfg.yaml")], cwd=tmp_path, env={**env, "NUM_GPUS": "2"},
                         capture_output=True, text=True)
    assert run.returncode == 2 and "deepspeed would ignore the mask and train on GPUs 0..1" in run.stderr
    env.pop("NUM_GPUS", None)
    run = subprocess.run(["bash", script, str(setup / "cfg.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "--num_gpus" not in run.stderr


def test_launcher_scripts_reject_missing_settings(setup, tmp_path):
    (tmp_path / "hosts").write_text("a slots=1\n")
    run = subprocess.run(["bash", str(REPO / "launchers" / "train_node.sh"), str(setup / "cfg.yaml")], cwd=tmp_path,
                         env={**os.environ, "HOSTFILE": "hosts"}, capture_output=True, text=True)
    assert run.returncode == 2 and "error: set NODE_RANK" in run.stderr
    assert subprocess.run(["bash", "-n", str(REPO / "launchers" / "train_slurm.sbatch")]).returncode == 0


# ---------------------------------------------------------------- evaluation (no process group)


def test_evaluate_without_a_process_group(tiny_model_dir, synthetic_items):
    from toolkit.models import ModelSpec, load_model
    from toolkit.train.evaluate import evaluate

    model, tok = load_model(ModelSpec(source=str(tiny_model_dir)))
    items = [it for it in synthetic_items if it.split == "dev"][:6]
    result = evaluate(model, tok, items, batch_size=4, max_new_tokens=4,
                      categories={items[0].id: "Unknown"})
    assert result.count == 6 and set(result.correct) == {it.id for it in items}
    assert set(result.by_category) <= {"Unknown", "uncategorised"}
    assert all("\n" not in a for a in result.answers.values())
