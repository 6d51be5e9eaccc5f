"""The pipeline's typed config (`gradual run CONFIG.yaml --set section.key=value`), its presets, and
the validation that happens once, before any step runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from toolkit import config as cfglib
from toolkit.config import ConfigError, FieldError, config_fields, knob, require
from toolkit.probe.pool import Placement
from toolkit.probe.types import ProbeConfig
from toolkit.train.config import TrainConfig
from toolkit.train.launch import LaunchConfig

from .selection import BASELINES, CONTROLS, STAGE2_STRATEGIES, SelectionConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_BASELINES = tuple(b for b in BASELINES if b != "one_stage") + tuple(CONTROLS) + tuple(
    s for s in STAGE2_STRATEGIES if s != "gradual")


@dataclass(frozen=True)
class DataSettings:
    path: Optional[str] = None  # None: build the built-in real-facts benchmark into RUN_DIR/data
    train_items: Optional[int] = None  # caps per split: a seeded subset, balanced across relations
    dev_items: Optional[int] = None
    test_items: Optional[int] = None
    subset_seed: int = 0
    relations: Optional[tuple[str, ...]] = None  # keep only these relations (None: all)

    def __post_init__(self):
        for name in ("train_items", "dev_items", "test_items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be >= 1 (or null for all)")
        if self.relations is not None and not self.relations:
            raise ConfigError("data.relations is empty (leave it out, or null, for all relations)")


@dataclass(frozen=True)
class ProbeSettings(ProbeConfig):
    """The probe's own settings (N_ex, k, n, temperature, ...: inherited), the splits probed with the
    base model, and where the actors run."""

    splits: tuple[str, ...] = knob(("train", "dev", "test"), "splits probed with the base model")
    shard_size: int = knob(32, "items per shard (fixes the shard plan)")
    placement: Placement = knob(factory=Placement, help="the Ray actors: how many, CPUs/GPUs each, cluster address")

    MOVED_KEYS: ClassVar[dict[str, str]] = {name: f"placement.{name}" for name in (
        "num_actors", "cpus_per_actor", "gpus_per_actor", "ray_address")}

    def __post_init__(self):
        for name in PIPELINE_PROBE_KEYS:
            require(getattr(self, name) == getattr(ProbeConfig, name), name, getattr(self, name),
                    "is set by the pipeline (per entry of `seeds`)")
        super().__post_init__()
        for split in ("train", "test"):
            require(split in self.splits, "splits", list(self.splits),
                    f"must include '{split}' (the schedule and the report need it)")
        require(self.shard_size >= 1, "shard_size", self.shard_size, "must be >= 1")

    def probe_config(self, seed: int) -> ProbeConfig:
        own = {f.name: getattr(self, f.name) for f in config_fields(ProbeConfig)}
        return ProbeConfig(**{**own, "seed": seed})


PIPELINE_PROBE_KEYS = ("seed", "keep_samples")
PIPELINE_TRAIN_KEYS = ("model", "data", "output_dir", "seed", "categories_file", "resume")


@dataclass(frozen=True)
class TrainSettings(LaunchConfig):
    """How each stage is launched (the launcher's keys: inherited), what changes in stage 2, and the
    trainer's own config (`options`: the keys of `gradual train --help`)."""

    stage2_lr_factor: float = knob(0.5, "stage 2 continues from M1 with lr x this factor")
    eval_batch_size: int = knob(32, "test-set evaluation of M0, M1, M2 and the baselines")
    keep_checkpoints: bool = knob(False, "keep a finished stage's DeepSpeed checkpoints (~14 bytes per parameter "
                                         "each); by default they are deleted once its model is exported")
    options: TrainConfig = knob(factory=TrainConfig, help="the trainer's config: lr, epochs, ds_config, ...")

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.stage2_lr_factor <= 10, "stage2_lr_factor", self.stage2_lr_factor, "must be in (0, 10]")
        require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")
        require(self.node_rank is None, "node_rank", self.node_rank,
                "launches one node by hand; the pipeline starts every node itself (hostfile)")
        for name in PIPELINE_TRAIN_KEYS:
            if name in self.options.given_keys:
                raise FieldError(f"options.{name}", getattr(self.options, name), "is set by the pipeline for each stage")


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = "custom"
    model: Optional[str] = None  # None: the embedded SmolLM2-135M
    seeds: tuple[int, ...] = (0,)
    baselines: tuple[str, ...] = ()  # natural, known_only, the controls, the stage-2 ablations; or "all"
    first_seed_baselines: tuple[str, ...] = ()  # trained in the first seed only (a costly one: natural's fit speed)
    data: DataSettings = field(default_factory=DataSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    notes: str = ""  # printed at the start: what a preset chose and why

    def __post_init__(self):
        if not self.seeds:
            raise ConfigError("seeds is empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds has duplicates: {list(self.seeds)}")
        if "all" in self.baselines:
            object.__setattr__(self, "baselines", ALL_BASELINES)
        for key in ("baselines", "first_seed_baselines"):
            for name in getattr(self, key):
                if name not in ALL_BASELINES:
                    raise ConfigError(f"{key}: unknown baseline '{name}' (expected "
                                      f"{'all or ' if key == 'baselines' else ''}{', '.join(ALL_BASELINES)})")
        if both := sorted(set(self.baselines) & set(self.first_seed_baselines)):
            raise ConfigError(f"first_seed_baselines: {', '.join(both)} already in baselines (every seed)")

    def seed_baselines(self, seed: int) -> tuple[str, ...]:
        return self.baselines + (self.first_seed_baselines if seed == self.seeds[0] else ())

    def for_seed(self, seed: int) -> "PipelineConfig":
        return dataclasses.replace(self, selection=dataclasses.replace(self.selection, seed=seed))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset '{name}' (known: {known})")
    return path


def load_pipeline_config(path: str | Path | None = None, overrides=(), preset: str | None = None) -> PipelineConfig:
    """The preset (default: 'default' when no config file is given), then the file, then --set."""
    base: dict[str, Any] = {}
    if preset or path is None:
        base = cfglib.read_yaml(preset_path(preset or "default"))
    return cfglib.load(PipelineConfig, path, overrides, base=base)
