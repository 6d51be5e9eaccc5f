"""The whole schedule end to end on a tiny model and synthetic facts: real Ray probing, real DeepSpeed
launches, the report, stage 2 chosen by the shipped upgrade rule. Then an interrupted run (killed in
the middle of a training step) resumed to the same metrics."""
import hashlib
import json
import os
import random
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
from toolkit.io import read_jsonl, write_json, write_jsonl
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
TRAIN = [it for it in ITEMS if it.split == "train"]
MEMORISED = {it.id for it in TRAIN[::2]}  # the base model learns these in the probe format
TEST_ITEMS = 12
BASELINES = ("known_only", "one_stage_longer", "random_stage2", "random_same_pool", "one_stage_union")
# The paper's stage-2 rule as shipped, written out: Weakly/Unknown under C0, MaybeKnown or better under C1.
UPGRADED_FROM, UPGRADED_TO = {"WeaklyKnown", "Unknown"}, {"HighlyKnown", "MaybeKnown"}


def constructed_c1() -> dict[str, str]:
    """M1's categories for this run. A 2-layer model's SFT does not carry facts over to the few-shot
    probe format (measured on this setup: after stage 1 every item the base model did not know is
    still Unknown, so the shipped rule upgrades none and stage 2 would be skipped). So M1's probe is
    this table, recorded before the run as a completed step (the resume seam: state/<step>.json and
    the step's output), and everything else runs for real. Half of the items the base model did not
    learn move up (MaybeKnown, HighlyKnown), half do not; learned items move to MaybeKnown (better
    than Weakly, but not from Weakly/Unknown) or are forgotten (WeaklyKnown)."""
    table = {}
    for k, it in enumerate(TRAIN[1::2]):
        table[it.id] = ("MaybeKnown", "Unknown", "HighlyKnown", "WeaklyKnown")[k % 4]
    for k, it in enumerate(TRAIN[::2]):
        table[it.id] = ("MaybeKnown", "WeaklyKnown")[k % 2]
    return table


def record_m1_probe(run_dir: Path, c1: dict[str, str]) -> None:
    out = run_dir / "seed-0" / "probe" / "m1-train"
    write_jsonl(out / "categories.jsonl", [{"id": i, "category": c} for i, c in sorted(c1.items())])
    write_json(run_dir / "state" / "seed0.probe_m1_train.json",
               {"step": "seed0.probe_m1_train", "wall_s": 0.0, "summary": {"dir": str(out)}})


