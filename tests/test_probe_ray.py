"""The Ray probe driver on a real two-node Ray cluster on loopback: shard invariance across actor
counts and pick-up orders, actor and driver deaths, resume, one actor per node, and CLI errors."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import tiny
from tests.tiny import train_memoriser
from toolkit.cli import main
from toolkit.data.prompts import ExemplarPool
from toolkit.io import read_jsonl, write_jsonl
from toolkit.probe.pool import ActorGroup, ActorGroupError, Placement
from toolkit.probe.runner import RunConfig, run_probe
from toolkit.probe.slick import ProbeConfigError
from toolkit.probe.types import ProbeConfig

REPO = Path(__file__).resolve().parents[1]
PROBE = ProbeConfig(num_exemplar_sets=3, shots=2, samples=4, max_new_tokens=8, engine="reference",
                    keep_samples=True, dtype="float32")


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on 127.0.0.1 with explicit resources (STRICT_SPREAD puts one actor on each)."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:  # subprocesses (the CLI driver) inherit these
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes (and clients) use loopback
        mp.setenv("RAY_AUTH_MODE", "disabled")
        node = dict(num_cpus=2, memory=2 << 30, object_store_memory=80 << 20)
        c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
        c.add_node(**node)
        ray.init(address=c.address, logging_level="WARNING")
        yield c
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A tiny Llama that memorised half of the train facts; the other half are guessable (6 answers
    per relation), so the probe yields a mix of categories. 18 train items, 9 shards of 2."""
    root = tmp_path_factory.mktemp("probe-ray")
    items = tiny.synthetic_items(per_relation=12)
    write_jsonl(root / "data.jsonl", [it.to_dict() for it in items])
    train = [it for it in items if it.split == "train"]
    memorised = [it for i, it in enumerate(train) if i % 2 == 0]
    model_dir = tiny.build_model_dir(root / "model")
    train_memoriser(model_dir, memorised, ExemplarPool([it for it in items if it.split == "dev"]), PROBE)
    run = RunConfig(data=str(root / "data.jsonl"), out=str(root / "baseline"), model=str(model_dir),
                    shard_size=2, progress=False)
    return root, run, {it.id for it in memorised}


@pytest.fixture(scope="module")
def baseline(cluster, workload):
    root, run, _ = workload
    summary = run_probe(run, PROBE)
    return summary, read_jsonl(Path(run.out) / "categories.jsonl")


def _run(run: RunConfig, out: Path, placement: Placement = Placement(num_actors=1), probe: ProbeConfig = PROBE,
         **kwargs) -> tuple[dict, list[dict]]:
    summary = run_probe(dataclasses.replace(run, out=str(out)), probe, placement, **kwargs)
    return summary, read_jsonl(out / "categories.jsonl")


@pytest.mark.slow  # shares a 2-node Ray cluster and a trained model (~30 s to set up)
def test_baseline_outputs(baseline, workload):
    summary, rows = baseline
    root, run, memorised = workload
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len(rows) == 18
    assert all(r["category"] == "HighlyKnown" for r in rows if r["id"] in memorised)
    assert len({r["category"] for r in rows}) >= 2  # a mix, so invariance checks mean something
    assert sum(summary["counts"].values()) == 18 and summary["fractions"]["HighlyKnown"] >= 0.5
    for rel in summary["relations"].values():
        assert rel["items"] == 6 and sum(rel["fractions"].values()) == pytest.approx(1.0)
    assert summary["total_answers"] == summary["probed_answers"] == 18 * 3 * 5  # a fresh run: every answer new
    assert 0 < summary["probe_wall_s"] <= summary["wall_s"]
    assert summary["answers_per_s"] == pytest.approx(summary["probed_answers"] / summary["probe_wall_s"])
    assert summary["num_shards"] == 9 and summary["engine"] == "reference"
    # the placement's counts left auto: on two 2-CPU nodes without GPUs, 2 one-thread actors
    assert (summary["num_actors"], summary["gpus_per_actor"], summary["cpus_per_actor"]) == (2, 0, 1)
    assert summary["placement"] == "2 actor(s) x (1 CPU) each, engine reference, on 2 node(s) without GPUs"
    manifest = json.loads((Path(run.out) / "manifest.json").read_text())
    assert manifest["shots"] == 2 and manifest["samples"] == 4 and len(manifest["data_hash"]) == 64
    # the dtype each actor resolved, on every row and in the summary (float32 asked for: float32)
    assert {r["dtype"] for r in rows} == {"float32"} and {w["dtype"] for w in summary["workers"]} == {"float32"}
    assert (summary["dtype"], summary["dtype_requested"], manifest["dtype"]) == ("float32", "float32", "float32")
    assert summary["answers_saved"] == 0.0  # the fraction of full sampling's answers not generated (full here)
    assert sorted(p.name for p in (Path(run.out) / "shards").iterdir()) == [f"shard-{i:05d}.jsonl" for i in range(9)]


