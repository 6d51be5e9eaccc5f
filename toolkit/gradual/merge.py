"""`gradual report --merge RUN_DIR ... --out DIR`: runs of the same settings with different seeds (run
separately, on other machines or days) combined into one result, as if one run had had all their seeds.
Only the seeds' per-item files are copied (toolkit/report/provenance.py); metrics.json is computed from
them again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from toolkit.config import ConfigError
from toolkit.io import write_json
from toolkit.report.collect import recollect, run_seeds
from toolkit.report.provenance import ITEMS_FILE, STAGES_FILE

from .lock import comparable


def merge_runs(run_dirs: list[Path], out: Path) -> dict:
    """Copy every run's seeds into `out` (its config.json: the runs' config with all their seeds) and
    write out/metrics.json. Refused, before anything is written, when the runs' settings differ, a
    seed is in two runs, or a run has no finished seed."""
    configs, seeds_of = [], {}
    for run_dir in run_dirs:
        path = run_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (not a `gradual run` directory)")
        configs.append(json.loads(path.read_text(encoding="utf-8")))
        seeds = run_seeds(run_dir)
        if not seeds:
            raise ConfigError(f"{run_dir}: no finished seed (seed-<s>/{ITEMS_FILE})")
        for seed in seeds:
            if seed in seeds_of:
                raise ConfigError(f"{run_dir}: seed {seed} is also in {seeds_of[seed]}")
            seeds_of[seed] = run_dir
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        if comparable(config) != comparable(configs[0]):
            raise ConfigError(f"{run_dir}/config.json: other settings than {run_dirs[0]}/config.json")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty")
    for seed, run_dir in seeds_of.items():
        for name in (ITEMS_FILE, STAGES_FILE):
            target = out / f"seed-{seed}" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / f"seed-{seed}" / name, target)
    first = run_dirs[0] / "metrics.json"
    if first.exists():  # the run's settings, as its report shows them
        shutil.copyfile(first, out / "metrics.json")
    write_json(out / "config.json", {**configs[0], "seeds": list(seeds_of)})
    metrics = recollect(out)
    write_json(out / "metrics.json", metrics, strict=True)
    return metrics