def seeded_rng(*parts) -> random.Random:
    """The selection's random draws, re-done here: Python's random seeded by the first 8 bytes
    (little-endian) of sha256 over the parts joined by \\x1f, as toolkit.data.prompts.stable_seed
    is specified (the same draw on every machine and Python)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def pipeline_config(model_dir, data_dir) -> dict:
    return {
        "preset": "test", "model": str(model_dir), "noise_floor": True, "baselines": list(BASELINES),
        "data": {"path": str(data_dir), "test_items": TEST_ITEMS},
        "probe": {**PROBE, "shard_size": 8, "splits": ["train", "test"],
                  "placement": {"num_actors": 1, "cpus_per_actor": 1}},
        # stage 1 on the items the base model partly knows; stage 2 by the shipped rule (its upgraded items
        # come from the Unknown ones, the same-pool control's pool)
        "selection": {"stage1_categories": ["MaybeKnown", "WeaklyKnown"], "replay_ratio": 0.5},
        "train": {"num_accelerators": 1,
                  "options": {"epochs": 20, "lr": 1.0e-2, "micro_batch_size": 4, "optimizer": "adamw",
                              "patience": 0, "max_len": 48, "eval_batch_size": 32, "progress": False}},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic facts, and a base model that memorised (in the probe format) half of the train
    facts: the base probe finds HighlyKnown items to replay and to forget."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    for split in ("train", "dev", "test"):
        write_jsonl(data / f"{split}.jsonl", [it.to_dict() for it in ITEMS if it.split == split])
    model = tiny.build_model_dir(root / "base-model")
    pool = ExemplarPool([it for it in ITEMS if it.split == "dev"])
    tiny.train_memoriser(model, [it for it in TRAIN if it.id in MEMORISED], pool, ProbeConfig(**PROBE, seed=0),
                         steps=200)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(model, data)))
    return root, config, MEMORISED, model


@pytest.fixture(scope="module")
def finished_run(setup):
    root, config = setup[:2]
    run_dir = root / "run-a"
    record_m1_probe(run_dir, constructed_c1())
    metrics = Pipeline(load_pipeline_config(config), run_dir, echo=lambda line: None).run()
    return run_dir, metrics


def categories(probe_dir: Path) -> dict[str, str]:
    return {r["id"]: r["category"] for r in read_jsonl(probe_dir / "categories.jsonl")}


def expected_stage2(c0: dict[str, str], c1: dict[str, str]) -> tuple[list[str], list[str]]:
    """(upgraded, replay) by the shipped rule, re-done: replay is round(0.5 x upgraded) of the items
    HighlyKnown under C0, drawn by a seeded shuffle of them in id order (seed 0: the run's seed)."""
    upgraded = sorted(i for i in c0 if c0[i] in UPGRADED_FROM and c1[i] in UPGRADED_TO)
    pool = sorted(i for i in c0 if c0[i] == "HighlyKnown" and i not in upgraded)
    seeded_rng("replay", 0).shuffle(pool)
    return upgraded, sorted(pool[:round(0.5 * len(upgraded))])


def without_costs(metrics: dict) -> str:
    """The metrics minus timings, as canonical JSON (so NaN compares equal to NaN)."""
    seeds = {seed: {k: v for k, v in m.items() if k != "costs"} for seed, m in metrics["seeds"].items()}
    return json.dumps(seeds, sort_keys=True)


def test_every_step_wrote_real_content(finished_run, setup):
    run_dir, metrics = finished_run
    memorised = setup[2]
    sd = run_dir / "seed-0"
    train_ids = sorted(it.id for it in TRAIN)
    for probe in ("m0-train", "m2-train"):
        rows = read_jsonl(sd / "probe" / probe / "categories.jsonl")
        assert [r["id"] for r in rows] == train_ids
        assert all(r["category"] in CATEGORIES and len(r["greedy_answers"]) == 2 for r in rows)
    assert len(read_jsonl(sd / "probe" / "m0-test" / "categories.jsonl")) == TEST_ITEMS
    c0, c1, c2 = (categories(sd / "probe" / name) for name in ("m0-train", "m1-train", "m2-train"))
    assert c1 == constructed_c1()  # the recorded step was skipped, not re-run
    base_known = {i for i, c in c0.items() if c == "HighlyKnown"}
    assert len(base_known & memorised) >= 0.75 * len(memorised)  # the base model knows what it memorised
    # stage 1: the items the base model partly knew
    stage1 = sorted(i for i in c0 if c0[i] in ("MaybeKnown", "WeaklyKnown"))
    assert stage1
    assert [r["id"] for r in read_jsonl(sd / "stage1" / "data" / "train.jsonl")] == stage1
    known_only = [r["id"] for r in read_jsonl(sd / "baseline-known_only" / "data" / "train.jsonl")]
    assert known_only == sorted(i for i in c0 if c0[i] != "Unknown")  # SliCK's filter, from M0
    for stage in ("stage1", "stage2", *(f"baseline-{b}" for b in BASELINES)):
        summary = json.loads((sd / stage / "train" / "train_summary.json").read_text())
        assert Path(summary["model_dir"], "config.json").exists() and summary["global_step"] > 0
        # the stage's DeepSpeed checkpoints went once its model was exported (train.keep_checkpoints: false)
        assert not (sd / stage / "train" / "checkpoints").exists()
    for model in ("M0", "M1", "M2", *BASELINES):
        assert len(read_jsonl(sd / "eval" / f"{model}.jsonl")) == TEST_ITEMS
    # the metrics agree with the files they come from
    m = metrics["seeds"]["0"]
    highly = lambda cats: sum(c == "HighlyKnown" for c in cats.values())  # noqa: E731
    assert m["knowledge_acquired"]["M2"]["highly_known_M0"] == len(base_known)
    assert m["knowledge_acquired"]["M2"]["highly_known_M1"] == highly(c1)
    assert m["knowledge_acquired"]["M2"]["highly_known"] == highly(c2)
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


def test_stage_2_trains_the_upgraded_items_and_their_replay_from_m1(finished_run):
    """Stage 2 holds exactly the items the probes of M0 and M1 say were upgraded (the shipped rule),
    plus the seeded replay of base-HighlyKnown items, and trains M2 from M1."""
    run_dir, _ = finished_run
    sd = run_dir / "seed-0"
    c0, c1 = categories(sd / "probe" / "m0-train"), categories(sd / "probe" / "m1-train")
    upgraded, replay = expected_stage2(c0, c1)
    # items the base model did not learn, moved up in the constructed C1: Unknown under C0 bar chance
    assert len(upgraded) >= 3, (c0, upgraded)
    assert set(upgraded) < {i for i in c1 if c1[i] in UPGRADED_TO}  # C0 decides too: learned items are not
    assert len(replay) == round(0.5 * len(upgraded)) > 0
    selection = json.loads((sd / "stage2" / "data" / "selection.json").read_text())
    assert selection == {"upgraded": len(upgraded), "replay": len(replay)}
    assert sorted(r["id"] for r in read_jsonl(sd / "stage2" / "data" / "train.jsonl")) == sorted(upgraded + replay)
    states = {name: json.loads((run_dir / "state" / f"seed0.{name}.json").read_text())["summary"]
              for name in ("train_stage1", "train_stage2")}
    stage2 = states["train_stage2"]
    assert not stage2.get("skipped") and stage2["model_dir"] != states["train_stage1"]["model_dir"]
    assert stage2["global_step"] > 0
    resolved = json.loads((sd / "stage2" / "train" / "train_config.resolved.json").read_text())
    assert resolved["model"] == states["train_stage1"]["model_dir"]  # M2 continues from M1


def test_the_controls_match_stage_2_in_compute_and_in_data(finished_run, setup):
    """one_stage_longer: M1 on the stage-1 items again, for exactly stage 2's optimizer steps at its lr;
    random_stage2: as many random not-HighlyKnown items as stage 2's upgraded set, plus the same replay.
    Both are probed on train like M1 and M2, and their numbers reach metrics.json (strict JSON)."""
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
    upgraded, replay = expected_stage2(c0, categories(sd / "probe" / "m1-train"))
    assert stage2_ids == set(upgraded) | set(replay)
    # as many items as stage 2 upgraded, drawn (seeded: the same draw every time) from every item not
    # HighlyKnown under C0, in id order, then the same replay
    pool = sorted(i for i in c0 if c0[i] != "HighlyKnown" and i not in replay)
    assert len(pool) > len(upgraded)  # a draw that can differ from the upgraded set
    drawn = seeded_rng("random_stage2", 0).sample(pool, len(upgraded))
    assert random_ids == set(drawn) | set(replay)

    # random_same_pool: from M1 at stage 2's lr for its steps, as many items as it upgraded, drawn from
    # where they came from (Weakly/Unknown under C0, not in stage 1, not replayed), the same replay
    same_dir = "baseline-random_same_pool"
    stage1_ids = ids(sd / "stage1" / "data" / "train.jsonl")
    pool = sorted(i for i in c0 if c0[i] in UPGRADED_FROM and i not in stage1_ids and i not in replay)
    assert len(pool) > len(upgraded)  # a draw that can differ from the upgraded set
    drawn = seeded_rng("random_same_pool", 0).sample(pool, len(upgraded))
    assert set(ids(sd / same_dir / "data" / "train.jsonl")) == set(drawn) | set(replay)
    assert json.loads((sd / same_dir / "data" / "parts.json").read_text()) == {
        "random (same pool)": sorted(drawn), "replay": replay}
    assert summary(same_dir)["global_step"] == stage2_steps
    assert resolved(same_dir)["lr"] == resolved("stage2")["lr"] and resolved(same_dir)["model"] == summary("stage1")["model_dir"]
    # one_stage_union: from M0 at stage 1's lr, stage 1's items + stage 2's, both stages' steps in one
    union_dir = "baseline-one_stage_union"
    assert set(ids(sd / union_dir / "data" / "train.jsonl")) == set(stage1_ids) | stage2_ids
    assert summary(union_dir)["global_step"] == summary("stage1")["global_step"] + stage2_steps
    assert resolved(union_dir)["lr"] == resolved("stage1")["lr"] and resolved(union_dir)["model"] == str(setup[3])

    m = metrics["seeds"]["0"]
    for name in BASELINES:
        rows = read_jsonl(sd / "probe" / f"{name}-train" / "categories.jsonl")
        assert len(rows) == len(c0)
        highly = sum(r["category"] == "HighlyKnown" for r in rows)
        assert m["knowledge"][name]["highly_known"] == highly
        assert m["knowledge"][name]["gain_vs_M1"] == highly - m["knowledge"]["M1"]["highly_known"]
        assert f"M2 vs {name}" in m["item_comparisons"] and f"M2 vs {name}" in m["comparisons"]
    json.loads((run_dir / "metrics.json").read_text(),
               parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))