@pytest.mark.slow
def test_two_actors_one_per_node_same_rows(baseline, workload, tmp_path):
    root, run, _ = workload
    summary, rows = _run(run, tmp_path, Placement(num_actors=2, strategy="STRICT_SPREAD"))
    assert rows == baseline[1]
    assert {w["device"] for w in summary["workers"]} == {"cpu"}  # no GPU share: the CPU, whatever CUDA says
    nodes = {w["node_id"] for w in summary["workers"] if w["shards"] > 0}
    assert len(nodes) == 2, summary["workers"]  # both nodes did work


@pytest.mark.slow
def test_fast_engine_in_actors_on_two_nodes(baseline, workload, tmp_path):
    """The toolkit's own engine inside Ray actors: the same rows as one actor, and the greedy answers
    (hence P_greedy, HighlyKnown and MaybeKnown) of the reference engine."""
    root, run, memorised = workload
    fast = dataclasses.replace(PROBE, engine="fast")
    summary, rows = _run(run, tmp_path / "two", Placement(num_actors=2, strategy="STRICT_SPREAD"), probe=fast)
    assert summary["engine"] == "fast" and len({w["node_id"] for w in summary["workers"] if w["shards"]}) == 2
    assert _run(run, tmp_path / "one", probe=fast)[1] == rows
    reference = {r["id"]: r for r in baseline[1]}
    assert [r["greedy_answers"] for r in rows] == [reference[r["id"]]["greedy_answers"] for r in rows]
    assert all(r["category"] == "HighlyKnown" for r in rows if r["id"] in memorised)


@pytest.mark.slow
def test_reversed_pickup_order_same_rows(baseline, workload, tmp_path):
    root, run, _ = workload
    summary, rows = _run(run, tmp_path, pick_order=list(range(9))[::-1])
    assert rows == baseline[1]
    mtimes = [(tmp_path / "shards" / f"shard-{i:05d}.jsonl").stat().st_mtime_ns for i in range(9)]
    assert mtimes == sorted(mtimes, reverse=True)  # really written last-shard-first


@pytest.mark.slow
def test_killed_actor_loses_nothing(baseline, workload, tmp_path):
    root, run, _ = workload
    killed = []

    def kill_after_first_shard(index: int, result: dict) -> None:
        if not killed:  # this actor already holds its next shard: SIGKILL it mid-shard
            killed.append(result["worker"]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    summary, rows = _run(run, tmp_path, Placement(num_actors=2), on_shard=kill_after_first_shard)
    assert summary["actor_restarts"] >= 1 and rows == baseline[1]
    assert sum(w["shards"] for w in summary["workers"]) == 9  # every shard persisted exactly once
    assert sum(w["items"] for w in summary["workers"] if w["pid"] == killed[0]) == 2  # only its first shard


@pytest.mark.slow
def test_killed_driver_resumes_from_finished_shards(baseline, workload, cluster, tmp_path):
    root, run, _ = workload
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "toolkit.cli", "probe", "--model", run.model, "--data", run.data,
           "--out", str(out), "--num-exemplar-sets", "3", "--shots", "2", "--samples", "4",
           "--max-new-tokens", "8", "--engine", "reference", "--keep-samples", "--shard-size", "2",
           "--ray-address", cluster.address, "--no-progress", "--dtype", "float32"]
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ.copy())
    shards = out / "shards"
    deadline = time.time() + 120
    while len(list(shards.glob("shard-*.jsonl"))) < 2:
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("shard-*.jsonl")}
    assert 2 <= len(finished) < 9, "the driver finished before it was killed"

    summary, rows = _run(run, out)
    assert rows == baseline[1]
    assert summary["shards_skipped"] == len(finished) and summary["probed_items"] == 18 - 2 * len(finished)
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in
            ((n, shards / n) for n in finished)} == finished  # finished shards were not rewritten


