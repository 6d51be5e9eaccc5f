"""Everything checked before a process group exists: config, ds_config, batch arithmetic, data,
tokenizer, resume directory. Every rank (and `gradual train`, before launching) builds the same
RunPlan, so bad input fails with one clear error instead of a hang. Also the dry-run report."""
from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import yaml

from toolkit.config import to_dict
from toolkit.data.loading import load_qa
from toolkit.data.schema import DataError, QAItem

from .config import TrainConfig, TrainConfigError, replace
from .data import BatchPlan, SFTExample, encode_sft, load_categories
from .devices import describe_devices
from .memory import FIT_FRACTION, choose_stage, describe_memory, gib, states_for
from .ops import check_optimizer_build
from .dsconfig import (AUTO, derived_batch_note, describe_disk, disk_estimate, load_ds_config, resolve,
                       validate_with_deepspeed)

log = logging.getLogger("toolkit.train")
# fields that shape the training trajectory: a resumed run must not change them
TRAJECTORY_FIELDS = ("model", "data", "train_split", "categories", "micro_batch_size", "gradient_accumulation_steps",
                     "train_batch_size", "epochs", "optimizer", "lr", "lr_scheduler", "warmup_ratio", "weight_decay",
                     "betas", "eps", "grad_clip", "seed", "max_len", "zero_stage")
STATE_FILE = "trainer_state.json"


@dataclass
class RunPlan:
    cfg: TrainConfig
    ds_config: dict
    world_size: int
    on_gpu: bool
    tokenizer: object
    train_items: list[QAItem]
    dev_items: list[QAItem]
    categories: dict[str, str]
    examples: list[SFTExample]
    batches: BatchPlan
    hosts: dict | None = None
    resume_tag: str | None = None
    notes: list[str] = field(default_factory=list)
    batch_note: str | None = None  # how micro batch / accumulation were derived from the world size
    devices: dict[str, list[int]] | None = None  # per node: the GPU indices (or CPU rank slots) its ranks get
    memory_lines: list[str] = field(default_factory=list)  # the fit-checked memory plan (gradual train)
    zero_stage_line: str | None = None  # how zero_stage=auto was decided
    gpu_bytes: float | None = None  # each GPU's memory, where known

    @property
    def total_steps(self) -> int:
        all_epochs = self.batches.steps_per_epoch * self.cfg.epochs
        return min(all_epochs, self.cfg.max_steps) if self.cfg.max_steps else all_epochs

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.cfg.warmup_ratio * self.total_steps)


def training_bf16(requested: bool | str, on_gpu: bool, gpu_bf16: bool | None) -> bool:
    """Whether the ranks train in bf16: as set, or for "auto" toolkit.models.resolve_dtype's training
    rule on the ranks' device (GPUs: bf16 where they compute in it, fp32 before Ampere rather than fp16
    loss scaling; CPUs: fp32). `gpu_bf16`: whether the GPUs do; None where they are not on the machine
    that plans (a login node's dry run): bf16 assumed, each rank decides on its own GPU. Every rank
    (prepare) and the launch's checks (plan_launch, check_training: `gradual train --dry-run`, `gradual
    run`'s preflight) decide with this function, so the plan shows the precision the ranks use."""
    from toolkit.models import resolve_dtype

    if requested != AUTO:
        return bool(requested)
    known = True if gpu_bf16 is None else gpu_bf16
    return resolve_dtype("auto", "cuda" if on_gpu else "cpu", gpu_bf16=known, training=True) == "bfloat16"


