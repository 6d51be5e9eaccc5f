"""The whole schedule end to end on a tiny model and synthetic facts: real Ray probing, real DeepSpeed
launches, the report. Then an interrupted run (killed in the middle of a training step) resumed to the
same metrics."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from toolkit.gradual.config import load_pipeline_config
from toolkit.gradual.pipeline import Pipeline
from toolkit.io import read_jsonl, write_jsonl
from tests import tiny
from toolkit.data.prompts import ExemplarPool
from toolkit.probe.slick import CATEGORIES
from toolkit.probe.types import ProbeConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


PROBE = {"num_exemplar_sets": 2, "shots": 2, "samples": 2, "max_new_tokens": 4}
ITEMS = tiny.synthetic_items(per_relation=16)  # 24 train, 12 dev, 12 test
TEST_ITEMS = 12


def pipeline_config(model_dir, data_dir) -> dict:
    return {
        "preset": "test", "model": str(model_dir), "baselines": ["known_only", "one_stage_longer", "random_stage2"],
        "data": {"path": str(data_dir), "test_items": TEST_ITEMS},
        "probe": {**PROBE, "shard_size": 8, "splits": ["train", "test"],
                  "placement": {"num_actors": 1, "cpus_per_actor": 1}},
        # A 2-layer model cannot carry facts learned in the SFT format over to the few-shot probe
        # format, so few items get upgraded for real. For the plumbing, stage 2 here takes every item
        # that was Weakly/Unknown before stage 1 whatever it became (upgraded_to: all categories);
        # the upgrade definitions themselves are tested on constructed tables in test_selection.py.
        "selection": {"stage1_categories": ["MaybeKnown", "WeaklyKnown", "Unknown"],
                      "upgraded_to": list(CATEGORIES), "replay_ratio": 0.5},
        "train": {"num_accelerators": 1, "eval_batch_size": 16,
                  "options": {"epochs": 20, "lr": 1.0e-2, "micro_batch_size": 4, "optimizer": "adamw",
                              "patience": 0, "max_len": 48, "max_new_tokens": 4, "eval_batch_size": 32,
                              "progress": False}},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    synthetic_items = ITEMS
    """Synthetic facts, and a base model that memorised (in the probe format) half of the train
    facts: the base probe finds HighlyKnown items to replay and to forget."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    for split in ("train", "dev", "test"):
        write_jsonl(data / f"{split}.jsonl", [it.to_dict() for it in synthetic_items if it.split == split])
    train = [it for it in synthetic_items if it.split == "train"]
    model = tiny.build_model_dir(root / "base-model")
    pool = ExemplarPool([it for it in synthetic_items if it.split == "dev"])
    tiny.train_memoriser(model, train[::2], pool, ProbeConfig(**PROBE, seed=0), steps=200)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(model, data)))
    return root, config, {it.id for it in train[::2]}


@pytest.fixture(scope="module")
def finished_run(setup):
    root, config, _ = setup
    run_dir = root / "run-a"
    metrics = Pipeline(load_pipeline_config(config), run_dir, echo=lambda line: None).run()
    return run_dir, metrics


def without_costs(metrics: dict) -> str:
    """The metrics minus timings, as canonical JSON (so NaN compares equal to NaN)."""
    seeds = {seed: {k: v for k, v in m.items() if k != "costs"} for seed, m in metrics["seeds"].items()}
    return json.dumps(seeds, sort_keys=True)


