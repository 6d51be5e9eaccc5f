"""Assemble metrics.json from a finished run directory (the layout in toolkit/gradual/pipeline.py).
Reads files only: the report never reaches back into the pipeline's code."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from toolkit.io import read_jsonl

from . import metrics as M

MAIN_MODELS = ("M0", "M1", "M2")
# The headline table's columns, each a mean over seeds: (where its interval may lie, readable name
# of the same number in `aggregate`).
HEADLINE = {
    "knowledge_gain": (M.DIFFERENCE, "knowledge gain vs M1 {m} (fraction of train items)"),
    "test_accuracy": (M.PROPORTION, "test accuracy {m}"),
    "forgetting": (M.PROPORTION, "forgetting {m} (fraction of base HighlyKnown)"),
    "vs_M2_knowledge": (M.DIFFERENCE, "M2 minus {m}: HighlyKnown train fraction"),
    "vs_M2_test": (M.DIFFERENCE, "M2 minus {m}: test accuracy"),
    # ratios of counts minus 1: no bound
    "acquired_gain": (None, "acquired gain {m}: (HK - HK(M0)) / (HK(M1) - HK(M0)) - 1 on train items"),
    "retained_ratio": (None, "retained ratio {m}: HK / HK(M1) - 1 on train items"),
}
# Which interval each kind of number carries (metrics.py: wilson_interval, paired_difference,
# mean_over_seeds); the report names them. Files without this key gave proportions a bootstrap.
INTERVALS = {"proportion": "Wilson", "paired difference": "paired bootstrap", "across seeds": "Student t"}
# the test comparison of M2 with M1 has kept its longer name (the demo's metrics.json)
M2_VS_M1_TEST = "M2 vs M1 (two stages vs one)"


def json_safe(obj):
    """A copy of `obj` with every NaN or infinity replaced by None (and numpy scalars made plain),
    so a strict JSON writer accepts it."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def baselines_of_seed(baselines: Sequence[str] | Mapping[int, Sequence[str]], seed: int) -> tuple[str, ...]:
    """`baselines` is one list for every seed, or a list per seed (a costly one may run in one seed)."""
    if isinstance(baselines, Mapping):
        # a mapping read back from JSON has string keys
        return tuple(baselines.get(seed, baselines.get(str(seed), ())))
    return tuple(baselines)


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
    # runs from before baselines were probed have no train probe for them: test accuracy only
    probed = {b: _categories(sd / "probe" / f"{b}-train") for b in baselines
              if (sd / "probe" / f"{b}-train" / "categories.jsonl").exists()}
    train_tables = {"M1": c1, "M2": c2, **probed}
    # M1 against itself is 0 by definition: M2 and the baselines only
    acquired = {name: M.knowledge_acquired(c0, c1, table) for name, table in train_tables.items() if name != "M1"}

    comparisons = {M2_VS_M1_TEST: M.paired_difference(correct["M2"], correct["M1"]),
                   "M1 vs M0": M.paired_difference(correct["M1"], correct["M0"])}
    for name in baselines:
        comparisons[f"M2 vs {name}"] = M.paired_difference(correct["M2"], correct[name])
    item_comparisons = {f"M2 vs {name}": M.knowledge_difference(c2, table)
                        for name, table in train_tables.items() if name != "M2"}

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
                       "M2 train": M.category_counts(c2), "M0 test": M.category_counts(test_c0),
                       **{f"{b} train": M.category_counts(table) for b, table in probed.items()}},
        "per_relation": {rel: r["fractions"] for rel, r in relations.items()},
        "transitions": {"C0 -> C1": M.transition_matrix(c0, c1), "C1 -> C2": M.transition_matrix(c1, c2),
                        "C0 -> C2": M.transition_matrix(c0, c2)},
        "knowledge_acquired": acquired,
        "forgetting": {name: M.forgetting(c0, table) for name, table in train_tables.items()},
        "knowledge": {name: M.knowledge(table, c1) for name, table in train_tables.items()},
        "test_accuracy": {name: M.accuracy_by_category(c, test_c0) for name, c in correct.items()},
        "comparisons": comparisons,
        "item_comparisons": item_comparisons,
        "fit_speed": {stage: _fit_speed(d / "train") for stage, d in stage_dirs.items()},
        "selection": selection,
        "costs": costs,
    }


