"""The pipeline config: shipped presets and the documented example validate; bad keys are refused."""
import json
import shutil
from pathlib import Path

import pytest

from toolkit.config import ConfigError
from toolkit.gradual.config import ALL_BASELINES, DataSettings, load_pipeline_config
from toolkit.probe.vllm_engine import vllm_importable

EXAMPLE = Path(__file__).resolve().parents[1] / "toolkit" / "configs" / "examples" / "own_data.yaml"


def test_presets_and_example_validate():
    default = load_pipeline_config()
    assert default.preset == "default" and default.model is None and default.train.num_accelerators == 1
    paper = load_pipeline_config(preset="paper")
    assert (paper.probe.num_exemplar_sets, paper.probe.shots, paper.probe.samples, paper.probe.temperature) == (10, 4, 16, 0.5)
    example = load_pipeline_config(EXAMPLE)
    assert example.train.hostfile == "/shared/hostfile" and example.seeds == (0, 1, 2)


def test_overrides_and_all_baselines():
    cfg = load_pipeline_config(None, ["probe.samples=2", "baselines=all", "seeds=0,1", "train.options.lr=1e-4"])
    assert cfg.probe.samples == 2 and cfg.baselines == ALL_BASELINES and cfg.seeds == (0, 1)
    assert cfg.train.options.lr == 1e-4 and "lr" in cfg.train.options.given_keys  # typed: the trainer's config
    assert cfg.for_seed(1).selection.seed == 1
    with pytest.raises(ConfigError, match="data.relations is empty"):
        DataSettings(relations=())
    costly = load_pipeline_config(None, ["seeds=3,1", "baselines=random_stage2", "first_seed_baselines=natural"])
    assert costly.seed_baselines(3) == ("random_stage2", "natural") and costly.seed_baselines(1) == ("random_stage2",)
    assert load_pipeline_config(None, ["probe.placement.num_actors=3"]).probe.placement.num_actors == 3


