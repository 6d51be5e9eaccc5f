"""Turn-taking on the GPUs: a training rank starts only once its GPU is free.

Probing and training share the GPUs. When the probe finishes, its Ray actors are killed, but a kill
is asynchronous: an actor process can hold its model's memory for seconds after the driver moved
on, and a driver or another job can hold a GPU too. A rank that starts then runs out of memory
minutes later, or fails its first allocation. So each rank, before it joins the process group,
waits (bounded) until the memory other processes use on its GPU is below a threshold, and fails
with one line naming the GPU, the processes and their memory otherwise.

Read through `nvidia-smi` (no CUDA context is created by the check); the decisions are plain
functions of its output, tested without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

GPU_QUERY = ("nvidia-smi", "--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits")
APPS_QUERY = ("nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
              "--format=csv,noheader,nounits")


class DeviceBusyError(RuntimeError):
    """A GPU stayed occupied by other processes for longer than the wait allows (one line)."""


@dataclass
class GpuState:
    index: int
    uuid: str
    used_mib: float
    total_mib: float
    processes: list[tuple[int, str, float]] = field(default_factory=list)  # (pid, name, MiB)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return 0.0


def parse_nvidia_smi(gpus_csv: str, apps_csv: str) -> list[GpuState]:
    """The two CSV answers of nvidia-smi (GPU_QUERY, APPS_QUERY) as one list of GPUs with their processes."""
    gpus = []
    for line in gpus_csv.strip().splitlines():
        index, uuid, used, total = (part.strip() for part in line.split(","))
        gpus.append(GpuState(int(index), uuid, _number(used), _number(total)))
    by_uuid = {g.uuid: g for g in gpus}
    for line in apps_csv.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 4 or parts[0] not in by_uuid:
            continue
        uuid, pid, name, used = parts[0], parts[1], ",".join(parts[2:-1]), parts[-1]
        by_uuid[uuid].processes.append((int(pid), name, _number(used)))
    return gpus


def query_nvidia_smi(timeout_s: float = 30) -> list[GpuState] | None:
    """This node's GPUs, or None where nvidia-smi is missing or fails (no check possible)."""
    try:
        gpus = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
        apps = subprocess.run(APPS_QUERY, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(gpus, apps)


def normalise_uuid(uuid: str) -> str:
    uuid = uuid.strip().lower()
    return uuid if uuid.startswith(("gpu-", "mig-")) else f"gpu-{uuid}"


def find_gpu(gpus: list[GpuState], uuid: str | None = None, index: int | None = None) -> GpuState | None:
    for g in gpus:
        if (uuid is not None and normalise_uuid(g.uuid) == normalise_uuid(uuid)) or (uuid is None and g.index == index):
            return g
    return None


def others_on(gpu: GpuState, own_pids: set[int]) -> tuple[float, list[tuple[int, str, float]]]:
    """(MiB used on `gpu` by processes other than ours, those processes). The device's own figure
    counts too: processes in other containers are not listed, yet their memory is used."""
    listed = [p for p in gpu.processes if p[0] not in own_pids]
    ours = sum(p[2] for p in gpu.processes if p[0] in own_pids)
    return max(gpu.used_mib - ours, sum(p[2] for p in listed)), listed


def describe_busy(gpu: GpuState, used_mib: float, procs: list[tuple[int, str, float]]) -> str:
    shown = ", ".join(f"pid {pid} ({name}) {mib / 1024:.1f} GiB" for pid, name, mib in procs[:4]) or \
        "processes not visible from here (another container?)"
    return f"GPU {gpu.index} ({gpu.uuid}) has {used_mib / 1024:.1f} GiB in use by other processes: {shown}"


def wait_for_free_gpu(gpu_uuid: str | None, gpu_index: int | None, own_pids: set[int], busy_mib: float,
                      timeout_s: float, poll_s: float = 2.0,
                      query: Callable[[], list[GpuState] | None] = query_nvidia_smi,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                      log: Callable[[str], None] | None = None) -> float | None:
    """Wait until the GPU (by UUID, else index) has at most `busy_mib` used by other processes.
    Returns the seconds waited, or None when it cannot be checked (no nvidia-smi, GPU not listed).
    Raises DeviceBusyError after `timeout_s`."""
    start = clock()
    announced = False
    while True:
        gpus = query()
        gpu = find_gpu(gpus, gpu_uuid, gpu_index) if gpus else None
        if gpu is None:
            return None
        used, procs = others_on(gpu, own_pids)
        if used <= busy_mib:
            return clock() - start
        waited = clock() - start
        if waited >= timeout_s:
            raise DeviceBusyError(f"{describe_busy(gpu, used, procs)}, still after {waited:.0f} s; training needs "
                                  f"it free (at most {busy_mib:g} MiB used by others): the probe's Ray actors not "
                                  "yet gone, or another job? Free the GPU, or raise gpu_wait_s / gpu_busy_mib")
        if log and not announced:
            log(f"waiting for the GPU: {describe_busy(gpu, used, procs)}")
            announced = True
        sleep(poll_s)


def wait_for_this_ranks_gpu(wait_s: int, busy_mib: float, log: Callable[[str], None] | None = None) -> float | None:
    """In a training rank, before it touches its GPU: the GPU of LOCAL_RANK (as torch numbers the
    visible devices) must be free. Nothing to do on CPU or with wait_s == 0."""
    import torch

    if wait_s <= 0 or not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", 0))
    uuid, index = physical_gpu(local, os.environ.get("CUDA_VISIBLE_DEVICES"),
                               getattr(torch.cuda.get_device_properties(local), "uuid", None))
    return wait_for_free_gpu(uuid, index, {os.getpid()}, busy_mib, wait_s, log=log)


def physical_gpu(local_rank: int, visible: str | None, torch_uuid=None) -> tuple[str | None, int | None]:
    """(UUID, nvidia-smi index) of the GPU torch calls cuda:<local_rank>: its UUID when torch reports
    one (unambiguous), else the CUDA_VISIBLE_DEVICES entry (an index or a UUID), else the index itself."""
    if torch_uuid is not None and str(torch_uuid):
        return normalise_uuid(str(torch_uuid)), None
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    if local_rank < len(entries):
        entry = entries[local_rank]
        return (entry, None) if not entry.isdigit() else (None, int(entry))
    return None, local_rank


# ---------------------------------------------------------------- the GPUs a launch uses


@dataclass(frozen=True)
class NodeGpus:
    """This node's GPUs as a single-node launch sees them: the CUDA_VISIBLE_DEVICES mask, how many
    GPUs torch sees through it, each one's total memory (torch's order), nvidia-smi's list (read only
    when the mask names UUIDs), and whether they compute in bf16 (None: no GPU here to ask).
    Built by `this_node`; tests describe a node instead."""

    visible: str | None = None
    count: int = 0
    memory_bytes: tuple[int, ...] = ()
    smi: tuple[GpuState, ...] | None = None
    bf16: bool | None = None


def mask_entries(visible: str | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES as its entries; [] when unset or empty (DeepSpeed's runner treats an
    empty mask as none too)."""
    return [e.strip() for e in visible.split(",") if e.strip()] if visible else []


def mask_names_uuids(visible: str | None) -> bool:
    return any(not e.isdigit() for e in mask_entries(visible))


def this_node() -> NodeGpus:
    """Read this node: the mask, torch's GPU count and memory (torch.cuda.get_device_properties:
    starts the CUDA runtime here, allocates no tensor), nvidia-smi only for a UUID mask."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    memory = tuple(torch.cuda.get_device_properties(i).total_memory for i in range(count))
    smi = query_nvidia_smi() if mask_names_uuids(visible) else None
    return NodeGpus(visible, count, memory, tuple(smi) if smi is not None else None, visible_gpus_have_bf16())


def visible_gpus_have_bf16() -> bool | None:
    """Whether every GPU this process sees computes in bf16 (toolkit.models.gpu_has_bf16); None without
    a GPU. Asked by the launch's plan (this_node) and by each rank (plan.prepare), which sees its node's
    GPUs of the launch (DeepSpeed's launcher gives every rank the same CUDA_VISIBLE_DEVICES), so a node
    plans and trains in one precision."""
    import torch

    from toolkit.models import gpu_has_bf16

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return all(gpu_has_bf16(i) for i in range(count)) if count else None


def smallest_visible_gpu_bytes() -> int | None:
    """The total memory of the smallest GPU this process sees (a rank's zero_stage=auto sizes for it);
    None without a GPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) if count else None


def launch_gpu_ids(node: NodeGpus, num_gpus: int | None) -> list[int] | None:
    """The GPU indices a single-node launch hands its ranks (`deepspeed --include localhost:<ids>`):
    the first `num_gpus` entries of CUDA_VISIBLE_DEVICES (all of them by default), UUIDs mapped to
    nvidia-smi's indices. None without a mask: the launcher takes GPUs 0..N-1 (`--num_gpus`).

    DeepSpeed 0.19's runner accepts integers only here (launcher/runner.py parse_node_config:
    `int(x)` of each slot), sorts them (parse_node_config_list), and its launch.py gives every rank
    CUDA_VISIBLE_DEVICES=<those ids>, with LOCAL_RANK indexing into them. A MIG instance has no such
    index, so a MIG mask is refused. Raises TrainConfigError (one line)."""
    from .config import TrainConfigError

    entries = mask_entries(node.visible)
    if not entries:
        return None
    shown = f"CUDA_VISIBLE_DEVICES={node.visible}"
    if any(e.upper().startswith("MIG-") for e in entries):
        raise TrainConfigError(f"{shown} names MIG instances: the deepspeed launcher hands each rank whole GPUs "
                               "by index (CUDA_VISIBLE_DEVICES=<indices>), not a MIG instance; train on whole GPUs "
                               "(give their indices)")
    if mask_names_uuids(node.visible) and any(e.isdigit() for e in entries):
        raise TrainConfigError(f"{shown} mixes indices and UUIDs; give one kind")
    ids = []
    for entry in entries:
        if entry.isdigit():
            ids.append(int(entry))
            continue
        if node.smi is None:
            raise TrainConfigError(f"{shown}: the deepspeed launcher takes GPU indices, and nvidia-smi (needed to "
                                   f"map the UUID {entry} to one) is not available; give the indices instead")
        # CUDA also takes a unique prefix of a UUID
        found = [g for g in node.smi if normalise_uuid(g.uuid).startswith(normalise_uuid(entry))]
        if len(found) != 1:
            raise TrainConfigError(f"{shown}: nvidia-smi lists {len(found) or 'no'} GPU(s) {entry} on this node")
        ids.append(found[0].index)
    if len(set(ids)) != len(ids):
        raise TrainConfigError(f"{shown} names a GPU twice")
    if num_gpus is not None and num_gpus > len(ids):
        raise TrainConfigError(f"num_gpus={num_gpus}: {shown} makes {len(ids)} GPU(s) visible")
    return sorted(ids[:num_gpus] if num_gpus else ids)


def describe_devices(devices: dict[str, list[int]], on_gpu: bool) -> list[str]:
    """The dry run's lines: per node, the GPU indices its ranks get (CPU runs: how many ranks)."""
    return [f"== devices per node ({'GPU indices' if on_gpu else 'CPU ranks'})",
            *(f"{host}: {', '.join(map(str, ids))}" if on_gpu else f"{host}: {len(ids)} CPU rank(s)"
              for host, ids in devices.items())]


# ---------------------------------------------------------------- processes


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def wait_for_exit(pids: list[int], timeout_s: float, what: str = "process", poll_s: float = 0.2,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until every pid has exited; DeviceBusyError naming those left after `timeout_s`."""
    start = clock()
    while True:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive:
            return clock() - start
        if clock() - start >= timeout_s:
            raise DeviceBusyError(f"{len(alive)} {what}(es) still running {timeout_s:g} s after being stopped "
                                  f"(pid {', '.join(map(str, alive[:8]))}); they hold the memory training needs")
        sleep(poll_s)