def _lookup(tree: dict, path: Sequence[str]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def headline_value(seed: dict, key: str, model: str):
    """One headline number of one model in one seed's metrics (None where that seed lacks it)."""
    test_comparison = M2_VS_M1_TEST if model == "M1" else f"M2 vs {model}"
    paths = {"knowledge_gain": ("knowledge", model, "gain_fraction_vs_M1"),
             "test_accuracy": ("test_accuracy", model, "overall", "accuracy"),
             "forgetting": ("forgetting", model, "fraction"),
             "vs_M2_knowledge": ("item_comparisons", f"M2 vs {model}", "difference"),
             "vs_M2_test": ("comparisons", test_comparison, "difference"),
             "acquired_gain": ("knowledge_acquired", model, "acquired_gain"),
             "retained_ratio": ("knowledge_acquired", model, "retained_ratio")}
    return _lookup(seed, paths[key])


def model_over_seeds(per_seed: dict[str, dict], model: str) -> dict[str, dict | None]:
    """The headline numbers of one model, each averaged over the seeds that have it (None: no seed has it)."""
    stats = {}
    for key, (bounds, _) in HEADLINE.items():
        stat = M.mean_over_seeds([headline_value(m, key, model) for m in per_seed.values()], bounds)
        stats[key] = stat if stat["seeds"] else None
    return stats


def aggregate_metrics(per_seed: dict[str, dict], models: Sequence[str]) -> tuple[dict, list[dict]]:
    """(readable name -> mean over seeds, headline table rows for M1, M2 and the baselines)."""
    stats = {model: model_over_seeds(per_seed, model) for model in models}
    aggregate = {}
    for model in models:
        for key, (_, name) in HEADLINE.items():
            if stats[model][key] is not None:
                aggregate[name.format(m=model)] = stats[model][key]
    table = [{"model": model, **stats[model]} for model in models if model != "M0"]
    return aggregate, table


def probe_dtype(run_dir: Path) -> str | None:
    """The dtype the run's probes answered in, as their actors resolved it (each probe's summary.json;
    "auto" is never shown: the request is named beside what it resolved to). None: no probe yet."""
    summaries = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(run_dir.glob("seed-*/probe/*/summary.json"))]
    if not summaries:
        return None
    resolved = sorted({s["dtype"] for s in summaries})
    requested = sorted({s.get("dtype_requested", s["dtype"]) for s in summaries})  # older probes: as resolved
    return ", ".join(resolved) + ("" if requested == resolved else f" (requested {', '.join(requested)})")


def collect_metrics(run_dir: str | Path, seeds: Sequence[int],
                    baselines: Sequence[str] | Mapping[int, Sequence[str]] = (),
                    run_info: dict | None = None) -> dict:
    """metrics.json's content (json_safe: no NaN). `baselines`: the same names for every seed, or
    a mapping seed -> names."""
    run_dir = Path(run_dir)
    per_seed = {str(s): seed_metrics(run_dir, s, baselines_of_seed(baselines, s)) for s in seeds}
    all_baselines = list(dict.fromkeys(b for s in seeds for b in baselines_of_seed(baselines, s)))
    aggregate, table = aggregate_metrics(per_seed, [*MAIN_MODELS, *all_baselines])
    data_state = _state(run_dir, "data")
    info = dict(run_info or {})
    if data_state:
        info["items (train/dev/test)"] = "/".join(str(data_state["summary"]["items"][s]) for s in ("train", "dev", "test"))
    if dtype := probe_dtype(run_dir):
        info["probe dtype"] = dtype
    return json_safe({"run": info, "intervals": INTERVALS, "seeds": per_seed, "aggregate": aggregate,
                      "aggregate_table": table})
