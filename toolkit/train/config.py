"""The training configuration: one typed dataclass, loaded from YAML with `--set key=value` overrides.
Unknown keys and bad values fail here, with the key named, before any process group exists."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config import ConfigError, coerce, read_yaml

OPTIMIZERS = ("deepspeed_adam", "adamw", "adamw_8bit")
LR_SCHEDULES = ("linear", "cosine", "constant")
REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


class TrainConfigError(ConfigError):
    """A bad training config, ds_config, hostfile or launch request; the message is one line."""


@dataclass
class TrainConfig:
    # what to train, on what, and where the results go
    model: str = ""  # HF directory (or anything toolkit.models.load_model accepts)
    data: str = ""  # QA dataset: file or directory (toolkit.data.load_qa)
    output_dir: str = ""
    train_split: str = "train"
    dev_split: str | None = "dev"  # None: no dev evaluation, the last model is exported
    categories: list[str] | None = None  # train only on items of these SliCK categories
    categories_file: str | None = None  # id -> category (JSON/JSONL); default: 'category' in the data rows
    # DeepSpeed
    ds_config: str = "zero2"  # a path, or zero1 | zero2 | zero2_offload from ds_configs/
    zero_stage: int | None = None  # overrides the ds_config's stage
    offload: bool = False  # ZeRO optimizer offload to CPU (needs optimizer: deepspeed_adam)
    bf16: bool | str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # batch arithmetic: train_batch_size = micro_batch_size x gradient_accumulation_steps x world size
    micro_batch_size: int = 8
    gradient_accumulation_steps: int | None = None  # None: from train_batch_size, else 1
    train_batch_size: int | None = None
    max_len: int = 256
    # optimisation
    epochs: int = 3
    optimizer: str = "adamw"
    lr: float = 1e-5
    lr_scheduler: str = "linear"  # after warm-up: linear decay to 0, cosine, or constant
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # explicit (DeepSpeed's hidden default is also 1.0); 0 = off
    seed: int = 0
    # evaluation, early stopping, checkpoints
    eval_every_steps: int = 0  # 0: at the end of every epoch
    eval_batch_size: int = 32
    eval_train: bool = True  # training accuracy per category at each evaluation ("fit speed")
    max_new_tokens: int = 16
    patience: int = 3  # evaluations without a dev improvement before stopping; 0 = never stop early
    keep_last_n: int = 2  # DeepSpeed checkpoints kept, plus the best one
    stop_after_epoch: int = 0  # stop (as if pre-empted) after this epoch's checkpoint; 0 = off
    resume: bool | str = False  # True: <output_dir>/checkpoints; or a checkpoint directory
    log_dir: str | None = None  # TensorBoard; default <output_dir>/tensorboard
    progress: bool = True
    # keys the user set (YAML or --set); explicit ds_config values may fill the others
    explicit: frozenset = field(default=frozenset(), repr=False, compare=False)

    # ------------------------------------------------------------ derived paths

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.log_dir) if self.log_dir else self.out / "tensorboard"

    @property
    def resume_dir(self) -> Path | None:
        if self.resume is False:
            return None
        return self.checkpoint_dir if self.resume is True else Path(self.resume)

    def ds_config_path(self) -> Path:
        path = Path(self.ds_config)
        if path.exists():
            return path
        for candidate in (DS_CONFIG_DIR / self.ds_config, DS_CONFIG_DIR / f"{self.ds_config}.json"):
            if not path.is_absolute() and candidate.exists():
                return candidate
        raise TrainConfigError(f"ds_config not found: {self.ds_config} (a path, or one of "
                               f"{', '.join(sorted(p.stem for p in DS_CONFIG_DIR.glob('*.json')))})")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "explicit"}

    # ------------------------------------------------------------ validation

    def validate(self) -> "TrainConfig":
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise TrainConfigError(f"training config: '{name}' is required")
        _check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        for name in ("gradient_accumulation_steps", "train_batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "must be >= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
               "must be two numbers in [0, 1)")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
        _check(self.lr_scheduler in LR_SCHEDULES, "lr_scheduler", self.lr_scheduler,
               f"must be one of {', '.join(LR_SCHEDULES)}")
        _check(self.zero_stage in (None, 0, 1, 2), "zero_stage", self.zero_stage,
               "must be 0, 1 or 2 (ZeRO-3 is not supported: evaluation generates with full parameters)")
        _check(self.bf16 in (True, False, "auto"), "bf16", self.bf16, "must be true, false or auto")
        for name in ("eval_every_steps", "patience", "stop_after_epoch"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        for name in ("eval_batch_size", "keep_last_n", "max_new_tokens"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.max_len >= 8, "max_len", self.max_len, "must be >= 8")
        _check(not self.offload or self.optimizer == "deepspeed_adam", "offload", self.offload,
               "needs optimizer: deepspeed_adam (DeepSpeedCPUAdam runs the offloaded step)")
        if self.categories is not None and not self.categories:
            raise TrainConfigError("training config: 'categories' is empty (leave it out to train on all)")
        return self


def _check(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise TrainConfigError(f"training config: {name}={value!r} {why}")


# ---------------------------------------------------------------- loading and overrides

def _coerce(name: str, value, kind):
    """`value` (from YAML or a --set string) as the field's type, or a TrainConfigError naming it."""
    try:
        return coerce(name, value, kind, source="training config")
    except ConfigError as err:
        raise TrainConfigError(str(err)) from None


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "explicit"}


def parse_overrides(pairs) -> dict[str, str]:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key.strip()] = value
    return out


def build_config(values: dict, source: str = "training config") -> TrainConfig:
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise TrainConfigError(f"{source}: unknown key '{unknown[0]}' (known keys: {', '.join(types)})")
    kwargs = {k: _coerce(k, v, types[k]) for k, v in values.items()}
    return TrainConfig(**kwargs, explicit=frozenset(kwargs)).validate()


def load_config(path=None, overrides=None, extra: dict | None = None) -> TrainConfig:
    """YAML file (optional), then `--set` overrides, then `extra` (CLI flags like --resume)."""
    values: dict = {}
    if path is not None:
        try:
            values.update(read_yaml(path, what="training config"))
        except ConfigError as err:
            raise TrainConfigError(str(err)) from None
    for key, value in parse_overrides(overrides).items():
        if key not in _field_types():
            raise TrainConfigError(f"--set: unknown key '{key}' (known keys: {', '.join(_field_types())})")
        values[key] = value
    values.update(extra or {})
    return build_config(values, source=str(path) if path else "training config")


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy with `changes` applied; they do not count as explicitly set by the user."""
    return dataclasses.replace(cfg, **changes).validate()
