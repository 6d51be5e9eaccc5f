"""Per-item provenance of one seed of a run: two compact files from which every number of its
metrics.json is recomputed (collect.py reads nothing else of a seed), small enough to commit with a
result and to merge with other runs' seeds.

RUN_DIR/seed-<s>/items.jsonl.gz   one row per (model, split, item), sorted:
    {"model", "split", "id", "relation"}, + {"category", "p_greedy", "p_sample"} where the model was
    probed on that split, + {"answer", "correct"} where it was evaluated (test).
    model: M0, M1, M2, a baseline's name, or REPROBE (M0 probed again under another probe seed: the
    noise floor).
RUN_DIR/seed-<s>/stages.json      {"code": git commit, "device": where it computed, "baselines": [names], "upgrade_rule": {"from": [...], "to": [...]},
    "stages": {stage: {"parts": {part: [ids]}, "steps", "exported_step", "best_dev_accuracy",
                       "skipped", "fit_speed": [...], "costs": {...} | null}},
    "costs": {"steps": {step: seconds}, "probe": {probe: {...}}}}
    stage: "stage1", "stage2", "baseline <name>"; exported_step: the optimizer step whose weights the
    stage exported (its best dev step).

Written by the pipeline when a seed's last step is done (from its probe, eval and stage directories);
read by collect.py.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from toolkit.io import read_jsonl, write_json, write_jsonl

ITEMS_FILE, STAGES_FILE = "items.jsonl.gz", "stages.json"
REPROBE = "M0 reprobe"
# probe directory names (seed-<s>/probe/<name>-<split>) of the main models and the noise floor
PROBE_NAMES = {"m0": "M0", "m1": "M1", "m2": "M2", "m0_reprobe": REPROBE}
PROBE_FIELDS = ("category", "p_greedy", "p_sample")


@dataclass(frozen=True)
class SeedRecord:
    """One seed's provenance, read back."""
    categories: dict[tuple[str, str], dict[str, str]]  # (model, split) -> item id -> category
    correct: dict[str, dict[str, bool]]  # model -> test item id -> exact match
    relations: dict[str, str]  # item id -> relation
    stages: dict  # stages.json

    def table(self, model: str, split: str = "train") -> dict[str, str] | None:
        return self.categories.get((model, split))


def has_provenance(seed_dir: Path) -> bool:
    return (seed_dir / ITEMS_FILE).is_file() and (seed_dir / STAGES_FILE).is_file()


def read_seed(seed_dir: str | Path) -> SeedRecord:
    seed_dir = Path(seed_dir)
    categories: dict[tuple[str, str], dict[str, str]] = {}
    correct: dict[str, dict[str, bool]] = {}
    relations: dict[str, str] = {}
    for row in read_jsonl(seed_dir / ITEMS_FILE):
        relations[row["id"]] = row["relation"]
        if "category" in row:
            categories.setdefault((row["model"], row["split"]), {})[row["id"]] = row["category"]
        if "correct" in row:
            correct.setdefault(row["model"], {})[row["id"]] = bool(row["correct"])
    stages = json.loads((seed_dir / STAGES_FILE).read_text(encoding="utf-8"))
    return SeedRecord(categories, correct, relations, stages)


# ---------------------------------------------------------------- writing, from a run directory

