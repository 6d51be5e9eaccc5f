"""benchmarks/gpu_check.py cannot run its GPU checks here: every decision in it (the runner and its
budgets, the import check, the agreement rates and the verdict, the disk estimate) is a plain function
tested here with constructed inputs, and the script imports, answers --help and refuses a machine
without a GPU. The real GPU run is `test_gpu_check_passes_on_this_gpu`, marked `gpu`: skipped unless
selected with `-m gpu` on a GPU machine. (`--train --smoke` runs the trainer's checks for real on 2 CPU
ranks with a tiny model, about 3 minutes; not part of the suite.)"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the script sees no GPU, even on a GPU machine


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path: its modules import each other by name
    return module


@pytest.fixture(scope="module")
def rules(gpu_check):
    import gpu_check_rules

    return gpu_check_rules


@pytest.fixture(scope="module")
def train_part(gpu_check):
    import gpu_check_train

    return gpu_check_train


def test_the_script_imports_and_shows_its_help_on_a_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--train" in done.stdout and "--probe" in done.stdout and "--budget-s" in done.stdout
    none = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path)
    assert none.returncode == 2 and "choose --train and/or --probe" in none.stderr
    cpu = subprocess.run([sys.executable, str(SCRIPT), "--train", "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path, env=NO_GPU, timeout=300)
    assert cpu.returncode == 2 and "use --smoke to check the script on CPU" in cpu.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("*.json"))


def test_a_package_that_does_not_import_is_named_in_one_line_before_any_work(tmp_path):
    """msgpack and click broken (as a half-installed environment has them): one line names both and
    Ray (which imports click), exit 2, no result written, no GPU question asked."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("msgpack", "click"):
        (shims / f"{name}.py").write_text("raise ImportError('not installed (simulated)')\n")
    env = {**NO_GPU, "PYTHONPATH": os.pathsep.join([str(shims), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--probe", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("error: the GPU check needs ")
    assert "msgpack" in line and "click" in line and "ray" in line and "GPU here" not in done.stderr
    assert not list(tmp_path.glob("*.json"))


def test_import_check_names_pip_packages_and_optional_ones_apart(rules):
    def importer(module):
        if module in ("google.protobuf", "requests"):
            raise ModuleNotFoundError(f"No module named '{module}'")

    problems = rules.import_problems(importer=importer)
    assert problems == {"protobuf": "ModuleNotFoundError: No module named 'google.protobuf'",
                        "requests": "ModuleNotFoundError: No module named 'requests'"}
    line = rules.import_error_line(problems)
    assert "\n" not in line and "needs protobuf, requests," in line and "make setup" in line
    assert rules.import_error_line(rules.import_problems(importer=lambda m: None)) is None
    assert {m for m, _ in rules.REQUIRED_IMPORTS} >= {"torch", "deepspeed", "ray", "msgpack", "google.protobuf",
                                                       "requests", "click"}
    assert rules.optional_present(find=lambda m: None if m == "flash_attn" else object()) == {
        "vllm": True, "flash-attn": False}


def test_a_machine_without_cuda_is_refused_with_the_reason(rules):
    assert "is a CPU build" in rules.cuda_problem("2.13.0+cpu", None, 0, smoke=False)
    assert "no GPU here" in rules.cuda_problem("2.13.0", "12.8", 0, smoke=False)
    assert rules.cuda_problem("2.13.0", "12.8", 8, smoke=False) is None
    assert rules.cuda_problem("2.13.0+cpu", None, 0, smoke=True) is None


def test_parts_are_named_lists_of_checks_that_fit_their_own_budget(gpu_check, rules):
    assert set(gpu_check.PARTS) == {"train", "probe"}
    names = [c.name for c in gpu_check.PARTS["train"]]
    assert names[:1] == ["setup"] and len(set(names)) == len(names)
    assert {"zero2", "export_reload", "zero2_resume", "zero1", "zero3", "throughput_1b", "load_to_device",
            "turn_taking"} <= set(names)
    for check in gpu_check.PARTS["train"]:  # a check only needs checks that run before it
        assert all(names.index(n) < names.index(check.name) for n in check.needs)
    assert [c.name for c in gpu_check.PARTS["probe"]] == ["planning", "engine_1b", "engine_8b", "actors"]
    for checks in gpu_check.PARTS.values():  # each part within 8 minutes on one H100, start-up included
        assert sum(c.estimate_s for c in checks) <= rules.BUDGET_S <= 8 * 60 - 30


def test_checks_run_in_order_fail_alone_and_skip_what_builds_on_a_failure(rules, tmp_path):
    C = rules.Check
    calls, saves = [], []

    def ok(ctx):
        calls.append("a")
        return {"value": 1, "expectations": [rules.expect_at_most("gap", 2.0, 1.0, "why")]}

    def broken(ctx):
        calls.append("b")
        raise ValueError("no memory")

    checks = [C("a", ok, estimate_s=1), C("b", broken, ("a",), estimate_s=1), C("c", ok, ("b",), estimate_s=1),
              C("d", ok, ("a",), estimate_s=1000)]
    ctx = rules.Context(argparse.Namespace(budget_s=100), tmp_path, on_gpu=False, ranks=1)
    results = rules.run_checks(checks, ctx, save=lambda: saves.append(1), echo=lambda line: None)
    assert calls == ["a", "b"] and len(saves) == 4
    assert results["a"]["status"] == "ok" and results["a"]["value"] == 1  # an unmet expectation keeps the figures
    assert results["b"]["status"] == "failed" and results["b"]["error"] == "ValueError: no memory"
    assert results["c"] == {"status": "skipped", "reason": "needs b (failed)"}
    assert results["d"]["status"] == "skipped" and results["d"]["reason"].startswith("budget: ")
    assert rules.summary(results) == {"ok": ["a"], "failed": ["b"], "skipped": ["c", "d"],
                                      "expectations_failed": ["a/gap"]}
    assert rules.decide(checks[3], results, 0, 0) is None  # --budget-s 0: no limit
    late = rules.Context(argparse.Namespace(budget_s=100), tmp_path, on_gpu=False, ranks=1,
                         started=time.perf_counter() - 99.5)  # a part's budget counts from its own start
    assert rules.decide(checks[0], {}, late.elapsed(), 100).startswith("budget: ")


def test_the_verdict_lists_failures_and_never_counts_a_skipped_check_as_passed(rules):
    met = rules.expect_rate("graphs_vs_eager", {"equal": 10, "total": 10, "rate": 1.0}, rules.Rule(0.99, "r"))
    unmet = rules.expect_rate("batch_8_vs_16", {"equal": 8, "total": 10, "rate": 0.8}, rules.Rule(0.97, "kernels"))
    assert rules.verdict({"probe": {"a": {"status": "ok", "expectations": [met]}}})["verdict"] == "passed"
    skipped = rules.verdict({"probe": {"a": {"status": "ok", "expectations": [met]},
                                       "b": {"status": "skipped", "reason": "budget: 400 s spent"}}})
    assert skipped["verdict"] == "incomplete" and skipped["skipped_checks"] == ["probe/b: budget: 400 s spent"]
    failed = rules.verdict({"probe": {"a": {"status": "ok", "expectations": [met, unmet]}},
                            "train": {"zero2": {"status": "failed", "error": "RuntimeError: exit 1"}}})
    assert failed["verdict"] == "failed" and failed["expectations_met"] == 1
    assert failed["failed_checks"] == ["train/zero2: RuntimeError: exit 1"]
    assert failed["failed_expectations"] == ["probe/a/batch_8_vs_16: 8/10 equal = 0.800 < 0.97 (kernels)"]


def test_agreement_rates_tolerate_rare_flips_on_gpu_and_none_on_cpu(rules):
    a = [f"answer {i}" for i in range(544)]  # one shape's answers: 32 prompts x (1 greedy + 16 samples)
    five, six = list(a), list(a)
    for i in range(5):
        five[i * 100] = six[i * 100] = "flipped"
    six[501] = "flipped"
    counts = rules.agreement(a, five)
    assert (counts["equal"], counts["total"]) == (539, 544) and counts["examples"][0] == {
        "index": 0, "a": "answer 0", "b": "flipped"}
    assert rules.expect_rate("graphs_vs_eager", counts, rules.rule("graphs_vs_eager", on_gpu=True))["passed"]
    gpu_rule = rules.rule("graphs_vs_eager", on_gpu=True)
    assert not rules.expect_rate("graphs_vs_eager", rules.agreement(a, six), gpu_rule)["passed"]
    assert not rules.expect_rate("graphs_vs_eager", counts, rules.rule("graphs_vs_eager", on_gpu=False))["passed"]
    assert rules.expect_rate("x", rules.agreement(a, a), rules.rule("batch_8_vs_16", on_gpu=False))["passed"]
    assert not rules.expect_rate("x", rules.agreement([], []), rules.Rule(0.5, "r"))["passed"]  # nothing compared
    for table in (rules.GPU_RULES, rules.CPU_RULES):
        assert set(table) == {"graphs_vs_eager", "batch_8_vs_16", "engine_vs_generate", "actor_rows", "lazy_vs_full"}
        assert all(0 < r.min_rate <= 1 and len(r.why) > 20 for r in table.values())  # a reason beside each
    with pytest.raises(ValueError, match="comparing 2 items with 1"):
        rules.agreement([1, 2], [1])
    saved = rules.expect_at_least("saved", 0.19, 0.2, "two phases skip samples")
    assert not saved["passed"] and rules.describe(saved) == "0.19 < 0.2 (two phases skip samples)"
    assert rules.expect_at_least("saved", 0.2, 0.2, "r")["passed"] and not rules.expect_at_least("s", None, 0.2, "r")["passed"]


def test_engine_rows_are_compared_answer_by_answer_and_a_failed_engine_compares_nothing(gpu_check):
    from gpu_check_probe import engine_comparisons

    def row(answers):  # answers: per prompt (greedy, samples)
        return {"all_answers": answers, "greedy": [g for g, _ in answers]}

    toolkit = row([("Paris", ["Paris", "Lyon"]), ("Rome", ["Rome", "Milan"])])
    eager = row([("Paris", ["Paris", "Lyon"]), ("Rome", ["Rome", "Turin"])])
    found, expectations = engine_comparisons({"toolkit": toolkit, "eager": eager, "eager_batch8": eager,
                                              "generate": row([("Paris", [])])}, on_gpu=True)
    assert found["graphs_vs_eager"]["answers"]["equal"] == 5 and found["graphs_vs_eager"]["answers"]["total"] == 6
    assert found["graphs_vs_eager"]["greedy"]["rate"] == 1.0
    assert found["engine_vs_generate"]["greedy"]["total"] == 1  # generate ran the first prompts only
    assert [(e["name"], e["passed"]) for e in expectations] == [
        ("graphs_vs_eager", False), ("batch_8_vs_16", True), ("engine_vs_generate", True)]
    found, expectations = engine_comparisons({"toolkit": toolkit, "generate": row([("Paris", [])])}, on_gpu=True)
    assert set(found) == {"engine_vs_generate"} and len(expectations) == 1


def test_a_resume_is_held_to_the_run_to_run_noise_of_its_fresh_steps(rules):
    base = [11.9, 11.2, 10.6, 10.1, 9.7, 9.3, 9.0, 8.8]
    assert rules.resume_expectation(base, list(base), 4)["passed"]
    noisy = [x + 1e-3 for x in base[:4]] + [x + 5e-3 for x in base[4:]]  # noise grown, under 10x
    e = rules.resume_expectation(base, noisy, 4)
    assert e["passed"] and e["fresh_steps_max_abs_diff"] == pytest.approx(1e-3)
    lost_moments = base[:4] + [x + 0.3 for x in base[4:]]
    e = rules.resume_expectation(base, lost_moments, 4)
    assert not e["passed"] and e["value"] == pytest.approx(0.3) and e["limit"] == pytest.approx(11.9e-3)
    assert not rules.resume_expectation(base, base[:6], 4)["passed"]
    assert rules.relative_loss_gap([10.0, 9.0], [10.0, 9.9, 9.8]) == pytest.approx(0.9 / 9.9)


def test_the_train_part_writes_checkpoints_of_the_small_model_and_one_of_the_1b(rules, train_part, tmp_path):
    one = rules.launch_disk(10**9, checkpoints=2, export=True)  # bf16: 2 B weights + 12 B fp32 states
    assert one == {"written": 2 * 14e9 + 2e9, "peak": 2 * 14e9 + 2e9 + 2e9, "checkpoint": 14e9, "export": 2e9}
    assert rules.launch_disk(10**9, checkpoints=1, export=False)["peak"] == 14e9
    need = train_part.train_disk_need(134_515_008, 1_235_814_400, same_model=False)
    launches = need["launches"]
    assert set(launches) == {"zero2", "zero2_resume_part1", "zero2_resume_part2", "zero1", "zero3", "throughput_1b"}
    assert launches["throughput_1b"]["written"] == pytest.approx(14 * 1_235_814_400 + 2 * 1_235_814_400)
    assert need["written_bytes"] < 40 * 2**30  # was ~140 GB: four 1B launches of two checkpoints each
    assert need["peak_bytes"] < need["written_bytes"]
    assert rules.disk_problem(need, int(need["peak_bytes"] * 1.2), tmp_path) is None
    line = rules.disk_problem(need, 10 * 2**30, tmp_path)
    assert line.startswith(f"error: --work {tmp_path}: 10.0 GiB free") and "\n" not in line


HOST_GROWTH = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
import gpu_check_rules as rules

def copy_then_free():
    # 256 MiB, filled: resident, and held long enough for the sampler thread on a busy machine
    x = torch.ones(64 * 2**20, dtype=torch.float32)
    time.sleep(0.5)
    return float(x[0])

value, grew = rules.peak_anon_growth(copy_then_free)
_, idle = rules.peak_anon_growth(lambda: time.sleep(0.05))
print(value, grew, idle)
"""


def test_host_memory_growth_is_measured_while_a_function_runs(rules):
    # in a fresh process, as gpu_check_train measures a load: a long-lived one (this test session) may
    # hand the fill memory its allocator kept from earlier tests (a CI run saw 4 KiB of growth)
    assert rules.anon_rss_bytes("Name:\tx\nRssAnon:\t  2048 kB\nRssFile:\t 10 kB\n") == 2 * 2**20
    assert rules.anon_rss_bytes("Rss:  4096 kB\nPss_Anon:  12 kB\nAnonymous:  3072 kB\n") == 3 * 2**20
    done = subprocess.run([sys.executable, "-c", HOST_GROWTH, str(REPO / "benchmarks")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    value, grew, idle = done.stdout.split()
    assert float(value) == 1.0 and int(grew) >= 200 * 2**20 and int(idle) < 64 * 2**20


def test_run_configs_are_valid_training_configs(train_part, tmp_path):
    import yaml

    from toolkit.train.config import load_config

    for stage, offload, ds_config in ((1, False, "zero1"), (2, False, "zero2"), (3, False, "zero3"),
                                      (3, True, "zero3_offload")):
        cfg = train_part.run_config("m", tmp_path / "data", tmp_path / "out", stage, micro=64, stop_after_epoch=1,
                                    offload=offload)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        loaded = load_config(tmp_path / "c.yaml")
        assert loaded.zero_stage == stage and loaded.ds_config == ds_config and loaded.micro_batch_size == 64
        assert loaded.keep_last_n == 1 and loaded.stop_after_epoch == 1 and loaded.epochs == 2
        assert loaded.ds_config_path().is_file()
    cmd = train_part.launch_command(8, True, 29511, Path("c.yaml"), python="py")
    assert cmd[:6] == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port"]
    assert cmd[-4:] == ["--module", "toolkit.train", "--config", "c.yaml"]
    assert train_part.launch_command(2, False, 1, Path("c"))[3] == "--num_accelerators"
    env = train_part.launch_env(False, 2, base={"PYTHONPATH": "/tmp/site", "PATH": "/bin"})
    assert env["PYTHONPATH"] == f"{REPO}:/tmp/site" and env["OMP_NUM_THREADS"] and env["PATH"].endswith("/bin")


def test_figures_of_a_training_output(train_part, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step000004").mkdir(parents=True)
    (out / "checkpoints" / "step000004" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (out / "model").mkdir()
    (out / "model" / "model.safetensors").write_bytes(b"x" * 40)
    rows = [{"step": i + 1, "loss": 3.0 - i, "tokens": 1000, "tokens_per_s": tps} for i, tps in enumerate([10, 500, 1000])]
    (out / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "train_summary.json").write_text(json.dumps({"global_step": 3, "seconds": 9.5, "peak_memory": {
        "kind": "cuda_max_allocated", "train": [5, 6], "export": [1, 2]}}))
    s = train_part.summarize_run(out, num_params=10**9, peak_flops=1e15, ranks=2)
    assert s["losses"] == [3.0, 2.0, 1.0] and s["tokens_per_s"] == 750  # the first step (warm-up) left out
    assert s["mfu"] == pytest.approx(6 * 10**9 * 750 / 2e15) and s["peak_memory"]["export"] == [1, 2]
    assert s["checkpoint_bytes"] == {"step000004": 100} and s["export_bytes"] == 40
    assert train_part.mfu(10**9, None, 1e15, 1) is None and train_part.mfu(10**9, 100, None, 1) is None
    assert train_part.compare_losses([1.0, 2.0], [1.0, 2.0]) == {"steps": [2, 2], "max_abs_diff": 0.0,
                                                                 "bitwise_equal": True, "compared": 2}
    assert train_part.compare_losses([1.0, 2.0], [1.0, 2.5, 3.0])["max_abs_diff"] == 0.5


def test_bench_train_gpu_preset_uses_every_gpu():
    from toolkit.bench import load_benchmark

    bench = load_benchmark("train")
    assert bench.PRESETS["gpu"]["ranks"] is None and bench.PRESETS["gpu"]["optimizer"] == "adamw"
    assert bench.resolve_ranks(None, True, 8) == 8 and bench.resolve_ranks(None, False, 0) == 1
    assert bench.resolve_ranks(2, True, 8) == 2
    assert bench.parse_args(["--preset", "gpu"]).ranks is None  # decided when the GPUs are known


@pytest.mark.slow  # the probe checks for real on CPU with a tiny model (~60 s): checks the script, not a GPU
def test_probe_checks_smoke_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--probe", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=NO_GPU)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    probe = result["results"]["probe"]
    assert result["summary"]["probe"]["ok"] == ["planning", "engine_1b", "engine_8b", "actors"]
    assert probe["planning"]["plan"].startswith("2 actor(s) x (1 CPU)")  # no GPU: the CPU plan
    assert result["verdict"]["verdict"] == "passed" and result["verdict"]["expectations_met"] == 15
    assert set(probe["engine_1b"]["answers_per_s"]) == {"toolkit", "eager", "eager_batch8", "generate"}
    # the probe's own loop per shape, half the questions with planted gold: two phases skip their samples
    lazy = probe["engine_1b"]["lazy_probe"]
    assert lazy["planted"] == 3 and lazy["vllm"] == "skipped with --smoke"  # varied answers: the tied head replaced
    assert {(r["engine"], r["sampling"]) for r in lazy["runs"]} == {("toolkit", m) for m in ("full", "one_pass", "two_phase")}
    assert all(r["categories_equal_to_full"] for r in lazy["runs"])
    assert lazy["answers_saved"]["toolkit_two_phase"] == 0.4  # 3 settled questions x 2 prompts x 4 of 60 answers
    assert probe["engine_1b"]["agreement"]["graphs_vs_eager"]["answers"]["rate"] == 1.0  # CPU fp32: equal
    assert probe["actors"]["devices"] == {"two_actors_one_gpu": ["cpu"], "cpu_actor": ["cpu"]}
    assert probe["actors"]["rows_equal"] is True


@pytest.mark.gpu  # the real check on this machine's GPU (about 8 minutes): only with `-m gpu`
def test_gpu_check_passes_on_this_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--probe", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, timeout=900)
    result = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    assert done.returncode == 0 and result["verdict"]["verdict"] != "failed", json.dumps(result["verdict"])