def prepare(cfg: TrainConfig, world_size: int, on_gpu: bool | None = None, hosts: dict | None = None,
            gpu_bf16: bool | None = None, gpu_bytes: float | None = None, node_ranks: int | None = None) -> RunPlan:
    """Validate everything and build the plan; raises TrainConfigError / DataError / ModelError.
    on_gpu None: on a rank, which reads its node (its GPUs, whether they compute in bf16, the smallest
    one's memory for zero_stage=auto); otherwise the launch's plan of the ranks' GPUs (`gpu_bf16`: see
    training_bf16; `gpu_bytes`: each GPU's memory, None where unknown; `node_ranks`: ranks per node)."""
    from toolkit.models import load_tokenizer

    from .devices import smallest_visible_gpu_bytes, visible_gpus_have_bf16

    cfg.require_paths()
    if on_gpu is None:
        gpu_bf16 = visible_gpus_have_bf16()
        on_gpu = gpu_bf16 is not None
        gpu_bytes = smallest_visible_gpu_bytes() if on_gpu else None
    cfg = replace(cfg, bf16=training_bf16(cfg.bf16, on_gpu, gpu_bf16))
    # cheap checks first; the ones that import deepspeed / transformers (seconds) last
    ds_path = cfg.ds_config_path()
    raw_ds = load_ds_config(ds_path)
    batch_note = derived_batch_note(cfg, world_size, raw_ds)
    cfg, stage_line = settle_zero_stage(cfg, raw_ds, world_size, on_gpu, gpu_bytes, str(ds_path), cfg.model,
                                        node_ranks)
    cfg, ds = resolve(cfg, raw_ds, world_size, on_gpu, str(ds_path), deepspeed_checks=False)
    import torch

    gpu_here = torch.cuda.is_available()
    check_optimizer_build(cfg.optimizer, cfg.offload, gpu_here and on_gpu)  # this node compiles its ranks' op
    resume_tag = check_resume(cfg, world_size)
    train = load_qa(cfg.data, splits=(cfg.train_split,))
    dev = load_qa(cfg.data, splits=(cfg.dev_split,)) if cfg.dev_split else []
    validate_with_deepspeed(ds, str(ds_path))
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.eos_token_id is None:
        raise TrainConfigError(f"the tokenizer of {cfg.model} has no EOS token; SFT targets end with EOS")
    categories = load_categories(cfg.categories_file, cfg.data)
    if cfg.categories:
        if not categories:
            raise DataError(cfg.categories_file or cfg.data, "categories filter set, but the data carries no "
                            "categories (give categories_file or a 'category' field)", field_name="category")
        train = [it for it in train if categories.get(it.id) in cfg.categories]
        if not train:
            raise DataError(cfg.data, f"no training items in categories {', '.join(cfg.categories)}")
    examples = [encode_sft(tokenizer, it, cfg.max_len) for it in train]
    plan = RunPlan(cfg, ds, world_size, on_gpu, tokenizer, train, dev, categories, examples,
                   BatchPlan(len(examples), cfg.micro_batch_size, cfg.gradient_accumulation_steps, world_size,
                             cfg.seed), hosts, resume_tag, batch_note=batch_note, zero_stage_line=stage_line,
                   gpu_bytes=gpu_bytes)
    if on_gpu and not gpu_here and cfg.optimizer == "deepspeed_adam":
        plan.notes.append("optimizer deepspeed_adam: each GPU node compiles DeepSpeed's "
                          f"{'CPUAdam' if cfg.offload else 'FusedAdam (nvcc, CUDA_HOME)'} at the first step; "
                          "not checked on this machine without a GPU")
    truncated = sum(ex.truncated for ex in examples)
    if truncated:
        plan.notes.append(f"{truncated} prompt(s) longer than max_len={cfg.max_len} lost their start")
    if len(train) < plan.batches.global_batch:
        plan.notes.append(f"only {len(train)} training items for a global batch of {plan.batches.global_batch}: "
                          "items repeat within a step")
    return plan


