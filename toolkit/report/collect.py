"""Assemble metrics.json from a finished run directory (the layout in toolkit/gradual/pipeline.py).
Reads files only: the report never reaches back into the pipeline's code."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

from . import metrics as M
from .provenance import ITEMS_FILE, REPROBE, STAGES_FILE, SeedRecord, has_provenance, read_seed

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
    # counts of train items: the re-probed base model's upgrades are the floor (noise_floor)
    "upgraded_above_floor": (None, "upgraded above the probe-noise floor {m} (train items)"),
}
# the floor itself (M0 re-probed under another probe seed), averaged over seeds in `aggregate`
FLOOR_AGGREGATE = {"upgraded": "noise floor: items upgraded by re-probing M0 alone",
                   "forgotten": "noise floor: base HighlyKnown items forgotten by re-probing M0 alone",
                   "changed": "noise floor: items whose category re-probing M0 changed"}
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


def _state(run_dir: Path, name: str) -> dict | None:
    path = run_dir / "state" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def per_relation_fractions(categories: dict[str, str], relations: dict[str, str]) -> dict[str, dict[str, float]]:
    """Category fractions per relation (the base model's train probe, as its summary.json has them)."""
    by_relation: dict[str, list[str]] = {}
    for item_id, category in categories.items():
        by_relation.setdefault(relations[item_id], []).append(category)
    return {rel: {c: n / len(cats) for c, n in M.category_counts(dict(enumerate(cats))).items()}
            for rel, cats in sorted(by_relation.items())}


def seed_metrics(record: SeedRecord) -> dict:
    """One seed's metrics from its provenance (provenance.py): nothing else of the run is read."""
    baselines = record.stages["baselines"]
    c0, c1, c2 = (record.table(m) for m in MAIN_MODELS)
    test_c0 = record.table("M0", "test")
    correct = {name: record.correct[name] for name in (*MAIN_MODELS, *baselines)}
    # runs from before baselines were probed have no train probe for them: test accuracy only
    probed = {b: record.table(b) for b in baselines if record.table(b) is not None}
    train_tables = {"M1": c1, "M2": c2, **probed}
    # M1 against itself is 0 by definition: M2 and the baselines only
    acquired = {name: M.knowledge_acquired(c0, c1, table) for name, table in train_tables.items() if name != "M1"}

    comparisons = {M2_VS_M1_TEST: M.paired_difference(correct["M2"], correct["M1"]),
                   "M1 vs M0": M.paired_difference(correct["M1"], correct["M0"])}
    for name in baselines:
        comparisons[f"M2 vs {name}"] = M.paired_difference(correct["M2"], correct[name])
    item_comparisons = {f"M2 vs {name}": M.knowledge_difference(c2, table)
                        for name, table in train_tables.items() if name != "M2"}

    stages = record.stages["stages"]
    selection = {f"{stage}: {part}": n for stage, s in stages.items() for part, n in s["sizes"].items()}
    costs = {**record.stages["costs"], "train": {stage: s["costs"] for stage, s in stages.items() if s["costs"]}}
    training = {stage: {k: s[k] for k in ("steps", "exported_step", "best_dev_accuracy", "skipped")}
                for stage, s in stages.items()}
    out = {
        "categories": {"M0 train": M.category_counts(c0), "M1 train": M.category_counts(c1),
                       "M2 train": M.category_counts(c2), "M0 test": M.category_counts(test_c0),
                       **{f"{b} train": M.category_counts(table) for b, table in probed.items()}},
        "per_relation": per_relation_fractions(c0, record.relations),
        "transitions": {"C0 -> C1": M.transition_matrix(c0, c1), "C1 -> C2": M.transition_matrix(c1, c2),
                        "C0 -> C2": M.transition_matrix(c0, c2)},
        "knowledge_acquired": acquired,
        "forgetting": {name: M.forgetting(c0, table) for name, table in train_tables.items()},
        "knowledge": {name: M.knowledge(table, c1) for name, table in train_tables.items()},
        "test_accuracy": {name: M.accuracy_by_category(c, test_c0) for name, c in correct.items()},
        "comparisons": comparisons,
        "item_comparisons": item_comparisons,
        "fit_speed": {stage: s["fit_speed"] for stage, s in stages.items()},
        "selection": selection,
        "training": training,
        "costs": costs,
    }
    out["knowledge_by_group"] = M.highly_known_by_group(trained_groups(stages, c0), {"M0": c0, **train_tables})
    if (reprobe := record.table(REPROBE)) is not None:
        rule = record.stages["upgrade_rule"]
        out["noise_floor"] = M.noise_floor(c0, reprobe, train_tables, rule["from"], rule["to"])
    return out


def trained_groups(stages: dict, items: Collection[str]) -> dict[str, list[str]]:
    """The item sets the stages and controls trained on ("stage2: upgraded", "baseline random_same_pool:
    random (same pool)", ...), each set once, the stages' first: a control reusing a stage's set (its
    replay, stage 1's items) is left out, and so is a control trained on every item (natural)."""
    groups: dict[str, list[str]] = {}
    seen: set[frozenset] = {frozenset(items)}
    for stage in sorted(stages, key=lambda name: (name.startswith("baseline"), name)):
        for part, ids in stages[stage]["parts"].items():
            if ids and (key := frozenset(ids)) not in seen:
                seen.add(key)
                groups[f"{stage}: {part}"] = sorted(ids)
    return groups


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
             "retained_ratio": ("knowledge_acquired", model, "retained_ratio"),
             "upgraded_above_floor": ("noise_floor", "models", model, "upgraded_above_floor")}
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
    for key, name in FLOOR_AGGREGATE.items():
        stat = M.mean_over_seeds([_lookup(m, ("noise_floor", "reprobe", key)) for m in per_seed.values()])
        if stat["seeds"]:
            aggregate[name] = stat
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


