"""launchers/ray_head.sh, ray_worker.sh and ray_stop.sh: a head and a worker started by the scripts on
this machine form one 2-node cluster that a driver joins by the printed address, and ray_stop.sh
stops exactly the nodes it recorded (every process of their sessions), nothing else.

Two facts about Ray 2.60 shape this test. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what tests/test_probe_ray.py
uses to keep its in-process cluster on loopback) makes `ray start --address` refuse to join ("Multi-node
Ray clusters are not supported"), so the scripts run with multi-node enabled; Ray then reports a local
node address (--node-ip-address 127.0.0.1) as the machine's own address, so the head's printed address
is HOST:PORT with the machine's HOST, still this machine. And the nodes get explicit free ports and
temp dirs of their own, so nothing collides with other Ray users of the machine."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_BIN": str(Path(sys.executable).parent / "ray")}
for _name in ("RAY_ADDRESS", "RAY_PORT", "RAY_NODE_IP", "RAY_NUM_CPUS", "RAY_NUM_GPUS", "RAY_MEMORY",
              "RAY_OBJECT_STORE_MEMORY", "RAY_TEMP_DIR", "PRINT_ONLY"):
    ENV.pop(_name, None)
NODE = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(2 * 10**9),
        "--object-store-memory", str(200 * 10**6)]


def script(name: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHERS / name), *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (all held open together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def pids_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def kill_sessions(sids) -> None:
    """Last resort for sessions this test started: SIGKILL whatever the script under test left."""
    for sid in sids:
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def recorded_sessions(temp_dir: Path) -> dict[str, int]:
    return {p.name: int(p.name.rsplit("-", 1)[1]) for p in (temp_dir / "launchers").glob("*-*")
            if p.name.rsplit("-", 1)[1].isdigit()}


@pytest.fixture
def short_dir(tmp_path_factory):
    """Directories short enough for Ray's Unix sockets (<temp dir>/session_<date>_<pid>/sockets/plasma_store
    must fit in 107 bytes): under pytest's base temp dir when that is short, else under /tmp."""
    made = []

    def make(prefix: str) -> Path:
        path = tmp_path_factory.mktemp(prefix)
        if len(str(path)) > 45:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
            made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- arguments (no Ray started)


def test_help_and_bad_arguments(tmp_path):
    for name in ("ray_head.sh", "ray_worker.sh", "ray_stop.sh"):
        done = script(name, "--help")
        assert done.returncode == 0 and "usage: launchers/" + name in done.stdout, (name, done.stderr)
    cases = [(("ray_worker.sh",), "give the head's address"),
             (("ray_worker.sh", "10.0.0.1"), "must be HOST:PORT, got '10.0.0.1'"),
             (("ray_head.sh", "--num-cpus", "two"), "--num-cpus must be a whole number, got 'two'"),
             (("ray_head.sh", "--memory=2G"), "--memory must be a whole number of bytes, got '2G'"),
             (("ray_head.sh", "--port"), "--port needs a value"),
             (("ray_stop.sh", "--grace-period", "soon"), "--grace-period must be a whole number"),
             (("ray_stop.sh", "--force"), "unknown argument '--force'")]
    for args, message in cases:
        done = script(*args)
        errors = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), (args, done)
        assert message in errors[0], (args, errors)


def test_print_only_shows_the_ray_start_command(tmp_path):
    """Flags win over the environment; unknown flags reach `ray start` as written; nothing starts."""
    env = {"PRINT_ONLY": "1", "RAY_NUM_CPUS": "3", "RAY_MEMORY": "1000", "RAY_TEMP_DIR": str(tmp_path / "t")}
    done = script("ray_head.sh", "--num-cpus", "1", "--num-gpus=2", "--dashboard-port", "8266", env=env)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    cmd = done.stderr.strip().split(" ", 1)[1].split()
    assert cmd[:2] == [ENV["RAY_BIN"], "start"]
    expected = ["--head", "--port", "6379", "--num-cpus", "1", "--num-gpus", "2", "--memory", "1000",
                "--temp-dir", str(tmp_path / "t"), "--disable-usage-stats", "--dashboard-port", "8266"]
    assert cmd[2:] == expected
    done = script("ray_worker.sh", "10.0.0.1:6380", "--object-store-memory", "5", env=env)
    assert done.returncode == 0, done.stderr
    cmd = done.stderr.strip().split(" ", 1)[1].split()
    assert cmd[2:] == ["--address", "10.0.0.1:6380", "--num-cpus", "3", "--memory", "1000",
                       "--object-store-memory", "5", "--temp-dir", str(tmp_path / "t"), "--disable-usage-stats"]
    assert not (tmp_path / "t").exists()


