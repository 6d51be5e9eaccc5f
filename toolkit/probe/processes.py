"""What a dead actor leaves behind: the processes it started (a vLLM engine core, its tensor-parallel
workers) can outlive it and keep their GPU memory, so a replacement on the same GPU fails to start.

An actor reports its process tree (`process_tree()`, in its `info()`); once it died, the group kills
what is left of that tree on the node where it ran and waits until it is gone (`kill_leftovers`).

Why Ray does not do this alone (Ray 2.60, seen on this machine): each worker gets a process group of
its own and the raylet kills that group when the worker dies (RAY_process_group_cleanup_enabled), so
children that stay in the group die with the actor, but a descendant that started a session or group
of its own survives, and with that option off even the direct children survive a SIGKILL. vLLM 0.32
stops its engine core only from the LLM's finalizer (v1/engine/utils.py CoreEngineProcManager: a
clean exit or garbage collection), and its TP workers watch only the engine core (a death pipe,
v1/executor/multiproc_executor.py): nothing in vLLM notices a SIGKILLed or OOM-killed front end.
"""
from __future__ import annotations

import logging
from typing import Iterable

from toolkit.train.devices import wait_for_exit

log = logging.getLogger("toolkit.probe.processes")
LEFTOVER_WAIT_S = 30.0
# A pid is taken for the recorded process only if its start time matches: a pid the kernel handed to
# a new process meanwhile is left alone. Start times are counted in clock ticks (10 ms): 1 s is slack
# enough for rounding, and no pid is recycled within a second of its previous owner's start.
START_TIME_SLACK_S = 1.0


def process_tree() -> list[tuple[int, float]]:
    """(pid, start time) of this process and of every process it started, recursively."""
    import psutil

    me = psutil.Process()
    tree = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            tree.append((proc.pid, proc.create_time()))
        except psutil.NoSuchProcess:  # exited while we looked
            continue
    return tree


def kill_processes(processes: Iterable[tuple[int, float]], timeout_s: float = LEFTOVER_WAIT_S) -> list[int]:
    """SIGKILL those of `processes` (pid, start time) still running on this node and wait until they
    have exited; their pids. DeviceBusyError (toolkit.train.devices) if some outlive `timeout_s`."""
    import psutil

    killed = []
    for pid, started in processes:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) > START_TIME_SLACK_S:
                continue  # the pid belongs to another process now
            proc.kill()
            killed.append(pid)
        except psutil.NoSuchProcess:
            continue
    wait_for_exit(killed, timeout_s, what="leftover process")
    return killed


def kill_leftovers(infos: Iterable[dict], timeout_s: float = LEFTOVER_WAIT_S) -> list[int]:
    """Kill the recorded process trees of dead actors (their `info()`: `node_id`, `processes`), each
    on its own node, and wait until they are gone; the pids killed. On the driver's node directly;
    elsewhere in a Ray task pinned to that node (the driver may sit on another machine), all nodes
    at once. Raises DeviceBusyError when processes outlive `timeout_s`, or Ray's error when a node
    cannot run the task (a lost node takes its processes with it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_node: dict[str | None, list] = {}
    for info in infos:
        if info and info.get("processes"):
            by_node.setdefault(info.get("node_id"), []).extend(tuple(p) for p in info["processes"])
    here = ray.get_runtime_context().get_node_id()
    remote_kill = ray.remote(kill_processes)
    refs = [remote_kill.options(num_cpus=0,  # runs even when the actors hold every CPU
                                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                                max_retries=0).remote(processes, timeout_s)
            for node, processes in by_node.items() if node not in (None, here)]
    killed = kill_processes(by_node.get(here, []) + by_node.get(None, []), timeout_s)
    for pids in ray.get(refs, timeout=timeout_s + 60):  # + the time to start a worker on that node
        killed.extend(pids)
    return killed
