"""The pipeline's typed config (`gradual run CONFIG.yaml --set section.key=value`), its presets, and
the validation that happens once, before any step runs. Every knob is declared once: a section that
passes a value on to the probe or the trainer inherits or reuses that config's own declaration."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from toolkit import config as cfglib
from toolkit.config import ConfigError, FieldError, config_fields, knob, knob_of, require
from toolkit.probe.pool import Placement
from toolkit.probe.runner import RunConfig, check_shard_size
from toolkit.probe.types import ProbeConfig
from toolkit.train.config import TrainConfig
from toolkit.train.launch import LaunchConfig

from .selection import BASELINES, CONTROLS, STAGE2_STRATEGIES, SelectionConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
REPROBE_SEED_OFFSET = 10_000
ALL_BASELINES = tuple(b for b in BASELINES if b != "one_stage") + tuple(CONTROLS) + tuple(
    s for s in STAGE2_STRATEGIES if s != "gradual")


@dataclass(frozen=True)
class DataSettings:
    """The QA data and the seeded subset the run uses."""

    path: Optional[str] = knob(None, "QA file or directory with train/dev/test splits (see `gradual data "
                                     "validate`); null: the built-in real-facts benchmark, built into RUN_DIR/data")
    train_items: Optional[int] = knob(None, "train items used: a seeded subset balanced across relations (null: all)")
    dev_items: Optional[int] = knob(None, "dev items used (early stopping): a seeded balanced subset (null: all)")
    test_items: Optional[int] = knob(None, "test items used (evaluation): a seeded balanced subset (null: all)")
    subset_seed: int = knob(0, "fixes the subsets")
    relations: Optional[tuple[str, ...]] = knob(None, "keep only these relations (null: all)")

    def __post_init__(self):
        for name in ("train_items", "dev_items", "test_items"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1 (or null for all)")
        if self.relations is not None and not self.relations:
            raise ConfigError("data.relations is empty (leave it out, or null, for all relations)")


@dataclass(frozen=True)
class ProbeSettings(ProbeConfig):
    """The probe's own settings (N_ex, k, n, temperature, ...: inherited), the splits probed with the
    base model, and where the actors run."""

    splits: tuple[str, ...] = knob(("train", "dev", "test"), "splits probed with the base model")
    shard_size: int = knob_of(RunConfig, "shard_size")  # each probe step's RunConfig gets it
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
        check_shard_size(self.shard_size)

    def probe_config(self, seed: int) -> ProbeConfig:
        own = {f.name: getattr(self, f.name) for f in config_fields(ProbeConfig)}
        return ProbeConfig(**{**own, "seed": seed})


PIPELINE_PROBE_KEYS = ("seed", "keep_samples")
PIPELINE_TRAIN_KEYS = {"model": "for each stage", "data": "for each stage", "output_dir": "for each stage",
                       "seed": "for each stage", "categories_file": "for each stage", "resume": "for each stage",
                       # the answer length of the probe is the evaluation's (design: the same format)
                       "max_new_tokens": "from probe.max_new_tokens"}


@dataclass(frozen=True)
class TrainSettings(LaunchConfig):
    """How each stage is launched (the launcher's keys: inherited), what changes in stage 2, and the
    trainer's own config (`options`: the keys of `gradual train --help`; its eval_batch_size serves the
    test-set evaluation too)."""

    stage2_lr_factor: float = knob(0.5, "stage 2 continues from M1 with lr x this factor")
    keep_checkpoints: bool = knob(False, "keep a finished stage's DeepSpeed checkpoints (~14 bytes per parameter "
                                         "each); by default they are deleted once its model is exported")
    options: TrainConfig = knob(factory=TrainConfig, help="the trainer's config: lr, epochs, ds_config, ...")

    MOVED_KEYS: ClassVar[dict[str, str]] = {"eval_batch_size": "options.eval_batch_size"}

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.stage2_lr_factor <= 10, "stage2_lr_factor", self.stage2_lr_factor, "must be in (0, 10]")
        require(self.node_rank is None, "node_rank", self.node_rank,
                "launches one node by hand; the pipeline starts every node itself (hostfile)")
        for name, how in PIPELINE_TRAIN_KEYS.items():
            if name in self.options.given_keys:
                raise FieldError(f"options.{name}", getattr(self.options, name), f"is set by the pipeline {how}")


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = knob("custom", "the preset this config started from (a name in the report)")
    model: Optional[str] = knob(None, "the base model: HF directory, .gguf file, hub id or random:<shape> "
                                      "(null: the embedded SmolLM2-135M)")
    seeds: tuple[int, ...] = knob((0,), "each seed repeats the schedule: its probes' sampling, the selection's "
                                        "random draws and the training's data order and initialisation")
    baselines: tuple[str, ...] = knob((), "trained in every seed beside M1 and M2: natural, known_only, the "
                                          "controls, the stage-2 ablations; or all")
    first_seed_baselines: tuple[str, ...] = knob((), "trained in the first seed only (a costly one: natural's fit speed)")
    noise_floor: bool = knob(False, "probe the base model on train again under another probe seed (seed + "
                                    f"{REPROBE_SEED_OFFSET}): the 'upgrades' and 'forgetting' re-probing shows with no training")
    data: DataSettings = knob(factory=DataSettings, help="the QA data and its subset")
    probe: ProbeSettings = knob(factory=ProbeSettings, help="the SliCK probe and its Ray actors")
    selection: SelectionConfig = knob(factory=SelectionConfig, help="which items each stage trains on")
    train: TrainSettings = knob(factory=TrainSettings, help="the training launch and the trainer's config")
    notes: str = knob("", "printed at the start: what a preset chose and why")

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
        # one answer length: the trainer's dev evaluation answers as the probe and the test evaluation do
        options = dataclasses.replace(self.train.options, max_new_tokens=self.probe.max_new_tokens)
        object.__setattr__(self, "train", dataclasses.replace(self.train, options=options))

    @staticmethod
    def reprobe_seed(seed: int) -> int:
        """The probe seed of the noise floor's second probe of the base model."""
        return seed + REPROBE_SEED_OFFSET

    def seed_baselines(self, seed: int) -> tuple[str, ...]:
        return self.baselines + (self.first_seed_baselines if seed == self.seeds[0] else ())

    def for_seed(self, seed: int) -> "PipelineConfig":
        """The config of one entry of `seeds`: the selection's random draws follow it."""
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