def write_seed(run_dir: str | Path, seed: int, baselines: list[str] | tuple[str, ...],
               upgrade_rule: dict[str, list[str]]) -> dict:
    """Write seed-<seed>/items.jsonl.gz and stages.json from the seed's probe, eval and stage
    directories and its state markers. `upgrade_rule`: the selection's upgraded_from / upgraded_to."""
    run_dir = Path(run_dir)
    sd = run_dir / f"seed-{seed}"
    rows: dict[tuple[str, str, str], dict] = {}
    relations: dict[str, str] = {}  # every test item is probed with M0 (the report's base categories)

    def row(model: str, split: str, item_id: str) -> dict:
        return rows.setdefault((model, split, item_id), {"model": model, "split": split, "id": item_id,
                                                         "relation": relations.get(item_id)})

    for probe_dir in sorted((sd / "probe").iterdir()):
        name, split = probe_dir.name.rsplit("-", 1)
        for r in read_jsonl(probe_dir / "categories.jsonl"):
            relations[r["id"]] = r.get("relation")
            row(PROBE_NAMES.get(name, name), split, r["id"]).update({k: r.get(k) for k in PROBE_FIELDS})
    for path in sorted((sd / "eval").glob("*.jsonl")):
        for r in read_jsonl(path):
            row(path.stem, "test", r["id"]).update(answer=r["answer"], correct=bool(r["correct"]))
    write_jsonl(sd / ITEMS_FILE, [rows[key] for key in sorted(rows)])

    stage_dirs = {"stage1": sd / "stage1", "stage2": sd / "stage2",
                  **{f"baseline {b}": sd / f"baseline-{b}" for b in baselines}}
    from toolkit.doctor import device_description

    stages = {"code": code_version(), "device": device_description(), "baselines": list(baselines),
              "upgrade_rule": {k: list(v) for k, v in upgrade_rule.items()},
              "stages": {stage: _stage(d) for stage, d in stage_dirs.items()},
              "costs": _step_costs(run_dir, seed)}
    write_json(sd / STAGES_FILE, stages, strict=True)
    return {"rows": len(rows), "stages": len(stage_dirs)}


def code_version() -> str | None:
    """The toolkit's git commit (with "+changes" when its tree differs), None outside a checkout: a
    seed added to a run weeks later says which code computed it."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def _stage(stage_dir: Path) -> dict:
    data, train = stage_dir / "data", stage_dir / "train"
    parts_path, sizes_path = data / "parts.json", data / "selection.json"
    parts = json.loads(parts_path.read_text(encoding="utf-8")) if parts_path.exists() else {}
    sizes = json.loads(sizes_path.read_text(encoding="utf-8")) if sizes_path.exists() else {}
    summary_path = train / "train_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    return {"parts": parts, "sizes": sizes, "skipped": summary is None,
            "steps": summary["global_step"] if summary else 0,
            "exported_step": summary.get("best_step") if summary else None,
            "best_dev_accuracy": summary.get("best_dev_accuracy") if summary else None,
            "fit_speed": _fit_speed(train), "costs": _train_costs(train, summary)}


def _fit_speed(train_dir: Path) -> list[dict]:
    evals = train_dir / "evals.jsonl"
    if not evals.exists():
        return []
    return [{"epoch": round(row["epoch"], 3), "accuracy_by_category": row["train"]["by_category"]}
            for row in read_jsonl(evals) if row.get("train")]


def _train_costs(train_dir: Path, summary: dict | None) -> dict | None:
    if summary is None:
        return None
    rates = [row["tokens_per_s"] for row in read_jsonl(train_dir / "losses.jsonl") if row.get("tokens_per_s")]
    return {"tokens_per_s": sum(rates) / len(rates) if rates else 0.0, "steps": summary["global_step"],
            "wall_s": summary["seconds"], "best_dev_accuracy": summary["best_dev_accuracy"]}


def _step_costs(run_dir: Path, seed: int) -> dict:
    """Wall time of each of the seed's steps, and each probe's throughput (its step's summary)."""
    costs: dict[str, dict] = {"steps": {}, "probe": {}}
    for marker in sorted((run_dir / "state").glob(f"seed{seed}.*.json")):
        state = json.loads(marker.read_text(encoding="utf-8"))
        step = state["step"].split(".", 1)[1]
        costs["steps"][step] = state["wall_s"]
        if step.startswith("probe_") and "answers_per_s" in state["summary"]:
            costs["probe"][step[len("probe_"):]] = state["summary"]
    return costs
