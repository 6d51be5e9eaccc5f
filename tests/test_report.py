"""The report, from the metrics.json of a real `gradual run` (the committed CPU demo,
benchmarks/results/demo-cpu): what toolkit/report/collect.py writes today must have that file's keys
and shape, and toolkit/report/render.py must turn that file into a report that states its numbers.
A key renamed on either side breaks one of these tests."""
import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from toolkit.doctor import device_description
from toolkit.io import write_json as toolkit_write_json
from toolkit.report import provenance
from toolkit.report.collect import MAIN_MODELS, collect_metrics, recollect
from toolkit.report.render import PAPER_COMPARISON, ReportError, render_report

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "benchmarks" / "results" / "demo-cpu"  # written by `gradual run` (default preset, seed 0)
CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")  # the report's column order


@pytest.fixture(scope="module")
def real_metrics() -> dict:
    return json.loads((DEMO / "metrics.json").read_text())


@pytest.fixture
def demo_run(tmp_path) -> Path:
    """A copy of the demo run's metrics.json, alone in a run directory."""
    shutil.copy(DEMO / "metrics.json", tmp_path / "metrics.json")
    return tmp_path


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def headings(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("#")]


def table_rows(markdown: str) -> set[tuple[str, ...]]:
    return {tuple(c.strip() for c in line.strip("|").split("|")) for line in markdown.splitlines()
            if line.startswith("|")}


