"""ds_config resolution, batch arithmetic, hostfiles and the disk estimate (memory: memory.py).

Convention (the Hugging Face Trainer's): a value written "auto" in a ds_config is filled from the
training config; an explicit value is kept, and fills the training config field it maps to, unless
the user also set that field explicitly to something else (then it is a conflict, named in the
error). The shipped ds_configs use "auto" for everything the training config owns (batch sizes,
gradient clipping, bf16, optimizer hyper-parameters) and explicit values for the ZeRO layout.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from collections import OrderedDict
from pathlib import Path

from .config import TrainConfig, TrainConfigError, replace

AUTO = "auto"
# (ds_config path, training config field): one source of truth per number
MAPPED = ((("train_micro_batch_size_per_gpu",), "micro_batch_size"),
          (("gradient_accumulation_steps",), "gradient_accumulation_steps"),
          (("train_batch_size",), "train_batch_size"),
          (("gradient_clipping",), "grad_clip"),
          (("zero_optimization", "stage"), "zero_stage"),
          (("bf16", "enabled"), "bf16"),
          (("optimizer", "params", "lr"), "lr"),
          (("optimizer", "params", "betas"), "betas"),
          (("optimizer", "params", "eps"), "eps"),
          (("optimizer", "params", "weight_decay"), "weight_decay"))
# top-level keys DeepSpeedConfig reads through .keys() or outside its constructor
EXTRA_KNOWN = {"optimizer", "scheduler", "flops_profiler", "autotuning", "activation_checkpointing", "aio",
               "zenflow", "sequence_parallel_size", "mics_shard_size", "mics_hierarchical_params_gather"}


def load_ds_config(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TrainConfigError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
    except OSError as err:
        raise TrainConfigError(f"cannot read ds_config {path}: {err.strerror}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: a ds_config must be a JSON object")
    return data


def _get(d: dict, path: tuple):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b


def resolve(cfg: TrainConfig, raw: dict, world_size: int, on_gpu: bool, source: str = "ds_config",
            deepspeed_checks: bool = True, hidden_size: int | None = None) -> tuple[TrainConfig, dict]:
    """(training config with explicit ds_config values folded in, fully resolved ds_config).
    cfg.zero_stage must not be "auto" here (the launch or the rank chooses it first: memory.choose_stage).
    `hidden_size`: the model's, for ZeRO-3's "auto" bucket sizes (default: read from cfg.model's config)."""
    if cfg.zero_stage == AUTO:
        raise TrainConfigError("zero_stage=auto must be chosen before the ds_config is resolved")
    ds = copy.deepcopy(raw)
    if "scheduler" in ds:
        raise TrainConfigError(f"{source}: remove 'scheduler'; the trainer owns the learning-rate "
                               "schedule (lr, warmup_ratio, lr_scheduler in the training config)")
    if "optimizer" in ds and cfg.optimizer != "deepspeed_adam":
        if "optimizer" in cfg.given_keys:
            raise TrainConfigError(f"{source}: has an 'optimizer' section but optimizer={cfg.optimizer} builds "
                                   "its own; remove the section or set optimizer: deepspeed_adam")
        cfg = replace(cfg, optimizer="deepspeed_adam")  # the ds_config's explicit choice fills the default
    if (_get(ds, ("fp16", "enabled")) or False) not in (False, AUTO):
        raise TrainConfigError(f"{source}: fp16 is not supported (loss scaling); use bf16")
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise TrainConfigError(f"{source}: 'zero_optimization' must be an object")
    if cfg.optimizer == "deepspeed_adam":
        opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
        if str(opt.get("type", "")).lower() not in ("adam", "adamw"):
            raise TrainConfigError(f"{source}: optimizer.type must be Adam or AdamW for deepspeed_adam")
        opt.setdefault("params", {})
    # explicit ds_config values fill fields the user left at their defaults
    fixes = {}
    for path, name in MAPPED:
        value = _get(ds, path)
        if value is None or value == AUTO or (name == "zero_stage" and name in cfg.given_keys):
            continue  # zero_stage is an override: it replaces the ds_config's stage
        if name in cfg.given_keys and not _same(getattr(cfg, name), value):
            dotted = ".".join(path)
            raise TrainConfigError(f"{source}: {dotted}={json.dumps(value)} conflicts with the training "
                                   f"config's {name}={getattr(cfg, name)!r}; set one of them (or \"auto\")")
        fixes[name] = list(value) if isinstance(value, (list, tuple)) else value
    offload_device = _get(zero, ("offload_optimizer", "device"))
    if offload_device not in (None, "none"):
        if "offload" in cfg.given_keys and not cfg.offload:
            raise TrainConfigError(f"{source}: offload_optimizer is set but the training config says offload=false")
        fixes["offload"] = True
    try:
        cfg = replace(cfg, **fixes)
    except TypeError as err:
        raise TrainConfigError(f"{source}: bad value ({err})") from None
    micro, accum, total = batch_arithmetic(cfg, world_size)
    stage = 0 if cfg.zero_stage is None else cfg.zero_stage
    bf16 = on_gpu if cfg.bf16 == AUTO else bool(cfg.bf16)
    cfg = replace(cfg, micro_batch_size=micro, gradient_accumulation_steps=accum, train_batch_size=total,
                  zero_stage=stage, bf16=bf16)
    if cfg.offload and stage < 1:
        raise TrainConfigError("offload needs ZeRO stage 1, 2 or 3")
    if _get(zero, ("offload_param", "device")) not in (None, "none") and stage != 3:
        raise TrainConfigError(f"{source}: offload_param needs ZeRO stage 3 (the weights are partitioned only "
                               f"there), the stage is {stage}; use offload_optimizer")
    if stage == 3:
        _resolve_zero3(zero, hidden_size, cfg.model, source)
    for section in ("offload_optimizer", "offload_param"):  # pinned host memory speeds GPU copies only
        if isinstance(zero.get(section), dict) and zero[section].get("pin_memory") == AUTO:
            zero[section]["pin_memory"] = on_gpu
    # write every owned value back: the resolved ds_config has no "auto" left
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, accum
    ds["train_batch_size"], ds["gradient_clipping"] = total, float(cfg.grad_clip)
    zero["stage"] = stage
    if cfg.offload and offload_device in (None, "none"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    # ds_configs/zero1.json also sets bf16.immediate_grad_update. ZeRO-1 with bf16 and fp32 accumulation
    # runs DeepSpeed's BF16_Optimizer, which keeps a full fp32 gradient buffer either way and, without
    # it, every bf16 .grad beside that buffer (zeroed, never freed: 15 GiB more per GPU for 8B). With it
    # a post-accumulate-grad hook adds each bf16 gradient into the fp32 buffer and frees it, in every
    # micro-step, so gradient accumulation is unchanged (bf16_optimizer.py accumulate_hp_grads_and_remove_lp;
    # test_zero1_json_frees_the_bf16_gradients_and_keeps_the_losses). The memory estimate reads the
    # flag from the resolved ds_config (memory.states_for).
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bf16}
    # bf16 weights and gradients, but gradients accumulated (micro-steps, and ZeRO's reductions) in fp32;
    # DeepSpeed 0.19 runs that under ZeRO-1/2 only (ZeRO-1: its BF16_Optimizer), not plain data parallel
    types = ds.get("data_types")
    if types is not None and not isinstance(types, dict):
        raise TrainConfigError(f"{source}: 'data_types' must be an object")
    if types is not None and types.get("grad_accum_dtype") == AUTO:
        if bf16 and stage >= 1:
            types["grad_accum_dtype"] = "fp32"
        else:
            del types["grad_accum_dtype"]  # the weights' dtype
    accum_dtype = (types or {}).get("grad_accum_dtype")
    if bf16 and stage == 0 and accum_dtype not in (None, "bf16", "bfloat16"):
        raise TrainConfigError(f"{source}: data_types.grad_accum_dtype={accum_dtype} with bf16 needs ZeRO stage 1 or 2 "
                               "(DeepSpeed 0.19 accumulates in the weights' dtype without ZeRO)")
    # overlap the gradient reduction with the backward pass on GPU (separate CUDA streams); on CPU
    # there is nothing to overlap with
    if zero.get("overlap_comm") == AUTO:
        zero["overlap_comm"] = on_gpu
    if "fp16" in ds:
        ds["fp16"] = {**ds["fp16"], "enabled": False}
    if cfg.optimizer == "deepspeed_adam":
        ds["optimizer"]["params"].update(lr=cfg.lr, betas=list(cfg.betas), eps=cfg.eps,
                                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        if ds.get("zero_allow_untested_optimizer") is False:
            raise TrainConfigError(f"{source}: adamw_8bit under ZeRO needs zero_allow_untested_optimizer=true")
        ds["zero_allow_untested_optimizer"] = True
    _reject_leftover_auto(ds, source)
    if deepspeed_checks:
        validate_with_deepspeed(ds, source)
    return cfg, ds


# ZeRO-3 settings a ds_config without them gets when the stage is 3 (zero_stage=3 over zero2.json):
# those of ds_configs/zero3.json. Sizes written "auto" follow the Hugging Face Trainer's rule, from the
# model's hidden size h: buckets of h^2 elements (one layer's largest matrices per reduction), the
# prefetch 0.9 h^2, and parameters under 10 h elements (norms, biases) kept whole on every rank.
ZERO3_DEFAULTS = {"reduce_bucket_size": AUTO, "stage3_prefetch_bucket_size": AUTO,
                  "stage3_param_persistence_threshold": AUTO, "stage3_max_live_parameters": 1_000_000_000,
                  "stage3_max_reuse_distance": 1_000_000_000, "sub_group_size": 1_000_000_000,
                  "stage3_gather_16bit_weights_on_model_save": True}


def zero3_sizes(hidden_size: int) -> dict[str, int]:
    return {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


def _resolve_zero3(zero: dict, hidden_size: int | None, model: str, source: str) -> None:
    for key, value in ZERO3_DEFAULTS.items():
        zero.setdefault(key, value)
    if not any(zero.get(key) == AUTO for key in zero3_sizes(1)):
        return
    if hidden_size is None:
        if not model:
            raise TrainConfigError(f"{source}: ZeRO-3 bucket sizes are \"auto\" but no model is known to size them "
                                   "from; give explicit values")
        from .plan import model_size

        hidden_size = model_size(model).hidden
    for key, value in zero3_sizes(hidden_size).items():
        if zero.get(key) == AUTO:
            zero[key] = value


def validate_with_deepspeed(ds: dict, source: str) -> None:
    """Unknown top-level keys, then DeepSpeed's own parser. Separate from `resolve` because it
    imports deepspeed (seconds): cheap checks (batch arithmetic, data, resume) fail first."""
    check_known_keys(ds, source)
    check_with_deepspeed(ds, source)


def batch_arithmetic(cfg: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(micro, accumulation, train_batch_size) with train_batch_size = micro x accumulation x world.

    A stated train_batch_size is kept and split over the world size: each rank takes
    train_batch_size / world sequences per step, as micro batches of micro_batch_size (given, or the
    largest divisor up to max_micro_batch_size) times the accumulation steps (derived). So one config
    gives the same global batch, and the same training trajectory, on 1, 8 or 16 GPUs."""
    micro, accum, total = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.train_batch_size
    if total is None:
        micro = micro or cfg.max_micro_batch_size
        accum = accum or 1
        return micro, accum, micro * accum * world_size
    if total % world_size:
        fits = [m * world_size for m in (total // world_size, total // world_size + 1) if m >= 1]
        raise TrainConfigError(
            f"batch arithmetic: train_batch_size={total} cannot be split over world size {world_size}: no micro "
            f"batch fits (a global batch for {world_size} ranks is a multiple of {world_size}, e.g. "
            f"{' or '.join(map(str, fits))})")
    per_rank = total // world_size
    if micro is not None:
        if per_rank % micro:
            raise TrainConfigError(
                f"batch arithmetic: train_batch_size={total} is not divisible by micro_batch_size={micro} "
                f"x world size {world_size} (= {micro * world_size}); micro batches that fit: "
                f"{', '.join(map(str, divisors(per_rank)[:8]))} (or leave micro_batch_size out to derive it)")
        if accum is not None and accum * micro != per_rank:
            raise TrainConfigError(
                f"batch arithmetic: train_batch_size={total} != micro_batch_size={micro} x "
                f"gradient_accumulation_steps={accum} x world size {world_size} (= {accum * micro * world_size})")
        return micro, per_rank // micro, total
    if accum is not None:
        if per_rank % accum:
            raise TrainConfigError(
                f"batch arithmetic: train_batch_size={total} is not divisible by gradient_accumulation_steps="
                f"{accum} x world size {world_size} (= {accum * world_size})")
        return per_rank // accum, accum, total
    micro = max(d for d in divisors(per_rank) if d <= cfg.max_micro_batch_size)
    return micro, per_rank // micro, total


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def derived_batch_note(cfg: TrainConfig, world_size: int, raw_ds: dict | None = None) -> str | None:
    """How the micro batch and the accumulation are chosen when neither the (unresolved) training
    config nor the ds_config as written (`raw_ds`) states them."""
    def stated(index: int, name: str) -> bool:
        return getattr(cfg, name) is not None or _get(raw_ds or {}, MAPPED[index][0]) not in (None, AUTO)

    total = cfg.train_batch_size if cfg.train_batch_size is not None else _get(raw_ds or {}, ("train_batch_size",))
    if total in (None, AUTO):
        return None
    micro, accum = stated(0, "micro_batch_size"), stated(1, "gradient_accumulation_steps")
    if micro and accum:
        return None
    if micro:
        return "gradient_accumulation_steps derived: train_batch_size / (micro_batch_size x world size)"
    if accum:
        return "micro_batch_size derived: train_batch_size / (gradient_accumulation_steps x world size)"
    return (f"micro_batch_size derived: the largest divisor of train_batch_size / world size = "
            f"{int(total) // world_size} up to max_micro_batch_size={cfg.max_micro_batch_size}; "
            "accumulation: the rest")


def _reject_leftover_auto(d, source, prefix=""):
    for key, value in (d.items() if isinstance(d, dict) else ()):
        if value == AUTO:
            raise TrainConfigError(f"{source}: '{prefix}{key}' is \"auto\", which this trainer cannot fill; "
                                   "give an explicit value")
        _reject_leftover_auto(value, source, f"{prefix}{key}.")


_KNOWN: set[str] | None = None


def known_top_level_keys() -> set[str]:
    """Every top-level key DeepSpeed 0.19 reads: recorded by running its own config parser once."""
    global _KNOWN
    if _KNOWN is None:
        from deepspeed.runtime.config import DeepSpeedConfig

        class Recorder(dict):
            seen: set = set()

            def get(self, key, default=None):
                Recorder.seen.add(key)
                return super().get(key, default)

            def __contains__(self, key):
                Recorder.seen.add(key)
                return super().__contains__(key)

            def __getitem__(self, key):
                Recorder.seen.add(key)
                return super().__getitem__(key)

            def __copy__(self):
                return self

        with _quiet_deepspeed():
            DeepSpeedConfig(Recorder(train_batch_size=1, zero_optimization={"stage": 2}))
        _KNOWN = Recorder.seen | EXTRA_KNOWN
    return _KNOWN


def check_known_keys(ds: dict, source: str) -> None:
    known = known_top_level_keys()
    for key in ds:
        if key not in known:
            close = [k for k in sorted(known) if k.replace("_", "") == key.replace("_", "").lower()]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrainConfigError(f"{source}: unknown key '{key}'{hint}")


class _quiet_deepspeed:
    def __enter__(self):
        self.logger = logging.getLogger("DeepSpeed")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def check_with_deepspeed(ds: dict, source: str) -> None:
    """DeepSpeed's own parser (its sections forbid unknown keys), run before any process group
    exists: without one it assumes world size 1, so it gets the per-process batch numbers."""
    from deepspeed.runtime.config import DeepSpeedConfig

    local = dict(ds, train_batch_size=ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    try:
        with _quiet_deepspeed():
            DeepSpeedConfig(local)
    except Exception as err:  # pydantic ValidationError, AssertionError, ValueError...
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and "errors.pydantic" not in ln]
        raise TrainConfigError(f"{source}: rejected by DeepSpeed: {' / '.join(lines[:3])}") from None


# ---------------------------------------------------------------- hostfiles and world size


def read_hostfile(path) -> "OrderedDict[str, int]":
    """DeepSpeed's hostfile format: `<host> slots=<n>` per line, '#' comments."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"hostfile not found: {path}")
    hosts: OrderedDict[str, int] = OrderedDict()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or int(match[2]) < 1:
            raise TrainConfigError(f"{path}:{lineno}: expected '<host> slots=<n>' with n >= 1, got '{line}'")
        if match[1] in hosts:
            raise TrainConfigError(f"{path}:{lineno}: host '{match[1]}' listed twice")
        hosts[match[1]] = int(match[2])
    if not hosts:
        raise TrainConfigError(f"{path}: the hostfile lists no hosts")
    return hosts


def world_size_for(hosts: dict | None, per_node: int | None, num_nodes: int | None) -> int:
    """The number of ranks the deepspeed launcher will start (its --num_nodes / --num_gpus rules)."""
    if not hosts:
        return per_node or 1
    slots = list(hosts.values())[: num_nodes or len(hosts)]
    if num_nodes and num_nodes > len(hosts):
        raise TrainConfigError(f"--num-nodes {num_nodes} but the hostfile lists {len(hosts)} host(s)")
    return sum(min(s, per_node) if per_node else s for s in slots)


# ---------------------------------------------------------------- disk


def checkpoint_bytes(num_params: int, bf16: bool, optimizer: str, stage: int = 2) -> dict[str, float]:
    """One DeepSpeed checkpoint on disk, all ranks together, pickling overhead aside. ZeRO-1/2: the
    weights in the training dtype (mp_rank_00_model_states.pt) and the optimizer states (*optim_states.pt:
    fp32 master copy + Adam's two fp32 moments, or 8-bit moments); a best checkpoint is kept as its
    weights only. ZeRO-3: the model states hold empty placeholders, the weights live only in the
    optimizer states' fp32 partitions, so a best checkpoint is kept whole (`best`)."""
    weights = 0 if stage == 3 else num_params * (2 if bf16 else 4)
    states = num_params * (4 + (2 if optimizer == "adamw_8bit" else 8))
    return {"weights": weights, "optimizer": states, "full": weights + states,
            "best": weights + states if stage == 3 else weights}


def disk_estimate(num_params: int, bf16: bool, optimizer: str, keep_last_n: int, stages: int = 1,
                  keep_checkpoints: bool = True, stage: int = 2) -> dict[str, float]:
    """Disk a training run needs at its peak. A stage holds its `keep_last_n` newest checkpoints whole,
    writes a new one beside them before the oldest goes, keeps the best one (checkpoint_bytes' `best`),
    and ends with the exported model (16-bit, or fp32 weights). `stages` runs one after another (the
    pipeline's stages); with keep_checkpoints=False each finished stage keeps only its export."""
    ckpt = checkpoint_bytes(num_params, bf16, optimizer, stage)
    export = num_params * (2 if bf16 else 4)
    while_training = (keep_last_n + 1) * ckpt["full"] + ckpt["best"]
    at_end = keep_last_n * ckpt["full"] + ckpt["best"] + export
    stage_peak = max(while_training, at_end)
    finished = at_end if keep_checkpoints else export
    return {**{f"checkpoint_{k}": v for k, v in ckpt.items()}, "export": export, "stage_peak": stage_peak,
            "finished_stage": finished, "total_peak": (stages - 1) * finished + stage_peak, "stages": stages}


def describe_disk(est: dict, keep_last_n: int) -> list[str]:
    return [f"one checkpoint: weights {human_bytes(est['checkpoint_weights'])} + optimizer states "
            f"{human_bytes(est['checkpoint_optimizer'])} = {human_bytes(est['checkpoint_full'])} (all ranks)",
            f"one stage at its peak: {human_bytes(est['stage_peak'])} ({keep_last_n} checkpoint(s) kept + a new one "
            f"being written + the best one ({human_bytes(est['checkpoint_best'])}"
            + (", whole under ZeRO-3" if est["checkpoint_best"] == est["checkpoint_full"] else ", its weights")
            + f") + the export {human_bytes(est['export'])})"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"