@pytest.mark.slow
def test_local_probe_starts_its_own_ray_beside_a_running_cluster(baseline, workload, cluster, tmp_path):
    """Without --ray-address the probe starts a Ray of its own: it neither joins the cluster already
    running on this machine (Ray 2.60's ray.init() would, then refuse num_cpus) nor disturbs it."""
    root, run, _ = workload
    cmd = [sys.executable, "-m", "toolkit.cli", "probe", "--model", run.model, "--data", run.data,
           "--out", str(tmp_path / "out"), "--num-exemplar-sets", "3", "--shots", "2", "--samples", "4",
           "--max-new-tokens", "8", "--engine", "reference", "--keep-samples", "--shard-size", "2", "--no-progress",
           "--dtype", "float32"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_jsonl(tmp_path / "out" / "categories.jsonl") == baseline[1]
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the test cluster is untouched


@pytest.mark.slow
def test_rerun_skips_everything_and_other_arguments_are_refused(baseline, workload):
    root, run, _ = workload
    summary = run_probe(run, PROBE)  # all shards exist: no actor is started
    assert summary["shards_skipped"] == 9 and summary["workers"] == [] and summary["probed_items"] == 0
    assert read_jsonl(Path(run.out) / "categories.jsonl") == baseline[1]
    with pytest.raises(ProbeConfigError, match=r"different arguments: seed was 0, now 1"):
        run_probe(run, dataclasses.replace(PROBE, seed=1))
    with pytest.raises(ProbeConfigError, match=r"shard_size was 2, now 3"):
        run_probe(dataclasses.replace(run, shard_size=3), PROBE)
    with pytest.raises(ProbeConfigError, match=r"dtype was 'float32', now 'bfloat16'"):  # never mix dtypes
        run_probe(run, dataclasses.replace(PROBE, dtype="bfloat16"))
    # auto: the shards' dtype stands (nothing left to probe, so no actor resolves anything)
    summary = run_probe(run, dataclasses.replace(PROBE, dtype="auto"))
    assert (summary["dtype"], summary["dtype_requested"]) == ("float32", "auto")


def test_a_manifest_written_before_a_probe_setting_existed_resumes_with_its_default(tmp_path, synthetic_items):
    from toolkit.io import write_json
    from toolkit.probe.manifest import check_manifest, probe_manifest
    from toolkit.probe.shards import make_plan

    plan = make_plan(synthetic_items, 8, seed=0)
    manifest = probe_manifest(RunConfig(data="d", out=str(tmp_path)), ProbeConfig(), plan, [])
    write_json(tmp_path / "manifest.json", {k: v for k, v in manifest.items() if k not in ("lazy", "exemplars")})
    assert check_manifest(tmp_path, manifest, plan) is None  # no shard yet, and no difference
    changed = probe_manifest(RunConfig(data="d", out=str(tmp_path)), ProbeConfig(exemplars="per_relation"), plan, [])
    with pytest.raises(ProbeConfigError, match=r"different arguments: exemplars was 'per_item', now 'per_relation'"):
        check_manifest(tmp_path, changed, plan)


def test_actors_resolving_different_dtypes_are_named_in_one_line():
    """dtype=auto on a cluster whose nodes differ (bf16 instructions on one CPU, not on the other)."""
    from toolkit.probe.manifest import dtype_mix_error

    a, b = {"dtype": "bfloat16", "hostname": "node-a"}, {"dtype": "float32", "hostname": "node-b"}
    assert dtype_mix_error("auto", [a, dict(a, hostname="node-c")], None) is None
    assert dtype_mix_error("auto", [a, b], None) == (
        "dtype=auto resolved to 2 dtypes (bfloat16 on node-a; float32 on node-b); one probe's answers come from "
        "one dtype: set dtype to one of them")
    assert dtype_mix_error("auto", [b], "bfloat16") == (
        "dtype=auto resolved to 2 dtypes (bfloat16 on the shards already written; float32 on node-b); one probe's "
        "answers come from one dtype: set dtype to one of them")


@pytest.mark.slow
def test_a_resumed_probe_whose_actors_resolve_another_dtype_is_refused(baseline, workload, tmp_path):
    """Shards probed with dtype=auto on a node that resolved it otherwise: the actors started here find
    out, and the run stops before it writes a shard in their dtype."""
    import shutil
    import socket

    from toolkit.models import resolve_dtype

    root, run, _ = workload
    out = tmp_path / "resumed"
    shutil.copytree(run.out, out)
    here = resolve_dtype("auto", "cpu")  # what an actor on this machine resolves
    other = {"bfloat16": "float32", "float32": "bfloat16"}[here]
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, dtype="auto")))
    for shard in (out / "shards").iterdir():
        write_jsonl(shard, [dict(r, dtype=other) for r in read_jsonl(shard)])
    (out / "shards" / "shard-00004.jsonl").unlink()
    auto = dataclasses.replace(PROBE, dtype="auto")
    said = "; ".join(f"{d} on {w}" for d, w in sorted([(here, socket.gethostname()),
                                                          (other, "the shards already written")]))
    with pytest.raises(ProbeConfigError) as refused:
        run_probe(dataclasses.replace(run, out=str(out)), auto, Placement(num_actors=1))
    assert str(refused.value) == (f"dtype=auto resolved to 2 dtypes ({said}); one probe's answers come from "
                                  f"one dtype: set dtype to one of them")
    assert not (out / "shards" / "shard-00004.jsonl").exists()
    # rows of an older toolkit carry no dtype: its manifest held the one it resolved
    for shard in (out / "shards").iterdir():
        write_jsonl(shard, [{k: v for k, v in r.items() if k != "dtype"} for r in read_jsonl(shard)])
    (out / "manifest.json").write_text(json.dumps(dict(manifest, dtype=other)))
    with pytest.raises(ProbeConfigError, match=rf"dtype was '{other}', now 'float16'"):
        run_probe(dataclasses.replace(run, out=str(out)), dataclasses.replace(PROBE, dtype="float16"))