def test_every_step_wrote_real_content(finished_run, setup):
    synthetic_items = ITEMS
    run_dir, metrics = finished_run
    memorised = setup[2]
    sd = run_dir / "seed-0"
    train_ids = sorted(it.id for it in synthetic_items if it.split == "train")
    for probe in ("m0-train", "m1-train", "m2-train"):
        rows = read_jsonl(sd / "probe" / probe / "categories.jsonl")
        assert [r["id"] for r in rows] == train_ids
        assert all(r["category"] in CATEGORIES and len(r["greedy_answers"]) == 2 for r in rows)
    assert len(read_jsonl(sd / "probe" / "m0-test" / "categories.jsonl")) == TEST_ITEMS
    c0 = {r["id"]: r["category"] for r in read_jsonl(sd / "probe" / "m0-train" / "categories.jsonl")}
    c1 = {r["id"]: r["category"] for r in read_jsonl(sd / "probe" / "m1-train" / "categories.jsonl")}
    c2 = {r["id"]: r["category"] for r in read_jsonl(sd / "probe" / "m2-train" / "categories.jsonl")}
    base_known = {i for i, c in c0.items() if c == "HighlyKnown"}
    assert len(base_known & memorised) >= 0.75 * len(memorised)  # the base model knows what it memorised
    # stage 1: the items the base model did not know; stage 2: Weakly/Unknown before + replay of
    # base-HighlyKnown items at ratio 0.5
    stage1 = sorted(i for i in c0 if c0[i] != "HighlyKnown")
    assert [r["id"] for r in read_jsonl(sd / "stage1" / "data" / "train.jsonl")] == stage1
    upgraded = sorted(i for i in c0 if c0[i] in ("WeaklyKnown", "Unknown"))
    selection = json.loads((sd / "stage2" / "data" / "selection.json").read_text())
    assert selection == {"upgraded": len(upgraded), "replay": round(0.5 * len(upgraded))}
    stage2_ids = {r["id"] for r in read_jsonl(sd / "stage2" / "data" / "train.jsonl")}
    assert set(upgraded) <= stage2_ids and stage2_ids - set(upgraded) <= base_known
    assert len(stage2_ids) == sum(selection.values())
    known_only = [r["id"] for r in read_jsonl(sd / "baseline-known_only" / "data" / "train.jsonl")]
    assert known_only == sorted(i for i in c0 if c0[i] != "Unknown")  # SliCK's filter, from M0
    for stage in ("stage1", "stage2", "baseline-known_only", "baseline-one_stage_longer", "baseline-random_stage2"):
        summary = json.loads((sd / stage / "train" / "train_summary.json").read_text())
        assert Path(summary["model_dir"], "config.json").exists() and summary["global_step"] > 0
        # the stage's DeepSpeed checkpoints went once its model was exported (train.keep_checkpoints: false)
        assert not (sd / stage / "train" / "checkpoints").exists()
    for model in ("M0", "M1", "M2", "known_only", "one_stage_longer", "random_stage2"):
        assert len(read_jsonl(sd / "eval" / f"{model}.jsonl")) == TEST_ITEMS
    # the metrics agree with the files they come from
    m = metrics["seeds"]["0"]
    highly = lambda cats: sum(c == "HighlyKnown" for c in cats.values())  # noqa: E731
    assert m["knowledge_acquired"]["highly_known_one_stage"] == highly(c1)
    assert m["knowledge_acquired"]["highly_known_two_stage"] == highly(c2)
    assert m["forgetting"]["M1"]["base_highly_known"] == len(base_known)
    assert m["forgetting"]["M1"]["dropped"] == sum(c1[i] != "HighlyKnown" for i in base_known)
    assert m["categories"]["M0 train"] == {c: sum(v == c for v in c0.values()) for c in CATEGORIES}
    assert sum(map(sum, (row.values() for row in m["transitions"]["C0 -> C1"].values()))) == len(train_ids)
    m1_correct = [r["correct"] for r in read_jsonl(sd / "eval" / "M1.jsonl")]
    assert m["test_accuracy"]["M1"]["overall"]["accuracy"] == sum(m1_correct) / TEST_ITEMS
    # fit speed: training accuracy per category per epoch, rising as stage 1 fits its items
    curve = m["fit_speed"]["stage1"]
    assert len(curve) == 20 and set(curve[-1]["accuracy_by_category"]) <= set(CATEGORIES)
    assert sum(curve[-1]["accuracy_by_category"].values()) > sum(curve[0]["accuracy_by_category"].values())