@pytest.mark.parametrize("overrides,message", [
    (["baselines=fancy"], "unknown baseline 'fancy'"),
    (["seeds=0,0"], "seeds has duplicates"),
    (["probe.splits=train"], "probe.splits=['train'] must include 'test'"),
    (["probe.engine=turbo"], "probe.engine='turbo' must be one of fast, reference"),
    (["probe.samples=-1"], "probe.samples=-1 must be >= 0"),
    (["probe.seed=3"], "probe.seed=3 is set by the pipeline"),
    (["selection.stage1_categories=Known"], "unknown category 'Known'"),
    (["train.options.model=x"], "train.options.model='x' is set by the pipeline"),
    (["train.options.micro_batch_size=0"], "train.options.micro_batch_size=0 must be >= 1"),
    (["train.options.lrr=1"], "unknown key 'train.options.lrr'"),
    (["train.stage2_lr_factor=0"], "train.stage2_lr_factor=0.0 must be in (0, 10]"),
    (["train.node_rank=1"], "train.node_rank=1 launches one node by hand"),
    (["data.train_items=0"], "data.train_items=0 must be >= 1"),
    (["first_seed_baselines=fancy"], "first_seed_baselines: unknown baseline 'fancy'"),
    (["baselines=natural", "first_seed_baselines=natural"], "first_seed_baselines: natural already in baselines"),
    (["probe.shot=3"], "unknown key 'probe.shot'"),
    (["probe.placement.num_actors=0"], "probe.placement.num_actors=0 must be >= 1"),
    # keys that moved name their new place; a removed one says where its job went
    (["probe.num_actors=2"], "key 'probe.num_actors' has moved: use 'probe.placement.num_actors'"),
    (["probe.ray_address=auto"], "use 'probe.placement.ray_address'"),
    (["train.eval_batch_size=8"], "key 'train.eval_batch_size' has moved: use 'train.options.eval_batch_size'"),
    (["selection.seed=3"], "key 'selection.seed' was removed: the selection's random draws follow each entry "
                           "of the top-level `seeds`"),
    # one answer length: the probe's
    (["train.options.max_new_tokens=4"], "train.options.max_new_tokens=4 is set by the pipeline from "
                                         "probe.max_new_tokens"),
    (["probe.shard_size=0"], "probe.shard_size=0 must be >= 1"),
])
def test_bad_pipeline_config(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_each_knob_is_read_once():
    """The evaluations answer as long as the probe does; the shard size is the probe runner's knob."""
    import dataclasses

    from toolkit.probe.runner import RunConfig

    cfg = load_pipeline_config(None, ["probe.max_new_tokens=5", "train.options.eval_batch_size=7"])
    assert cfg.train.options.max_new_tokens == 5  # the trainer's dev evaluation
    assert "max_new_tokens" not in cfg.train.options.given_keys  # still the pipeline's to set
    assert cfg.train.options.eval_batch_size == 7
    shard_size = {f.name: f for f in dataclasses.fields(type(cfg.probe))}["shard_size"]
    assert shard_size.metadata["help"] == "items per shard (fixes the shard plan)" and shard_size.default == 32
    assert {f.name: f for f in dataclasses.fields(RunConfig)}["shard_size"].default == 32


def test_every_pipeline_knob_has_help_text():
    from toolkit.config import config_fields
    from toolkit.gradual.config import DataSettings, PipelineConfig, ProbeSettings, TrainSettings
    from toolkit.gradual.selection import SelectionConfig

    for cls in (PipelineConfig, DataSettings, ProbeSettings, SelectionConfig, TrainSettings):
        assert [f.name for f in config_fields(cls) if not f.metadata.get("help")] == [], cls.__name__


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fast' .known: default, evidence, paper"):
        load_pipeline_config(preset="fast")


def test_run_locked_by_an_older_toolkit_resumes_if_only_new_keys_are_missing(tmp_path):
    from toolkit.config import to_dict
    from toolkit.gradual.pipeline import Pipeline

    cfg = load_pipeline_config(None)
    written = to_dict(cfg)
    del written["probe"]["seed"], written["probe"]["keep_samples"]  # keys this toolkit added later
    placement = written["probe"].pop("placement")  # locked before `probe.placement`: flat actor keys
    written["probe"].update(num_actors=placement["num_actors"], cpus_per_actor=placement["cpus_per_actor"])
    written["probe"]["sample_round"] = 4  # a knob this toolkit has removed since
    written["selection"]["seed"] = 0  # removed since: the pipeline's seeds set it
    written["train"]["eval_batch_size"] = 16  # moved since to train.options (how the evaluation batches)
    written["train"]["options"]["max_new_tokens"] = 16  # its own then; probe.max_new_tokens (8) decides now
    written["notes"] = "the preset's description as it was worded then"
    (tmp_path / "config.json").write_text(json.dumps(written))
    Pipeline(cfg, tmp_path)._lock_config()  # the same run: accepted
    changed = load_pipeline_config(None, ["probe.samples=3"])
    with pytest.raises(ConfigError, match="probe.samples"):
        Pipeline(changed, tmp_path)._lock_config()


# ---------------------------------------------------------------- gradual run: checked before anything is written


@pytest.fixture(scope="module")
def user_inputs(tmp_path_factory, tiny_model_dir, synthetic_items):
    """A user's good data directory and config, and the held-out mistakes a new user makes."""
    import csv

    import yaml

    root = tmp_path_factory.mktemp("run-inputs")
    data = root / "data"
    data.mkdir()
    for split in ("train", "dev", "test"):
        rows = [it.to_dict() for it in synthetic_items if it.split == split]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    empty = root / "empty-train"
    shutil.copytree(data, empty)
    (empty / "train.jsonl").write_text("")
    no_answer = root / "qa.csv"
    with open(no_answer, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "question", "relation", "split"])
        writer.writerow(["q1", "What is it?", "color", "train"])
    (root / "bad.json").write_text('{"zero_optimization": {"stage": 2,}}\n')
    good = {"model": str(tiny_model_dir), "data": {"path": str(data)},
            "probe": {"num_exemplar_sets": 1, "shots": 1, "samples": 1},
            "train": {"num_accelerators": 1, "options": {"micro_batch_size": 8}}}
    (root / "good.yaml").write_text(yaml.safe_dump(good))
    return root


