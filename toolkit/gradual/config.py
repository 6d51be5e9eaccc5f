"""The pipeline's typed config (`gradual run CONFIG.yaml --set section.key=value`), its presets, and
the validation that happens once, before any step runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from toolkit import config as cfglib
from toolkit.config import ConfigError
from toolkit.probe.slick import ProbeConfig, ProbeConfigError

from .selection import BASELINES, STAGE2_STRATEGIES, SelectionConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_BASELINES = tuple(b for b in BASELINES if b != "one_stage") + tuple(
    s for s in STAGE2_STRATEGIES if s != "gradual")


@dataclass(frozen=True)
class DataSettings:
    path: Optional[str] = None  # None: build the built-in real-facts benchmark into RUN_DIR/data
    train_items: Optional[int] = None  # caps per split: a seeded subset, balanced across relations
    dev_items: Optional[int] = None
    test_items: Optional[int] = None
    subset_seed: int = 0

    def __post_init__(self):
        for name in ("train_items", "dev_items", "test_items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be >= 1 (or null for all)")


@dataclass(frozen=True)
class ProbeSettings(ProbeConfig):
    """The probe's own settings (N_ex, k, n, temperature, ...: inherited) plus where it runs."""

    splits: tuple[str, ...] = ("train", "dev", "test")  # probed with the base model
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    ray_address: Optional[str] = None
    shard_size: int = 32

    def __post_init__(self):
        for name in ("seed", "keep_samples"):
            if getattr(self, name) != getattr(ProbeConfig, name):
                raise ConfigError(f"probe.{name} is set by the pipeline (per entry of `seeds`)")
        try:
            super().__post_init__()
        except ProbeConfigError as err:
            raise ConfigError(f"probe: {err}") from None
        for split in ("train", "test"):
            if split not in self.splits:
                raise ConfigError(f"probe.splits must include '{split}' (the schedule and the report need it)")

    def probe_config(self, seed: int) -> ProbeConfig:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(ProbeConfig)}
        return ProbeConfig(**{**own, "seed": seed})


@dataclass(frozen=True)
class TrainSettings:
    """How each stage is launched, and the trainer's own keys (see `gradual train --help`)."""

    num_accelerators: Optional[int] = None  # CPU ranks per node (CPU machines)
    num_gpus: Optional[int] = None  # GPUs per node (default: all)
    hostfile: Optional[str] = None
    stage2_lr_factor: float = 0.5  # stage 2 continues from M1 with lr x this factor
    eval_batch_size: int = 32  # test-set evaluation of M0, M1, M2 and the baselines
    options: dict = field(default_factory=dict)  # TrainConfig keys: lr, epochs, ds_config, ...

    def __post_init__(self):
        if not 0 < self.stage2_lr_factor <= 10:
            raise ConfigError(f"train.stage2_lr_factor={self.stage2_lr_factor} must be in (0, 10]")
        reserved = sorted(set(self.options) & {"model", "data", "output_dir", "seed", "categories_file"})
        if reserved:
            raise ConfigError(f"train.options.{reserved[0]} is set by the pipeline for each stage")
        from toolkit.train.config import TrainConfigError, build_config

        try:  # the trainer's own validation, now rather than at the first launch
            build_config({**self.options, "model": "-", "data": "-", "output_dir": "-"},
                         source="train.options")
        except TrainConfigError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = "custom"
    model: Optional[str] = None  # None: the embedded SmolLM2-135M
    seeds: tuple[int, ...] = (0,)
    baselines: tuple[str, ...] = ()  # natural, known_only, and the stage-2 ablations; or "all"
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
        for name in self.baselines:
            if name not in ALL_BASELINES:
                raise ConfigError(f"unknown baseline '{name}' (expected all or {', '.join(ALL_BASELINES)})")

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
