"""The probe driver: validate early, plan shards, run them on a Ray actor group, persist each finished
shard atomically, resume from finished shards, and write `categories.jsonl` and `summary.json`.

Output directory layout:
  manifest.json          the arguments that fix the results (a re-run must match them); `dtype` as
                         requested ("auto" is resolved by each actor on its own device)
  shards/shard-00007.jsonl  one row per item of that shard, written once, atomically; each row has the
                         dtype its actor resolved (one probe's rows share one: a mix is refused)
  categories.jsonl       every row, in id order
  summary.json           category counts/fractions overall and per relation, throughput, workers, the
                         placement resolved (toolkit.probe.placement), the dtype resolved
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from toolkit.config import knob, require
from toolkit.data.loading import load_qa
from toolkit.data.prompts import ExemplarPool
from toolkit.data.schema import DataError
from toolkit.io import read_jsonl, write_json, write_jsonl
from toolkit.models import EMBEDDED_MODEL, ModelSpec, resolve_source

from .manifest import check_manifest, dtype_mix_error, probe_manifest
from .placement import (PlacementPlan, describe_probe_plan, model_shape, plan_refusal, planned_dtype,
                        resolve_placement)
from .pool import ActorGroup, Placement, ProbeWorker
from .shards import ShardPlan, make_plan
from .slick import CATEGORIES, ProbeConfig, ProbeConfigError, build_requests
from .vllm_engine import preflight_error, starts_serially, vllm_importable

log = logging.getLogger("toolkit.probe")


@dataclass(frozen=True)
class RunConfig:
    """What to probe and where the results go (the settings of the probe itself: ProbeConfig; where
    its actors run: Placement)."""

    data: str = knob(help="QA file or directory (see `gradual data validate`)")
    out: str = knob(help="output directory (re-running resumes it)")
    model: Optional[str] = knob(None, "HF directory, .gguf file, hub id or random:<shape> (default: the embedded SmolLM2)")
    split: str = knob("train", "split to probe")
    exemplar_split: str = knob("dev", "split the few-shot exemplars come from")
    exemplar_data: Optional[str] = knob(None, "dataset the exemplars come from (default: --data)")
    shard_size: int = knob(32, "items per shard (fixes the shard plan)")
    limit: Optional[int] = knob(None, "only the first N items of the shard plan")
    progress: bool = knob(True, "show a progress bar")

    def __post_init__(self):
        check_shard_size(self.shard_size)
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1")


def check_shard_size(value: int) -> None:
    """The check of `shard_size`, wherever a config carries it (the pipeline's probe section too)."""
    require(value >= 1, "shard_size", value, "must be >= 1")


# ---------------------------------------------------------------- validation and manifest


def _load_inputs(run: RunConfig, probe: ProbeConfig):
    items = load_qa(run.data, splits=(run.split,))
    exemplar_path = run.exemplar_data or run.data
    exemplars = load_qa(exemplar_path, splits=(run.exemplar_split,)) if probe.shots > 0 else []
    pool = ExemplarPool(exemplars, source=f"{exemplar_path} (split {run.exemplar_split})")
    pool.check_covers(items, probe.shots)  # DataError naming the relation, before any model loads
    return items, exemplars


# ---------------------------------------------------------------- ray


def check_reachable(address: str) -> None:
    """A wrong `host:port` makes ray.init retry for minutes; a plain TCP connect fails in seconds."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # 'auto', 'ray://...': left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ProbeConfigError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _connect_ray(placement: Placement) -> bool:
    """Connect to the given cluster, reuse an initialised Ray, or start a local one. True if we own it."""
    import ray

    if ray.is_initialized():
        return False
    if placement.ray_address:
        ray.init(address=placement.ray_address, logging_level=logging.WARNING)
        return False
    # logical CPUs may oversubscribe; the GPUs were checked against this machine's (gpu_shortage)
    total_cpus = max(os.cpu_count() or 1, placement.num_actors * placement.cpus_per_actor)
    # address="local": a new cluster of our own, never one that happens to run on this machine
    ray.init(address="local", num_cpus=int(-(-total_cpus // 1)), include_dashboard=False,
             logging_level=logging.WARNING)
    return True


# ---------------------------------------------------------------- checked before anything is written


@dataclass
class ProbeJob:
    """A probe checked against everything that needs no actor: what run_probe runs, what a dry run
    describes."""

    run: RunConfig
    probe: ProbeConfig  # its dtype as requested: each actor resolves "auto" on its own device
    plan: PlacementPlan  # its placement's counts resolved
    items: list
    exemplars: list
    source: str  # the model, resolved (toolkit.models.resolve_source)
    shards: ShardPlan
    manifest: dict
    connected: bool  # to the cluster at ray_address, by prepare_probe
    written_dtype: str | None = None  # of the shards a previous run finished


def check_engine_settings(placement: Placement, engine: str, model: str | None, key=lambda setting: setting) -> None:
    """The settings alone, before any file is read: an engine that is not installed or cannot run this
    placement or model, an unreachable cluster (ProbeConfigError, one line)."""
    if refusal := preflight_error(engine, placement.gpus_per_actor or 0.0, model, vllm_importable()):
        raise ProbeConfigError(refusal.line(key(refusal.setting)))
    if placement.ray_address:
        check_reachable(placement.ray_address)


def checked_plan(placement: Placement, engine: str, model: str | None, source: str, dtype: str,
                 check_devices: bool = True, key=lambda setting: setting) -> tuple[PlacementPlan, str]:
    """The placement plan of a probe (resolve_placement: the plan and where its nodes were found;
    `source`: the model resolved), refused in one line (ProbeConfigError, the setting named by `key`)
    when the engine, the model or the nodes cannot run it: the one check of gradual probe and of
    gradual run's preflight (`check_devices` False: a dry run, on a login node without the GPUs)."""
    check_engine_settings(placement, engine, model, key)
    plan, found = resolve_placement(placement, engine, dtype, source)
    if refusal := plan_refusal(plan, source, check_devices):
        if found == "connected":
            import ray

            ray.shutdown()
        raise ProbeConfigError(refusal.line(key(refusal.setting)))
    return plan, found


def prepare_probe(run: RunConfig, probe: ProbeConfig, placement: Placement) -> ProbeJob:
    """Every check of a probe before Ray starts or anything is written: settings, data, exemplars,
    model, the placement on the nodes it will run on, the output directory. Raises one-line errors."""
    check_engine_settings(placement, probe.engine, run.model)  # cheapest first: before the data is read
    items, exemplars = _load_inputs(run, probe)
    source = resolve_source(run.model)  # ModelError for a bad path; converts a GGUF once, before any actor starts
    # auto counts resolved once, here: the actors and the summary use the plan
    plan, found = checked_plan(placement, probe.engine, run.model, source, probe.dtype)
    try:
        shards = make_plan(items, run.shard_size, probe.seed, run.limit)
        manifest = probe_manifest(run, probe, shards, exemplars)
        written = check_manifest(Path(run.out), manifest, shards)
    except BaseException:
        if found == "connected":
            import ray

            ray.shutdown()
        raise
    return ProbeJob(run, probe, plan, items, exemplars, source, shards, manifest, found == "connected", written)


def longest_prompt_tokens(items: list, exemplars: list, probe: ProbeConfig, model: str | None) -> int:
    """Tokens of the longest few-shot prompt these items are probed with (the engines' encoding)."""
    from toolkit.models import encode_prompts, load_tokenizer

    pool = ExemplarPool(exemplars)
    texts = [r.text for it in items for r in build_requests(it, pool, probe)]
    return max(map(len, encode_prompts(load_tokenizer(model), texts)), default=0)


def plan_lines(plan: PlacementPlan, probe: ProbeConfig, source: str, model: str | None, items: list,
               exemplars: list, shards: ShardPlan) -> list[str]:
    """describe_probe_plan for probing the shard plan's items (of `items`) with this placement plan."""
    by_id = {it.id: it for it in items}
    longest = longest_prompt_tokens([by_id[i] for i in shards.item_ids], exemplars, probe, model)
    dtype, how = planned_dtype(probe.dtype, plan)
    lines = describe_probe_plan(plan, dtype, model_shape(source), 1 + probe.samples, longest,
                                probe.max_new_tokens, f"{shards.num_items} item(s) in {len(shards.shards)} "
                                f"shard(s) of up to {shards.shard_size}")
    return lines + ([f"  dtype {how}"] if how != dtype else [])


def dry_run(run: RunConfig, probe: ProbeConfig, placement: Placement) -> list[str]:
    """`gradual probe --dry-run`: every check run_probe makes, then the plan in words; nothing is
    written and no Ray starts (a cluster at ray_address is joined to see its nodes, then left)."""
    job = prepare_probe(run, probe, placement)
    try:
        return plan_lines(job.plan, job.probe, job.source, run.model, job.items, job.exemplars, job.shards)
    finally:
        if job.connected:
            import ray

            ray.shutdown()


# ---------------------------------------------------------------- the run


@dataclass
class _RunStats:
    """What this invocation did (a resumed run skips finished shards)."""

    rows: list[dict] = field(default_factory=list)
    workers: dict[tuple, dict] = field(default_factory=dict)
    restarts: int = 0
    actor_start_s: float = 0.0
    probe_s: float = 0.0
    dtype: str | None = None  # what the actors resolved (None: no actor ran)

    @property
    def answers(self) -> int:
        return sum(r["num_prompts"] + r["num_samples"] for r in self.rows)

    def add(self, result: dict) -> None:
        self.rows.extend(result["rows"])
        w = result["worker"]
        stats = self.workers.setdefault((w["node_id"], w["pid"]), dict(w, shards=0, items=0, seconds=0.0))
        stats["shards"] += 1
        stats["items"] += len(result["rows"])
        stats["seconds"] += result["seconds"]


def run_probe(run: RunConfig, probe: ProbeConfig, placement: Placement = Placement(), *, on_shard: Callable[[int, dict], None] | None = None,
              pick_order: list[int] | None = None) -> dict:
    """Probe every item of `run.split`; return the summary. `on_shard(index, result)` runs on the driver
    after each shard is persisted; `pick_order` (shard indices) changes the hand-out order (for tests)."""
    t_start = time.perf_counter()
    job = prepare_probe(run, probe, placement)
    probe, plan, items, exemplars, placement = job.probe, job.shards, job.items, job.exemplars, job.plan.placement
    if job.plan.warning:
        log.warning(job.plan.warning)
    log.info("probe placement: %s", job.plan.line())
    out = Path(run.out)
    if not (out / "manifest.json").exists():
        write_json(out / "manifest.json", job.manifest)

    todo = [s for s in plan.shards if not s.path(out).exists()]
    if pick_order is not None:
        rank = {index: r for r, index in enumerate(pick_order)}
        todo.sort(key=lambda s: rank.get(s.index, len(rank) + s.index))
    log.info("probe: %d items in %d shards; %d shards to do", plan.num_items, len(plan.shards), len(todo))
    stats = _RunStats()
    if todo:
        _run_shards(job, todo, stats, on_shard)

    rows = _collect_rows(out, plan)
    write_jsonl(out / "categories.jsonl", rows)
    summary = _summary(rows, stats, probe, run, job.plan, plan, time.perf_counter() - t_start)
    summary.update(dtype=stats.dtype or job.written_dtype or probe.dtype, dtype_requested=probe.dtype)
    write_json(out / "summary.json", summary)
    return summary


def _run_shards(job: ProbeJob, todo: list, stats: _RunStats, on_shard) -> None:
    import ray
    from tqdm import tqdm

    run, probe, placement, plan, exemplars = job.run, job.probe, job.plan.placement, job.shards, job.exemplars
    by_id = {it.id: it for it in job.items}
    out = Path(run.out)
    owns_ray = _connect_ray(placement)
    bar = None
    try:
        t_actors = time.perf_counter()
        # The original source, not the driver's resolved path: each node resolves (and caches) it.
        threads = None if placement.gpus_per_actor else max(1, int(placement.cpus_per_actor))
        spec = ModelSpec(source=run.model, dtype=probe.dtype, attention=probe.load_attention())
        args = (spec, probe, ray.put(exemplars), threads, placement.vllm_cpu_kv_gib)
        log.info("starting %d actor(s) with %s each", placement.num_actors, placement.bundle)
        with ActorGroup(ProbeWorker, args, placement,
                        start_serially=starts_serially(probe.engine, placement.gpus_per_actor)) as group:
            # Every replica loaded before the first shard: model errors surface at once, all actors
            # start together (vLLM engines sharing a GPU: one after another), and the throughput
            # excludes loading.
            infos = group.wait_ready()
            if error := dtype_mix_error(probe.dtype, infos, job.written_dtype):
                raise ProbeConfigError(error)
            dtype = stats.dtype = infos[0]["dtype"]  # what every shard of this run is probed in
            stats.actor_start_s = time.perf_counter() - t_actors
            bar = tqdm(total=plan.num_items, initial=plan.num_items - sum(len(s.item_ids) for s in todo),
                       unit="q", desc="probe", disable=not run.progress, dynamic_ncols=True)
            t0 = time.perf_counter()

            def persist(index: int, result: dict) -> None:
                # a replacement actor may have started on a node whose hardware resolves another dtype
                if error := dtype_mix_error(probe.dtype, [infos[0], result["worker"]], None):
                    raise ProbeConfigError(error)
                write_jsonl(plan.shards[index].path(out), [dict(row, dtype=dtype) for row in result["rows"]])
                stats.add(result)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.update(len(result["rows"]))
                bar.set_postfix({"q/s": f"{len(stats.rows) / elapsed:.2f}",
                                 "ans/s": f"{stats.answers / elapsed:.1f}"})
                if on_shard is not None:
                    on_shard(index, result)

            group.run([(s.index, (s.index, [by_id[i] for i in s.item_ids])) for s in todo], "probe_shard", persist)
            stats.restarts = sum(group.restarts)
            stats.probe_s = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        if owns_ray:
            ray.shutdown()


def _collect_rows(out: Path, plan: ShardPlan) -> list[dict]:
    rows = []
    for shard in plan.shards:
        shard_rows = read_jsonl(shard.path(out))
        if tuple(r["id"] for r in shard_rows) != shard.item_ids:
            raise DataError(shard.path(out), "does not hold the items the shard plan expects; delete it to redo it")
        rows.extend(shard_rows)
    return sorted(rows, key=lambda r: r["id"])


def _fractions(counts: Counter, total: int) -> dict:
    return {c: (counts[c] / total if total else 0.0) for c in CATEGORIES}


def _summary(rows: list[dict], stats: _RunStats, probe: ProbeConfig, run: RunConfig, where: PlacementPlan,
             plan: ShardPlan, wall_s: float) -> dict:
    counts = Counter(r["category"] for r in rows)
    per_relation: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        per_relation[r["relation"]][r["category"]] += 1
    answers = sum(r["num_prompts"] + r["num_samples"] for r in rows)
    full = len(rows) * probe.num_exemplar_sets * (1 + probe.samples)
    new_answers = sum(r["num_prompts"] + r["num_samples"] for r in stats.rows)
    new_tokens = sum(r["generated_tokens"] for r in stats.rows)
    rate = (lambda x: x / stats.probe_s) if stats.probe_s > 0 else (lambda x: 0.0)
    workers = sorted(stats.workers.values(), key=lambda w: (w["node_id"], w["pid"]))
    return dict(
        items=len(rows), counts={c: counts[c] for c in CATEGORIES}, fractions=_fractions(counts, len(rows)),
        relations={rel: dict(items=sum(c.values()), counts={k: c[k] for k in CATEGORIES},
                             fractions=_fractions(c, sum(c.values())))
                   for rel, c in sorted(per_relation.items())},
        total_answers=answers, generated_tokens=sum(r["generated_tokens"] for r in rows),
        # the fraction of full sampling's answers (every prompt x (1 + n)) that lazy sampling did not
        # have to generate: the benchmarks' answers_saved too
        sampling=dict(Counter(r.get("sampling", "full") for r in rows)),
        answers_full=full, answers_saved=1 - answers / full if full else 0.0,
        # Throughput covers this invocation's probing only: loaded actors to last shard.
        probed_items=len(stats.rows), probed_answers=new_answers, wall_s=wall_s,
        actor_start_s=stats.actor_start_s, probe_wall_s=stats.probe_s,
        questions_per_s=rate(len(stats.rows)), answers_per_s=rate(new_answers),
        generated_tokens_per_s=rate(new_tokens),
        # the placement this invocation resolved (auto counts filled: toolkit.probe.placement)
        num_actors=where.placement.num_actors, gpus_per_actor=where.placement.gpus_per_actor,
        cpus_per_actor=where.placement.cpus_per_actor, tensor_parallel=where.tensor_parallel,
        placement=where.line(), engine=probe.engine, model=run.model or EMBEDDED_MODEL,
        num_shards=len(plan.shards), shards_skipped=len(plan.shards) - sum(w["shards"] for w in workers),
        actor_restarts=stats.restarts, workers=workers)
