"""Assemble metrics.json from a finished run directory (the layout in toolkit/gradual/pipeline.py).
Reads files only: the report never reaches back into the pipeline's code."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from toolkit.io import read_jsonl

from . import metrics as M

MAIN_MODELS = ("M0", "M1", "M2")


def _categories(probe_dir: Path) -> dict[str, str]:
    return {row["id"]: row["category"] for row in read_jsonl(probe_dir / "categories.jsonl")}


def _state(run_dir: Path, name: str) -> dict | None:
    path = run_dir / "state" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _fit_speed(train_dir: Path) -> list[dict]:
    evals = train_dir / "evals.jsonl"
    if not evals.exists():
        return []
    return [{"epoch": round(row["epoch"], 3), "accuracy_by_category": row["train"]["by_category"]}
            for row in read_jsonl(evals) if row.get("train")]


def _train_costs(train_dir: Path) -> dict | None:
    summary_path = train_dir / "train_summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    rates = [row["tokens_per_s"] for row in read_jsonl(train_dir / "losses.jsonl") if row.get("tokens_per_s")]
    return {"tokens_per_s": sum(rates) / len(rates) if rates else 0.0, "steps": summary["global_step"],
            "wall_s": summary["seconds"], "best_dev_accuracy": summary["best_dev_accuracy"]}


def seed_metrics(run_dir: Path, seed: int, baselines: Sequence[str]) -> dict:
    sd = run_dir / f"seed-{seed}"
    c0, c1, c2 = (_categories(sd / "probe" / f"{m}-train") for m in ("m0", "m1", "m2"))
    test_c0 = _categories(sd / "probe" / "m0-test")
    correct = {}
    for name in (*MAIN_MODELS, *baselines):
        correct[name] = {r["id"]: r["correct"] for r in read_jsonl(sd / "eval" / f"{name}.jsonl")}
    relations = json.loads((sd / "probe" / "m0-train" / "summary.json").read_text(encoding="utf-8"))["relations"]

    comparisons = {"M2 vs M1 (two stages vs one)": M.paired_difference(correct["M2"], correct["M1"]),
                   "M1 vs M0": M.paired_difference(correct["M1"], correct["M0"])}
    for name in baselines:
        comparisons[f"M2 vs {name}"] = M.paired_difference(correct["M2"], correct[name])

    stage_dirs = {"stage1": sd / "stage1", "stage2": sd / "stage2",
                  **{f"baseline {b}": sd / f"baseline-{b}" for b in baselines}}
    selection = {}
    for stage, d in stage_dirs.items():
        sel = d / "data" / "selection.json"
        if sel.exists():
            for part, n in json.loads(sel.read_text(encoding="utf-8")).items():
                selection[f"{stage}: {part}"] = n
    costs = {"steps": {}, "probe": {}, "train": {}}
    for marker in sorted((run_dir / "state").glob(f"seed{seed}.*.json")):
        state = json.loads(marker.read_text(encoding="utf-8"))
        step = state["step"].split(".", 1)[1]
        costs["steps"][step] = state["wall_s"]
        if step.startswith("probe_") and "answers_per_s" in state["summary"]:
            costs["probe"][step[len("probe_"):]] = state["summary"]
    for stage, d in stage_dirs.items():
        if (c := _train_costs(d / "train")) is not None:
            costs["train"][stage] = c

    return {
        "categories": {"M0 train": M.category_counts(c0), "M1 train": M.category_counts(c1),
                       "M2 train": M.category_counts(c2), "M0 test": M.category_counts(test_c0)},
        "per_relation": {rel: r["fractions"] for rel, r in relations.items()},
        "transitions": {"C0 -> C1": M.transition_matrix(c0, c1), "C1 -> C2": M.transition_matrix(c1, c2),
                        "C0 -> C2": M.transition_matrix(c0, c2)},
        "knowledge_acquired": M.knowledge_acquired(c1, c2),
        "forgetting": {"M1": M.forgetting(c0, c1), "M2": M.forgetting(c0, c2)},
        "test_accuracy": {name: M.accuracy_by_category(c, test_c0, seed=seed) for name, c in correct.items()},
        "comparisons": comparisons,
        "fit_speed": {stage: _fit_speed(d / "train") for stage, d in stage_dirs.items()},
        "selection": selection,
        "costs": costs,
    }


def collect_metrics(run_dir: str | Path, seeds: Sequence[int], baselines: Sequence[str] = (),
                    run_info: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    per_seed = {str(s): seed_metrics(run_dir, s, baselines) for s in seeds}
    aggregate = {}
    for name in (*MAIN_MODELS, *baselines):
        aggregate[f"test accuracy {name}"] = M.mean_over_seeds(
            [m["test_accuracy"][name]["overall"]["accuracy"] for m in per_seed.values()])
    aggregate["knowledge acquired (relative gain, M2 vs M1)"] = M.mean_over_seeds(
        [m["knowledge_acquired"]["relative_gain"] for m in per_seed.values()])
    aggregate["forgetting M2 (fraction of base HighlyKnown)"] = M.mean_over_seeds(
        [m["forgetting"]["M2"]["fraction"] for m in per_seed.values()])
    data_state = _state(run_dir, "data")
    info = dict(run_info or {})
    if data_state:
        info["items (train/dev/test)"] = "/".join(str(data_state["summary"]["items"][s]) for s in ("train", "dev", "test"))
    return {"run": info, "seeds": per_seed, "aggregate": aggregate}