def collect_metrics(run_dir: str | Path, seeds: Sequence[int], run_info: dict | None = None) -> dict:
    """metrics.json's content (json_safe: no NaN) from the per-item files of `seeds` (provenance.py);
    `run_info`: the run's settings, completed from the run directory where it has them (the data
    step's item counts, the dtype the probes resolved) and with the devices its seeds ran on (each
    seed's stages.json; for a seed that does not record one, the device `run_info` names, else this
    machine's, toolkit.doctor.device_description)."""
    run_dir = Path(run_dir)
    records = {s: read_seed(run_dir / f"seed-{s}") for s in seeds}
    per_seed = {str(s): seed_metrics(record) for s, record in records.items()}
    all_baselines = list(dict.fromkeys(b for r in records.values() for b in r.stages["baselines"]))
    aggregate, table = aggregate_metrics(per_seed, [*MAIN_MODELS, *all_baselines])
    data_state = _state(run_dir, "data")
    info = dict(run_info or {})
    if data_state:
        info["items (train/dev/test)"] = "/".join(str(data_state["summary"]["items"][s]) for s in ("train", "dev", "test"))
    if dtype := probe_dtype(run_dir):
        info["probe dtype"] = dtype
    if "device" not in info:
        from toolkit.doctor import device_description

        info["device"] = device_description()
    # merged runs may have computed on several machines: every seed's own device, once
    info["device"] = "; ".join(dict.fromkeys(r.stages.get("device") or info["device"] for r in records.values()))
    return json_safe({"run": info, "intervals": INTERVALS, "seeds": per_seed, "aggregate": aggregate,
                      "aggregate_table": table})


def run_seeds(run_dir: Path) -> list[int]:
    """The seeds of a run directory whose provenance is written, in the order of its config.json's
    `seeds` (seed directories it does not list follow, sorted)."""
    config = run_dir / "config.json"
    listed = json.loads(config.read_text(encoding="utf-8")).get("seeds", []) if config.exists() else []
    found = sorted(int(d.name.split("-", 1)[1]) for d in run_dir.glob("seed-*") if has_provenance(d))
    return [s for s in listed if s in found] + [s for s in found if s not in listed]


def recollect(run_dir: str | Path) -> dict:
    """metrics.json recomputed from the per-item files of every seed (`gradual report`): the run's
    settings are kept from the metrics.json there, its seeds are the ones found."""
    run_dir = Path(run_dir)
    seeds = run_seeds(run_dir)
    if not seeds:
        raise FileNotFoundError(f"{run_dir}: no seed-<s>/{ITEMS_FILE} with {STAGES_FILE}")
    old = run_dir / "metrics.json"
    info = json.loads(old.read_text(encoding="utf-8")).get("run", {}) if old.exists() else {}
    info.setdefault("device", "not recorded")  # not this machine's: the run may have computed elsewhere
    if "seeds" in info:
        info["seeds"] = seeds
    return collect_metrics(run_dir, seeds, run_info=info)