def test_the_controls_match_stage_2_in_compute_and_in_data(finished_run, setup):
    """one_stage_longer: M1 on the stage-1 items again, for exactly stage 2's optimizer steps at its lr;
    random_stage2: as many random not-HighlyKnown items as stage 2's upgraded set, plus the same replay.
    Both are probed on train like M1 and M2, and their numbers reach metrics.json (strict JSON)."""
    from toolkit.gradual.selection import SelectionConfig, random_stage2_items

    run_dir, metrics = finished_run
    sd = run_dir / "seed-0"
    ids = lambda path: [r["id"] for r in read_jsonl(path)]  # noqa: E731
    summary = lambda stage: json.loads((sd / stage / "train" / "train_summary.json").read_text())  # noqa: E731
    resolved = lambda stage: json.loads((sd / stage / "train" / "train_config.resolved.json").read_text())  # noqa: E731
    stage2_steps = summary("stage2")["global_step"]
    longer = "baseline-one_stage_longer"
    assert ids(sd / longer / "data" / "train.jsonl") == ids(sd / "stage1" / "data" / "train.jsonl")
    assert summary(longer)["global_step"] == stage2_steps > 0
    assert resolved(longer)["lr"] == resolved("stage2")["lr"] == resolved("stage1")["lr"] * 0.5
    assert resolved(longer)["model"] == summary("stage1")["model_dir"]  # continues from M1
    assert summary(longer)["train_batch_size"] == summary("stage2")["train_batch_size"]  # same examples

    c0 = {r["id"]: r["category"] for r in read_jsonl(sd / "probe" / "m0-train" / "categories.jsonl")}
    stage2_parts = json.loads((sd / "stage2" / "data" / "selection.json").read_text())
    random_dir = sd / "baseline-random_stage2"
    assert json.loads((random_dir / "data" / "selection.json").read_text()) == {
        "random": stage2_parts["upgraded"], "replay": stage2_parts["replay"]}
    stage2_ids, random_ids = set(ids(sd / "stage2" / "data" / "train.jsonl")), set(ids(random_dir / "data" / "train.jsonl"))
    replay = {i for i in stage2_ids if c0[i] == "HighlyKnown"}
    assert len(replay) == stage2_parts["replay"] and replay <= random_ids
    assert all(c0[i] != "HighlyKnown" for i in random_ids - replay)
    upgraded = sorted(stage2_ids - replay)
    expected = random_stage2_items(c0, {"upgraded": upgraded, "replay": sorted(replay)}, SelectionConfig(seed=0))
    assert random_ids == set(expected["random"]) | replay  # seeded: the same draw every time
    if len([i for i in c0 if c0[i] != "HighlyKnown"]) > len(upgraded):
        assert random_ids != stage2_ids  # drawn from a larger pool (seeded: a fixed draw), not the upgraded set

    m = metrics["seeds"]["0"]
    for name in ("known_only", "one_stage_longer", "random_stage2"):
        rows = read_jsonl(sd / "probe" / f"{name}-train" / "categories.jsonl")
        assert len(rows) == len(c0)
        highly = sum(r["category"] == "HighlyKnown" for r in rows)
        assert m["knowledge"][name]["highly_known"] == highly
        assert m["knowledge"][name]["gain_vs_M1"] == highly - m["knowledge"]["M1"]["highly_known"]
        assert f"M2 vs {name}" in m["item_comparisons"] and f"M2 vs {name}" in m["comparisons"]
    json.loads((run_dir / "metrics.json").read_text(),
               parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))


def test_report_renders(finished_run):
    run_dir, _ = finished_run
    html = (run_dir / "report" / "report.html").read_text()
    HTMLParser().feed(html)
    assert html.count("<img") >= 5 and "Knowledge acquired" in html
    for png in (run_dir / "report" / "figures").glob("*.png"):
        assert png.stat().st_size > 5000


def test_rerun_skips_every_step(finished_run, setup):
    run_dir, metrics = finished_run
    lines: list[str] = []
    again = Pipeline(load_pipeline_config(setup[1]), run_dir, echo=lines.append).run()
    assert without_costs(again) == without_costs(metrics)
    assert not any(line.startswith("[step]") for line in lines)


def test_rerun_with_another_config_is_refused(finished_run, setup):
    from toolkit.config import ConfigError

    run_dir, _ = finished_run
    cfg = load_pipeline_config(setup[1], ["probe.samples=3"])
    with pytest.raises(ConfigError, match="probe.samples"):
        Pipeline(cfg, run_dir).run()


