"""RUN_DIR/config.json: the config a run directory was started with. A re-run must compute the same
thing: the settings that change only how a step runs may differ, and a run locked by an older toolkit
still resumes (keys added since read as their defaults, keys removed since decide nothing now).
The seed list is not locked: each seed is an independent repetition, so a re-run with other seeds
adds them (the locked ones stay, first, and are not redone)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from toolkit import config as cfglib
from toolkit.config import ConfigError
from toolkit.io import write_json
from toolkit.train.launch import LaunchConfig

from .config import PipelineConfig

# Settings that change how a step runs, not what it computes: a resumed run may change them
# (the probe's flat actor keys are those of run directories locked before `probe.placement`;
# train.eval_batch_size, of those locked before it moved to train.options).
EXECUTION_KEYS = {"probe": ("placement", "num_actors", "cpus_per_actor", "gpus_per_actor", "ray_address"),
                  "train": tuple(f.name for f in dataclasses.fields(LaunchConfig)) + ("eval_batch_size",
                                                                                       "keep_checkpoints")}
# trainer options that change how a stage runs, not what it computes
EXECUTION_OPTIONS = ("progress", "keep_last_n", "collective_timeout_min", "gpu_wait_s", "gpu_busy_mib",
                     "eval_batch_size")

# trainer options the pipeline derives from other keys (compared there): an older lock may hold its own
DERIVED_OPTIONS = ("max_new_tokens",)  # probe.max_new_tokens


def lock_config(run_dir: Path, cfg: PipelineConfig) -> tuple[int, ...]:
    """Write `cfg` to RUN_DIR/config.json, or refuse (one line) a directory locked with another config.
    Returns the run's seeds: the locked ones, then those of `cfg` not among them."""
    path = run_dir / "config.json"
    current = cfglib.to_dict(cfg)
    if path.exists():
        written = json.loads(path.read_text(encoding="utf-8"))
        current["seeds"] = list(dict.fromkeys([*written.get("seeds", []), *cfg.seeds]))
        new = comparable(current)
        old = _shared_keys(comparable(cfglib.deep_merge(cfglib.to_dict(PipelineConfig()), written)), new)
        if old != new:
            diffs = _diff_keys(old, new)
            raise ConfigError(f"{run_dir} holds a run with another config ({', '.join(diffs[:4])} "
                              f"differ); use another --out")
    write_json(path, current)
    return tuple(current["seeds"])


def comparable(config: dict) -> dict:
    """A config as plain data without the keys that may change on a resumed run."""
    out = json.loads(json.dumps(config))
    for section, keys in EXECUTION_KEYS.items():
        for key in keys:
            out.get(section, {}).pop(key, None)
    for key in EXECUTION_OPTIONS + DERIVED_OPTIONS:
        out.get("train", {}).get("options", {}).pop(key, None)
    out.pop("notes", None)  # a preset's description, not a setting
    out.pop("seeds", None)  # seeds are added, not changed (lock_config)
    return out


def _shared_keys(old: dict, new: dict) -> dict:
    """`old` without the keys `new` does not have (at any depth)."""
    return {k: _shared_keys(v, new[k]) if isinstance(v, dict) and isinstance(new[k], dict) else v
            for k, v in old.items() if k in new}


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
