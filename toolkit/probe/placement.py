"""Where the probe's actors run, decided once at the edge (`gradual probe`, `gradual run`'s preflight
and probe steps): `plan_placement` turns a Placement whose unset counts mean auto, and a described set
of nodes, into a PlacementPlan with every count fixed. GPU first:

* GPUs visible, no GPU count asked: the own engines (fast, reference) run one actor per GPU; vLLM runs
  the smallest tensor-parallel size (1/2/4/8) the model's heads split by whose share of the 16-bit
  weights fits WEIGHTS_FRACTION of a GPU, one actor per that many GPUs of a node. CPUs per actor: the
  node's CPUs shared by its actors, 1 to MAX_AUTO_CPUS.
* No GPU (or gpus_per_actor=0, said in one warning when GPUs are visible): CPU_ACTORS one-thread actors.
* Counts the user set are kept; the others are filled around them (more actors than GPUs: equal shares).

The nodes are this machine (torch's view: CUDA_VISIBLE_DEVICES applies) or, with a Ray cluster, its
live nodes (`ray.nodes()`; each GPU node's memory read by nvidia-smi, which creates no CUDA context).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from .memory import (CPU_BATCH_PROMPTS, batch_memory_budget, cache_length, kv_bytes, kv_bytes_per_row,
                     prompt_batch_size)
from .pool import Placement
from .vllm_engine import (TENSOR_PARALLEL_SIZES, Refusal, head_split_error, head_split_reason, tensor_parallel_error,
                          tensor_parallel_size)

CPU_ACTORS = 2  # two one-thread actors beat one two-thread actor on 2 cores (no intra-op sync)
MAX_AUTO_CPUS = 8  # a GPU actor's CPU work (tokenising, sampling bookkeeping) gains little past this
# A vLLM engine's share of the weights may take this much of each GPU: the rest holds its KV cache,
# activations and CUDA graphs (its gpu_memory_utilization is 0.9 of its GPU share: vllm_engine.py).
WEIGHTS_FRACTION = 0.6
GPU_QUERY_TIMEOUT_S = 60


@dataclass(frozen=True)
class NodeResources:
    """One node as the plan sees it: its GPUs (the memory of its smallest; None: unknown) and CPUs."""

    gpus: int
    gpu_memory_bytes: Optional[int]
    cpus: int
    name: str = "this machine"
    cuda_visible_devices: Optional[str] = None  # as set for the driver (this machine only)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config without loading weights."""

    parameters: int
    heads: int
    kv_heads: int
    config: Any = None  # the (text) config: the size of a KV cache row


@dataclass(frozen=True)
class PlacementPlan:
    placement: Placement  # every count set
    nodes: tuple[NodeResources, ...]
    engine: str
    tensor_parallel: int = 1
    notes: tuple[str, ...] = ()  # why the plan chose what it chose
    warning: Optional[str] = None  # one line the caller logs
    requested: Placement = Placement()  # what the user asked for (unset counts: auto)
    local: bool = True  # the nodes are this machine, whose Ray starts with what it has (never grows)

    @property
    def on_gpu(self) -> bool:
        return self.placement.gpus_per_actor > 0

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def line(self) -> str:
        """The plan in one line (logged, and kept in summary.json)."""
        p = self.placement
        each = (f"{p.gpus_per_actor:g} GPU + " if p.gpus_per_actor else "") + f"{p.cpus_per_actor:g} CPU"
        tp = f", tensor parallel {self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        where = (f"{len(self.nodes)} node(s) with {self.gpus} GPU(s)" if self.gpus
                 else f"{len(self.nodes)} node(s) without GPUs")
        return f"{p.num_actors} actor(s) x ({each}) each, engine {self.engine}{tp}, on {where}"


# ---------------------------------------------------------------- the plan (a plain function)


def weight_bytes(dtype: str) -> int:
    """Bytes per weight of a GPU probe in `dtype` ('auto' is bf16 on GPUs: toolkit.models.resolve_dtype)."""
    return 4 if dtype == "float32" else 2