def _counts(num_actors: int = 1, **kwargs) -> Placement:
    """A placement with every count set, as ActorGroup takes it (the probe resolves "auto" first)."""
    return Placement(num_actors=num_actors, cpus_per_actor=1, gpus_per_actor=0, **kwargs)


class _Toy:
    """A torch-free actor for the group's own error paths."""

    def __init__(self, fail: bool = False):
        if fail:
            raise ValueError("no weights here")

    def info(self) -> dict:
        return {"pid": os.getpid()}

    def work(self, x):
        if x == "boom":
            raise KeyError("bad payload")
        return x * 10


@pytest.mark.slow
def test_group_errors(cluster):
    with pytest.raises(ActorGroupError, match="actor 0 failed to start: ValueError: no weights here"):
        with ActorGroup(_Toy, (True,), _counts()) as group:  # a constructor error: no restart loop
            group.wait_ready()
    with ActorGroup(_Toy, (), _counts(2)) as group:
        results = {}
        group.run([(i, i) for i in range(6)], "work", results.__setitem__)
        assert results == {i: i * 10 for i in range(6)} and sum(group.tasks_done.values()) == 6
        with pytest.raises(KeyError, match="bad payload") as raised:  # a task's own error propagates, typed
            group.run([("k", "boom")], "work", results.__setitem__)
        assert type(raised.value) is KeyError  # as raised, not Ray's wrapper (whose message is a traceback)
    with pytest.raises(ActorGroupError, match="cannot place 9 actor"):
        ActorGroup(_Toy, (), _counts(9, ready_timeout_s=2))


class _Visible:
    """Reports what CUDA would be shown in an actor."""

    def info(self) -> dict:
        return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@pytest.mark.slow
