"""Model-state memory per GPU as DeepSpeed 0.19 allocates it (ZeRO-0/1/2/3, bf16 or fp32, optimizer
and parameter offload), the fit check that refuses, before anything starts, a plan whose model states
cannot fit (naming the cheapest layout that does), and zero_stage=auto's choice. Plain functions of a
described run; activations come on top, inside the margin the check leaves.

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
- ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): everything partitioned: the weights (W-th of each), the
  gradients in one flat partition buffer of the accumulation dtype (grad_partitions_flat_buffer), the
  fp32 master partition (`_create_fp32_partitions`; fp32 weights are their own master) and the
  moments. Each module's weights are gathered whole for its forward and backward: DeepSpeed's own
  estimator (stage3.py estimate_zero3_model_states_mem_needs) counts 4 bytes per parameter of the
  largest layer, and so do we. bf16 with fp32 accumulation and Adam: 18 bytes per parameter over W,
  DeepSpeed's figure. Optimizer offload moves the gradient partition, the master copy and the
  moments to host memory; parameter offload moves the weight partitions too, leaving the GPU the
  gathered layer. Host memory there is what moved times the estimator's additional_buffer_factor 1.5.
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
ZERO3_HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's ZeRO-3 estimator: additional_buffer_factor on offloaded states
MAX_WORLD = 4096  # the largest world size a way out proposes
# (stage, optimizer offload, parameter offload): every layout the dry run compares, and the order in
# which a refusal proposes them: the lowest stage first, then offload (slower: host copies, CPU Adam)
LAYOUTS = ((0, False, False), (1, False, False), (2, False, False), (3, False, False),
           (2, True, False), (3, True, False), (3, True, True))
# the ds_config that runs a layout (ZeRO-3 with the optimizer offloaded alone: zero2_offload at stage 3,
# which resolve() gives ZeRO-3's settings)
SHIPPED = {(1, False, False): "zero1", (2, False, False): "zero2", (3, False, False): "zero3",
           (2, True, False): "zero2_offload", (3, True, False): "zero2_offload and zero_stage=3",
           (3, True, True): "zero3_offload"}


@dataclass(frozen=True)
class ModelStates:
    """What sizes the model states on each GPU: the model, the ZeRO layout, the precision, the
    optimizer, and the ds_config settings that size DeepSpeed's own buffers."""

    num_params: int
    stage: int
    world_size: int
    bf16: bool
    optimizer: str
    offload: bool = False  # the optimizer states in host memory (offload_optimizer)
    largest_param: int = 0  # the largest single tensor (offload's copy buffers)
    reduce_bucket_size: int = DS_REDUCE_BUCKET
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    immediate_grad_update: bool = False
    grad_accum_fp32: bool = True  # bf16 weights, gradients accumulated in fp32 (data_types.grad_accum_dtype)
    largest_layer: int = 0  # the largest module's own parameters: what ZeRO-3 gathers at once
    offload_params: bool = False  # ZeRO-3's weight partitions in host memory too (offload_param)


def states_for(num_params: int, largest_param: int, ds: dict, optimizer: str, world_size: int,
               largest_layer: int = 0) -> ModelStates:
    """The ModelStates of a resolved ds_config (no "auto" left)."""
    zero = ds.get("zero_optimization") or {}
    bf16_section = ds.get("bf16") or {}
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    stage = int(zero.get("stage", 0))
    offload = (zero.get("offload_optimizer") or {}).get("device") not in (None, "none")
    offload_params = (zero.get("offload_param") or {}).get("device") not in (None, "none")
    return ModelStates(num_params, stage, world_size, bool(bf16_section.get("enabled")), optimizer,
                       offload and stage >= 1, largest_param,
                       int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)), bool(zero.get("overlap_comm", False)),
                       bool(zero.get("contiguous_gradients", True)), bool(bf16_section.get("immediate_grad_update")),
                       accum.replace("torch.", "") in ("fp32", "float32", "float"), largest_layer,
                       offload_params and stage == 3)


def uses_bf16_optimizer(s: ModelStates) -> bool:
    return s.stage == 1 and s.bf16 and s.grad_accum_fp32 and not s.offload


def estimate(s: ModelStates) -> dict:
    """Bytes per GPU: weights, gradients, optimizer (fp32 master copy + moments), buffers (the largest
    transient: buckets, casts, step copies, ZeRO-3's gathered layer), total; host (bytes per rank in
    host memory, offload); `holder`: the DeepSpeed class that holds them."""
    n, width, world = s.num_params, (2 if s.bf16 else 4), s.world_size
    moments = 2 if s.optimizer == "adamw_8bit" else 8
    master_and_moments = (4 + moments) * n
    weights = width * n
    offload = s.offload and s.stage >= 1
    accum_width = 4 if (not s.bf16 or s.grad_accum_fp32) else width
    host = 0.0
    step_copy = 0.0
    if s.stage == 3:
        weights = width * n / world
        grads = accum_width * n / world
        optimizer = (master_and_moments if s.bf16 else moments * n) / world
        moved = 0.0
        if offload:
            moved, grads, optimizer = grads + optimizer, 0.0, 0.0
        if s.offload_params:  # the GPU keeps only the layer being gathered
            moved, weights = moved + weights, 0.0
        host = moved * ZERO3_HOST_BUFFER_FACTOR
        bucket = 4 * s.largest_layer
        holder = "DeepSpeedZeroOptimizer_Stage3"
    elif s.stage == 0:
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


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def layout(s: ModelStates, stage: int, offload: bool, offload_params: bool) -> ModelStates:
    """These model states under another ZeRO layout; offload runs DeepSpeed's CPUAdam (Adam's fp32 moments)."""
    optimizer = "deepspeed_adam" if offload and not s.offload else s.optimizer
    return dataclasses.replace(s, stage=stage, offload=offload, offload_params=offload_params, optimizer=optimizer)