def plan_placement(placement: Placement, nodes: list[NodeResources], engine: str, shape: ModelShape | None = None,
                   dtype: str = "auto") -> PlacementPlan:
    """`placement` with its auto counts filled for these nodes (see the module's docstring). `shape`
    is needed only to choose a vLLM tensor-parallel size (engine vllm, GPUs, no gpus_per_actor)."""
    nodes = tuple(nodes)
    gpus = sum(n.gpus for n in nodes)
    asked = placement.gpus_per_actor
    if asked == 0 or (asked is None and gpus == 0):
        warning = (f"gpus_per_actor=0: the probe runs on CPU although {gpus} GPU(s) are visible"
                   if asked == 0 and gpus else None)
        resolved = dataclasses.replace(
            placement, gpus_per_actor=0.0, cpus_per_actor=placement.cpus_per_actor or 1.0,
            num_actors=placement.num_actors or max(1, min(CPU_ACTORS, sum(n.cpus for n in nodes))))
        return PlacementPlan(resolved, nodes, engine, 1, (), warning, placement)
    notes: tuple[str, ...] = ()
    if asked is not None:
        per_actor = asked
    elif engine == "vllm":
        tp, note = vllm_tensor_parallel(shape, nodes, weight_bytes(dtype))
        per_actor, notes = float(tp), (note,)
    else:
        per_actor = 1.0
    if asked is None and per_actor == 1 and (placement.num_actors or 0) > gpus:
        per_actor = 1 / -(-placement.num_actors // gpus)  # more actors than GPUs: equal shares of each
    capacity = [actors_on_node(n.gpus, per_actor) for n in nodes]
    cpus = placement.cpus_per_actor or float(min(MAX_AUTO_CPUS, max(1, min(
        (n.cpus // k for n, k in zip(nodes, capacity) if k), default=1))))
    resolved = dataclasses.replace(placement, gpus_per_actor=float(per_actor), cpus_per_actor=cpus,
                                   num_actors=placement.num_actors or max(1, sum(capacity)))
    return PlacementPlan(resolved, nodes, engine, tensor_parallel_size(per_actor), notes, None, placement)


def actors_on_node(gpus: int, per_actor: float) -> int:
    """How many actors of `per_actor` GPUs a node of `gpus` GPUs holds (a share never spans two GPUs)."""
    if per_actor < 1:
        return gpus * int(1 / per_actor + 1e-9)
    return gpus // int(per_actor)


def vllm_tensor_parallel(shape: ModelShape | None, nodes: tuple[NodeResources, ...],
                         dtype_bytes: int) -> tuple[int, str]:
    """The smallest TP size in TENSOR_PARALLEL_SIZES that the model's heads split by, that one node
    holds, and whose share of the weights fits WEIGHTS_FRACTION of a GPU; with the reason in words."""
    if shape is None:
        raise ValueError("choosing a vLLM tensor-parallel size needs the model's shape")
    most = max(n.gpus for n in nodes)
    memory = min((n.gpu_memory_bytes for n in nodes if n.gpus and n.gpu_memory_bytes), default=None)
    sizes = [tp for tp in TENSOR_PARALLEL_SIZES
             if tp <= most and not head_split_reason(shape.heads, shape.kv_heads, tp)]
    weights = shape.parameters * dtype_bytes
    if memory is None:
        return sizes[0], (f"tensor parallel {sizes[0]}: the GPUs' memory is unknown (set gpus_per_actor "
                          f"for a model whose {gib(weights)} of weights need several GPUs)")
    for tp in sizes:
        if weights / tp <= WEIGHTS_FRACTION * memory:
            return tp, (f"tensor parallel {tp}: {gib(weights)} of weights, {gib(weights / tp)} per GPU "
                        f"(at most {WEIGHTS_FRACTION:.0%} of {gib(memory)})")
    return sizes[-1], (f"tensor parallel {sizes[-1]}, the largest the heads and a node allow: {gib(weights)} "
                       f"of weights, {gib(weights / sizes[-1])} per GPU, more than {WEIGHTS_FRACTION:.0%} "
                       f"of {gib(memory)} (vLLM may find no room for its KV cache)")


def gpu_shortage(plan: PlacementPlan) -> Refusal | None:
    """Why the actors cannot fit this machine's GPUs (a local Ray never grows), or None; it names the
    count the user set. A cluster is not checked: an autoscaler may add nodes (ready_timeout_s)."""
    p, have = plan.placement, plan.gpus
    if not plan.on_gpu or not plan.local:
        return None
    per_gpu = int(1 / p.gpus_per_actor + 1e-9) if p.gpus_per_actor < 1 else 0
    need = -(-p.num_actors // per_gpu) if per_gpu else p.num_actors * p.gpus_per_actor
    if need <= have:
        return None
    setting = "gpus_per_actor" if plan.requested.gpus_per_actor is not None else "num_actors"
    return Refusal(setting, getattr(plan.requested, setting),
                   f"{p.num_actors} actor(s) need {need:g} GPU(s), this machine has {have} "
                   f"(ray_address joins a cluster)")


def plan_refusal(plan: PlacementPlan, source: str, check_devices: bool = True) -> Refusal | None:
    """Why this plan cannot run its engine on its nodes, or None: a vLLM tensor-parallel size the
    model's heads (`source`, resolved) cannot take or that no node holds (a bundle no node can hold
    would wait ready_timeout_s, then fail vaguely), or (`check_devices`) more GPUs than this machine has."""
    gpus = plan.placement.gpus_per_actor
    if refusal := head_split_error(plan.engine, source, gpus):
        return refusal
    if plan.engine == "vllm" and (reason := tensor_parallel_error(plan.tensor_parallel, [n.gpus for n in plan.nodes])):
        return Refusal("gpus_per_actor", gpus, reason)
    return gpu_shortage(plan) if check_devices else None


def planned_dtype(requested: str, plan: PlacementPlan) -> tuple[str, str]:
    """The dtype the plan's actors are expected to resolve `requested` to (for sizes), and in words.
    The actors decide (toolkit.models.resolve_dtype on their own device); the driver reads only this
    machine's CPU, and no GPU (that would put a CUDA context in the driver, which training then pays for)."""
    from toolkit.models import resolve_dtype

    if requested != "auto":
        return requested, requested
    if plan.on_gpu:
        return "bfloat16", "auto: bfloat16 on GPUs that have it (float32 on older ones), decided by each actor"
    if plan.local:
        here = resolve_dtype("auto", "cpu")
        return here, f"auto: {here} on this machine's CPU, decided by each actor"
    return "float32", "auto: bfloat16 on CPUs with bf16 instructions, else float32, decided by each actor on its node"


# ---------------------------------------------------------------- what the plan is made of


def local_node() -> NodeResources:
    """This machine as the trainer's launch reads it (toolkit.train.devices.this_node: torch's view,
    CUDA_VISIBLE_DEVICES applied), with its CPUs."""
    from toolkit.train.devices import this_node

    node = this_node()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return NodeResources(node.count, min(node.memory_bytes, default=None), cpus, cuda_visible_devices=node.visible)


def query_gpu_memory() -> int | None:
    """The memory of this node's smallest GPU from nvidia-smi (None without one, or where it reports
    no total)."""
    from toolkit.train.devices import query_nvidia_smi

    totals = [g.total_mib for g in query_nvidia_smi(GPU_QUERY_TIMEOUT_S) or () if g.total_mib > 0]
    return int(min(totals)) << 20 if totals else None  # MiB


def cluster_nodes() -> list[NodeResources]:
    """The live nodes of the connected Ray cluster (public ray.nodes()); each GPU node's memory from a
    CPU-less task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    live = [n for n in ray.nodes() if n["Alive"]]
    query = ray.remote(num_cpus=0)(query_gpu_memory)
    refs = {n["NodeID"]: query.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote() for n in live if n["Resources"].get("GPU", 0) >= 1}
    try:
        memory = dict(zip(refs, ray.get(list(refs.values()), timeout=GPU_QUERY_TIMEOUT_S)))
    except ray.exceptions.GetTimeoutError:
        memory = {}
    return [NodeResources(int(n["Resources"].get("GPU", 0)), memory.get(n["NodeID"]), int(n["Resources"].get("CPU", 0)),
                          n.get("NodeManagerHostname") or n["NodeID"][:12]) for n in live]


def probe_nodes(placement: Placement) -> tuple[list[NodeResources], str]:
    """The nodes the actors will run on, and where they were found: "ray" (the Ray this process is
    connected to), "connected" (the cluster at `ray_address`, connected here) or "local" (this
    machine, whose own Ray starts later with what torch sees here)."""
    import ray

    if ray.is_initialized():
        return cluster_nodes(), "ray"
    if placement.ray_address:
        ray.init(address=placement.ray_address, logging_level=logging.WARNING)
        return cluster_nodes(), "connected"
    return [local_node()], "local"


def resolve_placement(placement: Placement, engine: str, dtype: str, source: str) -> tuple[PlacementPlan, str]:
    """The plan for the nodes this probe will run on (probe_nodes: the str), `source` a resolved
    model reference. The one place gradual probe and gradual run resolve auto counts."""
    nodes, found = probe_nodes(placement)
    shape = model_shape(source) if needs_shape(placement, engine, nodes) else None
    plan = plan_placement(placement, nodes, engine, shape, dtype)
    return dataclasses.replace(plan, local=found == "local"), found


def model_shape(ref: str) -> ModelShape:
    """Parameters and heads of a resolved model reference (toolkit.models.resolve_source), weights not
    loaded: its config, and the parameters counted on the meta device."""
    from toolkit.models import RANDOM_PREFIX, random_config
    from toolkit.train.plan import count_parameters

    from .vllm_engine import text_config

    config = random_config(ref[len(RANDOM_PREFIX):]) if ref.startswith(RANDOM_PREFIX) else text_config(ref)
    heads = config.num_attention_heads
    return ModelShape(count_parameters(ref), heads, getattr(config, "num_key_value_heads", None) or heads, config)


def needs_shape(placement: Placement, engine: str, nodes: list[NodeResources]) -> bool:
    return engine == "vllm" and placement.gpus_per_actor is None and any(n.gpus for n in nodes)


# ---------------------------------------------------------------- the dry run's words


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe_node(node: NodeResources) -> str:
    gpus = (f"{node.gpus} GPU(s) of {gib(node.gpu_memory_bytes) if node.gpu_memory_bytes else 'unknown memory'}"
            if node.gpus else "no GPU")
    mask = f" (CUDA_VISIBLE_DEVICES={node.cuda_visible_devices})" if node.cuda_visible_devices is not None else ""
    return f"{node.name}: {gpus}{mask}, {node.cpus} CPU(s)"


def describe_batches(plan: PlacementPlan, shape: ModelShape, dtype: str, streams: int, prompt_tokens: int,
                     max_new_tokens: int) -> str:
    """How big one actor's batches are: the fast engine's memory budget on its GPU share
    (toolkit.probe.memory, the engine's own functions) for the longest prompt."""
    if plan.engine == "vllm":
        return "batches: vLLM schedules its own (KV cache: its gpu_memory_utilization of each actor's GPUs)"
    if plan.engine == "reference":
        return "batches: the reference engine's (Hugging Face generate, a fixed number of prompts at a time)"
    if not plan.on_gpu:
        return f"batches: {CPU_BATCH_PROMPTS} prompts x {streams} answers (fast engine on CPU)"
    memory = min((n.gpu_memory_bytes for n in plan.nodes if n.gpus and n.gpu_memory_bytes), default=None)
    if memory is None:
        return "batches: sized by each actor at run time (the GPUs' memory is unknown here)"
    share = min(1.0, plan.placement.gpus_per_actor)
    dtype_bytes = weight_bytes(dtype)
    weights = shape.parameters * dtype_bytes
    budget = batch_memory_budget(share, memory, weights)
    length = cache_length(prompt_tokens + max_new_tokens)
    row = kv_bytes_per_row(shape.config, length, dtype_bytes)
    prompts = prompt_batch_size(budget, row, streams, kept_bytes=kv_bytes(shape.config, prompt_tokens, dtype_bytes))
    return (f"batch budget per actor: {gib(budget)} ({budget} bytes) of {share:g} x {gib(memory)} less "
            f"{gib(weights)} of weights: {prompts} prompt(s) x {streams} answers per batch for the longest "
            f"prompt ({prompt_tokens} + {max_new_tokens} tokens, cache {length})")


def describe_probe_plan(plan: PlacementPlan, dtype: str, shape: ModelShape, streams: int, prompt_tokens: int,
                        max_new_tokens: int, shards: str) -> list[str]:
    """The probe's plan in words, as `gradual probe --dry-run` and `gradual run --dry-run` print it."""
    p = plan.placement
    lines = ["probe plan: " + plan.line(), *(f"  node {describe_node(n)}" for n in plan.nodes),
             f"  actors: {p.num_actors}, each {p.gpus_per_actor:g} GPU and {p.cpus_per_actor:g} CPU(s); "
             f"engine {plan.engine}, tensor parallel size {plan.tensor_parallel}, dtype {dtype}",
             "  " + describe_batches(plan, shape, dtype, streams, prompt_tokens, max_new_tokens),
             f"  model: {shape.parameters / 1e6:.1f}M parameters ({gib(shape.parameters * weight_bytes(dtype))} "
             f"in {dtype})", f"  shards: {shards}"]
    return lines + [f"  {note}" for note in plan.notes] + ([f"  warning: {plan.warning}"] if plan.warning else [])
