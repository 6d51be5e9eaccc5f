"""Real DeepSpeed runs through the real `deepspeed` launcher: 2 CPU ranks with gloo, a tiny Llama.

Each training launch costs ~20-40 s on 2 cores (mostly imports), so each run is a lazily started,
module-scoped result that several tests inspect. Losses come from <output_dir>/losses.jsonl."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.io import read_jsonl
from toolkit.train.strategy import checkpoint_tag, free_port

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # JIT ops built once
os.environ.setdefault("GRADUAL_CACHE_DIR", str(REPO / ".cache" / "gradual"))
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TIMEOUT = 300
TIMINGS: dict[str, float] = {}


def start(cmd, log: Path, env=None) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, log: Path, timeout=TIMEOUT) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own process group: its ranks go too
        proc.wait()
        pytest.fail(f"launch timed out after {timeout}s (a hang?); log {log}:\n{log.read_text()[-3000:]}")
    return rc, log.read_text()


SHM = Path("/dev/shm")
SHM_BEFORE = set(os.listdir(SHM)) if SHM.is_dir() else set()  # no DeepSpeed buffer may outlive its launch


def ds_train(config: Path, out: Path, *sets: str, procs: int = 2, extra=()) -> list[str]:
    cmd = [DEEPSPEED, "--num_accelerators", str(procs), "--master_port", str(free_port()),
           "--module", "toolkit.train", "--config", str(config), "--set", f"output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def run_ok(name: str, cmd, out: Path) -> Path:
    tick = time.perf_counter()
    rc, text = finish(start(cmd, out.parent / f"{name}.log"), out.parent / f"{name}.log")
    TIMINGS[name] = time.perf_counter() - tick
    assert rc == 0, f"{name} failed (rc={rc}):\n{text[-4000:]}"
    return out


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "losses.jsonl").read_text().splitlines())]


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def max_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def module_state(ckpt_tag_dir: Path) -> dict:
    import torch

    return torch.load(ckpt_tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


# ---------------------------------------------------------------- data and runs


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir, synthetic_items):
    """18 train facts (5 global batches of 4 per epoch: the last one wraps around) and 8 dev items
    that repeat training facts, so dev accuracy follows what was learned; SliCK categories attached.
    The learning run: 8 facts, all repeated in dev, so early stopping waits until they are learned."""
    from tests import tiny

    d = tmp_path_factory.mktemp("ds-train")
    train = [it for it in synthetic_items if it.split == "train"]
    cats = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")

    def write(path, items, n_dev):
        rows = [it.to_dict() for it in items]
        rows += [{**it.to_dict(), "id": f"dev-{it.id}", "split": "dev"} for it in items[:n_dev]]
        path.write_text("".join(json.dumps({**r, "category": cats[i % 4]}) + "\n" for i, r in enumerate(rows)))

    write(d / "data.jsonl", train[:18], 8)
    write(d / "small.jsonl", train[::2][:8], 8)
    (d / "cfg.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {d / 'data.jsonl'}\nds_config: zero2\nmicro_batch_size: 2\n"
        "epochs: 2\nlr: 3.0e-3\nwarmup_ratio: 0.2\ngrad_clip: 0\neval_batch_size: 8\nprogress: false\n")
    tiny.build_model_dir(d / "model128", hidden=128)  # memorises a handful of facts in a few dozen steps
    (d / "learn.yaml").write_text(
        f"model: {d / 'model128'}\ndata: {d / 'small.jsonl'}\nds_config: zero2\noptimizer: adamw_8bit\n"
        "micro_batch_size: 2\nepochs: 40\nlr: 2.0e-3\nwarmup_ratio: 0.05\ngrad_clip: 1.0\neval_every_steps: 4\n"
        "patience: 5\nkeep_last_n: 1\neval_batch_size: 8\nprogress: false\n")
    return d


class Runs:
    """Each run launched once, on first use."""

    def __init__(self, work: Path):
        self.w, self.done = work, {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            self.done[name] = getattr(self, f"_{name}")(self.w / name)
        return self.done[name]

    def _single(self, out):  # one process, 2 accumulation steps: the same global batch of 4
        return run_ok("single", ds_train(self.w / "cfg.yaml", out, "gradient_accumulation_steps=2",
                                         "zero_stage=0", procs=1), out)

    def _zero1(self, out):  # through `gradual train`, which validates and then starts the launcher
        cmd = [str(Path(sys.executable).parent / "gradual"), "train", "--config", str(self.w / "cfg.yaml"),
               "--num-accelerators", "2", "--master-port", str(free_port()), "--set", f"output_dir={out}",
               "--set", "zero_stage=1"]
        run_ok("zero1", cmd, out)
        assert "[gradual train] " in (self.w / "zero1.log").read_text()  # the resolved command, printed
        return out

    def _zero2(self, out):
        return run_ok("zero2", ds_train(self.w / "cfg.yaml", out), out)

    def _multinode(self, out):
        """Two `deepspeed --no_ssh --node_rank r` launches (through launchers/train_node.sh) sharing a
        hostfile and a loopback master: one CPU rank per simulated node."""
        (self.w / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
        env = {"HOSTFILE": str(self.w / "hostfile"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        cmd = ["bash", str(REPO / "launchers" / "train_node.sh"), str(self.w / "cfg.yaml"), "--set", f"output_dir={out}"]
        tick = time.perf_counter()
        procs = [start(cmd, self.w / f"node{r}.log", {**env, "NODE_RANK": str(r)}) for r in (0, 1)]
        results = [finish(p, self.w / f"node{r}.log") for r, p in enumerate(procs)]
        TIMINGS["multinode"] = time.perf_counter() - tick
        for r, (rc, text) in enumerate(results):
            assert rc == 0, f"node {r} failed:\n{text[-4000:]}"
        return out

    def _pdsh(self, out):
        """launchers/train_multi_node.sh through DeepSpeed's multi-node runner (pdsh), two one-rank
        'nodes' on this machine. pdsh and ssh are stand-ins (tests/fake_remote.py) that run each node's
        command locally in a fresh login environment, as ssh would: the ranks get only what DeepSpeed
        exports, the env file included."""
        from tests import fake_remote

        bin_dir = self.w / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        fake_remote.install(bin_dir)
        (self.w / "hostfile-2").write_text("node0 slots=1\nnode1 slots=1\n")
        (self.w / "launch-dir").mkdir(exist_ok=True)
        (self.w / "launch-dir" / ".deepspeed_env").write_text("HF_HOME=/from/the/user/file\n")
        env = {"HOSTFILE": str(self.w / "hostfile-2"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "lo",
               "CUDA_HOME": str(self.w / "no-cuda"), "LD_LIBRARY_PATH": str(self.w / "lib"), "HF_HOME": str(self.w / "hf"),
               "GLOO_SOCKET_IFNAME": "lo"}
        cmd = ["bash", str(REPO / "launchers" / "train_multi_node.sh"), str(self.w / "cfg.yaml"),
               "--set", f"output_dir={out}", "--set", "epochs=1"]
        tick = time.perf_counter()
        with open(self.w / "pdsh.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=self.w / "launch-dir", stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **env})
            rc, text = finish(proc, self.w / "pdsh.log")
        TIMINGS["pdsh"] = time.perf_counter() - tick
        assert rc == 0, f"multi-node launch failed:\n{text[-4000:]}"
        return out

    def _resume(self, out):
        run_ok("resume-part1", ds_train(self.w / "cfg.yaml", out, "stop_after_epoch=1"), out)
        (self.w / "part1_summary.json").write_text((out / "train_summary.json").read_text())
        # what a kill in the middle of the next save leaves: the tag's files half written, 'latest'
        # still naming the last complete checkpoint (the strategy moves it last)
        ckpt = out / "checkpoints"
        (self.w / "part1_latest").write_text((ckpt / "latest").read_text())
        torn = ckpt / checkpoint_tag(2 * json.loads((out / "train_summary.json").read_text())["global_step"])
        torn.mkdir()
        (torn / "mp_rank_00_model_states.pt").write_bytes(b"torn")
        return run_ok("resume-part2", ds_train(self.w / "cfg.yaml", out, extra=["--resume"]), out)

    def _offload(self, out):  # DeepSpeedCPUAdam on offloaded optimizer states, activations recomputed
        return run_ok("offload", ds_train(self.w / "cfg.yaml", out, "ds_config=zero2_offload",
                                          "gradient_checkpointing=true"), out)

    def _zero3(self, out):
        """ZeRO-3 through tests/alloc_tracker.py (the largest tensor each rank creates), its export in
        shards of 0.1 MiB (several files for this ~0.4 MB model)."""
        cmd = ds_train(self.w / "cfg.yaml", out, "ds_config=zero3", "export_shard_mib=0.1")
        cmd[cmd.index("toolkit.train")] = "tests.alloc_tracker"
        return run_ok("zero3", cmd, out)

    def _zero3_resume(self, out):
        run_ok("zero3-part1", ds_train(self.w / "cfg.yaml", out, "ds_config=zero3", "stop_after_epoch=1"), out)
        return run_ok("zero3-part2", ds_train(self.w / "cfg.yaml", out, "ds_config=zero3", extra=["--resume"]), out)

    def _zero3_offload(self, out):  # parameters and optimizer states in host memory, DeepSpeedCPUAdam
        return run_ok("zero3-offload", ds_train(self.w / "cfg.yaml", out, "ds_config=zero3_offload"), out)

    def _learn(self, out):
        return run_ok("learn", ds_train(self.w / "learn.yaml", out), out)


@pytest.fixture(scope="module")
def runs(work):
    r = Runs(work)
    yield r
    if TIMINGS:
        print("\nlaunch timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}), file=sys.stderr)


# ---------------------------------------------------------------- equivalence


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_zero1_and_zero2_match_single_process(runs):
    single, zero1, zero2 = (losses(runs.get(n)) for n in ("single", "zero1", "zero2"))
    assert len(single) == 10  # 2 epochs x 5 steps on every rank: nobody ran out early
    assert max_diff(single, zero1) <= 1e-6 and max_diff(single, zero2) <= 1e-6
    print(f"\nZeRO-1 bitwise: {single == zero1}, ZeRO-2 bitwise: {single == zero2}", file=sys.stderr)
    assert single[-1] < single[0]
    assert summary(runs.get("zero2"))["world_size"] == 2 and summary(runs.get("single"))["world_size"] == 1
    assert evals(runs.get("single"))[-1]["dev"] == evals(runs.get("zero2"))[-1]["dev"]
    leaked = sorted(n for n in set(os.listdir(SHM)) - SHM_BEFORE if "deepspeed" in n) if SHM.is_dir() else []
    assert not leaked, f"DeepSpeed's shm all-reduce buffers left behind: {leaked}"
    # the logged gradient norm is the same number whatever ZeRO-0 (own computation) or ZeRO-2 reports
    norms = [[r["grad_norm"] for r in read_jsonl(runs.get(n) / "losses.jsonl")] for n in ("single", "zero2")]
    assert None not in norms[0] and max_diff(*norms) <= 1e-4 * max(norms[1])


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_two_simulated_nodes_match_one_node(runs):
    multi, zero2 = runs.get("multinode"), runs.get("zero2")
    assert max_diff(losses(multi), losses(zero2)) <= 1e-6
    print(f"\nmulti-node bitwise: {losses(multi) == losses(zero2)}", file=sys.stderr)
    assert summary(multi)["world_size"] == 2 and (multi / "model" / "config.json").exists()


@pytest.mark.slow  # a 2-rank launch
def test_multi_node_launch_forwards_the_environment_to_fresh_nodes(runs):
    """Each rank started by the multi-node runner in a fresh environment has PATH, CUDA_HOME,
    LD_LIBRARY_PATH, the NCCL_* settings and the toolkit's caches of the launching shell, and the
    user's own .deepspeed_env value where it sets one (HF_HOME)."""
    out = runs.get("pdsh")
    records = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1] and summary(out)["world_size"] == 2
    for r in records:
        env = r["environment"]
        assert env["CUDA_HOME"] == str(runs.w / "no-cuda") and env["LD_LIBRARY_PATH"] == str(runs.w / "lib")
        assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # the venv's bin/ first
        assert env["TORCH_EXTENSIONS_DIR"] == os.environ["TORCH_EXTENSIONS_DIR"]
        assert env["HF_HOME"] == "/from/the/user/file"
    log = (runs.w / "pdsh.log").read_text()
    assert "fake pdsh: 2 node(s) in fresh environments" in log  # the runner's multi-node path ran
    assert (out / "model" / "config.json").is_file()


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_resume_continues_exactly(runs):
    resumed, full = runs.get("resume"), runs.get("zero2")
    part1 = json.loads((runs.w / "part1_summary.json").read_text())
    assert part1["interrupted"] and part1["epochs_completed"] == 1 and part1["model_dir"] is None
    latest = (runs.w / "part1_latest").read_text().strip()
    assert latest == checkpoint_tag(part1["global_step"])
    assert (resumed / "checkpoints" / latest / "trainer_state.json").is_file()
    assert losses(resumed) == losses(full)  # bitwise: same batches, optimizer, schedule and RNG
    assert [e["dev"] for e in evals(resumed)] == [e["dev"] for e in evals(full)]
    assert summary(resumed)["best_step"] == summary(full)["best_step"]
    import torch

    client = torch.load(resumed / "checkpoints" / summary(resumed)["best_tag"] / "mp_rank_00_model_states.pt",
                        weights_only=False)  # the client state: progress, early stopping, every rank's RNG
    assert client["train_state"]["consumed_samples"] == 20 and client["train_state"]["best_tag"]
    assert len(client["rng"]) == 2 and {"python", "numpy", "torch"} <= client["rng"][1].keys()

    last = sorted(p.name for p in (full / "checkpoints").glob("step*"))[-1]
    a, b = module_state(full / "checkpoints" / last), module_state(resumed / "checkpoints" / last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    ea, eb = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_offload_and_gradient_checkpointing_follow_the_same_trajectory(runs):
    out = runs.get("offload")
    ds = json.loads((out / "ds_config.resolved.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["optimizer"]["type"] == "AdamW"
    # DeepSpeedCPUAdam's vectorised update rounds differently from torch AdamW: close, not bitwise
    assert max_diff(losses(out), losses(runs.get("zero2"))) < 1e-4


# ---------------------------------------------------------------- export


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_exported_model_reloads_with_the_same_logits(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs.get("zero2")
    ref = torch.load(out / "export_check.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    assert (logits - ref["logits"]).abs().max().item() <= 1e-6
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.eos_token_id == model.config.eos_token_id and model.config.use_cache
    best = summary(out)["best_tag"]
    state = module_state(out / "checkpoints" / best)  # the export is the best checkpoint's weights
    exported = model.state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in state)


# ---------------------------------------------------------------- ZeRO-3


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_zero3_matches_zero2_and_single_process(runs):
    zero3, zero2, single = runs.get("zero3"), runs.get("zero2"), runs.get("single")
    assert summary(zero3)["zero_stage"] == 3 and summary(zero3)["world_size"] == 2
    assert max_diff(losses(single), losses(zero3)) <= 1e-6 and max_diff(losses(zero2), losses(zero3)) <= 1e-6
    print(f"\nZeRO-3 bitwise: vs single {losses(single) == losses(zero3)}, vs ZeRO-2 {losses(zero2) == losses(zero3)}",
          file=sys.stderr)
    # evaluation generated with partitioned weights, in lockstep: the same answers
    assert [e["dev"] for e in evals(zero3)] == [e["dev"] for e in evals(zero2)]
    assert summary(zero3)["best_step"] == summary(zero2)["best_step"]
    zero = json.loads((zero3 / "ds_config.resolved.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 64 * 64  # "auto": hidden size squared


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_zero3_ranks_never_hold_the_whole_model_and_the_sharded_export_reloads(runs):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from toolkit.train.plan import model_size

    out = runs.get("zero3")
    full_bytes = 4 * model_size(yaml_model(runs.w)).params  # fp32
    for rank in (0, 1):  # the largest tensor a rank created: its fp32 partition, half the model
        seen = json.loads((out / "alloc" / f"rank{rank}.json").read_text())
        assert 0 < seen["max_bytes"] <= 0.55 * full_bytes, seen
    model_dir = out / "model"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all((model_dir / f).stat().st_size < 0.2 * 2**20 for f in files)
    ref = torch.load(out / "export_check.pt")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max().item() <= 1e-6
    # the same weights as ZeRO-2's export of the same trajectory (its best checkpoint), to rounding
    zero2 = load_file(runs.get("zero2") / "model" / "model.safetensors")
    exported = {k: v for f in files for k, v in load_file(model_dir / f).items()}
    assert exported.keys() == zero2.keys()
    assert max((exported[k] - zero2[k]).abs().max().item() for k in zero2) <= 1e-5
    # the best checkpoint stays whole: ZeRO-3 keeps its weights only in the optimizer's partitions;
    # both are the size the disk estimate says
    from toolkit.train.dsconfig import checkpoint_bytes

    best = out / "checkpoints" / summary(out)["best_tag"]
    assert len(list(best.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    expect = checkpoint_bytes(full_bytes // 4, bf16=False, optimizer="adamw", stage=3)
    for tag in {best.name, (out / "checkpoints" / "latest").read_text().strip()}:
        on_disk = sum(f.stat().st_size for f in (out / "checkpoints" / tag).iterdir())
        assert on_disk == pytest.approx(expect["full"], rel=0.15) and expect["best"] == expect["full"]


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_zero3_resume_continues_exactly(runs):
    from safetensors.torch import load_file

    resumed, full = runs.get("zero3_resume"), runs.get("zero3")
    assert losses(resumed) == losses(full)
    assert [e["dev"] for e in evals(resumed)] == [e["dev"] for e in evals(full)]
    a = load_file(resumed / "model" / "model.safetensors")  # the default shard size: one file
    b = {k: v for f in (full / "model").glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_zero3_with_parameter_and_optimizer_offload_follows_the_same_trajectory(runs):
    out = runs.get("zero3_offload")
    zero = json.loads((out / "ds_config.resolved.json").read_text())["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    # DeepSpeedCPUAdam rounds differently from torch AdamW: close, not bitwise
    assert max_diff(losses(out), losses(runs.get("zero2"))) < 1e-4
    assert (out / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------- 8-bit AdamW, early stopping, learning


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_bnb_adamw8bit_under_zero2_trains(runs):
    import torch

    out = runs.get("learn")
    curve = losses(out)
    assert sum(curve[-5:]) / 5 < 0.3 * sum(curve[:5]) / 5
    ds = json.loads((out / "ds_config.resolved.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"] is True
    tag = (out / "checkpoints" / "latest").read_text().strip()  # the best one keeps only its weights
    optim = torch.load(out / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    found = []

    def walk(x):
        if torch.is_tensor(x):
            found.append(x.dtype)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(optim["optimizer_state_dict"])
    assert torch.uint8 in found  # bitsandbytes' quantised Adam moments


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_early_stopping_keeps_the_best_and_facts_are_learned(runs):
    """The learning run must stop early: its dev set repeats its 8 training facts, so once they are
    learned dev accuracy is 1.0, which no later evaluation can beat (only a strict improvement
    counts), and 40 epochs leave far more evaluations than `patience` after that."""
    import yaml

    out = runs.get("learn")
    rows, s = evals(out), summary(out)
    cfg = yaml.safe_load((runs.w / "learn.yaml").read_text())
    patience, every = cfg["patience"], cfg["eval_every_steps"]
    steps_per_epoch = sum(1 for r in read_jsonl(out / "losses.jsonl") if r["epoch"] == 0)
    planned_evals = cfg["epochs"] * steps_per_epoch // every
    dev = [r["dev"]["accuracy"] for r in rows]
    best = dev.index(max(dev))  # the first evaluation with the best dev accuracy
    # the situation that forces a stop: the ceiling reached, with more than `patience` evaluations left
    assert max(dev) == 1.0 and best + patience < planned_evals, (dev, planned_evals)
    assert s["stopped_early"] and rows[-1]["stopped_early"] and not any(r["stopped_early"] for r in rows[:-1])
    assert len(rows) == best + 1 + patience  # stopped at the patience-th evaluation without improvement
    assert [r["bad_evals"] for r in rows[best:]] == list(range(patience + 1))
    # the counter over the whole run: back to 0 on every strict improvement (plateaus included), else +1
    record, bad, best_step = -1.0, 0, None
    for r in rows:
        record, bad, best_step = ((r["dev"]["accuracy"], 0, r["step"]) if r["dev"]["accuracy"] > record
                                  else (record, bad + 1, best_step))
        assert (r["bad_evals"], r["best_step"]) == (bad, best_step), r
    # no optimizer step after the stopping evaluation, well before the planned end
    assert s["global_step"] == rows[-1]["step"] == len(losses(out)) == every * len(rows)
    assert s["global_step"] < cfg["epochs"] * steps_per_epoch and s["epochs_completed"] < cfg["epochs"]
    assert s["best_step"] == rows[best]["step"] and s["best_dev_accuracy"] == max(dev)
    assert max(r["train"]["accuracy"] for r in rows) == 1.0  # every training fact learned
    assert set(rows[-1]["train"]["by_category"]) == {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    tags = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert s["best_tag"] in tags and len(tags) <= 2  # keep_last_n=1 plus the best
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the exported model is the best one: it scores the best dev accuracy again
    from toolkit.data.loading import load_qa
    from toolkit.models import ModelSpec, load_model
    from toolkit.train.evaluate import evaluate

    model, tok = load_model(ModelSpec(source=str(out / "model")))
    dev_items = load_qa(runs.w / "small.jsonl", splits=("dev",))
    assert evaluate(model, tok, dev_items, batch_size=8, max_new_tokens=16).accuracy == max(dev)


@pytest.mark.slow  # shares the 40-epoch learning launch (it stops early, at about epoch 26)
def test_report_draws_the_curves_of_a_training_run(runs, capsys):
    from toolkit.cli import main

    out = runs.get("learn")
    assert main(["report", str(out)]) == 0
    best = summary(out)
    assert f"best dev accuracy {best['best_dev_accuracy']} at step {best['best_step']}" in capsys.readouterr().out
    assert (out / "curves.png").stat().st_size > 5000


@pytest.mark.slow  # starts (or shares) multi-process training launches
def test_checkpoints_keep_what_resume_needs_and_the_disk_estimate_holds(runs):
    """keep_last_n=1 (the default): the newest checkpoint whole (every rank's optimizer partition: a
    resume needs them), the best one reduced to its weights (the export loads it module-only), nothing
    else; their sizes are what the dry run's disk estimate says."""
    from toolkit.train.dsconfig import checkpoint_bytes
    from toolkit.train.plan import count_parameters

    out = runs.get("zero2")
    ckpt, s = out / "checkpoints", summary(out)
    latest = (ckpt / "latest").read_text().strip()
    tags = sorted(p.name for p in ckpt.glob("step*"))
    assert latest == checkpoint_tag(s["global_step"]) and set(tags) <= {latest, s["best_tag"]}
    assert sorted(p.name for p in (ckpt / latest).glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert s["best_tag"] != latest, "this run's best is an earlier checkpoint (dev accuracy stops improving)"
    best = ckpt / s["best_tag"]
    assert not list(best.glob("*optim_states.pt")) and (best / "mp_rank_00_model_states.pt").is_file()
    expect = checkpoint_bytes(count_parameters(yaml_model(runs.w)), bf16=False, optimizer="adamw")
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(ckpt / latest) == pytest.approx(expect["full"], rel=0.15)
    assert size(best) == pytest.approx(expect["weights"], rel=0.15)


def yaml_model(w: Path) -> str:
    import yaml

    return yaml.safe_load((w / "cfg.yaml").read_text())["model"]


# A real ZeRO-2 engine (one CPU rank, fp32) after one optimizer step, so its weights are views of
# ZeRO's flat buffer: the export from the CPU state dict beside the engine module's own save_pretrained
# (the export before), and the timeouts of the process groups, including DeepSpeed's copy of the world.
EXPORT_BOTH_WAYS = r"""
import json
import sys

import torch
import torch.distributed as dist

from toolkit.models import ModelSpec, load_model
from toolkit.train.config import load_config
from toolkit.train.data import collate
from toolkit.train.plan import prepare
from toolkit.train.strategy import DeepSpeedStrategy, cpu_state_dict

cfg = load_config(sys.argv[1], [f"output_dir={sys.argv[2]}", "collective_timeout_min=7"])
plan = prepare(cfg, 1, on_gpu=False)
strategy = DeepSpeedStrategy(plan.cfg, plan.ds_config)
strategy.setup_distributed()
model, tokenizer = load_model(ModelSpec(source=cfg.model, dtype="float32", device="cpu", seed=0))
engine = strategy.prepare(model, plan.total_steps, plan.warmup_steps)
for accum_step in range(plan.batches.accum):
    batch = collate([plan.examples[i] for i in range(2)], tokenizer.pad_token_id)
    strategy.backward(engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss)
    strategy.step()
flat = list(engine.optimizer.bit16_groups_flat)
in_flat = [any(p.data_ptr() >= f.data_ptr() and p.data_ptr() < f.data_ptr() + f.numel() * f.element_size()
               for f in flat) for p in engine.module.parameters()]
copies = cpu_state_dict(engine.module)
shares = any(c.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
             for c in copies.values() for p in engine.module.parameters())
strategy.save_hf_model(tokenizer, f"{sys.argv[2]}/cpu-export")  # the export now
engine.module.save_pretrained(f"{sys.argv[2]}/module-export", safe_serialization=True)  # the export before
tokenizer.save_pretrained(f"{sys.argv[2]}/module-export")
cpu = torch.device("cpu")
from toolkit.adapters.torch_internals import group_timeout
# the default group, and the group ZeRO reduces over: DeepSpeed's copy of the world, made without a timeout
timeouts = {"default": group_timeout(dist.group.WORLD, cpu).total_seconds(),
            "deepspeed_world": group_timeout(engine.optimizer.dp_process_group, cpu).total_seconds()}
own_group = engine.optimizer.dp_process_group is not dist.group.WORLD
print("RESULT " + json.dumps({"params_in_flat_buffer": all(in_flat), "copy_shares_memory": shares,
                              "timeouts_s": timeouts, "zero_has_its_own_group": own_group}))
strategy.destroy()
"""


def test_export_from_the_cpu_state_dict_equals_the_module_export(work, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    done = subprocess.run([sys.executable, "-c", EXPORT_BOTH_WAYS, str(work / "cfg.yaml"), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["params_in_flat_buffer"]  # what made the old export clone on the device
    assert not result["copy_shares_memory"]
    assert result["timeouts_s"] == {"default": 7 * 60, "deepspeed_world": 7 * 60}  # collective_timeout_min=7
    assert result["zero_has_its_own_group"]  # so its timeout is the one new groups get, not the default group's
    new, old = load_file(tmp_path / "cpu-export" / "model.safetensors"), load_file(
        tmp_path / "module-export" / "model.safetensors")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 11]])
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval()(input_ids=ids).logits
              for d in ("cpu-export", "module-export")]
    assert torch.equal(logits[0], logits[1])
    init = AutoModelForCausalLM.from_pretrained(yaml_model(work), dtype=torch.float32).eval()(input_ids=ids).logits
    assert not torch.equal(logits[0], init)  # the export holds the trained weights, not the initial ones


# bf16 as on a GPU (DeepSpeed's CPU accelerator runs it too, BF16_Optimizer included): one rank, a shipped
# ds_config resolved for bf16, two optimizer steps of two accumulated micro-batches, a checkpoint; how many
# parameters still hold a bf16 .grad after the last backward.
BF16_STEPS = r"""
import json
import sys

import torch

from toolkit.models import ModelSpec, load_model
from toolkit.train.config import load_config
from toolkit.train.data import collate
from toolkit.train.plan import prepare
from toolkit.train.strategy import OPTIMIZER_STATE_GLOB, DeepSpeedStrategy

cfg = load_config(sys.argv[1], [f"output_dir={sys.argv[2]}", "bf16=true", f"zero_stage={sys.argv[3]}",
                                f"ds_config={sys.argv[4]}", "micro_batch_size=2", "gradient_accumulation_steps=2"])
plan = prepare(cfg, 1, on_gpu=False)
strategy = DeepSpeedStrategy(plan.cfg, plan.ds_config)
strategy.setup_distributed()
model, tokenizer = load_model(ModelSpec(source=cfg.model, dtype="bfloat16", device="cpu", seed=0))
engine = strategy.prepare(model, plan.total_steps, plan.warmup_steps)
losses = []
for step in range(2):
    for accum_step in range(2):
        batch = collate([plan.examples[i] for i in range(2 * accum_step, 2 * accum_step + 2)], tokenizer.pad_token_id)
        loss = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        strategy.backward(loss)
        bf16_grads_held = sum(p.grad is not None for p in engine.module.parameters())
        strategy.step()
    losses.append(float(loss.detach()))
strategy.save_checkpoint(cfg.checkpoint_dir, "step000002", {}, {"tag": "step000002"})
print("RESULT " + json.dumps({
    "data_types": plan.ds_config.get("data_types"), "optimizer": type(engine.optimizer).__name__,
    "weights": str(next(engine.module.parameters()).dtype), "losses": losses, "bf16_grads_held": bf16_grads_held,
    "parameters": sum(1 for _ in engine.module.parameters()),
    "immediate_grad_update": plan.ds_config["bf16"].get("immediate_grad_update", False),
    "optimizer_files": sorted(p.name for p in (cfg.checkpoint_dir / "step000002").glob(OPTIMIZER_STATE_GLOB))}))
strategy.destroy()
"""


BF16_RUNS: dict[tuple[int, str], dict] = {}


def bf16_run(work: Path, out: Path, stage: int, ds_config: str) -> dict:
    """BF16_STEPS under `ds_config` with `zero_stage`, run once per module."""
    if (stage, ds_config) not in BF16_RUNS:
        done = subprocess.run([sys.executable, "-c", BF16_STEPS, str(work / "cfg.yaml"), str(out), str(stage),
                               ds_config], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        BF16_RUNS[stage, ds_config] = json.loads(next(ln for ln in done.stdout.splitlines()
                                                      if ln.startswith("RESULT "))[7:])
    return BF16_RUNS[stage, ds_config]


@pytest.mark.parametrize("stage, optimizer", [(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer")])
def test_bf16_with_fp32_gradient_accumulation_trains_under_zero1_and_zero2(work, tmp_path, stage, optimizer):
    """What the shipped ds_configs resolve to on GPU (bf16, grad_accum_dtype fp32) is accepted and steps
    in DeepSpeed 0.19: ZeRO-1 through its BF16_Optimizer, ZeRO-2 with an fp32 accumulation buffer."""
    result = bf16_run(work, tmp_path, stage, "zero2")
    assert result["data_types"] == {"grad_accum_dtype": "fp32"} and result["weights"] == "torch.bfloat16"
    assert result["optimizer"] == optimizer
    assert all(0 < loss < 20 for loss in result["losses"])
    assert result["optimizer_files"] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]  # what pruning deletes


def test_zero1_json_frees_the_bf16_gradients_and_keeps_the_losses(work, tmp_path_factory):
    """ds_configs/zero1.json sets bf16.immediate_grad_update: BF16_Optimizer adds each bf16 gradient into
    its fp32 buffer in backward and frees it (2 bytes per parameter less on every GPU), and accumulating
    two micro-batches gives the very losses of the default, which keeps the bf16 gradients allocated."""
    held = bf16_run(work, tmp_path_factory.mktemp("bf16-held"), 1, "zero2")
    freed = bf16_run(work, tmp_path_factory.mktemp("bf16-freed"), 1, "zero1")
    assert freed["optimizer"] == held["optimizer"] == "BF16_Optimizer"
    assert (held["immediate_grad_update"], freed["immediate_grad_update"]) == (False, True)
    assert held["bf16_grads_held"] == held["parameters"] and freed["bf16_grads_held"] == 0
    assert freed["losses"] == held["losses"]


# Dev evaluation inside a real 2-rank process group (gloo, started by the deepspeed launcher): each
# rank answers its shard, the results are gathered; every rank writes what it got.
SHARDED_EVAL = r"""
import json
import os
import sys

import deepspeed
import torch.distributed as dist

import toolkit.train.evaluate as evaluation
from toolkit.data.loading import load_qa
from toolkit.models import ModelSpec, load_model
from toolkit.train.__main__ import leave

model_dir, data, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
deepspeed.init_distributed()
rank = dist.get_rank()
answered = []
real = evaluation.greedy_answers


def counting(model, tokenizer, questions, *args, **kwargs):  # records the shard, answers it for real
    answered.extend(questions)
    return real(model, tokenizer, questions, *args, **kwargs)


evaluation.greedy_answers = counting
model, tokenizer = load_model(ModelSpec(source=model_dir, dtype="float32", device="cpu"))
items = load_qa(data, splits=("dev",))
result = evaluation.evaluate(model, tokenizer, items, batch_size=4, max_new_tokens=6, categories={})
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump({"accuracy": result.accuracy, "count": result.count, "correct": result.correct,
               "answers": result.answers, "answered": len(answered)}, fh)
dist.destroy_process_group()
leave(0)  # the trainer's own exit: skips the teardown where a C++ thread once aborted a finished rank
"""


@pytest.mark.slow  # a 2-rank launch (~30 s)
def test_sharded_dev_evaluation_equals_unsharded_on_two_ranks(tmp_path, tiny_model_dir, synthetic_items):
    """Two ranks each answer their half of the dev set; gathered, both ranks hold the same per-item
    results and accuracy as one process answering everything. The model first memorises 8 of the 15
    items (a plain SFT loop), so there are right and wrong answers to agree on."""
    import shutil

    import torch

    from toolkit.io import write_jsonl
    from toolkit.models import ModelSpec, load_model
    from toolkit.train.data import collate, encode_sft
    from toolkit.train.evaluate import evaluate

    dev = [it for it in synthetic_items if it.split == "dev"][:15]  # odd: the shards differ in size
    write_jsonl(tmp_path / "dev.jsonl", [it.to_dict() for it in dev])
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    model, tokenizer = load_model(ModelSpec(source=str(model_dir), dtype="float32", device="cpu"))
    batch = collate([encode_sft(tokenizer, it, 64) for it in dev[::2]], tokenizer.pad_token_id)
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    unsharded = evaluate(model, tokenizer, dev, batch_size=4, max_new_tokens=6)
    assert 0.3 <= unsharded.accuracy <= 0.8, unsharded.answers  # right and wrong answers to agree on
    (tmp_path / "eval.py").write_text(SHARDED_EVAL)
    cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), str(tmp_path / "eval.py"),
           str(model_dir), str(tmp_path / "dev.jsonl"), str(tmp_path)]
    rc, text = finish(start(cmd, tmp_path / "log"), tmp_path / "log")
    assert rc == 0, text[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["answered"] for r in ranks] == [8, 7]  # each rank generated for its shard only
    for r in ranks:
        assert r["count"] == 15 and r["accuracy"] == unsharded.accuracy
        assert r["correct"] == unsharded.correct and r["answers"] == unsharded.answers


# The process dies right after DeepSpeed's own save of the second checkpoint, before the strategy
# writes that tag's trainer_state.json: a real engine (one CPU rank), a real save, then SystemExit.
CRASH_AFTER_DEEPSPEED_SAVE = r"""
import sys

import toolkit.train.strategy as strategy_module
from toolkit.models import ModelSpec, load_model
from toolkit.train.config import load_config
from toolkit.train.plan import prepare

cfg = load_config(sys.argv[1], [f"output_dir={sys.argv[2]}"])
plan = prepare(cfg, 1, on_gpu=False)
strategy = strategy_module.DeepSpeedStrategy(plan.cfg, plan.ds_config)
strategy.setup_distributed()
model, _ = load_model(ModelSpec(source=cfg.model, dtype="float32", device="cpu", seed=0))
strategy.prepare(model, plan.total_steps, plan.warmup_steps)
strategy.save_checkpoint(cfg.checkpoint_dir, "step000001", {}, {"tag": "step000001"})


def killed(*args, **kwargs):
    raise SystemExit(9)


strategy_module.write_json = killed
strategy.save_checkpoint(cfg.checkpoint_dir, "step000002", {}, {"tag": "step000002"})
"""


def test_kill_after_deepspeed_save_leaves_latest_on_the_complete_checkpoint(work, tmp_path):
    done = subprocess.run([sys.executable, "-c", CRASH_AFTER_DEEPSPEED_SAVE, str(work / "cfg.yaml"), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 9, done.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "step000002" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's part was written
    assert not (ckpt / "step000002" / "trainer_state.json").exists()
    assert (ckpt / "latest").read_text().strip() == "step000001"  # a resume starts from a complete one
    assert (ckpt / "step000001" / "trainer_state.json").is_file()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["unknown_ds_key", "batch_arithmetic", "missing_data", "resume_without_checkpoint"])
def test_bad_input_fails_fast_with_one_error(work, tmp_path, case):
    (tmp_path / "bad_ds.json").write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": "auto",
                                                      "zero_optimization": {"stage": 2}, "zero_optimisation": {}}))
    sets, extra, expect = {
        "unknown_ds_key": ([f"ds_config={tmp_path / 'bad_ds.json'}"], [], "unknown key 'zero_optimisation'"),
        "batch_arithmetic": (["train_batch_size=6"], [], "train_batch_size=6 is not divisible by micro_batch_size=2"),
        "missing_data": ([f"data={tmp_path / 'nope.jsonl'}"], [], "nope.jsonl: no such file or directory"),
        "resume_without_checkpoint": ([], ["--resume", str(tmp_path)], "no DeepSpeed checkpoint in"),
    }[case]
    tick = time.perf_counter()
    rc, text = finish(start(ds_train(work / "cfg.yaml", tmp_path / "out", *sets, extra=extra), tmp_path / "log"),
                      tmp_path / "log", timeout=120)
    TIMINGS[f"error:{case}"] = time.perf_counter() - tick
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and expect in errors[0], text[-3000:]
    assert "Traceback" not in text and not (tmp_path / "out").exists()