def test_the_noise_floor_re_probes_m0_under_another_seed_and_sets_each_model_beside_it(finished_run):
    run_dir, metrics = finished_run
    sd = run_dir / "seed-0"
    reprobe_dir = sd / "probe" / "m0_reprobe-train"
    assert json.loads((reprobe_dir / "manifest.json").read_text())["seed"] == 10_000  # seed 0 + offset
    c0, again, c2 = (categories(sd / "probe" / name) for name in ("m0-train", "m0_reprobe-train", "m2-train"))
    assert sorted(again) == sorted(c0)
    upgraded = lambda after: sum(c0[i] in UPGRADED_FROM and after[i] in UPGRADED_TO for i in c0)  # noqa: E731
    forgotten = lambda after: sum(c0[i] == "HighlyKnown" != after[i] for i in c0)  # noqa: E731
    floor = metrics["seeds"]["0"]["noise_floor"]
    assert floor["reprobe"]["upgraded"] == upgraded(again) and floor["reprobe"]["forgotten"] == forgotten(again)
    assert floor["reprobe"]["changed"] == sum(again[i] != c0[i] for i in c0)
    assert floor["models"]["M2"]["upgraded_above_floor"] == upgraded(c2) - upgraded(again)
    assert floor["models"]["M2"]["forgotten_above_floor"] == forgotten(c2) - forgotten(again)
    assert set(floor["models"]) == {"M1", "M2", *BASELINES}