@pytest.mark.parametrize("sets, message", [
    (["train.options.train_batch_size=12"], "train.options: batch arithmetic: train_batch_size=12 is not divisible"),
    (["train.options.ds_config={root}/bad.json"], "train.options: {root}/bad.json:1: malformed JSON"),
    (["model={root}/no-such-model"], "model path not found: {root}/no-such-model"),
    (["data.path={root}/no-such-data"], "{root}/no-such-data: no such file or directory"),
    (["data.path={root}/empty-train"], "no items in split(s) train"),
    (["data.path={root}/qa.csv"], "field 'answer'"),
    (["train.options.lr=-1"], "train.options.lr=-1.0 must be > 0"),
    (["data.relations=color,colour"], "data.relations: no relation colour in {root}/data (known: code, color, home)"),
    (["probe.placement.gpus_per_actor=2"], "probe.placement.gpus_per_actor=2: engine=fast uses one GPU per actor"),
    (["probe.placement.gpus_per_actor=1", "probe.placement.num_actors=64"],
     "probe.placement.gpus_per_actor=1: 64 actor(s) need 64 GPU(s)"),
    (["probe.engine=vllm", "model=random:tiny"], "model=random:tiny: engine=vllm loads model directories"),
    pytest.param(["probe.engine=vllm", "probe.placement.gpus_per_actor=3"],
                 "probe.placement.gpus_per_actor=3: a vLLM actor runs tensor parallel over 1, 2, 4, 8 GPUs",
                 marks=pytest.mark.skipif(not vllm_importable(), reason="vLLM is not installed here")),
    pytest.param(["probe.engine=vllm", "probe.placement.gpus_per_actor=2", "model=smollm2"],
                 "probe.placement.gpus_per_actor=2: tensor parallel size 2 does not divide the model's 9 attention",
                 marks=pytest.mark.skipif(not vllm_importable(), reason="vLLM is not installed here")),
])
def test_run_refuses_bad_input_before_writing_anything(user_inputs, capsys, sets, message):
    from toolkit.cli import main

    root = user_inputs
    out = root / "out"
    argv = ["run", str(root / "good.yaml"), "--out", str(out)]
    for pair in sets:
        argv += ["--set", pair.format(root=root)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(root=root) in err[0], err
    assert not out.exists()  # nothing written, so the corrected config can use the same --out


def test_dry_run_checks_the_inputs_too(user_inputs, capsys):
    from toolkit.cli import main

    root = user_inputs
    assert main(["run", str(root / "good.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "config ok (data, model and training launch checked: 1 training rank(s))" in out
    # the probe's plan, as `gradual probe --dry-run` words it: the placement resolved, the first probe's shards
    assert "\nprobe plan: " in out and "\n  node this machine: " in out
    assert "\n  shards: 60 item(s) in 2 shard(s) of up to 32\n" in out  # the 60 train items
    assert main(["run", str(root / "good.yaml"), "--dry-run", "--set", f"data.path={root}/qa.csv"]) == 2


@pytest.mark.parametrize("gpus, micro, accum", [(1, 16, 4), (2, 16, 2), (4, 16, 1), (8, 8, 1), (16, 4, 1)])
def test_paper_preset_plans_the_same_global_batch_on_any_number_of_gpus(gpus, micro, accum):
    """What `gradual run --preset paper --dry-run --set train.num_gpus=N` plans, on a machine without GPUs."""
    import dataclasses

    from toolkit.train.launch import check_training

    paper = load_pipeline_config(preset="paper")
    planned = check_training(paper.train.options, dataclasses.replace(paper.train, num_gpus=gpus), launching=False)
    ds = planned["ds_config"]
    assert planned["world_size"] == gpus and planned["on_gpu"] and planned["bf16"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64, micro, accum)
    assert planned["batch"].startswith(f"train_batch_size 64 = micro_batch_size {micro} x gradient_accumulation_steps "
                                       f"{accum} x world size {gpus}")


def test_paper_preset_dry_run_through_the_cli(capsys):
    from toolkit.cli import main

    assert main(["run", "--preset", "paper", "--dry-run", "--set", "train.num_gpus=8"]) == 0
    out = capsys.readouterr().out
    assert "training launch: train_batch_size 64 = micro_batch_size 8 x gradient_accumulation_steps 1 x world size 8" in out
    assert "training disk: up to " in out and "for 2 training stage(s)" in out and "checkpoints deleted" in out
    assert "config ok" in out
    # a world size that no micro batch fits: one line, exit 2
    assert main(["run", "--preset", "paper", "--dry-run", "--set", "train.num_gpus=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: train.options: batch arithmetic: train_batch_size=64 cannot be split over world size 3: "
                   "no micro batch fits (a global batch for 3 ranks is a multiple of 3, e.g. 63 or 66)")
