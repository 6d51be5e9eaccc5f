"""Model-state memory per GPU as DeepSpeed 0.19 allocates it (ZeRO-0/1/2, bf16 or fp32, optimizer
offload), and the fit check that refuses, before anything starts, a plan whose model states cannot
fit. Plain functions of a described run; activations come on top, inside the margin the check leaves.

What each layout holds per GPU (N parameters, W ranks; read from DeepSpeed 0.19's sources):
- ZeRO-0, bf16: DeepSpeed's FP16_(Unfused)Optimizer: bf16 weights and gradients, a full fp32 master
  copy and Adam's moments, and during its step fp32 copies of all gradients. fp32: the torch
  optimizer on the weights themselves (no master copy).
- ZeRO-1, bf16 with fp32 gradient accumulation (what the shipped ds_configs resolve to on GPU), no
  offload: BF16_Optimizer (engine._do_optimizer_sanity_check). It keeps a full-size fp32 gradient
  buffer per parameter group (bf16_optimizer.py `_setup_for_real_optimizer`: zeros_like(the flat bf16
  group, grad_acc_dtype)), not a partition of it; without `bf16.immediate_grad_update` every
  parameter's bf16 .grad stays allocated beside it too (clear_lp_grads zeroes it, never frees it).
  Its gradient all-reduce (engine.allreduce_no_retain) casts a whole group's fp32 buffer to the bf16
  communication dtype at once: a group is one flat tensor, so the bucket size cannot split it.
- ZeRO-1 otherwise (fp32, offload): DeepSpeedZeroOptimizer keeps each parameter's whole gradient
  until the accumulation boundary (in fp32 `grad_accum` beside bf16 weights), plus its partition.
- ZeRO-2: DeepSpeedZeroOptimizer keeps only this rank's partition of the gradients: in fp32 (its
  compact buffer) when bf16 weights accumulate in fp32, else in the weights' dtype, flattened into a
  copy at the step. Gradients pass through `reduce_bucket_size`-element buckets (two with
  overlap_comm) in the weights' dtype (stage_1_and_2.py setup_buckets).
- Offload (ZeRO-1/2): the fp32 master copy, the moments and an fp32 gradient partition live in
  (pinned) host memory with a copy buffer of the partition; the GPU keeps the weights, the buckets
  and a buffer of the largest parameter's size (temp_grad_buffer_for_gpu_offload). The weights
  stay whole on every GPU: offload cannot make a model's weights fit.
- allgather_bucket_size allocates nothing with NCCL: the weights are gathered in place
  (runtime/utils.py all_gather_dp_groups -> all_gather_into_tensor).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .dsconfig import human_bytes

GIB = 2**30
# model states, with their transient buffers, must fit in this share of a GPU's memory: the rest is
# for activations, the CUDA context and the caching allocator's fragmentation
FIT_FRACTION = 0.9
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed 0.19's default reduce_bucket_size (runtime/zero/config.py)
ENGINE_ALLREDUCE_BUCKET = 500_000_000  # engine.py MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0's gradient all-reduce
MAX_WORLD = 4096  # the largest world size a way out proposes


@dataclass(frozen=True)
class ModelStates:
    """What sizes the model states on each GPU: the model, the ZeRO layout, the precision, the
    optimizer, and the ds_config settings that size DeepSpeed's own buffers."""

    num_params: int
    stage: int
    world_size: int
    bf16: bool
    optimizer: str
    offload: bool = False
    largest_param: int = 0  # the largest single tensor (offload's copy buffers)
    reduce_bucket_size: int = DS_REDUCE_BUCKET
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    immediate_grad_update: bool = False
    grad_accum_fp32: bool = True  # bf16 weights, gradients accumulated in fp32 (data_types.grad_accum_dtype)


def states_for(num_params: int, largest_param: int, ds: dict, optimizer: str, world_size: int) -> ModelStates:
    """The ModelStates of a resolved ds_config (no "auto" left)."""
    zero = ds.get("zero_optimization") or {}
    bf16_section = ds.get("bf16") or {}
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    stage = int(zero.get("stage", 0))
    offload = (zero.get("offload_optimizer") or {}).get("device") not in (None, "none")
    return ModelStates(num_params, stage, world_size, bool(bf16_section.get("enabled")), optimizer,
                       offload and stage >= 1, largest_param,
                       int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)), bool(zero.get("overlap_comm", False)),
                       bool(zero.get("contiguous_gradients", True)), bool(bf16_section.get("immediate_grad_update")),
                       accum.replace("torch.", "") in ("fp32", "float32", "float"))


def uses_bf16_optimizer(s: ModelStates) -> bool:
    return s.stage == 1 and s.bf16 and s.grad_accum_fp32 and not s.offload