def layout_key(s: ModelStates) -> tuple[int, bool, bool]:
    return s.stage, s.offload, s.offload_params


def layout_name(s: ModelStates) -> str:
    moved = [what for what, on in (("optimizer", s.offload), ("parameter", s.offload_params)) if on]
    return f"ZeRO-{s.stage}" + (f" + {' and '.join(moved)} offload" if moved else "")


def host_per_node(s: ModelStates, ranks_per_node: int | None = None) -> float:
    return estimate(s)["host"] * min(ranks_per_node or s.world_size, s.world_size)


def fits(s: ModelStates, gpu_bytes: float, ranks_per_node: int | None = None, host_bytes: float | None = None) -> bool:
    """The model states fit FIT_FRACTION of the GPU and, when the host memory of a node is stated,
    what they offload fits it."""
    if estimate(s)["total"] > FIT_FRACTION * gpu_bytes:
        return False
    return host_bytes is None or host_per_node(s, ranks_per_node) <= host_bytes


def fewest_gpus(s: ModelStates, gpu_bytes: float, ranks_per_node: int | None = None,
                host_bytes: float | None = None) -> int | None:
    """The smallest world size, at least the current one, at which these model states fit."""
    for world in range(s.world_size, MAX_WORLD + 1):
        if fits(dataclasses.replace(s, world_size=world), gpu_bytes, ranks_per_node, host_bytes):
            return world
    return None


def choose_stage(candidates: dict[int, ModelStates], gpu_bytes: float | None, ds_stage: int,
                 ranks_per_node: int | None = None) -> int:
    """zero_stage=auto: the lowest of 1, 2, 3 whose model states fit FIT_FRACTION of a GPU of
    `gpu_bytes`. `candidates`: per stage the ds_config can run at, its model states with the offload
    it configures; `ds_stage`: the ds_config's own stage, the answer when the GPU memory is unknown.
    Raises TrainConfigError (stage 3's fit refusal, naming the way out) when none fits."""
    from .config import TrainConfigError

    if gpu_bytes is None:
        return ds_stage
    for stage in sorted(candidates):
        if fits(candidates[stage], gpu_bytes):
            return stage
    highest = candidates[max(candidates)]
    raise TrainConfigError(f"zero_stage=auto: no stage fits: {fit_refusal(highest, gpu_bytes, ranks_per_node)}")


def switch_to(s: ModelStates, other: ModelStates) -> str:
    """What to set to run layout `other` instead of `s`."""
    if (other.offload, other.offload_params) == (s.offload, s.offload_params):
        return f"zero_stage={other.stage}"
    return f"{layout_name(other)}, ds_config={SHIPPED[layout_key(other)]}"


def way_out(s: ModelStates, other: ModelStates, ranks_per_node: int | None) -> str:
    """How to get from layout `s` to `other`, with what `other` needs."""
    est = estimate(other)
    host = (f", ~{human_bytes(est['host'])} of host memory per rank, "
            f"~{human_bytes(host_per_node(other, ranks_per_node))} per node" if est["host"] else "")
    return f"{switch_to(s, other)} (~{gib(est['total'])} per GPU{host})"