def settle_zero_stage(cfg: TrainConfig, raw_ds: dict, world_size: int, on_gpu: bool, gpu_bytes: float | None,
                      source: str, model: str, node_ranks: int | None = None) -> tuple[TrainConfig, str | None]:
    """cfg with zero_stage=auto decided, and the line saying how (cfg and None when the stage is set):
    memory.choose_stage on the ds_config resolved at each stage it runs at, for GPUs of `gpu_bytes`;
    the ds_config's own stage where no GPU memory (CPU ranks, a login node) or no model is known.
    The stage counts as set by the user, so the resolved config written for the ranks carries it."""
    if cfg.zero_stage != AUTO:
        return cfg, None
    ds_stage = (raw_ds.get("zero_optimization") or {}).get("stage", 0)
    if gpu_bytes is None or not model:
        why = "no model to size" if not model else ("CPU ranks" if not on_gpu else "GPU memory unknown")
        if ds_stage not in (0, 1, 2, 3):
            raise TrainConfigError(f"zero_stage=auto: {why}, and {source} names no stage to fall back on; set "
                                   "zero_stage, or gpu_memory_gib to size it")
        return decided(cfg, ds_stage), f"zero_stage auto -> {ds_stage} ({why}: the ds_config's stage {ds_stage})"
    size = model_size(model)
    candidates, error = {}, None
    for stage in (1, 2, 3):
        try:
            staged, ds = resolve(decided(cfg, stage), raw_ds, world_size, on_gpu, source, deepspeed_checks=False,
                                 hidden_size=size.hidden)
        except TrainConfigError as err:  # offload_param and ZeRO-3's "auto" sizes need stage 3
            error = err
            continue
        candidates[stage] = states_for(size.params, size.largest_param, ds, staged.optimizer, world_size,
                                       size.largest_layer)
    if not candidates:
        raise error
    stage = choose_stage(candidates, gpu_bytes, ds_stage, node_ranks)
    return decided(cfg, stage), (f"zero_stage auto -> {stage} (the lowest stage whose model states fit "
                                 f"{FIT_FRACTION:.0%} of each {gib(gpu_bytes)} GPU)")


def decided(cfg: TrainConfig, stage: int) -> TrainConfig:
    """cfg with this ZeRO stage, as if the user had set it (it then overrides the ds_config's)."""
    return replace(cfg, zero_stage=stage, given_keys=cfg.given_keys | {"zero_stage"})


def check_resume(cfg: TrainConfig, world_size: int) -> str | None:
    """The checkpoint tag to resume from (None when not resuming); refuses a fresh start over old
    checkpoints and a resume that would change the trajectory."""
    resume_dir = cfg.resume_dir
    if resume_dir is None:
        if (cfg.checkpoint_dir / "latest").exists():
            raise TrainConfigError(f"{cfg.checkpoint_dir} already holds checkpoints: pass --resume to continue "
                                   "that run, or choose a new output_dir")
        return None
    latest = resume_dir / "latest"
    if not latest.is_file():
        raise TrainConfigError(f"resume: no DeepSpeed checkpoint in {resume_dir} (no 'latest' file)")
    tag = latest.read_text().strip()
    state_file = resume_dir / tag / STATE_FILE
    if not state_file.is_file():
        raise TrainConfigError(f"resume: checkpoint {resume_dir / tag} is incomplete (no {STATE_FILE})")
    saved = json.loads(state_file.read_text())
    for name in TRAJECTORY_FIELDS:
        old, new = saved["config"].get(name), getattr(cfg, name)
        if old != new:
            raise TrainConfigError(f"resume: {name} was {old!r} in {resume_dir / tag}, now {new!r}; a resumed "
                                   "run must keep the settings that shape training")
    if saved.get("world_size") != world_size:
        raise TrainConfigError(f"resume: the checkpoint was written by {saved.get('world_size')} ranks, this "
                               f"launch has {world_size} (ZeRO partitions are per rank)")
    return tag


# ---------------------------------------------------------------- dry run


class ModelSize(NamedTuple):
    params: int
    largest_param: int  # the largest tensor (DeepSpeed's offload copy buffers)
    largest_layer: int  # the largest module's own parameters (DeepSpeed's ZeRO-3 estimator)
    hidden: int  # the hidden size (ZeRO-3's bucket sizes)


