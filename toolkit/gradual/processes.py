"""What the pipeline's steps need of the processes around them: the probe's Ray actors gone before a
training launch takes their devices, a model's memory freed after an evaluation, and the DeepSpeed
launcher run with its output logged."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

RAY_RELEASE_S = 120  # how long the actors of a finished probe may take to exit before a training launch


class PipelineError(RuntimeError):
    """A step failed; the message names the step and where its log is."""


def release_ray(timeout_s: float = RAY_RELEASE_S) -> None:
    """Let go of Ray before a training launch: wait (bounded) until the actors this driver started are
    dead in Ray's view and, on this node, their processes have exited (ray.kill is asynchronous),
    then disconnect. The training ranks then wait for their GPUs' memory themselves (gpu_wait_s)."""
    import ray

    if not ray.is_initialized():
        return
    from toolkit.adapters.ray_internals import job_actors
    from toolkit.train.devices import DeviceBusyError, wait_for_exit

    context = ray.get_runtime_context()
    job = ray.JobID.from_hex(context.get_job_id())
    deadline, since_ms = time.monotonic() + timeout_s, (time.time() - timeout_s) * 1000
    recent: set[str] = set()  # actors alive now or ended lately (older pids may belong to others by now)
    while True:
        actors = job_actors(job)
        recent |= {i for i, a in actors.items() if a["State"] != "DEAD" or a["EndTime"] >= since_ms}
        alive = [a for a in actors.values() if a["State"] != "DEAD"]
        if not alive:
            break
        if time.monotonic() >= deadline:
            names = ", ".join(sorted({a["ActorClassName"].rsplit(".", 1)[-1] for a in alive}))
            raise DeviceBusyError(f"{len(alive)} Ray actor(s) of the probe still alive {timeout_s:g} s after it "
                                  f"finished ({names}); training would compete with them for the GPUs")
        time.sleep(0.2)
    here = context.get_node_id()
    local = [actors[i]["Pid"] for i in recent if actors[i]["Address"]["NodeID"] == here and actors[i]["Pid"]]
    wait_for_exit(local, max(1.0, deadline - time.monotonic()), what="Ray actor process")
    ray.shutdown()


def free_device_memory() -> None:
    """Return what a deleted model held to the device (the next training launch needs the GPU)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_logged(cmd: list[str], log_path: Path, echo: Callable[[str], None], env: dict) -> None:
    """Run a launcher command, teeing its output to `log_path`; show our own lines and errors."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo(f"  $ {' '.join(cmd)}   (log: {log_path})")
    with open(log_path, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env)
        tail: list[str] = []
        for line in proc.stdout:
            fh.write(line)
            tail = (tail + [line.rstrip()])[-20:]
            if "toolkit." in line or "error" in line.lower():
                echo("  | " + line.rstrip())
        code = proc.wait()
    if code != 0:
        raise PipelineError(f"training failed (exit {code}); last lines:\n" + "\n".join(tail) + f"\nfull log: {log_path}")