def test_an_actor_without_a_gpu_share_sees_no_gpu(cluster):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset in a worker with num_gpus=0, so CUDA would show it
    every GPU of the node: the group hides them."""
    with ActorGroup(_Visible, (), _counts(2)) as group:
        assert [info["cuda_visible_devices"] for info in group.wait_ready()] == ["", ""]


class _SlowStart:
    """An actor whose start takes a while, recording when it began and ended."""

    def __init__(self, seconds: float):
        self.began = time.time()
        time.sleep(seconds)
        self.ended = time.time()

    def info(self) -> dict:
        return {"began": self.began, "ended": self.ended}

    def work(self, x):
        return x + 1


@pytest.mark.slow
def test_serial_start_creates_each_actor_once_the_previous_one_is_ready(cluster):
    placement = _counts(3)
    with ActorGroup(_SlowStart, (1.0,), placement, start_serially=True) as group:
        results = {}
        group.run([(i, i) for i in range(6)], "work", results.__setitem__)  # starts them too
        serial = group.wait_ready()
    assert results == {i: i + 1 for i in range(6)}
    assert all(later["began"] >= earlier["ended"] for earlier, later in zip(serial, serial[1:])), serial
    with ActorGroup(_SlowStart, (1.0,), placement) as group:
        together = sorted(group.wait_ready(), key=lambda info: info["began"])
    assert any(later["began"] < earlier["ended"] for earlier, later in zip(together, together[1:])), together


_SESSION_OF_ITS_OWN = ("import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)")


class _Spawner:
    """An actor that starts a process in a session of its own, which starts another (as vLLM's
    engine core starts its TP workers), then dies on its first task when it is the first actor on
    its node. A replacement records which of the previous actor's processes still ran when it began."""

    def __init__(self, state_dir: str):
        import psutil
        import ray

        from toolkit.train.devices import process_alive

        state = Path(state_dir) / ray.get_runtime_context().get_node_id()
        self.first = not state.exists()
        self.left_running = [] if self.first else [p for p in json.loads(state.read_text()) if process_alive(p)]
        self.child = subprocess.Popen([sys.executable, "-c", _SESSION_OF_ITS_OWN], start_new_session=True)
        deadline = time.time() + 30
        while len(psutil.Process().children(recursive=True)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        state.write_text(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]))

    def info(self) -> dict:
        from toolkit.probe.pool import worker_info
        from toolkit.probe.processes import process_tree

        return dict(worker_info(), processes=process_tree(), first=self.first, left_running=self.left_running)

    def work(self, x):
        if self.first:
            os._exit(1)  # its processes are in another session: Ray's clean-up of the actor misses them
        return x * 10


@pytest.mark.slow
def test_a_dead_actors_processes_are_gone_before_its_replacement_starts(cluster, tmp_path):
    """One actor per node (the driver's node and the other one, reached with a pinned Ray task):
    each dies on its first task, and its replacement finds none of its processes running."""
    from toolkit.train.devices import process_alive

    results = {}
    with ActorGroup(_Spawner, (str(tmp_path),), _counts(2, strategy="STRICT_SPREAD")) as group:
        firsts = group.wait_ready()
        started = [pid for info in firsts for pid, _ in info["processes"][1:]]
        group.run([(i, i) for i in range(6)], "work", results.__setitem__)
        replacements = group.wait_ready()
        assert group.restarts == [1, 1] and len(started) == 4
        assert all(not info["first"] and info["left_running"] == [] for info in replacements), replacements
        assert not any(process_alive(pid) for pid in started)
        now_running = [pid for info in replacements for pid, _ in info["processes"][1:]]
    assert results == {i: i * 10 for i in range(6)}  # every task finished
    assert len(now_running) == 4 and not any(process_alive(pid) for pid in now_running)  # shutdown stops them too


def test_only_the_recorded_processes_are_killed():
    """A pid whose start time differs from the recorded one belongs to another process: left alone."""
    import psutil

    from toolkit.probe.processes import kill_processes
    from toolkit.train.devices import process_alive

    proc = subprocess.Popen(["sleep", "600"])
    try:
        started = psutil.Process(proc.pid).create_time()
        assert kill_processes([(proc.pid, started - 3600)], timeout_s=5) == [] and process_alive(proc.pid)
        assert kill_processes([(proc.pid, started), (proc.pid + 10**7, started)], timeout_s=5) == [proc.pid]
        proc.wait(timeout=5)
    finally:
        proc.kill()