class StrictParser(HTMLParser):
    VOID = {"meta", "img", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


# ---------------------------------------------------------------- collect.py writes the demo's schema


def shape(x):
    """Keys all the way down; leaves reduced to their JSON type (a list: the set of its items' shapes)."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return ["list", sorted({json.dumps(shape(v), sort_keys=True) for v in x})]
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


def assert_holds_shape(got, real, where="metrics"):
    """`got` has every key of `real` with a value of the same shape (it may have more keys); a NaN in
    the real file (written before metrics.json became strict JSON) is null in `got`."""
    if isinstance(real, dict):
        assert isinstance(got, dict), where
        for key, value in real.items():
            assert key in got, f"{where}: no {key!r}"
            assert_holds_shape(got[key], value, f"{where}.{key}")
    elif isinstance(real, float) and real != real:
        assert got is None, f"{where}: {got!r} instead of null"
    else:
        assert shape(got) == shape(real), where


def is_subsequence(part: list, whole: list) -> bool:
    rest = iter(whole)
    return all(item in rest for item in part)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def build_run_dir(run_dir: Path, real: dict) -> None:
    """The files `gradual run` leaves for one seed (toolkit/gradual/pipeline.py's layout and the files
    the probe, the trainer and the evaluation write), small, with the demo's names for what depends
    on the data (relations, steps, training-set parts, the categories a stage trains on)."""
    m = real["seeds"]["0"]
    relations = list(m["per_relation"])
    train = [(f"train-{i:02d}", relations[i % len(relations)]) for i in range(2 * len(relations))]
    test = [f"test-{i:02d}" for i in range(12)]
    sd = run_dir / "seed-0"

    def probe(name: str, ids, shift: int) -> list[dict]:
        rows = [{"id": i, "relation": rel, "category": CATEGORIES[(n + shift) % 4]} for n, (i, rel) in enumerate(ids)]
        write_jsonl(sd / "probe" / name / "categories.jsonl", rows)
        return rows

    base = probe("m0-train", train, 0)
    probe("m1-train", train, 1)
    probe("m2-train", train, 3)
    probe("m0-test", [(i, relations[0]) for i in test], 0)
    per_relation = {}
    for rel in relations:
        counts = {c: sum(r["relation"] == rel and r["category"] == c for r in base) for c in CATEGORIES}
        n = sum(counts.values())
        per_relation[rel] = {"items": n, "counts": counts, "fractions": {c: k / n for c, k in counts.items()}}
    write_json(sd / "probe" / "m0-train" / "summary.json", {"items": len(base), "relations": per_relation,
                                                            "dtype": "bfloat16", "dtype_requested": "auto"})
    for k, model in enumerate(("M0", "M1", "M2")):
        write_jsonl(sd / "eval" / f"{model}.jsonl",
                    [{"id": i, "answer": "x", "correct": n % 3 < k} for n, i in enumerate(test)])

    parts: dict[str, dict[str, int]] = {}
    for name, size in m["selection"].items():
        stage, part = name.split(": ", 1)
        parts.setdefault(stage, {})[part] = size
    for stage, sizes in parts.items():
        write_json(sd / stage / "data" / "selection.json", sizes)
    for stage, rows in m["fit_speed"].items():
        if not rows:  # a stage with nothing to train on (skipped) has no training files
            continue
        trained_on = sorted(rows[0]["accuracy_by_category"])
        out = sd / stage / "train"
        write_jsonl(out / "evals.jsonl", [
            {"step": 2 * e, "epoch": float(e), "dev": {"accuracy": 0.25 * e, "count": 4, "by_category": {}},
             "train": {"accuracy": 0.5 * e, "count": 4, "by_category": {c: 0.5 * e for c in trained_on}},
             "best_step": 2 * e, "bad_evals": 0, "stopped_early": False} for e in (1, 2)])
        write_jsonl(out / "losses.jsonl", [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-5, "grad_norm": 1.0,
                                            "tokens": 100, "tokens_per_s": 50.0 * s} for s in (1, 2, 3, 4)])
        write_json(out / "train_summary.json", {"global_step": 4, "epochs_completed": 2, "best_step": 4,
                                                "best_tag": "step000004", "best_dev_accuracy": 0.5,
                                                "stopped_early": False, "seconds": 12.5, "model_dir": str(out / "model")})
    for step in m["costs"]["steps"]:
        summary = {}
        if step.startswith("probe_"):  # the probe step's summary, as the pipeline keeps it
            summary = dict(m["costs"]["probe"][step[len("probe_"):]])
        write_json(run_dir / "state" / f"seed0.{step}.json", {"step": f"seed0.{step}", "wall_s": 2.5, "summary": summary})
    write_json(run_dir / "state" / "data.json", {"step": "data", "wall_s": 0.5,
                                                 "summary": {"items": {"train": len(train), "dev": 0, "test": 12}}})
    provenance.write_seed(run_dir, 0, (), UPGRADE_RULE)  # the pipeline's last step of a seed


def test_collect_writes_the_keys_of_the_real_run(tmp_path, real_metrics):
    build_run_dir(tmp_path, real_metrics)
    run_info = {k: v for k, v in real_metrics["run"].items() if k != "items (train/dev/test)"}
    got = json.loads(json.dumps(collect_metrics(tmp_path, [0], run_info=run_info), allow_nan=False))
    # renamed on purpose (both readings of knowledge acquired): knowledge_acquired is per model, its relative_gain is retained_ratio
    older = json.loads(json.dumps(real_metrics))
    old_acquired = older["seeds"]["0"].pop("knowledge_acquired")
    older["aggregate"].pop("knowledge acquired (relative gain, M2 vs M1)")
    assert_holds_shape(got, older)
    assert "retained ratio M2: HK / HK(M1) - 1 on train items" in got["aggregate"]
    k = got["seeds"]["0"]["knowledge_acquired"]
    assert list(k) == ["M2"]  # no baseline ran; M1 is the denominator, not a row
    counts = got["seeds"]["0"]["categories"]
    assert (k["M2"]["highly_known_M0"], k["M2"]["highly_known_M1"], k["M2"]["highly_known"]) == tuple(
        counts[f"{model} train"]["HighlyKnown"] for model in MAIN_MODELS)
    assert set(old_acquired) - {"relative_gain", "gain", "highly_known_one_stage", "highly_known_two_stage"} == set()
    m = got["seeds"]["0"]  # and from these files, the right numbers
    n_train = 2 * len(real_metrics["seeds"]["0"]["per_relation"])
    assert got["run"]["items (train/dev/test)"] == f"{n_train}/0/12"
    assert got["run"]["probe dtype"] == "bfloat16 (requested auto)"  # what the actors resolved, never "auto"
    assert sum(m["categories"]["M0 train"].values()) == n_train and m["categories"]["M0 test"]["HighlyKnown"] == 3
    assert m["test_accuracy"]["M2"]["overall"]["accuracy"] == pytest.approx(8 / 12)
    assert m["costs"]["train"]["stage1"] == {"tokens_per_s": 125.0, "steps": 4, "wall_s": 12.5, "best_dev_accuracy": 0.5}
    assert m["fit_speed"]["stage1"][1]["epoch"] == 2.0 and m["selection"] == real_metrics["seeds"]["0"]["selection"]
    # the report of what collect wrote has the real run's sections, in order, and the newer ones
    write_json(tmp_path / "metrics.json", got)
    got_headings = headings(render_report(tmp_path)["markdown"].read_text())
    # the demo's accuracy intervals were bootstrap ones; collect.py's now are Wilson intervals
    demo_headings = [h.replace("95% bootstrap interval", "95% Wilson interval")
                     for h in headings((DEMO / "report.md").read_text())]
    assert is_subsequence(demo_headings, got_headings)
    assert "### HighlyKnown training items per model (gain vs the one-stage model M1)" in got_headings
    assert ("probe dtype", "`bfloat16 (requested auto)`") in table_rows((tmp_path / "report" / "report.md").read_text())


# ---------------------------------------------------------------- render.py reports the demo's numbers


def test_report_of_the_real_run_states_its_numbers(demo_run, real_metrics):
    out = render_report(demo_run)
    md = out["markdown"].read_text()
    rows = table_rows(md)
    m = real_metrics["seeds"]["0"]
    assert headings(md) == headings((DEMO / "report.md").read_text())
    assert "## Seed 0" in headings(md)

    assert ("preset", f"`{real_metrics['run']['preset']}`") in rows
    assert ("items (train/dev/test)", f"`{real_metrics['run']['items (train/dev/test)']}`") in rows
    for name, agg in real_metrics["aggregate"].items():  # one seed: no interval (NaN in this older file)
        assert agg["seeds"] == 1
        assert (name, f"{agg['mean']:.4f}", "n/a (1 seed)", "1") in rows
    assert "nan" not in md.lower()
    for probe, counts in m["categories"].items():
        assert (probe, *(str(counts[c]) for c in CATEGORIES), str(sum(counts.values()))) in rows
    for model, acc in m["test_accuracy"].items():
        cells = [f"{pct(a['accuracy'])} [{pct(a['low'])}, {pct(a['high'])}] (n={a['n']})" if a["n"] else "–"
                 for a in (acc["overall"], *(acc[c] for c in CATEGORIES))]
        assert (model, *cells) in rows
    for name, d in m["comparisons"].items():
        significant = "yes" if d["low"] > 0 or d["high"] < 0 else "no"
        assert (name, pct(d["difference"]), f"[{pct(d['low'])}, {pct(d['high'])}]", significant) in rows
    assert ("M2 vs M1 (two stages vs one)", "0.0%", "[0.0%, 0.0%]", "no") in rows  # spelled out once
    k = m["knowledge_acquired"]
    assert (f"HighlyKnown training items: {k['highly_known_one_stage']} after one stage, "
            f"{k['highly_known_two_stage']} after two stages ({k['gain']:+d}, relative gain "
            f"{pct(k['relative_gain'])}") in md
    for model, f in m["forgetting"].items():
        assert (model, str(f["base_highly_known"]), str(f["dropped"]), pct(f["fraction"])) in rows
    for name, size in m["selection"].items():
        assert (name, str(size)) in rows
    for step, seconds in m["costs"]["steps"].items():
        assert (step, f"{seconds:.1f}") in rows
    for name, p in m["costs"]["probe"].items():
        assert (name, f"{p['questions_per_s']:.2f}", f"{p['answers_per_s']:.1f}",
                f"{p['generated_tokens_per_s']:.1f}") in rows
    for name, t in m["costs"]["train"].items():
        assert (name, f"{t['tokens_per_s']:.1f}", str(t["steps"]), f"{t['wall_s']:.1f}") in rows

    # the figures the real run made, each embedded in the self-contained HTML
    assert sorted(f.name for f in out["figures"]) == sorted(p.name for p in (DEMO / "figures").glob("*.png"))
    for fig in out["figures"]:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 5000
    page = out["html"].read_text()
    parser = StrictParser()
    parser.feed(page)
    assert parser.stack == []  # every tag closed
    assert [base64.b64decode(src.split(",", 1)[1]) for src in parser.images] == [f.read_bytes() for f in out["figures"]]
    assert parser.tags.count("table") == len(re.findall(r"^\|---", md, flags=re.M))
    assert "<td>M2 vs M1 (two stages vs one)</td><td>0.0%</td><td>[0.0%, 0.0%]</td><td>no</td>" in page


def test_report_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="metrics.json: not found"):
        render_report(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"run": {}, "seeds": {}}))
    with pytest.raises(ReportError, match="no per-seed metrics"):
        render_report(tmp_path)


# ---------------------------------------------------------------- two seeds, baselines that differ per seed

TRAIN = [f"t{i}" for i in range(10)]
TEST = [f"q{i}" for i in range(4)]


def known(*ids, dropped=()) -> dict[str, str]:
    """A train category table: `ids` HighlyKnown, `dropped` MaybeKnown, the rest Unknown."""
    return {i: "HighlyKnown" if i in ids else "MaybeKnown" if i in dropped else "Unknown" for i in TRAIN}


def write_seed(run_dir: Path, seed: int, train_tables: dict[str, dict], test_correct: dict[str, int],
               dtype: dict | None = None) -> None:
    """The files collect.py reads for one seed: probe/<name>-train tables (m0, m1, m2, baselines),
    probe/m0-test, the base probe's summary.json and eval/<MODEL>.jsonl (the first k test items right)."""
    sd = run_dir / f"seed-{seed}"
    for name, table in train_tables.items():
        write_jsonl(sd / "probe" / f"{name}-train" / "categories.jsonl",
                    [{"id": i, "relation": "r", "category": c} for i, c in table.items()])
    write_jsonl(sd / "probe" / "m0-test" / "categories.jsonl",
                [{"id": q, "relation": "r", "category": CATEGORIES[n % 3]} for n, q in enumerate(TEST)])  # no Unknown
    counts = {c: sum(v == c for v in train_tables["m0"].values()) for c in CATEGORIES}
    write_json(sd / "probe" / "m0-train" / "summary.json", {"items": len(TRAIN), "relations": {
        "r": {"items": len(TRAIN), "counts": counts, "fractions": {c: k / len(TRAIN) for c, k in counts.items()}}},
        **(dtype or {"dtype": "float32"})})  # a probe of an older toolkit: only the dtype it resolved
    for model, k in test_correct.items():
        write_jsonl(sd / "eval" / f"{model}.jsonl", [{"id": q, "answer": "x", "correct": n < k} for n, q in enumerate(TEST)])


TWO_SEED_BASELINES = {0: ("one_stage_longer", "natural"), 1: ("one_stage_longer", "no_replay")}
UPGRADE_RULE = {"from": ["WeaklyKnown", "Unknown"], "to": ["HighlyKnown", "MaybeKnown"]}


@pytest.fixture
def two_seed_run(tmp_path) -> Path:
    """Seed 0 trains one_stage_longer and natural; seed 1 one_stage_longer and no_replay, the latter
    from an older run without a train probe. Base model: t0-t2 HighlyKnown in both seeds."""
    c0 = known("t0", "t1", "t2")
    write_seed(tmp_path, 0, {"m0": c0, "m1": known("t0", "t1", "t2", "t3"), "m2": known(*TRAIN[:6]),
                             "one_stage_longer": known("t0", "t2", "t3", "t4", dropped=("t1",)),
                             "natural": known("t0", "t1", "t2")},
               {"M0": 0, "M1": 1, "M2": 3, "one_stage_longer": 2, "natural": 1})
    write_seed(tmp_path, 1, {"m0": c0, "m1": known("t0", "t1", "t2"), "m2": known(*TRAIN[:7]),
                             "one_stage_longer": known(*TRAIN[:4])},
               {"M0": 0, "M1": 1, "M2": 2, "one_stage_longer": 2, "no_replay": 4},
               dtype={"dtype": "bfloat16", "dtype_requested": "bfloat16"})
    # natural trained on every category: its fit speed per category and epoch
    write_jsonl(tmp_path / "seed-0" / "baseline-natural" / "train" / "evals.jsonl", [
        {"step": e, "epoch": float(e), "dev": {"accuracy": 0.1, "count": 4, "by_category": {}},
         "train": {"accuracy": 0.5, "count": 8, "by_category": {"HighlyKnown": 0.5 + 0.25 * e, "Unknown": 0.1 * e}},
         "best_step": e} for e in (1, 2)])
    for seed, baselines in TWO_SEED_BASELINES.items():
        provenance.write_seed(tmp_path, seed, baselines, UPGRADE_RULE)
    return tmp_path


def test_collect_two_seeds_with_baselines_that_differ_per_seed(two_seed_run):
    metrics = collect_metrics(two_seed_run, [0, 1])
    s0, s1 = metrics["seeds"]["0"], metrics["seeds"]["1"]

    # per seed: baselines' train probes join the categories, forgetting and knowledge
    assert s0["categories"]["natural train"]["HighlyKnown"] == 3 and "natural train" not in s1["categories"]
    assert s0["forgetting"]["one_stage_longer"]["fraction"] == pytest.approx(1 / 3)  # t1 dropped
    assert s0["forgetting"]["natural"]["dropped"] == 0
    assert s0["knowledge"]["M2"] == {"highly_known": 6, "items": 10, "fraction": 0.6,
                                     "low": pytest.approx(0.3127, abs=5e-5), "high": pytest.approx(0.8318, abs=5e-5),
                                     "gain_vs_M1": 2, "gain_fraction_vs_M1": pytest.approx(0.2)}  # Wilson 6/10
    assert s0["knowledge"]["natural"]["gain_vs_M1"] == -1 and s1["knowledge"]["M2"]["gain_vs_M1"] == 4
    assert s0["knowledge"]["one_stage_longer"]["gain_vs_M1"] == 0  # 4 HighlyKnown, as M1
    # paired HighlyKnown indicators over train items: M2 knows t1 and t5 beyond one_stage_longer in seed 0
    assert s0["item_comparisons"]["M2 vs one_stage_longer"]["difference"] == pytest.approx(0.2)
    assert s0["item_comparisons"]["M2 vs M1"]["difference"] == pytest.approx(0.2)
    assert s0["item_comparisons"]["M2 vs natural"]["difference"] == pytest.approx(0.3)
    assert s1["item_comparisons"]["M2 vs one_stage_longer"]["difference"] == pytest.approx(0.3)
    # no train probe for no_replay: test accuracy and its test comparison only
    assert "no_replay" not in s1["knowledge"] and "no_replay" not in s1["forgetting"]
    assert "no_replay" not in s1["knowledge_acquired"]
    assert "M2 vs no_replay" not in s1["item_comparisons"]
    assert s1["comparisons"]["M2 vs no_replay"]["difference"] == pytest.approx(-0.5)
    assert s1["test_accuracy"]["no_replay"]["overall"]["accuracy"] == 1.0
    # acquired gain and retained ratio per model against M0 (3 HighlyKnown) and M1: seed 0's M1 knows 4
    # (acquired 1), seed 1's M1 knows 3 (acquired nothing: no acquired gain in seed 1)
    assert list(s0["knowledge_acquired"]) == ["M2", "one_stage_longer", "natural"]
    assert s0["knowledge_acquired"]["M2"] == {"highly_known_M0": 3, "highly_known_M1": 4, "highly_known": 6,
                                              "acquired_M1": 1, "acquired": 3, "acquired_gain": 2.0,
                                              "retained_ratio": 0.5}
    assert s0["knowledge_acquired"]["one_stage_longer"]["acquired_gain"] == 0.0  # acquired 1, as M1
    assert s0["knowledge_acquired"]["natural"]["acquired_gain"] == -1.0  # acquired nothing
    assert s0["knowledge_acquired"]["natural"]["retained_ratio"] == -0.25  # 3 / 4 - 1
    assert s1["knowledge_acquired"]["M2"]["acquired_gain"] is None
    assert s1["knowledge_acquired"]["M2"]["retained_ratio"] == pytest.approx(7 / 3 - 1)
    # seed 0 probed in float32 (an older probe's summary), seed 1 in bf16, asked for: both named
    assert metrics["run"]["probe dtype"] == "bfloat16, float32"

    # across seeds: averaged over the seeds that have the metric, t interval clipped
    agg = metrics["aggregate"]
    t1 = 12.706  # two seeds: 1 degree of freedom
    gain = agg["knowledge gain vs M1 M2 (fraction of train items)"]  # seeds 0.2 and 0.4
    assert gain["mean"] == pytest.approx(0.3) and gain["seeds"] == 2
    assert gain["low"] == pytest.approx(0.3 - t1 * 0.1) and gain["high"] == 1.0  # clipped to a difference
    acc = agg["test accuracy M2"]  # 3/4 and 2/4: the raw interval [-0.96, 2.21] clipped to [0, 1]
    assert (acc["mean"], acc["low"], acc["high"], acc["seeds"]) == (0.625, 0.0, 1.0, 2)
    assert agg["M2 minus one_stage_longer: HighlyKnown train fraction"]["mean"] == pytest.approx(0.25)
    assert agg["M2 minus one_stage_longer: test accuracy"]["mean"] == pytest.approx(0.125)
    assert agg["knowledge gain vs M1 natural (fraction of train items)"] == {
        "mean": pytest.approx(-0.1), "low": None, "high": None, "seeds": 1}
    assert agg["test accuracy no_replay"] == {"mean": 1.0, "low": None, "high": None, "seeds": 1}
    assert "forgetting no_replay (fraction of base HighlyKnown)" not in agg
    acquired = agg["acquired gain M2: (HK - HK(M0)) / (HK(M1) - HK(M0)) - 1 on train items"]
    assert acquired == {"mean": 2.0, "low": None, "high": None, "seeds": 1}  # seed 1 has none
    retained = agg["retained ratio M2: HK / HK(M1) - 1 on train items"]  # seeds 0.5 and 4/3: not clipped
    assert retained["mean"] == pytest.approx(11 / 12) and retained["low"] == pytest.approx(11 / 12 - t1 * 5 / 12)
    assert retained["high"] == pytest.approx(11 / 12 + t1 * 5 / 12)
    assert "retained ratio M1: HK / HK(M1) - 1 on train items" not in agg

    table = {row["model"]: row for row in metrics["aggregate_table"]}
    assert list(table) == ["M1", "M2", "one_stage_longer", "natural", "no_replay"]
    assert table["M2"]["vs_M2_knowledge"] is None and table["M2"]["knowledge_gain"] == gain
    assert table["M1"]["vs_M2_knowledge"]["mean"] == pytest.approx(0.3)  # seeds 0.2, 0.4
    assert table["natural"]["vs_M2_knowledge"]["seeds"] == 1
    assert table["no_replay"]["knowledge_gain"] is None and table["no_replay"]["forgetting"] is None
    assert table["no_replay"]["vs_M2_test"]["mean"] == pytest.approx(-0.5)
    assert table["M2"]["acquired_gain"] == acquired and table["M2"]["retained_ratio"] == retained
    assert table["M1"]["acquired_gain"] is None and table["no_replay"]["retained_ratio"] is None


def reject_constant(name):
    raise ValueError(f"{name} in metrics.json")


def test_metrics_json_is_strict_json_and_its_report_answers_the_question(two_seed_run):
    metrics = collect_metrics(two_seed_run, [0, 1])
    # no test item is Unknown (an accuracy over 0 items) and natural has one seed (no t interval): null
    toolkit_write_json(two_seed_run / "metrics.json", metrics, strict=True)  # as the pipeline writes it
    text = (two_seed_run / "metrics.json").read_text()
    parsed = json.loads(text, parse_constant=reject_constant)
    assert parsed["aggregate"]["test accuracy natural"]["low"] is None
    assert parsed["seeds"]["0"]["test_accuracy"]["M2"]["Unknown"] == {"accuracy": None, "low": None, "high": None, "n": 0}
    with pytest.raises(ValueError, match="NaN"):  # the check itself catches a NaN
        json.loads('{"x": NaN}', parse_constant=reject_constant)

    md = render_report(two_seed_run)["markdown"].read_text()
    rows = table_rows(md)
    assert headings(md)[1] == "## Does the two-stage schedule acquire more knowledge?"
    assert "nan" not in md.lower()
    # M2: gain 0.2 and 0.4 over seeds, test 0.75 and 0.5
    assert ("M2 (gradual, two stages)", "30.0% [-97.1%, 100.0%]", "62.5% [0.0%, 100.0%]", "0.0% [0.0%, 0.0%]",
            "+200.0% [n/a (1 seed)]", "+91.7% [-437.8%, +621.1%]", "–", "–", "–", "–", "2") in rows
    # which reading the paper's +24% is set against: in the question's section and in each seed's
    question = md.split("## Does the two-stage schedule acquire more knowledge?", 1)[1].split("\n#", 1)[0]
    assert PAPER_COMPARISON in question.splitlines() and md.count(PAPER_COMPARISON) == 3
    # natural ran in seed 0 only: no interval, nothing to call significant
    assert ("natural", "-10.0% [n/a (1 seed)]", "25.0% [n/a (1 seed)]", "0.0% [n/a (1 seed)]",
            "-100.0% [n/a (1 seed)]", "-25.0% [n/a (1 seed)]",
            "30.0% [n/a (1 seed)]", "n/a", "50.0% [n/a (1 seed)]", "n/a", "1") in rows
    # per seed: both metrics for each model, and the Wilson intervals named
    assert ("M2", "3", "4", "6", "+1", "+3", "+200.0%", "+50.0%") in rows
    assert ("M2", "3", "3", "7", "+0", "+4", "n/a", "+133.3%") in rows  # seed 1
    assert "### Test accuracy (exact match, per base-model category, 95% Wilson interval)" in headings(md)
    assert ("M2", "6", "10", "60.0% [31.3%, 83.2%]", "+2", "20.0%") in rows
    assert ("knowledge gain vs M1 natural (fraction of train items)", "-0.1000", "n/a (1 seed)", "1") in rows
    # the train comparison per seed, and natural's fit speed per category (HighlyKnown faster than Unknown)
    assert ("M2 vs natural", "30.0%", "[0.0%, 60.0%]", "no", "10") in rows  # bootstrap seed 0
    assert "### Fit speed: baseline natural (train exact match per epoch and category)" in headings(md)
    assert ("category", "epoch 1", "epoch 2") in rows
    assert ("HighlyKnown", "75.0%", "100.0%") in rows and ("Unknown", "10.0%", "20.0%") in rows


def test_the_report_and_the_run_headline_write_numbers_and_verdicts_alike():
    """One percentage format and one verdict (toolkit/report/format.py) for the report and `gradual run`."""
    from toolkit.gradual.cli import _difference
    from toolkit.report.format import pct, significant
    from toolkit.report.render import _significant

    assert (pct(0.125), pct(-0.1, signed=True), pct(0.0, signed=True)) == ("12.5%", "-10.0%", "+0.0%")
    assert pct(None) == pct(float("nan")) == pct(float("inf")) == "n/a"
    clear_loss = {"difference": -0.1, "low": -0.2, "high": -0.05}
    overlap = {"difference": 0.05, "low": -0.01, "high": 0.2}
    older = {"difference": 0.05, "low": float("nan"), "high": float("nan")}  # NaN in an older metrics.json
    assert (significant(clear_loss), significant(overlap), significant(older), significant(None)) == (True, False, None, None)
    assert [_significant(d) for d in (clear_loss, overlap, older)] == ["yes", "no", "n/a"]
    assert _difference(clear_loss) == "-10.0% [-20.0%, -5.0%] (significant)"
    assert _difference(overlap) == "+5.0% [-1.0%, +20.0%] (not significant)"
    assert _difference(older) == "+5.0% (no interval)"


def test_an_older_multi_seed_metrics_json_still_renders(tmp_path):
    """The committed evidence run (3 seeds, baselines) predates acquired_gain: its flat
    knowledge_acquired and relative gain are reported as they were, without the new columns."""
    evidence = REPO / "benchmarks" / "results" / "evidence-cpu"
    shutil.copy(evidence / "metrics.json", tmp_path / "metrics.json")
    metrics = json.loads((evidence / "metrics.json").read_text())
    md = render_report(tmp_path)["markdown"].read_text()
    assert headings(md) == headings((evidence / "report.md").read_text())
    assert "### Test accuracy (exact match, per base-model category, 95% bootstrap interval)" in headings(md)
    for seed, m in metrics["seeds"].items():
        k = m["knowledge_acquired"]
        assert (f"HighlyKnown training items: {k['highly_known_one_stage']} after one stage, "
                f"{k['highly_known_two_stage']} after two stages ({k['gain']:+d}, relative gain "
                f"{pct(k['relative_gain'])}; the paper reports +24%).") in md.splitlines()
    header = next(line for line in md.splitlines() if line.startswith("| model | knowledge gain vs M1"))
    assert "acquired gain" not in header and PAPER_COMPARISON not in md
    assert "nan" not in md.lower()


def test_the_evidence_table_of_the_docs_is_the_runs_headline_floor_and_seeds(two_seed_run, tmp_path_factory):
    from toolkit.report import reproduce
    from toolkit.report.render import headline_table

    metrics = collect_metrics(two_seed_run, [0, 1])
    for seed, changed in (("0", 7), ("1", 5)):  # this fixture ran no re-probe: a floor of made-up counts
        metrics["seeds"][seed]["noise_floor"] = {"reprobe": {"changed": changed, "upgraded": changed - 4,
                                                             "forgotten": 1, "items": 10}, "models": {}}
    table = reproduce.evidence_table(metrics, "results/evidence")
    assert table.startswith("<!-- evidence-table: results/evidence -->\nFrom `results/evidence/metrics.json` (seeds 0, 1;")
    assert "\n".join(headline_table(metrics["aggregate_table"])) in table
    assert "| M2 (gradual, two stages) |" in table and "| one_stage_longer |" in table
    assert "the category of 7, 5 of 10 train items changed; 3, 1 were \"upgraded\"" in table
    assert "M0 -> M1 -> M2, seed 0: 3 -> 4 -> 6 (stage 2: " in table
    assert "; seed 1: 3 -> 3 -> 7 (stage 2: " in table
    assert "| the rest | 20 | 6 | 7 | 13 |" in table  # no stage parts in this fixture: every item, summed
    root = tmp_path_factory.mktemp("docs")
    write_json(root / "results" / "evidence" / "metrics.json", metrics)
    doc = root / "results.txt"
    doc.write_text("# Evidence\n\n<!-- evidence-table: results/evidence -->\nstale\n<!-- evidence-table:end -->\n\nafter\n")
    assert reproduce.update_generated(doc, root=root) is True
    assert doc.read_text() == f"# Evidence\n\n{table}\n\nafter\n"


# ---------------------------------------------------------------- per-item files: recomputed, merged

def copy_seed(run_dir: Path, seed: int, out: Path, config: dict) -> Path:
    """A run directory holding only `seed`'s per-item files (as a run of that seed alone leaves them)."""
    for name in (provenance.ITEMS_FILE, provenance.STAGES_FILE):
        target = out / f"seed-{seed}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / f"seed-{seed}" / name, target)
    write_json(out / "config.json", {**config, "seeds": [seed]})
    return out


def test_merged_runs_equal_one_run_with_all_seeds(two_seed_run, tmp_path_factory):
    from toolkit.gradual.merge import merge_runs

    root = tmp_path_factory.mktemp("merge")
    config = {"preset": "test", "probe": {"samples": 4}}
    one = collect_metrics(two_seed_run, [0, 1])
    a, b = (copy_seed(two_seed_run, seed, root / f"run-{seed}", config) for seed in (0, 1))
    merged = merge_runs([a, b], root / "merged")
    assert merged["seeds"] == one["seeds"]
    assert merged["aggregate"] == one["aggregate"] and merged["aggregate_table"] == one["aggregate_table"]
    assert json.loads((root / "merged" / "config.json").read_text())["seeds"] == [0, 1]
    assert json.loads((root / "merged" / "metrics.json").read_text())["seeds"] == json.loads(json.dumps(one["seeds"]))


def test_merged_seeds_name_the_devices_they_computed_on(two_seed_run, tmp_path_factory):
    from toolkit.gradual.merge import merge_runs

    stages = json.loads((two_seed_run / "seed-0" / provenance.STAGES_FILE).read_text())
    assert stages["device"] == device_description()  # written with each seed
    root = tmp_path_factory.mktemp("merge-devices")
    config = {"preset": "test", "probe": {"samples": 4}}
    a, b = (copy_seed(two_seed_run, seed, root / f"run-{seed}", config) for seed in (0, 1))
    stages_path = b / "seed-1" / provenance.STAGES_FILE
    stages = json.loads(stages_path.read_text())
    write_json(stages_path, {**stages, "device": "GPU: NVIDIA H100 80GB HBM3 x1"})
    merged = merge_runs([a, b], root / "merged")
    assert merged["run"]["device"] == f"{device_description()}; GPU: NVIDIA H100 80GB HBM3 x1"
    del stages["device"]  # a seed from a toolkit that did not record it: the run's metrics.json says
    write_json(stages_path, stages)
    write_json(root / "merged" / "seed-1" / provenance.STAGES_FILE, stages)
    write_json(root / "merged" / "metrics.json", {"run": {"device": "CPU: elsewhere"}})
    assert recollect(root / "merged")["run"]["device"] == f"{device_description()}; CPU: elsewhere"


@pytest.mark.parametrize("problem", ["other settings", "a seed twice", "no seed", "out not empty"])
def test_merge_refuses_runs_it_cannot_combine_before_writing(two_seed_run, tmp_path_factory, problem):
    from toolkit.config import ConfigError
    from toolkit.gradual.merge import merge_runs

    root = tmp_path_factory.mktemp("merge-refused")
    config = {"preset": "test", "probe": {"samples": 4}}
    a = copy_seed(two_seed_run, 0, root / "a", config)
    b = copy_seed(two_seed_run, 1, root / "b", config)
    out = root / "out"
    if problem == "other settings":
        write_json(b / "config.json", {**config, "probe": {"samples": 8}, "seeds": [1]})
    elif problem == "a seed twice":
        b = copy_seed(two_seed_run, 0, root / "b2", config)
    elif problem == "no seed":
        shutil.rmtree(b / "seed-1")
    else:
        write_json(out / "note.json", {})
    match = {"other settings": "other settings", "a seed twice": "seed 0 is also in", "no seed": "no finished seed",
             "out not empty": "not empty"}[problem]
    with pytest.raises(ConfigError, match=match):
        merge_runs([a, b], out)
    assert not (out / "metrics.json").exists() and not list(out.glob("seed-*"))


def test_the_committed_evidence_result_is_recomputed_from_its_per_item_files(tmp_path):
    """benchmarks/results/evidence-cpu-v2 commits every seed's per-item files: `gradual report` on a
    copy recomputes its metrics.json from them alone."""
    committed = REPO / "benchmarks" / "results" / "evidence-cpu-v2"
    shutil.copytree(committed, tmp_path / "run", ignore=shutil.ignore_patterns("report", "README.md"))
    metrics = json.loads((committed / "metrics.json").read_text())
    assert len(metrics["seeds"]) >= 7 and provenance.has_provenance(tmp_path / "run" / "seed-6")
    assert json.loads(json.dumps(recollect(tmp_path / "run"), allow_nan=False)) == metrics