def fit_refusal(s: ModelStates, gpu_bytes: float, ranks_per_node: int | None = None,
                host_bytes: float | None = None) -> str | None:
    """None when the model states fit in FIT_FRACTION of a GPU (and what they offload in `host_bytes`
    of a node's memory, when stated); else one line naming the cheapest layout that fits these GPUs
    (the lowest stage first, then offload), the fewest GPUs that fit without more offload, or a
    smaller model."""
    if fits(s, gpu_bytes, ranks_per_node, host_bytes):
        return None
    est = estimate(s)
    budget = FIT_FRACTION * gpu_bytes
    dtype = "bf16" if s.bf16 else "fp32"
    described = (f"{s.num_params / 1e9:.1f}B parameters, {layout_name(s)}, {dtype}, {s.optimizer}, "
                 f"{s.world_size} GPU(s)")
    if est["total"] <= budget:
        head = (f"offloaded model states need ~{human_bytes(host_per_node(s, ranks_per_node))} of host memory per "
                f"node ({described}), more than host_memory_gib={host_bytes / GIB:g}")
    else:
        head = (f"model states need ~{gib(est['total'])} per GPU ({described}), more than the {gib(budget)} that "
                f"{FIT_FRACTION:.0%} of a {gib(gpu_bytes)} GPU leaves (the rest is for activations)")
        if not s.bf16 and fits(dataclasses.replace(s, bf16=True), gpu_bytes, ranks_per_node, host_bytes):
            return f"{head}: train in bf16 (bf16=auto or true on a GPU that has it)"
        if s.stage < 3 and est["weights"] > budget - est["buffers"]:
            head += (f"; the {dtype} weights alone ({gib(est['weights'])}) sit whole on every GPU under ZeRO-0/1/2, "
                     "so neither more GPUs nor offload (it moves optimizer states only) makes them fit there")

    def fit_here(other: ModelStates) -> bool:
        return fits(other, gpu_bytes, ranks_per_node, host_bytes)

    ways = []
    if uses_bf16_optimizer(s) and not s.immediate_grad_update and fit_here(
            with_update := dataclasses.replace(s, immediate_grad_update=True)):
        ways.append("\"bf16\": {\"immediate_grad_update\": true} in the ds_config, as ds_configs/zero1.json has "
                    f"(~{gib(estimate(with_update)['total'])})")
        return f"{head}: use " + ways[0]
    others = [layout(s, *key) for key in LAYOUTS if key[0] >= 1 and key != layout_key(s)]
    cheapest = next((other for other in others if fit_here(other)), None)
    if cheapest is not None:
        ways.append(way_out(s, cheapest, ranks_per_node))
    if cheapest is None or cheapest.offload > s.offload or cheapest.offload_params > s.offload_params:
        # more GPUs, without more offload than now: they shrink only what is partitioned (the most under
        # ZeRO-3) and what each node offloads; each layout named needs fewer GPUs than the ones before
        fewest = MAX_WORLD + 1
        for key in LAYOUTS:
            staged = s if key == layout_key(s) else layout(s, *key)
            if key[0] < max(s.stage, 1) or staged.offload > s.offload or staged.offload_params > s.offload_params:
                continue
            world = fewest_gpus(staged, gpu_bytes, ranks_per_node, host_bytes)
            if world and s.world_size < world < fewest:
                fewest = world
                ways.append(f"at least {world} GPUs " + ("(num_gpus, or a hostfile's nodes)" if staged is s
                                                         else f"with {switch_to(s, staged)}"))
    return f"{head}: use " + " or ".join(ways or ["a smaller model"])


def describe_memory(s: ModelStates, gpu_bytes: float | None, gpu_source: str, on_gpu: bool,
                    ranks_per_node: int, host_bytes: float | None = None, stage_line: str | None = None) -> list[str]:
    """The dry run's lines: every layout of this model on these ranks (per GPU, and host memory per
    rank and per node where it offloads), the chosen one marked, whether each fits when the GPU
    memory is known; how zero_stage=auto chose (`stage_line`); the fit of the chosen one."""
    lines = [f"== model-state memory per {'GPU' if on_gpu else 'rank'}: {s.num_params / 1e6:.1f}M parameters, "
             f"{'bf16' if s.bf16 else 'fp32'}, {s.optimizer}, world size {s.world_size}, {ranks_per_node} per node "
             "(activations not included)", *([stage_line] if stage_line else [])]
    rows = [s if key == layout_key(s) else layout(s, *key) for key in LAYOUTS]
    if layout_key(s) not in LAYOUTS:  # ZeRO-1 with offload, ZeRO-3 with its parameters offloaded alone
        rows.append(s)
    for row in rows:
        est = estimate(row)
        fit = ""
        if on_gpu and gpu_bytes is not None:
            fit = ": fits" if fits(row, gpu_bytes, ranks_per_node, host_bytes) else (
                ": does not fit" + (" the host memory" if est["total"] <= FIT_FRACTION * gpu_bytes else ""))
        lines.append(f"{layout_name(row)}: weights {human_bytes(est['weights'])} + gradients "
                     f"{human_bytes(est['gradients'])} + optimizer {human_bytes(est['optimizer'])} + buffers "
                     f"{human_bytes(est['buffers'])} = {human_bytes(est['total'])} ({est['holder']})"
                     + (f"; host memory {human_bytes(est['host'])} per rank, "
                        f"{human_bytes(host_per_node(row, ranks_per_node))} per node (offloaded, pinned)"
                        if est["host"] else "") + fit + ("  <- chosen" if row is s else ""))
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
        if host_bytes is not None and estimate(s)["host"]:
            lines.append(f"host memory: {human_bytes(host_per_node(s, ranks_per_node))} of a node's "
                         f"{human_bytes(host_bytes)} (host_memory_gib) offloaded")
    return lines


def check_fit(s: ModelStates, gpu_bytes: float | None, ranks_per_node: int | None = None,
              host_bytes: float | None = None) -> None:
    """Raise TrainConfigError (one line, the way out named) when the model states cannot fit."""
    from .config import TrainConfigError

    if gpu_bytes is not None and (refusal := fit_refusal(s, gpu_bytes, ranks_per_node, host_bytes)):
        raise TrainConfigError(refusal)
