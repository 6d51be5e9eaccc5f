"""benchmarks/gpu_check.py cannot run its GPU checks here: every decision in it is a plain function,
tested here, and the script imports and answers --help on a CPU. (`--train --smoke` runs the same
checks for real on 2 CPU ranks with a tiny model, about 2 minutes; not part of the suite.)"""
import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_script_imports_and_shows_its_help_on_a_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--train" in done.stdout and "--probe" in done.stdout and "--budget-s" in done.stdout
    none = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path)
    assert none.returncode == 2 and "choose --train and/or --probe" in none.stderr
    cpu = subprocess.run([sys.executable, str(SCRIPT), "--train", "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert cpu.returncode == 2 and "no GPU here (use --smoke" in cpu.stderr and not list(tmp_path.glob("*.json"))


def test_parts_are_named_lists_of_checks(gpu_check):
    assert set(gpu_check.PARTS) == {"train", "probe"}
    names = [c.name for c in gpu_check.PARTS["train"]]
    assert names[:1] == ["setup"] and len(set(names)) == len(names)
    assert {"zero2", "export_reload", "zero2_resume", "zero1", "turn_taking"} <= set(names)
    for check in gpu_check.PARTS["train"]:  # a check only needs checks that run before it
        assert all(names.index(n) < names.index(check.name) for n in check.needs)
    assert sum(c.estimate_s for c in gpu_check.PARTS["train"]) <= gpu_check.BUDGET_S  # fits the machine's time


def test_checks_run_in_order_fail_alone_and_skip_what_builds_on_a_failure(gpu_check, tmp_path):
    C = gpu_check.Check
    calls, saves = [], []

    def ok(ctx):
        calls.append("a")
        return {"value": 1}

    def broken(ctx):
        calls.append("b")
        raise ValueError("no memory")

    checks = [C("a", ok, estimate_s=1), C("b", broken, ("a",), estimate_s=1), C("c", ok, ("b",), estimate_s=1),
              C("d", ok, ("a",), estimate_s=1000)]
    ctx = gpu_check.Context(argparse.Namespace(budget_s=100), tmp_path, on_gpu=False, ranks=1)
    results = gpu_check.run_checks(checks, ctx, save=lambda: saves.append(1), echo=lambda line: None)
    assert calls == ["a", "b"] and len(saves) == 4
    assert results["a"]["status"] == "ok" and results["a"]["value"] == 1
    assert results["b"]["status"] == "failed" and results["b"]["error"] == "ValueError: no memory"
    assert results["c"] == {"status": "skipped", "reason": "needs b (failed)"}
    assert results["d"]["status"] == "skipped" and results["d"]["reason"].startswith("budget: ")
    assert gpu_check.summary(results) == {"ok": ["a"], "failed": ["b"], "skipped": ["c", "d"]}
    assert gpu_check.decide(checks[3], results, 0, 0) is None  # --budget-s 0: no limit


def test_run_configs_are_valid_training_configs(gpu_check, tmp_path):
    import yaml

    from toolkit.train.config import load_config

    for stage in (1, 2):
        cfg = gpu_check.run_config("m", tmp_path / "data", tmp_path / "out", stage, micro=64, stop_after_epoch=1)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        loaded = load_config(tmp_path / "c.yaml")
        assert loaded.zero_stage == stage and loaded.ds_config == f"zero{stage}" and loaded.micro_batch_size == 64
        assert loaded.keep_last_n == 1 and loaded.stop_after_epoch == 1 and loaded.epochs == 2
    cmd = gpu_check.launch_command(8, True, 29511, Path("c.yaml"), python="py")
    assert cmd[:6] == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port"]
    assert cmd[-4:] == ["--module", "toolkit.train", "--config", "c.yaml"]
    assert gpu_check.launch_command(2, False, 1, Path("c"))[3] == "--num_accelerators"
    env = gpu_check.launch_env(False, 2, base={"PYTHONPATH": "/tmp/site", "PATH": "/bin"})
    assert env["PYTHONPATH"] == f"{REPO}:/tmp/site" and env["OMP_NUM_THREADS"] and env["PATH"].endswith("/bin")


def test_figures_of_a_training_output(gpu_check, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step000004").mkdir(parents=True)
    (out / "checkpoints" / "step000004" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (out / "model").mkdir()
    (out / "model" / "model.safetensors").write_bytes(b"x" * 40)
    rows = [{"step": i + 1, "loss": 3.0 - i, "tokens": 1000, "tokens_per_s": tps} for i, tps in enumerate([10, 500, 1000])]
    (out / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "train_summary.json").write_text(json.dumps({"global_step": 3, "seconds": 9.5, "peak_memory": {
        "kind": "cuda_max_allocated", "train": [5, 6], "export": [1, 2]}}))
    s = gpu_check.summarize_run(out, num_params=10**9, peak_flops=1e15, ranks=2)
    assert s["losses"] == [3.0, 2.0, 1.0] and s["tokens_per_s"] == 750  # the first step (warm-up) left out
    assert s["mfu"] == pytest.approx(6 * 10**9 * 750 / 2e15) and s["peak_memory"]["export"] == [1, 2]
    assert s["checkpoint_bytes"] == {"step000004": 100} and s["export_bytes"] == 40
    assert gpu_check.mfu(10**9, None, 1e15, 1) is None and gpu_check.mfu(10**9, 100, None, 1) is None
    assert gpu_check.compare_losses([1.0, 2.0], [1.0, 2.0]) == {"steps": [2, 2], "max_abs_diff": 0.0,
                                                                 "bitwise_equal": True, "compared": 2}
    assert gpu_check.compare_losses([1.0, 2.0], [1.0, 2.5, 3.0])["max_abs_diff"] == 0.5


def test_bench_train_gpu_preset_uses_every_gpu():
    from toolkit.bench import load_benchmark

    bench = load_benchmark("train")
    assert bench.PRESETS["gpu"]["ranks"] is None and bench.PRESETS["gpu"]["optimizer"] == "adamw"
    assert bench.resolve_ranks(None, True, 8) == 8 and bench.resolve_ranks(None, False, 0) == 1
    assert bench.resolve_ranks(2, True, 8) == 2
    assert bench.parse_args(["--preset", "gpu"]).ranks is None  # decided when the GPUs are known


def test_probe_part_fits_the_budget(gpu_check):
    names = [c.name for c in gpu_check.PARTS["probe"]]
    assert names == ["engine_1b", "engine_8b", "actors"]
    assert sum(c.estimate_s for c in gpu_check.PARTS["probe"]) <= gpu_check.BUDGET_S


@pytest.mark.slow  # the probe checks for real on CPU with a tiny model (~40 s): checks the script, not a GPU
def test_probe_checks_smoke_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--probe", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    probe = result["results"]["probe"]
    assert result["summary"]["probe"]["ok"] == ["engine_1b", "engine_8b", "actors"]
    assert probe["engine_1b"]["x_generate"] > 0 and set(probe["engine_1b"]["answers_per_s"]) == {"toolkit", "generate"}
    assert probe["actors"]["devices"] == {"two_actors_one_gpu": ["cpu"], "cpu_actor": ["cpu"]}
    assert probe["actors"]["cpu_rows_equal"] is True
