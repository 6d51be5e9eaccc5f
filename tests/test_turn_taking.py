"""Probing and training take turns on the same devices: before a training launch the probe's Ray
actors must be gone and every rank's GPU free of other processes (bounded waits, one-line errors).
The GPU decisions are plain functions of nvidia-smi's output, tested here without a GPU; the Ray part
with a real Ray node. (The driver freeing its evaluation model matters only for CUDA's caching
allocator: benchmarks/gpu_check.py --train checks it on a GPU.)"""
import os
import subprocess
import sys

import pytest

from toolkit.train.devices import (DeviceBusyError, GpuState, others_on, parse_nvidia_smi, physical_gpu,
                                   process_alive, wait_for_exit, wait_for_free_gpu)

# what `nvidia-smi --query-gpu=index,uuid,memory.used,memory.total --format=csv,noheader,nounits` and
# `--query-compute-apps=gpu_uuid,pid,process_name,used_memory` print on a 2-GPU node while a probe actor exits
GPUS_CSV = ("0, GPU-5f0c2a3e-91d4-4b8e-a1b2-0c9d8e7f6a51, 31250, 81559\n"
            "1, GPU-77aa0c3e-91d4-4b8e-a1b2-0c9d8e7f6a52, 4, 81559\n")
APPS_CSV = ("GPU-5f0c2a3e-91d4-4b8e-a1b2-0c9d8e7f6a51, 4242, ray::ProbeWorker.probe_shard, 30712\n"
            "GPU-5f0c2a3e-91d4-4b8e-a1b2-0c9d8e7f6a51, 1001, /usr/bin/python3, 530\n")


def test_nvidia_smi_output_is_read_per_gpu():
    gpus = parse_nvidia_smi(GPUS_CSV, APPS_CSV)
    assert [(g.index, g.used_mib, len(g.processes)) for g in gpus] == [(0, 31250, 2), (1, 4, 0)]
    assert gpus[0].processes[0] == (4242, "ray::ProbeWorker.probe_shard", 30712)
    used, procs = others_on(gpus[0], own_pids={1001})  # the driver's own context is not "others"
    assert used == 31250 - 530 and [p[0] for p in procs] == [4242]
    # processes of another container are not listed, but the device's memory counts
    hidden = GpuState(0, "GPU-x", used_mib=20000, total_mib=81559)
    assert others_on(hidden, own_pids={1})[0] == 20000


def test_physical_gpu_of_a_rank():
    assert physical_gpu(1, "0,1", "5f0c2a3e-91d4") == ("gpu-5f0c2a3e-91d4", None)  # torch's UUID wins
    assert physical_gpu(1, "4,5,6,7", None) == (None, 5)  # CUDA_VISIBLE_DEVICES renumbers
    assert physical_gpu(0, "GPU-77aa,GPU-5f0c", None) == ("GPU-77aa", None)
    assert physical_gpu(2, None, None) == (None, 2)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_a_rank_waits_for_its_gpu_then_starts():
    """Busy while the probe actor's memory is still held, free 6 s later: the wait returns 6 s."""
    answers = iter([(GPUS_CSV, APPS_CSV)] * 3 + [(GPUS_CSV.replace("31250", "530"), APPS_CSV.splitlines()[1])])
    clock, lines = Clock(), []
    waited = wait_for_free_gpu("gpu-5f0c2a3e-91d4-4b8e-a1b2-0c9d8e7f6a51", None, {1001}, busy_mib=2048, timeout_s=60,
                               query=lambda: parse_nvidia_smi(*next(answers)), clock=clock, sleep=clock.sleep,
                               log=lines.append)
    assert waited == 6.0 and len(lines) == 1 and "pid 4242 (ray::ProbeWorker.probe_shard) 30.0 GiB" in lines[0]


def test_a_gpu_that_stays_busy_is_one_clear_error():
    clock = Clock()
    with pytest.raises(DeviceBusyError) as err:
        wait_for_free_gpu(None, 0, {1001}, busy_mib=2048, timeout_s=30, query=lambda: parse_nvidia_smi(GPUS_CSV, APPS_CSV),
                          clock=clock, sleep=clock.sleep)
    message = str(err.value)
    assert message.startswith("GPU 0 (GPU-5f0c2a3e-91d4-4b8e-a1b2-0c9d8e7f6a51) has 30.0 GiB in use by other processes:")
    assert "pid 4242" in message and "still after 30 s" in message and "gpu_wait_s" in message and "\n" not in message
    assert clock.now == 30
    # GPU 1 is free at once; without nvidia-smi (or the GPU not listed) nothing can be checked
    assert wait_for_free_gpu(None, 1, set(), 2048, 30, query=lambda: parse_nvidia_smi(GPUS_CSV, APPS_CSV),
                             clock=Clock()) == 0
    assert wait_for_free_gpu(None, 0, set(), 2048, 30, query=lambda: None) is None


def test_waiting_for_processes_to_exit():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(proc.pid)
        with pytest.raises(DeviceBusyError, match=f"1 worker process\\(es\\) still running 0.5 s after being stopped "
                                                   f"\\(pid {proc.pid}\\)"):
            wait_for_exit([proc.pid], 0.5, what="worker process")
        proc.kill()
        assert wait_for_exit([proc.pid], 10) < 10  # gone (a zombie until reaped counts as gone)
    finally:
        proc.kill()
        proc.wait()
    assert not process_alive(proc.pid)


@pytest.mark.slow  # starts a Ray node (~10 s)
def test_release_waits_until_killed_probe_actors_have_exited(monkeypatch):
    """A driver joined to a running Ray (probe.placement.ray_address): ray.kill returns at once, and
    disconnecting does not stop the node, so the actors' processes would still hold their memory when
    training starts. The pipeline's release returns only once they are dead and their processes gone."""
    import ray
    from ray.cluster_utils import Cluster

    from toolkit.gradual.processes import release_ray

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, memory=1 << 30,
                                                                object_store_memory=80 << 20, include_dashboard=False))
    try:
        ray.init(address=cluster.address, logging_level="ERROR")

        @ray.remote(num_cpus=0)
        class Holder:
            def pid(self):
                return os.getpid()

        actors = [Holder.remote() for _ in range(2)]
        pids = ray.get([a.pid.remote() for a in actors])
        ray.kill(actors[0], no_restart=True)  # asynchronous, as the probe's pool does it
        with pytest.raises(DeviceBusyError, match=r"^1 Ray actor\(s\) of the probe still alive 2 s after it finished "
                                                  r"\(Holder\); training would compete with them for the GPUs$"):
            release_ray(timeout_s=2)  # one left alive: a bounded wait, then one line
        assert ray.is_initialized()
        ray.kill(actors[1], no_restart=True)
        release_ray(timeout_s=60)
        assert not ray.is_initialized()
        assert not [pid for pid in pids if process_alive(pid)]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
