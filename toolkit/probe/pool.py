"""A Ray actor group (OpenRLHF-style) with pull scheduling and actor-death recovery, and the probe
worker it runs.

* Placement: one placement-group bundle per actor ({"CPU": c, "GPU": g, custom...}; fractional GPUs
  allowed); STRICT_SPREAD puts one actor per node.
* Pull scheduling: every live actor has at most one task in flight; whichever finishes first (ray.wait)
  gets the next task, so faster actors take more. An actor pulls only once it is ready (model loaded);
  `wait_ready()` waits for all of them, and a run never waits for a re-created actor once no work is left.
* Death (process killed, OOM, node lost): the task it held goes back to the front of the queue for
  the next free actor, and the actor is re-created in its own bundle (up to `max_restarts` per slot),
  once the processes it started are gone (toolkit.probe.processes). A task is handed out again only
  after its previous attempt failed, so results are never duplicated.
* Devices: an actor without a GPU share never sees the node's GPUs; `start_serially` starts one actor
  at a time (vLLM engines sharing a GPU each measure their memory while the others stand still).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Literal, Optional, Union

from toolkit.config import knob, require

from .vllm_engine import CPU_KV_CACHE_GIB

log = logging.getLogger("toolkit.probe.pool")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class ActorGroupError(RuntimeError):
    """The group cannot do its work: it cannot be placed, every actor died, or a task kept killing them."""


AUTO = "auto"


@dataclass(frozen=True)
class Placement:
    """Where the actors run: how many, what each one holds, how they are spread, which cluster. The
    counts left unset (None, or "auto") are filled once, at the edge, by
    toolkit.probe.placement.plan_placement from the GPUs and CPUs it sees; ActorGroup takes the result."""

    num_actors: Optional[Union[int, Literal["auto"]]] = knob(
        None, "model replicas (Ray actors); auto (the default): one per GPU (engine vllm: one per "
              "tensor-parallel group of GPUs), or 2 one-thread actors where no GPU is visible")
    cpus_per_actor: Optional[Union[float, Literal["auto"]]] = knob(
        None, "CPUs per actor (its torch threads on CPU); auto (the default): 1 on CPU, on GPU nodes the "
              "node's CPUs shared by its actors (1 to 8)")
    gpus_per_actor: Optional[Union[float, Literal["auto"]]] = knob(
        None, "GPUs per actor; fractions share a GPU, e.g. 0.5; with engine vllm, 2, 4 or 8 run one engine "
              "tensor parallel over that many GPUs of a node; 0: CPU only; auto (the default): 1 where GPUs "
              "are visible (engine vllm: the smallest tensor-parallel size the weights fit), else 0")
    resources_per_actor: dict = knob(factory=dict, help="custom Ray resources per actor, e.g. {node0: 1}")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = knob(
        "PACK", "placement-group strategy (STRICT_SPREAD: one actor per node)")
    ray_address: Optional[str] = knob(None, "join this Ray cluster ('auto' or host:port; default: start a local one)")
    max_restarts: int = knob(3, "re-creations of a dead actor per slot")
    max_attempts: int = knob(3, "actor deaths one shard may cause before the run gives up")
    ready_timeout_s: float = knob(600.0, "seconds to wait for the actors' resources (an autoscaler may add nodes)")
    vllm_cpu_kv_gib: int = knob(CPU_KV_CACHE_GIB, "engine vllm on CPU: each actor's KV cache in GiB "
                                                  "(vLLM's VLLM_CPU_KVCACHE_SPACE, whose default takes GiBs)")

    def __post_init__(self):
        for name in ("num_actors", "cpus_per_actor", "gpus_per_actor"):
            if getattr(self, name) == AUTO:  # "auto" is spelled None inside the package
                object.__setattr__(self, name, None)
        require(self.num_actors is None or self.num_actors >= 1, "num_actors", self.num_actors, "must be >= 1")
        require(self.cpus_per_actor is None or self.cpus_per_actor > 0, "cpus_per_actor", self.cpus_per_actor,
                "must be > 0")
        gpus = self.gpus_per_actor
        require(gpus is None or gpus >= 0, "gpus_per_actor", gpus, "must be >= 0")
        require(gpus is None or gpus <= 1 or gpus == int(gpus), "gpus_per_actor", gpus,
                "above 1 must be a whole number")
        require(self.strategy in STRATEGIES, "strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}")
        for name in ("max_restarts", "max_attempts"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.vllm_cpu_kv_gib >= 1, "vllm_cpu_kv_gib", self.vllm_cpu_kv_gib, "must be >= 1")

    @property
    def bundle(self) -> dict[str, float]:
        if self.cpus_per_actor is None or self.gpus_per_actor is None:
            raise ValueError("the placement still has auto counts: resolve it with "
                             "toolkit.probe.placement.plan_placement first")
        bundle = {"CPU": self.cpus_per_actor, "GPU": self.gpus_per_actor, **self.resources_per_actor}
        return {k: v for k, v in bundle.items() if v > 0}  # only resources actually asked for


def _death_errors() -> tuple[type[Exception], ...]:
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    return (RayActorError, WorkerCrashedError, OutOfMemoryError)  # ActorDiedError is a RayActorError


class ActorGroup:
    """`num_actors` instances of `actor_cls(*args)`, one per placement-group bundle. The actor class
    must have an `info()` method (called as a readiness probe; its result lands in `self.infos`);
    with `node_id` and `processes` (toolkit.probe.processes.process_tree()) in it, what the actor
    started is killed after it died, before its replacement starts.

    `start_serially`: an actor is created only while no other is starting (slot k+1 once slot k
    answered `info()`): vLLM engines sharing one GPU each profile its memory at start-up and would
    count each other's allocations. A replacement after a death starts while the others run, which
    is fine: the running engines' memory is steady by then."""

    def __init__(self, actor_cls: type, args: tuple = (), config: Placement = Placement(),
                 start_serially: bool = False):
        import ray
        from ray.util.placement_group import placement_group

        self.config = config
        self.start_serially = start_serially
        self._remote_cls = ray.remote(actor_cls)
        self._args = args
        n = config.num_actors
        self.pg = placement_group([config.bundle] * n, strategy=config.strategy)
        try:
            ray.get(self.pg.ready(), timeout=config.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise ActorGroupError(
                f"cannot place {n} actor(s) with {config.bundle} each (strategy {config.strategy}) within "
                f"{config.ready_timeout_s:.0f}s; the cluster has {ray.cluster_resources()}") from None
        self.actors: list[Any] = [None] * n  # None: not created yet
        self.live = set(range(n))
        self.restarts = [0] * n
        self.infos: list[dict | None] = [None] * n
        self.tasks_done = Counter()  # slot -> tasks finished
        self._waiting = deque(range(n))  # slots to create, in order
        self._create_waiting()

    def _starting(self) -> bool:
        return any(self.actors[s] is not None and self.infos[s] is None for s in self.live)

    def _create_waiting(self) -> list[int]:
        """Create the waiting slots' actors (with start_serially: one, once none is starting); their slots."""
        created = []
        while self._waiting and not (self.start_serially and self._starting()):
            slot = self._waiting.popleft()
            self.actors[slot] = self._create(slot)
            created.append(slot)
        return created

    def _create(self, slot: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.config
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=slot)
        # Ray 2.60 leaves CUDA_VISIBLE_DEVICES as the node has it for a worker with no GPU share
        # (ray/_private/utils.py set_visible_accelerator_ids skips an empty id list unless
        # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1; ray-project/ray#54868), so CUDA would hand such an
        # actor GPU 0. A GPU actor's variable is set by Ray. Ray merges these env_vars into the job's
        # runtime env (working_dir and other env_vars stay).
        options = {} if c.gpus_per_actor else {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
        # max_restarts=0: we re-create dead actors ourselves, so a restart never races a queued call.
        return self._remote_cls.options(
            num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor, resources=dict(c.resources_per_actor),
            max_restarts=0, max_task_retries=0, scheduling_strategy=strategy, **options).remote(*self._args)

    def _restart(self, slot: int, err: Exception) -> None:
        import ray

        if getattr(err, "actor_init_failed", False):  # the constructor raised: a restart would too
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            raise ActorGroupError(f"actor {slot} failed to start: {lines[-1]}") from None
        try:
            ray.kill(self.actors[slot], no_restart=True)  # frees its bundle if it is only unreachable
        except Exception:  # already gone
            pass
        self.restarts[slot] += 1
        who = self.infos[slot] or {}
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        killed = self._kill_leftovers([who], f"actor {slot}")
        self.infos[slot] = None  # not ready, and nothing of it left to kill
        if killed:
            log.info("actor %d: stopped the %d process(es) it left (pid %s)", slot, len(killed),
                     ", ".join(map(str, killed)))
        if self.restarts[slot] > self.config.max_restarts:
            self.live.discard(slot)
            log.warning("actor %d (pid %s) died (%s); out of restarts, dropping it", slot, who.get("pid"), first_line)
            if not self.live:
                raise ActorGroupError(f"every actor died; last error: {first_line}")
            return
        log.warning("actor %d (pid %s) died (%s); restarting it (%d/%d)", slot, who.get("pid"), first_line,
                    self.restarts[slot], self.config.max_restarts)
        self.actors[slot] = None
        self._waiting.appendleft(slot)  # created by the caller's _create_waiting()

    @staticmethod
    def _kill_leftovers(infos: list[dict], whose: str) -> list[int]:
        """What these actors started (a vLLM engine core, TP workers) can outlive them and keep GPU
        memory that a replacement or the next job needs: kill it and wait until it is gone."""
        from .processes import kill_leftovers

        try:
            return kill_leftovers(infos)
        except Exception as err:  # DeviceBusyError, a lost node: whatever comes next is tried anyway
            lines = str(err).strip().splitlines() or [type(err).__name__]
            log.warning("%s: could not stop every process it started (%s)", whose, lines[0])
            return []

    def wait_ready(self) -> list[dict]:
        """Block until every actor has loaded (restarting any that die meanwhile); their infos."""
        self._loop(deque(), "info", lambda *_: None, until_ready=True)
        return [info for info in self.infos if info is not None]

    def run(self, tasks: Iterable[tuple[Hashable, Any]], method: str,
            on_result: Callable[[Hashable, Any], None]) -> None:
        """Call `actor.method(payload)` once per (key, payload), pulling work as actors free up, and
        `on_result(key, result)` on the driver as each succeeds. Raises ActorGroupError when it cannot
        finish; an exception raised inside a task (a bug, bad data) propagates as is."""
        self._loop(deque(tasks), method, on_result, until_ready=False)

    def _loop(self, pending: deque, method: str, on_result: Callable, until_ready: bool) -> None:
        import ray

        death_errors = _death_errors()
        inflight: dict[Any, tuple[int, Hashable, Any]] = {}  # ref -> (slot, key, payload); key None = probe
        idle: list[int] = []
        deaths = Counter()

        def dispatch() -> None:
            while idle and pending:
                slot = idle.pop(0)
                if slot in self.live:
                    key, payload = pending.popleft()
                    inflight[getattr(self.actors[slot], method).remote(payload)] = (slot, key, payload)

        def probe(slot: int) -> None:
            inflight[self.actors[slot].info.remote()] = (slot, None, None)

        for slot in sorted(self.live):
            if self.infos[slot] is not None:
                idle.append(slot)
            elif self.actors[slot] is not None:
                probe(slot)  # not known to be ready yet: it pulls work once its model is loaded
        for slot in self._create_waiting():
            probe(slot)
        dispatch()

        def busy() -> bool:  # actors still restarting are not waited for once all tasks are done
            return bool(pending) or until_ready or any(k is not None for _, k, _ in inflight.values())

        while inflight and busy():
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, key, payload = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except death_errors as err:
                if key is not None:
                    deaths[key] += 1
                    if deaths[key] >= self.config.max_attempts:
                        raise ActorGroupError(f"task {key!r} was lost with its actor {deaths[key]} times; "
                                              f"giving up (last error: {str(err).splitlines()[0]})") from None
                    pending.appendleft((key, payload))  # the oldest work goes first, to a ready actor
                self._restart(slot, err)
                for started in self._create_waiting():
                    probe(started)
                dispatch()
                continue
            except ray.exceptions.RayTaskError as err:  # the task's own exception, as it raised it
                raise err.cause from err
            if key is None:
                self.infos[slot] = result
                for started in self._create_waiting():
                    probe(started)
            idle.append(slot)
            dispatch()  # hand out the next task before the driver spends time on this result
            if key is not None:
                self.tasks_done[slot] += 1
                on_result(key, result)
        if pending:  # unreachable unless every actor was dropped, which raises above
            raise ActorGroupError(f"{len(pending)} task(s) left with no live actor")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in getattr(self, "actors", []):
            if actor is None:
                continue
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        # ray.kill returns at once: the processes go when this returns, not while the next job starts
        self._kill_leftovers([info for info in getattr(self, "infos", []) if info], "the actor group")
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass

    def __enter__(self) -> "ActorGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# ---------------------------------------------------------------- the probe worker


def worker_info() -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return dict(pid=os.getpid(), node_id=ctx.get_node_id(), hostname=socket.gethostname(),
                actor_id=ctx.get_actor_id(), gpu_ids=[str(g) for g in ray.get_gpu_ids()])


def actor_device(gpu_ids: list) -> str:
    """The device of an actor with these Ray GPU ids: its own GPU (Ray sets CUDA_VISIBLE_DEVICES to
    it, so it is cuda:0 inside the actor), or the CPU with no GPU share. Ray 2.60 no longer hides the
    GPUs from a process without a share, so "cuda if available" would put every such actor on GPU 0."""
    return "cuda" if gpu_ids else "cpu"


class ProbeWorker:
    """A Ray actor holding one model replica; probes the shards it is handed."""

    def __init__(self, spec, config, exemplars, cpu_threads: int | None = None, vllm_cpu_kv_gib: int = CPU_KV_CACHE_GIB):
        import dataclasses

        import ray

        from toolkit.data.prompts import ExemplarPool
        from toolkit.models import load_model, resolve_dtype

        from .slick import make_engine

        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)  # Ray's OMP_NUM_THREADS default may differ per node
        t0 = time.perf_counter()
        self.device = actor_device(ray.get_gpu_ids())
        # dtype "auto" decided here, on the device the model runs on: the driver's node may differ
        self.dtype = resolve_dtype(config.dtype, self.device)
        config = dataclasses.replace(config, dtype=self.dtype)
        spec = dataclasses.replace(spec, dtype=self.dtype)
        if config.engine == "vllm":
            from .vllm_engine import start_in_actor

            self.engine = start_in_actor(spec, config, self.device, cpu_threads, vllm_cpu_kv_gib)
        else:
            from .memory import memory_share

            share = memory_share(ray.get_runtime_context().get_assigned_resources().get("GPU", 0))
            if self.device == "cuda" and share < 1:
                import torch

                # Actors sharing a GPU: this process's allocations stop at its share; one past it raises
                # torch's out-of-memory error, which the fast engine retries with smaller batches.
                torch.cuda.set_per_process_memory_fraction(share)
            model, tokenizer = load_model(dataclasses.replace(spec, device=self.device))
            self.engine = make_engine(model, tokenizer, config, memory_share=share)
        self.config = config
        self.pool = ExemplarPool(exemplars)
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        from .processes import process_tree

        # Read once the constructor is done: vLLM starts its engine core and TP workers inside LLM(...),
        # and generating starts none, so the tree is complete (the group kills it after a death).
        return dict(worker_info(), load_s=self.load_s, device=self.device, dtype=self.dtype,
                    processes=process_tree())

    def probe_shard(self, task: tuple[int, list]) -> dict:
        from .slick import probe_items

        index, items = task
        t0 = time.perf_counter()
        rows = probe_items(self.engine, items, self.pool, self.config)
        return dict(index=index, rows=rows, seconds=time.perf_counter() - t0,
                    worker=dict(worker_info(), device=self.device, dtype=self.dtype))