def test_actor_device_follows_the_gpu_share():
    from toolkit.probe.pool import actor_device

    assert actor_device([]) == "cpu" and actor_device([3]) == "cuda" and actor_device(["0"]) == "cuda"


def test_group_config_bundles():
    assert Placement(cpus_per_actor=2, gpus_per_actor=0.5).bundle == {"CPU": 2, "GPU": 0.5}
    assert _counts(resources_per_actor={"node1": 1}).bundle == {"CPU": 1.0, "node1": 1}
    with pytest.raises(ValueError, match="num_actors=0 must be >= 1"):
        Placement(num_actors=0)


@pytest.mark.slow
def test_cluster_nodes_are_read_from_ray(cluster):
    from toolkit.probe.placement import cluster_nodes, probe_nodes

    nodes = cluster_nodes()
    assert [(n.gpus, n.gpu_memory_bytes, n.cpus) for n in nodes] == [(0, None, 2), (0, None, 2)]
    assert probe_nodes(Placement()) == (nodes, "ray")  # the Ray this process is connected to


# ---------------------------------------------------------------- CLI errors: exit 2, one line


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-cli")
    (root / "empty.jsonl").write_text("")
    items = tiny.synthetic_items(per_relation=8)  # 2 dev items per relation
    write_jsonl(root / "small.jsonl", [it.to_dict() for it in items])
    return root, tiny.build_model_dir(root / "model")


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--data", "{root}/small.jsonl", "--shots", "2"], "model path not found: /nonexistent/model"),
    (["--model", "{model}", "--data", "{root}/empty.jsonl"], "the dataset is empty"),
    (["--model", "{model}", "--data", "{root}/small.jsonl", "--shots", "4"], "relation 'color' has 2 usable exemplars"),
    (["--model", "{model}", "--data", "{root}/small.jsonl", "--samples", "-1"], "samples=-1 must be >= 0"),
    (["--model", "{model}", "--data", "{root}/small.jsonl", "--shots", "2", "--ray-address", "127.0.0.1:1"],
     "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--model", "{model}", "--data", "{root}/small.jsonl", "--shots", "2", "--vllm-cpu-kv-gib", "0"],
     "vllm_cpu_kv_gib=0 must be >= 1"),
])
def test_cli_bad_input_exit_2(cli_inputs, capsys, args, message, dry_run):
    root, model = cli_inputs
    argv = ["probe", *[a.format(root=root, model=model) for a in args], "--out", str(root / "out"),
            "--engine", "reference", *dry_run]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (root / "out").exists()  # failed before writing anything


def test_dry_run_prints_the_plan_and_writes_nothing(cli_inputs, capsys):
    import ray

    root, model = cli_inputs
    had_ray = ray.is_initialized()  # the module's test cluster, when the slow tests ran first
    argv = ["probe", "--model", str(model), "--data", f"{root}/small.jsonl", "--shots", "2", "--out",
            str(root / "out"), "--shard-size", "5", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("probe plan: 2 actor(s) x (1 CPU) each, engine fast, on ")
    assert [line for line in out if line.startswith("  node ")] and "  shards: 12 item(s) in 3 shard(s) of up to 5" in out
    assert "  batches: 16 prompts x 17 answers (fast engine on CPU)" in out
    assert out[-1] == f"probe ok (data, exemplars, model and placement checked); it would write to {root / 'out'}"
    assert not (root / "out").exists() and ray.is_initialized() == had_ray  # nothing written, no Ray started


def test_the_vllm_cpu_kv_cache_is_the_placement_knob(monkeypatch):
    """vLLM's CPU KV cache size comes from probe.placement.vllm_cpu_kv_gib (ProbeWorker passes it to the
    engine it starts), not from an environment variable read at import."""
    from toolkit.probe.vllm_engine import set_cpu_environment

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")  # a value left in the environment
    set_cpu_environment(None, Placement(vllm_cpu_kv_gib=3).vllm_cpu_kv_gib)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert Placement().vllm_cpu_kv_gib == 1