def estimate(s: ModelStates) -> dict:
    """Bytes per GPU: weights, gradients, optimizer (fp32 master copy + moments), buffers (the largest
    transient: buckets, casts, step copies), total; host (bytes per rank in host memory, offload);
    `holder`: the DeepSpeed class that holds them."""
    n, width, world = s.num_params, (2 if s.bf16 else 4), s.world_size
    moments = 2 if s.optimizer == "adamw_8bit" else 8
    master_and_moments = (4 + moments) * n
    weights = width * n
    offload = s.offload and s.stage >= 1
    host = 0.0
    step_copy = 0.0
    if s.stage == 0:
        grads = width * n
        optimizer = master_and_moments if s.bf16 else moments * n
        step_copy = 4 * n if s.bf16 else 0  # fp32 copies of the gradients during the step
        bucket = min(n, ENGINE_ALLREDUCE_BUCKET) * width  # the all-reduce flattens up to 5e8 gradients
        holder = "FP16_Optimizer (bf16)" if s.bf16 else "no ZeRO optimizer"
    elif uses_bf16_optimizer(s):
        grads = 4 * n + (0 if s.immediate_grad_update else 2 * n)
        optimizer = master_and_moments / world
        bucket = 2 * n  # the bf16 cast of the largest group's fp32 gradients (about all of them)
        holder = "BF16_Optimizer" + (", immediate_grad_update" if s.immediate_grad_update else "")
    else:
        accum_width = 4 if (not s.bf16 or s.grad_accum_fp32) else width
        optimizer = 0.0 if offload else master_and_moments / world
        if s.stage == 1:  # whole gradients until the boundary, then this rank's partition of them
            grads = accum_width * n + (0 if offload else accum_width * n / world)
            bucket_width = 4 if (s.bf16 and s.grad_accum_fp32) else width  # ZeRO-1 stages the fp32 accumulator
        else:
            compact = s.bf16 and s.grad_accum_fp32
            grads = 0.0 if offload else (4 if compact else width) * n / world
            step_copy = 0.0 if (offload or compact) else 4 * n / world
            bucket_width = width
        bucket = s.reduce_bucket_size * bucket_width * (2 if s.overlap_comm else 1) if s.contiguous_gradients else 0
        if offload:
            bucket += s.largest_param * width
            host = (4 + moments + 4 + width) * n / world + s.largest_param * width
        holder = "DeepSpeedZeroOptimizer"
    buffers = max(bucket, step_copy)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "buffers": buffers,
            "total": weights + grads + optimizer + buffers, "host": host, "holder": holder}


def memory_estimate(num_params: int, stage: int, world_size: int, bf16: bool, optimizer: str, offload: bool,
                    **settings) -> dict:
    """`estimate` of the ModelStates these arguments (and keyword settings) describe."""
    return estimate(ModelStates(num_params, stage, world_size, bf16, optimizer, offload, **settings))


def zero3_bytes_per_gpu(num_params: int, largest_layer: int, world_size: int) -> float:
    """What DeepSpeed's own estimator says ZeRO-3 needs per GPU without offload (stage3.py
    estimate_zero3_model_states_mem_needs, zero_init): the largest layer gathered in fp32-sized
    chunks plus 18 bytes per parameter partitioned. ZeRO-3 is not supported here yet; this sizes the
    way out of a model whose weights cannot sit whole on one GPU."""
    return 4 * largest_layer + int(18 * num_params / world_size)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def fits(s: ModelStates, gpu_bytes: float) -> bool:
    return estimate(s)["total"] <= FIT_FRACTION * gpu_bytes


def fewest_gpus(s: ModelStates, gpu_bytes: float) -> int | None:
    """The smallest world size, at least the current one, at which these model states fit."""
    for world in range(s.world_size, MAX_WORLD + 1):
        if fits(dataclasses.replace(s, world_size=world), gpu_bytes):
            return world
    return None