def test_the_per_item_files_recompute_metrics_json(finished_run, tmp_path):
    """seed-<s>/items.jsonl.gz and stages.json hold every item's category, P_greedy, P_sample and test
    answer per model, and each stage's exported step: `gradual report` on them alone (no probe, eval
    or stage directory) writes the run's metrics.json again."""
    from toolkit.cli import main

    run_dir, metrics = finished_run
    sd = run_dir / "seed-0"
    rows = read_jsonl(sd / "items.jsonl.gz")
    m2_train = {r["id"]: r for r in rows if r["model"] == "M2" and r["split"] == "train"}
    probed = {r["id"]: r for r in read_jsonl(sd / "probe" / "m2-train" / "categories.jsonl")}
    assert {i: (r["category"], r["p_greedy"], r["p_sample"]) for i, r in m2_train.items()} == {
        i: (r["category"], r["p_greedy"], r["p_sample"]) for i, r in probed.items()}
    answers = {r["id"]: (r["answer"], r["correct"]) for r in rows if r["model"] == "one_stage_union" and "answer" in r}
    assert answers == {r["id"]: (r["answer"], r["correct"]) for r in read_jsonl(sd / "eval" / "one_stage_union.jsonl")}
    stages = json.loads((sd / "stages.json").read_text())
    stage2 = json.loads((sd / "stage2" / "train" / "train_summary.json").read_text())
    assert stages["stages"]["stage2"]["exported_step"] == stage2["best_step"] is not None
    assert metrics["seeds"]["0"]["training"]["stage2"]["exported_step"] == stage2["best_step"]

    copy = tmp_path / "committed"
    for name in ("items.jsonl.gz", "stages.json"):
        (copy / "seed-0").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sd / name, copy / "seed-0" / name)
    for name in ("config.json", "metrics.json"):
        shutil.copyfile(run_dir / name, copy / name)
    (copy / "metrics.json").write_text(json.dumps({"run": metrics["run"], "seeds": {}}))  # only its settings
    assert main(["report", str(copy)]) == 0
    assert json.loads((copy / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (copy / "report" / "report.md").exists()


def test_adding_a_seed_to_a_finished_run_redoes_nothing_of_the_old_seeds(finished_run, setup, tmp_path):
    # seed 1 as a copy of seed 0 done up to its evaluations (the resume seam: its markers and outputs),
    # so that only its evaluations and per-item files run; then `seeds: [1]` on the run of seed 0
    run_dir = tmp_path / "run-c"
    shutil.copytree(finished_run[0], run_dir)
    shutil.copytree(run_dir / "seed-0", run_dir / "seed-1")
    for marker in (run_dir / "state").glob("seed0.*.json"):
        step = marker.stem.split(".", 1)[1]
        if not step.startswith(("evaluate_", "provenance")):
            state = json.loads(marker.read_text())
            write_json(run_dir / "state" / f"seed1.{step}.json", {**state, "step": f"seed1.{step}"})
    for done in [run_dir / "seed-1" / "eval", run_dir / "seed-1" / "items.jsonl.gz", run_dir / "seed-1" / "stages.json"]:
        shutil.rmtree(done) if done.is_dir() else done.unlink()
    lines: list[str] = []
    metrics = Pipeline(load_pipeline_config(setup[1], ["seeds=1"]), run_dir, echo=lines.append).run()
    ran = [line.split()[1] for line in lines if line.startswith("[step]")]
    assert ran and all(step.startswith("seed1.") for step in ran), ran
    assert {"seed1.evaluate_M2", "seed1.provenance"} <= set(ran)
    assert json.loads((run_dir / "config.json").read_text())["seeds"] == [0, 1]
    assert list(metrics["seeds"]) == ["0", "1"]
    same = lambda m: {k: v for k, v in m.items() if k != "costs"}  # noqa: E731
    assert same(metrics["seeds"]["1"]) == same(metrics["seeds"]["0"]) == same(finished_run[1]["seeds"]["0"])
    assert metrics["aggregate"]["test accuracy M2"]["seeds"] == 2


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
    # A copy of the finished run with stage 2 and what comes of M2 undone (what came before was already
    # checked to be skipped on a re-run; the controls need only stage 2's step count, which the resumed
    # stage reproduces, so they stay done), then killed in the middle of stage 2 and resumed.
    root, config = setup[:2]
    run_dir = root / "run-b"
    shutil.copytree(finished_run[0], run_dir)
    undone = ("seed0.select_stage2", "seed0.train_stage2", "seed0.probe_m2_train", "seed0.evaluate_M2",
              "seed0.provenance")
    for marker in undone:
        (run_dir / "state" / f"{marker}.json").unlink()
    sd = run_dir / "seed-0"
    for later in [sd / "stage2", sd / "probe" / "m2-train", run_dir / "report"]:
        shutil.rmtree(later)
    for later in [sd / "eval" / "M2.jsonl", sd / "items.jsonl.gz", sd / "stages.json", run_dir / "metrics.json"]:
        later.unlink()

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
