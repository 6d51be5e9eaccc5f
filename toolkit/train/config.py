"""The training configuration: one typed dataclass, loaded from YAML with `--set key=value` overrides.
Unknown keys and bad values fail here, with the key named, before any process group exists."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from toolkit.config import (ConfigError, FieldError, apply_overrides, from_dict, given_keys, knob, read_yaml,
                            require)

OPTIMIZERS = ("deepspeed_adam", "adamw", "adamw_8bit")
LR_SCHEDULES = ("linear", "cosine", "constant")
REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


def shipped_ds_config(zero_stage: int, offload: bool = False) -> str:
    """The ds_configs/ file that runs a stage (ZeRO-0: zero1.json with the stage overridden), with
    optimizer offload (zero2_offload) or, under ZeRO-3, parameter and optimizer offload (zero3_offload)."""
    return f"zero{max(zero_stage, 1)}" + ("_offload" if offload else "")


class TrainConfigError(ConfigError):
    """A bad training config, ds_config, hostfile or launch request; the message is one line."""


@dataclass
class TrainConfig:
    # what to train, on what, and where the results go (the pipeline sets these per stage)
    model: str = knob("", "HF directory (or anything `gradual probe --model` accepts)")
    data: str = knob("", "QA dataset: file or directory")
    output_dir: str = knob("", "checkpoints, logs, the exported model")
    train_split: str = knob("train", "split to train on")
    dev_split: Optional[str] = knob("dev", "split for early stopping (null: no dev evaluation, the last model is exported)")
    categories: Optional[list[str]] = knob(None, "train only on items of these SliCK categories")
    categories_file: Optional[str] = knob(None, "id -> category (JSON/JSONL); default: 'category' in the data rows")
    # DeepSpeed
    ds_config: str = knob("zero2", "a path, or one of ds_configs/: zero1, zero2, zero2_offload, zero3, zero3_offload")
    zero_stage: Union[int, Literal["auto"], None] = knob(
        None, "overrides the ds_config's ZeRO stage (0, 1, 2, 3); auto: the lowest of 1, 2, 3 whose model states "
              "fit the GPUs (the ds_config's stage where their memory is unknown)")
    offload: bool = knob(False, "ZeRO optimizer offload to CPU (needs optimizer deepspeed_adam); the parameters "
                                "too: offload_param in the ds_config (zero3_offload)")
    bf16: Union[bool, Literal["auto"]] = knob("auto", "auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass")
    # batch arithmetic: train_batch_size = micro_batch_size x gradient_accumulation_steps x world size.
    # State the global batch; the micro batch and the accumulation then adapt to the world size.
    train_batch_size: Optional[int] = knob(
        None, "global batch (sequences per optimizer step); default: micro_batch_size x accumulation x world size")
    micro_batch_size: Optional[int] = knob(
        None, "sequences per rank per forward pass; default: the largest that divides train_batch_size / world "
              "size and is at most max_micro_batch_size (without train_batch_size: max_micro_batch_size)")
    max_micro_batch_size: int = knob(8, "upper bound of a derived micro_batch_size (what one rank's memory holds)")
    gradient_accumulation_steps: Optional[int] = knob(None, "default: derived from train_batch_size, else 1")
    max_len: int = knob(256, "tokens per sequence (a longer prompt loses its start)")
    # optimisation
    epochs: int = knob(3, "passes over the training set")
    max_steps: int = knob(0, "stop after this many optimizer steps, evaluating and saving there (0: the epochs "
                             "decide); the lr schedule spans min(max_steps, steps of all epochs)")
    optimizer: Literal["adamw", "deepspeed_adam", "adamw_8bit"] = knob(
        "adamw", "adamw (torch), deepspeed_adam (FusedAdam / CPUAdam), adamw_8bit (bitsandbytes)")
    lr: float = knob(1e-5, "peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = knob("linear", "decay after warm-up")
    warmup_ratio: float = knob(0.0, "fraction of the steps spent warming up")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    betas: list[float] = knob(factory=lambda: [0.9, 0.999], help="Adam betas")
    eps: float = knob(1e-8, "Adam epsilon")
    grad_clip: float = knob(1.0, "gradient-norm clipping (DeepSpeed's hidden default is also 1.0); 0 = off")
    seed: int = knob(0, "data order and initialisation")
    # evaluation, early stopping, checkpoints
    eval_every_steps: int = knob(0, "dev evaluation every N optimizer steps (0: at the end of every epoch)")
    eval_batch_size: int = knob(32, "prompts per generation batch in evaluation (gradual run: the test set's too)")
    eval_train: bool = knob(True, "training accuracy per category at each evaluation (fit speed)")
    max_new_tokens: int = knob(16, "answer length limit in evaluation (gradual run: probe.max_new_tokens)")
    patience: int = knob(3, "evaluations without a dev improvement before stopping; 0 = never stop early")
    keep_last_n: int = knob(1, "newest DeepSpeed checkpoints kept whole (a resume needs only the newest); the best "
                               "one is also kept, reduced to its weights")
    export_shard_mib: float = knob(5120, "largest safetensors file of a ZeRO-3 export (weights gathered one at a time; "
                                       "rank 0 holds at most one file's worth in memory)")
    stop_after_epoch: int = knob(0, "stop (as if pre-empted) after this epoch's checkpoint; 0 = off")
    resume: Union[bool, str] = knob(False, "continue from the latest checkpoint (true: <output_dir>/checkpoints, or a directory)")
    log_dir: Optional[str] = knob(None, "TensorBoard directory (default <output_dir>/tensorboard)")
    progress: bool = knob(True, "progress bars")
    gpu_wait_s: int = knob(300, "seconds a rank waits at start for its GPU to be free of other processes "
                                "(the probe's actors exiting); 0: no check")
    gpu_busy_mib: int = knob(2048, "MiB that other processes may hold on a rank's GPU when it starts")
    collective_timeout_min: int = knob(
        60, "minutes a rank waits in a collective before the run fails (ranks wait in a barrier while rank 0 "
            "writes an 8B export or deletes old checkpoints; DeepSpeed's default is 10)")
    # keys the user set (YAML, --set, flags): an explicit ds_config value may fill the others
    given_keys: frozenset = given_keys()

    def __post_init__(self):
        for name in ("micro_batch_size", "gradient_accumulation_steps", "train_batch_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                "must be two numbers in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
        require(self.lr_scheduler in LR_SCHEDULES, "lr_scheduler", self.lr_scheduler,
                f"must be one of {', '.join(LR_SCHEDULES)}")
        require(self.zero_stage in (None, 0, 1, 2, 3, "auto"), "zero_stage", self.zero_stage,
                "must be 0, 1, 2, 3 or auto")
        require(self.bf16 in (True, False, "auto"), "bf16", self.bf16, "must be true, false or auto")
        for name in ("eval_every_steps", "patience", "stop_after_epoch", "gpu_wait_s", "gpu_busy_mib", "max_steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        for name in ("eval_batch_size", "keep_last_n", "max_new_tokens", "max_micro_batch_size",
                     "collective_timeout_min"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.export_shard_mib > 0, "export_shard_mib", self.export_shard_mib, "must be > 0")
        require(self.max_len >= 8, "max_len", self.max_len, "must be >= 8")
        require(not self.offload or self.optimizer == "deepspeed_adam", "offload", self.offload,
                "needs optimizer: deepspeed_adam (DeepSpeedCPUAdam runs the offloaded step)")
        require(self.categories is None or len(self.categories) > 0, "categories", self.categories,
                "is empty (leave it out to train on all)")

    def require_paths(self, source: str = "training config") -> "TrainConfig":
        """model, data and output_dir: required for a launch (the pipeline fills them per stage)."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise TrainConfigError(f"{source}: '{name}' is required")
        return self

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

# ---------------------------------------------------------------- loading


def load_config(path=None, overrides=(), flags: dict | None = None) -> TrainConfig:
    """YAML file (optional), then `--set key=value` overrides, then command-line flags; validated,
    with model, data and output_dir required."""
    try:
        values = read_yaml(path, what="training config") if path is not None else {}
        values = apply_overrides(values, overrides)
        values.update(flags or {})
        return from_dict(TrainConfig, values, source=str(path) if path else "training config").require_paths(
            str(path) if path else "training config")
    except TrainConfigError:
        raise
    except ConfigError as err:
        raise TrainConfigError(str(err)) from None


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy with `changes` applied (validated); they do not count as set by the user."""
    try:
        return dataclasses.replace(cfg, **changes)
    except FieldError as err:
        raise TrainConfigError(f"training config: {err}") from None