def fit_refusal(s: ModelStates, gpu_bytes: float, largest_layer: int = 0) -> str | None:
    """None when the model states fit in FIT_FRACTION of a GPU; else one line with the way out."""
    est = estimate(s)
    budget = FIT_FRACTION * gpu_bytes
    if est["total"] <= budget:
        return None
    layout = (f"{s.num_params / 1e9:.1f}B parameters, ZeRO-{s.stage}{' with offload' if s.offload else ''}, "
              f"{'bf16' if s.bf16 else 'fp32'}, {s.optimizer}, {s.world_size} GPU(s)")
    head = (f"model states need ~{gib(est['total'])} per GPU ({layout}), more than the {gib(budget)} that "
            f"{FIT_FRACTION:.0%} of a {gib(gpu_bytes)} GPU leaves (the rest is for activations)")
    if not s.bf16 and fits(dataclasses.replace(s, bf16=True), gpu_bytes):
        return f"{head}: train in bf16 (bf16=auto or true on a GPU that has it)"
    zero3 = next((w for w in range(s.world_size, MAX_WORLD + 1)
                  if zero3_bytes_per_gpu(s.num_params, largest_layer, w) <= budget), None)
    zero3_way = ("ZeRO-3, which partitions the weights too (not supported yet"
                 + (f"; DeepSpeed's estimate for it: at least {zero3} such GPUs without offload)" if zero3 else ")"))
    if est["weights"] > budget - est["buffers"]:
        return (f"{head}: the {'bf16' if s.bf16 else 'fp32'} weights alone ({gib(est['weights'])}) sit whole on "
                "every GPU under ZeRO-0/1/2, so neither more GPUs nor offload (it moves optimizer states only) "
                f"makes them fit: use {zero3_way} or a smaller model")
    ways = []
    if uses_bf16_optimizer(s) and not s.immediate_grad_update:
        with_update = dataclasses.replace(s, immediate_grad_update=True)
        if fits(with_update, gpu_bytes):
            ways.append("\"bf16\": {\"immediate_grad_update\": true} in the ds_config, as ds_configs/zero1.json has "
                        f"(~{gib(estimate(with_update)['total'])})")
    if s.stage < 2 and fits(dataclasses.replace(s, stage=2), gpu_bytes):
        ways.append(f"zero_stage=2 (~{gib(estimate(dataclasses.replace(s, stage=2))['total'])})")
    if not s.offload:  # offload runs DeepSpeed's CPUAdam: Adam's fp32 moments
        offloaded = dataclasses.replace(s, stage=max(s.stage, 2), offload=True, optimizer="deepspeed_adam")
        if fits(offloaded, gpu_bytes):
            off = estimate(offloaded)
            ways.append(f"optimizer offload, ds_config=zero2_offload (~{gib(off['total'])} per GPU, "
                        f"~{gib(off['host'])} of host memory per rank)")
    # more GPUs shrink only what is partitioned: nothing under ZeRO-0, the most under ZeRO-2
    more_now = fewest_gpus(s, gpu_bytes) if s.stage >= 1 else None
    more_zero2 = fewest_gpus(dataclasses.replace(s, stage=2), gpu_bytes) if s.stage < 2 else None
    if more_now and more_now > s.world_size:
        ways.append(f"at least {more_now} GPUs (num_gpus, or a hostfile's nodes)")
    if more_zero2 and more_zero2 > s.world_size and more_zero2 < (more_now or MAX_WORLD + 1):
        ways.append(f"zero_stage=2 on at least {more_zero2} GPUs")
    return f"{head}: use " + " or ".join(ways or [zero3_way, "a smaller model"])


def describe_memory(s: ModelStates, gpu_bytes: float | None, gpu_source: str, on_gpu: bool,
                    ranks_per_node: int) -> list[str]:
    """The dry run's lines: the chosen layout's breakdown, the other stages for comparison, the fit."""
    lines = [f"== model-state memory per {'GPU' if on_gpu else 'rank'}: {s.num_params / 1e6:.1f}M parameters, "
             f"{'bf16' if s.bf16 else 'fp32'}, {s.optimizer}, world size {s.world_size} (activations not included)"]
    for stage in (0, 1, 2):
        other = dataclasses.replace(s, stage=stage, offload=s.offload and stage >= 1)
        est = estimate(other)
        lines.append(f"ZeRO-{stage}: weights {human_bytes(est['weights'])} + gradients {human_bytes(est['gradients'])}"
                     f" + optimizer {human_bytes(est['optimizer'])} + buffers {human_bytes(est['buffers'])} = "
                     f"{human_bytes(est['total'])} ({est['holder']})"
                     + (f"; host memory {human_bytes(est['host'])} per rank, "
                        f"{human_bytes(est['host'] * ranks_per_node)} per node (offloaded, pinned)" if est["host"] else "")
                     + ("  <- chosen" if stage == s.stage else ""))
    if not on_gpu:
        lines.append("fit: not checked (CPU ranks use host memory)")
    elif gpu_bytes is None:
        lines.append("fit: not checked, the GPU memory is unknown here (set gpu_memory_gib: gradual train "
                     "--gpu-memory-gib, gradual run train.gpu_memory_gib)")
    else:
        total = estimate(s)["total"]
        lines.append(f"fit: {human_bytes(total)} of the {human_bytes(FIT_FRACTION * gpu_bytes)} that "
                     f"{FIT_FRACTION:.0%} of a {human_bytes(gpu_bytes)} GPU ({gpu_source}) leaves: "
                     + (f"fits, {human_bytes(gpu_bytes - total)} left for activations"
                        if total <= FIT_FRACTION * gpu_bytes else "does not fit"))
    return lines


def check_fit(s: ModelStates, gpu_bytes: float | None, largest_layer: int = 0) -> None:
    """Raise TrainConfigError (one line, the way out named) when the model states cannot fit."""
    from .config import TrainConfigError

    if gpu_bytes is not None and (refusal := fit_refusal(s, gpu_bytes, largest_layer)):
        raise TrainConfigError(refusal)