def test_stop_ends_recorded_sessions_of_its_dir_only(tmp_path):
    """No Ray: three sessions started like the scripts start nodes. One belongs to the temp dir (its
    leader names it; a child does not), one ignores SIGTERM, one is recorded there but names another
    directory (a recycled session id): the first two end, the third is left alone."""
    temp_dir = tmp_path / "t"
    (temp_dir / "launchers").mkdir(parents=True)
    marker = str(temp_dir / "session_x" / "raylet")
    procs = {
        "node": subprocess.Popen(["bash", "-c", "sleep 600 & sleep 600 & wait", marker], start_new_session=True),
        "stubborn": subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 600 & sleep 600 & wait", marker],
                                     start_new_session=True),
        "stranger": subprocess.Popen(["bash", "-c", "sleep 600", str(tmp_path / "elsewhere")],
                                     start_new_session=True),
    }
    sids = {name: p.pid for name, p in procs.items()}
    try:
        deadline = time.time() + 10
        while any(len(session_pids(sids[n])) < 3 for n in ("node", "stubborn")) and time.time() < deadline:
            time.sleep(0.05)
        (temp_dir / "launchers" / f"head-{sids['node']}").write_text("head\n")
        (temp_dir / "launchers" / f"worker-{sids['stubborn']}").write_text("worker\n")
        (temp_dir / "launchers" / f"worker-{sids['stranger']}").write_text("worker\n")
        (temp_dir / "ray_current_cluster").write_text("127.0.0.1:1")
        tick = time.perf_counter()
        done = script("ray_stop.sh", "--temp-dir", str(temp_dir), "--grace-period", "1", timeout=60)
        took = time.perf_counter() - tick
        assert done.returncode == 0, done.stderr
        assert session_pids(sids["node"]) == [] and session_pids(sids["stubborn"]) == []
        assert procs["stranger"].poll() is None  # still running
        assert "SIGKILL" in done.stderr and 1 <= took < 20  # the stubborn one, after the grace period
        assert f"(session {sids['stranger']}) is not running" in done.stderr
        assert recorded_sessions(temp_dir) == {} and not (temp_dir / "ray_current_cluster").exists()
        again = script("ray_stop.sh", "--temp-dir", str(temp_dir))
        assert again.returncode == 0 and "no node started by ray_head.sh or ray_worker.sh" in again.stderr
    finally:
        kill_sessions(sids.values())
        for p in procs.values():
            p.wait(timeout=10)


# ---------------------------------------------------------------- a real cluster


DRIVER = r"""
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
          for n in nodes]
print(json.dumps({"nodes": [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                            for n in nodes],
                  "ran_on": ray.get(pinned, timeout=120), "cluster": ray.cluster_resources()}))
ray.shutdown()
"""


@pytest.mark.slow  # two Ray nodes, a driver and a stop: ~40 s on 2 cores
def test_head_and_worker_form_a_two_node_cluster_and_stop_ends_them(short_dir):
    head_dir, worker_dir = short_dir("rh"), short_dir("rw")
    port, client_port, dash_port, head_agent, worker_agent = free_ports(5)
    started = []
    try:
        head = script("ray_head.sh", "--port", str(port), *NODE, "--temp-dir", str(head_dir),
                      "--include-dashboard", "false", "--dashboard-port", str(dash_port),
                      "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(head_agent))
        started += recorded_sessions(head_dir).values()
        assert head.returncode == 0, head.stderr[-3000:]
        address = head.stdout.strip()
        host, _, printed_port = address.rpartition(":")
        assert int(printed_port) == port and (head_dir / "ray_current_cluster").read_text() == address
        assert f"launchers/ray_worker.sh {address}" in head.stderr

        worker = script("ray_worker.sh", address, *NODE, "--temp-dir", str(worker_dir),
                        "--dashboard-agent-listen-port", str(worker_agent))
        started += recorded_sessions(worker_dir).values()
        assert worker.returncode == 0, worker.stderr[-3000:]
        (head_record, head_sid), = recorded_sessions(head_dir).items()
        (worker_record, worker_sid), = recorded_sessions(worker_dir).items()
        assert (head_record, worker_record) == (f"head-{head_sid}", f"worker-{worker_sid}")

        driver = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True, text=True,
                                env=ENV, timeout=180)
        assert driver.returncode == 0, driver.stderr[-3000:]
        seen = json.loads(driver.stdout.strip().splitlines()[-1])
        nodes = seen["nodes"]
        assert len(nodes) == 2 and seen["cluster"]["CPU"] == 2.0
        assert sorted("node:__internal_head__" in n["resources"] for n in nodes) == [False, True]
        assert all(n["resources"]["CPU"] == 1.0 and n["resources"]["memory"] == 2 * 10**9 for n in nodes)
        assert {n["ip"] for n in nodes} == {host}  # both nodes are on this machine
        assert seen["ran_on"] == [n["id"] for n in nodes]  # a task ran on each node
        # each node's processes are in its own session: the raylets say which temp dir they serve
        for sid, temp_dir in ((head_sid, head_dir), (worker_sid, worker_dir)):
            raylets = [pid for pid in session_pids(sid) if (Path("/proc") / str(pid) / "exe").resolve().name == "raylet"]
            assert len(raylets) == 1
            assert f"--temp_dir={temp_dir}" in Path(f"/proc/{raylets[0]}/cmdline").read_bytes().decode().split("\0")
    finally:
        stop = script("ray_stop.sh", "--temp-dir", str(head_dir), "--temp-dir", str(worker_dir),
                      "--grace-period", "5", timeout=120)
        left = {sid: session_pids(sid) for sid in started}
        kill_sessions(started)  # what the script under test left behind, if anything
    assert stop.returncode == 0, stop.stderr
    assert "stopping the head node" in stop.stderr and "stopping the worker node" in stop.stderr
    assert left == {sid: [] for sid in started} and len(started) == 2
    assert pids_naming(str(head_dir)) == [] and pids_naming(str(worker_dir)) == []
    assert recorded_sessions(head_dir) == {} and not (head_dir / "ray_current_cluster").exists()