@functools.lru_cache(maxsize=8)  # a dry run sizes the model for the fit check and again for the report
def model_size(model_ref: str) -> ModelSize:
    """The model's parameters, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolkit.models import RANDOM_PREFIX, random_config, resolve_source

    ref = resolve_source(model_ref)
    config = random_config(ref[len(RANDOM_PREFIX):]) if ref.startswith(RANDOM_PREFIX) else AutoConfig.from_pretrained(ref)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelSize(sum(p.numel() for p in model.parameters()), max(p.numel() for p in model.parameters()),
                     max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                     int(config.hidden_size))


def count_parameters(model_ref: str) -> int:
    return model_size(model_ref).params


def ranks_per_node(devices: dict[str, list[int]] | None, world_size: int) -> int:
    """The most ranks one node runs (its GPUs' memory and its host memory hold that many): the
    largest node's share of `devices` (per node, the GPU indices or CPU slots its ranks get), else
    every rank on one node."""
    return max(map(len, devices.values())) if devices else world_size


def describe(plan: RunPlan) -> str:
    cfg, ds, tok = plan.cfg, plan.ds_config, plan.tokenizer
    lines = ["== training config (resolved)", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
             f"== ds_config: {cfg.ds_config_path()} (resolved)", json.dumps(ds, indent=2)]
    if plan.hosts:
        lines += ["== hostfile", *(f"{h} slots={n}" for h, n in plan.hosts.items())]
    b = plan.batches
    note = plan.batch_note
    lines += [f"== batch arithmetic ({plan.world_size} {'GPU' if plan.on_gpu else 'CPU'} rank(s))",
              f"train_batch_size {b.global_batch} = micro_batch_size {b.micro} x gradient_accumulation_steps "
              f"{b.accum} x world size {b.world}", *([f"({note})"] if note else []),
              f"{len(plan.train_items)} training items -> {b.steps_per_epoch} optimizer steps per epoch "
              f"(last batch padded by wrap-around), {plan.total_steps} steps in {cfg.epochs} epoch(s)"
              + (f" (max_steps {cfg.max_steps})" if cfg.max_steps else "") + ", "
              f"{plan.warmup_steps} warm-up",
              f"{len(plan.dev_items)} dev items, evaluated "
              + (f"every {cfg.eval_every_steps} steps" if cfg.eval_every_steps else "every epoch")]
    if plan.categories:
        counts = Counter(plan.categories.get(it.id, "uncategorised") for it in plan.train_items)
        lines.append("training items per category: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    ex = plan.examples[0]
    n_prompt = sum(1 for t in ex.labels if t == -100)
    lines += ["== tokenised example (loss on the target only)",
              f"item: {ex.item_id}", f"prompt ({n_prompt} tokens, masked): {tok.decode(ex.input_ids[:n_prompt])!r}",
              f"target ({ex.target_tokens} tokens, trained): {tok.decode(ex.input_ids[n_prompt:])!r}",
              f"input_ids: {list(ex.input_ids)}", f"labels:    {list(ex.labels)}"]
    size = model_size(cfg.model)
    lines += describe_devices(plan.devices, plan.on_gpu) if plan.devices else []
    lines += plan.memory_lines or describe_memory(
        states_for(size.params, size.largest_param, ds, cfg.optimizer, plan.world_size, size.largest_layer),
        plan.gpu_bytes, "the smallest GPU this rank sees", plan.on_gpu, ranks_per_node(plan.devices, plan.world_size),
        stage_line=plan.zero_stage_line)
    est = disk_estimate(size.params, ds["bf16"]["enabled"], cfg.optimizer, cfg.keep_last_n,
                        stage=ds["zero_optimization"]["stage"])
    lines += [f"== disk for checkpoints and the export under {cfg.out}", *describe_disk(est, cfg.keep_last_n)]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