def test_killed_in_the_middle_of_a_step_resumes_to_the_same_metrics(finished_run, setup):
    # A copy of the finished run rolled back to just before stage 2's training (what came before it
    # was already checked to be skipped on a re-run), then killed in the middle of stage 2 and resumed.
    root, config, _ = setup
    run_dir = root / "run-b"
    shutil.copytree(finished_run[0], run_dir)
    kept = {"data", "seed0.probe_m0_train", "seed0.probe_m0_test", "seed0.select_stage1", "seed0.train_stage1",
            "seed0.probe_m1_train"}
    for marker in (run_dir / "state").glob("*.json"):
        if marker.stem not in kept:
            marker.unlink()
    sd = run_dir / "seed-0"
    later_probes = [p for p in (sd / "probe").iterdir() if p.name not in ("m0-train", "m0-test", "m1-train")]
    for later in [sd / "stage2", *later_probes, sd / "eval", run_dir / "report", *sd.glob("baseline-*")]:
        shutil.rmtree(later)
    (run_dir / "metrics.json").unlink()

    cmd = [sys.executable, "-m", "toolkit.cli", "run", str(config), "--out", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = sd / "stage2" / "train" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before stage 2 wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the launcher's ranks, mid-training
    proc.wait()
    assert not (run_dir / "state" / "seed0.train_stage2.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert without_costs(resumed) == without_costs(finished_run[1])
    assert "[skip] seed0.probe_m1_train (done)" in done.stdout
    assert "resumed from" in (sd / "stage2" / "train.log").read_text()
    # kept while the stage was unfinished (the resume needed them), deleted once its model was exported
    assert not (sd / "stage2" / "train" / "checkpoints").exists() and (sd / "stage2" / "train" / "model").is_dir()
    assert f"deleted {sd / 'stage2' / 'train' / 'checkpoints'}" in done.stdout


def test_checkpoints_are_deleted_only_after_the_export(tmp_path):
    """A finished stage (export written, completion recorded) loses its checkpoints; an interrupted one
    (no export yet) keeps them for its resume; train.keep_checkpoints keeps them all."""
    def stage(name: str, exported: bool) -> Path:
        train = tmp_path / name / "train"
        (train / "checkpoints" / "step000004").mkdir(parents=True)
        (train / "checkpoints" / "step000004" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        (train / "checkpoints" / "latest").write_text("step000004")
        (train / "model").mkdir()
        if exported:
            (train / "model" / "config.json").write_text("{}")
        (train / "train_summary.json").write_text(json.dumps({"model_dir": str(train / "model") if exported else None}))
        return tmp_path / name

    deleting = Pipeline(load_pipeline_config(None), tmp_path / "run", echo=lambda line: None)
    keeping = Pipeline(load_pipeline_config(None, ["train.keep_checkpoints=true"]), tmp_path / "run", echo=print)
    done, interrupted, kept = stage("done", True), stage("interrupted", False), stage("kept", True)
    assert deleting.clean_checkpoints(done) and not (done / "train" / "checkpoints").exists()
    assert (done / "train" / "model" / "config.json").exists()
    assert not deleting.clean_checkpoints(interrupted) and (interrupted / "train" / "checkpoints" / "latest").exists()
    assert not keeping.clean_checkpoints(kept) and (kept / "train" / "checkpoints" / "latest").exists()
    assert not deleting.clean_checkpoints(done)  # nothing left: a re-run passes by


@pytest.fixture(scope="module")
def real_rule_run(setup):
    """The schedule with the paper's stage-2 rule as shipped (upgraded = Weakly/Unknown under C0 and
    MaybeKnown or better under C1), on the same base model, and stage 1 on every item not known."""
    root, config, _ = setup
    cfg = yaml.safe_load(config.read_text())
    cfg.update(baselines=[], selection={"stage1_categories": ["MaybeKnown", "WeaklyKnown", "Unknown"],
                                        "replay_ratio": 0.5})
    cfg["train"]["options"].update(epochs=6, lr=3.0e-3)
    path = root / "real-rule.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = root / "run-real-rule"
    Pipeline(load_pipeline_config(path), run_dir, echo=lambda line: None).run()
    return run_dir


def test_the_real_upgrade_rule_end_to_end(real_rule_run):
    """Stage 2 holds exactly the items the probes of M0 and M1 say were upgraded, plus replay; when
    there are none (the usual outcome for a 2-layer model, whose SFT does not carry over to the
    few-shot format), stage 2 is skipped and M2 is M1."""
    sd = real_rule_run / "seed-0"
    categories = {name: {r["id"]: r["category"] for r in read_jsonl(sd / "probe" / name / "categories.jsonl")}
                  for name in ("m0-train", "m1-train", "m2-train")}
    c0, c1 = categories["m0-train"], categories["m1-train"]
    upgraded = sorted(i for i in c0 if c0[i] in ("WeaklyKnown", "Unknown") and c1[i] in ("HighlyKnown", "MaybeKnown"))
    selection = json.loads((sd / "stage2" / "data" / "selection.json").read_text())
    assert selection["upgraded"] == len(upgraded) and selection["replay"] == round(0.5 * len(upgraded))
    stage2_ids = sorted(r["id"] for r in read_jsonl(sd / "stage2" / "data" / "train.jsonl"))
    assert set(upgraded) <= set(stage2_ids) and len(stage2_ids) == sum(selection.values())
    stage2 = json.loads((real_rule_run / "state" / "seed0.train_stage2.json").read_text())["summary"]
    m1 = json.loads((real_rule_run / "state" / "seed0.train_stage1.json").read_text())["summary"]["model_dir"]
    if upgraded:
        assert not stage2.get("skipped") and stage2["model_dir"] != m1
    else:
        assert stage2 == {"skipped": True, "model_dir": m1} and categories["m2-train"] == c1
