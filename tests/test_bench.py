"""Smoke tests of the benchmarks (benchmarks/*.py) at their tiniest settings: they run end to end,
write a result JSON with the figures and a PNG, and `gradual bench` forwards to them. Timings here
mean nothing; the figures are produced by the full presets (benchmarks/README.md)."""
import json
import os
import resource
import time
from pathlib import Path

import pytest

from toolkit.bench import load_benchmark
from toolkit.cli import EXIT_BAD_INPUT, main

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("GRADUAL_CACHE_DIR", str(REPO / ".cache" / "gradual"))


def only_result(out: Path, name: str) -> dict:
    files = sorted(out.glob(f"{name}-*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".png").is_file()
    return json.loads(files[0].read_text())


def test_sampling_smoke_through_the_cli(tmp_path, capsys):
    # random 'tiny' shape, 2 questions x 1 prompt x (1 + 2) answers, 2 new tokens, no Ray
    peak_before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter()
    assert main(["bench", "sampling", "--preset", "smoke", "--actors", "--out", str(tmp_path)]) == 0
    elapsed, peak_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = only_result(tmp_path, "sampling")
    assert result["env"]["versions"]["torch"] and result["env"]["device"] and result["env"]["date"]
    assert result["config"]["questions"] == 2 and result["config"]["samples"] == 2
    model = result["models"][0]
    assert model["forced_full_length"] and not model["failed"]
    rows = {r["engine"]: r for r in model["engines"]}
    assert set(rows) == {"toolkit", "generate", "no-fanout", "no-bucketing"}  # no CUDA graphs on CPU
    for r in rows.values():
        assert r["answers"] == 2 * 3 and 0 < r["seconds"] < elapsed
        assert r["answers_per_s"] == pytest.approx(r["answers"] / r["seconds"])
        # on CPU: this process's peak RSS so far, in bytes (it only grows)
        assert r["peak_memory"]["kind"] == "process_peak_rss" and peak_before <= r["peak_memory"]["bytes"] <= peak_after
        assert r["tokens_per_answer"] == 2  # forced full length
    toolkit = rows["toolkit"]
    assert rows["generate"]["x_generate"] == 1 and 0 < toolkit["prefill_s"] < elapsed
    assert toolkit["prefill_tokens_per_s"] == pytest.approx(toolkit["prefill_tokens"] / toolkit["prefill_s"])
    assert set(model["feature_gain"]) == {"fan_out_kv", "bucket_by_length"}
    assert rows["no-fanout"]["same_answers_as_toolkit"] and rows["no-bucketing"]["same_answers_as_toolkit"]
    assert result["extrapolation"][0]["hours_8"] == pytest.approx(result["extrapolation"][0]["hours_1"] / 8)
    modes = {r["sampling"]: r for r in result["probe_modes"]["runs"]}  # lazy vs full, the probe's own loop
    assert set(modes) == {"full", "one_pass", "two_phase"} and modes["full"]["answers"] == 3 * 1 * 3
    for lazy in (modes["one_pass"], modes["two_phase"]):
        assert lazy["categories_equal_to_full"] and lazy["answers"] <= modes["full"]["answers"]
        assert lazy["answers_saved"] == pytest.approx(1 - lazy["answers"] / modes["full"]["answers"])
        assert lazy["prefilled_prompts"] == modes["full"]["prefilled_prompts"] == 3  # each prompt prefilled once
    # phase 2: the 2 samples of each prompt whose greedy answer was wrong (N_ex 1: not HighlyKnown)
    unsettled = 3 - modes["full"]["counts"].get("HighlyKnown", 0)
    assert modes["one_pass"]["phase2_rows"] == 0 and modes["two_phase"]["phase2_rows"] == 2 * unsettled
    for r in modes.values():
        assert r["questions_per_s"] == pytest.approx(r["items"] / r["seconds"])
        assert r["answers_per_s"] == pytest.approx(r["answers"] / r["seconds"])
    assert modes["full"]["answers_saved"] == 0 and modes["full"]["greedy_agreement_vs_fp32"] == 1
    out = capsys.readouterr().out
    assert "| toolkit" in out and "The probe's own loop" in out
    next(tmp_path.glob("*.png")).unlink()
    assert main(["bench", "sampling", "--replot", str(next(tmp_path.glob("sampling-*.json")))]) == 0
    assert next(tmp_path.glob("*.png"))


def test_forced_full_length_and_roofline_accounting():
    import torch

    from toolkit.models import ModelSpec, load_model
    from toolkit.probe.types import PromptRequest, ProbeConfig

    bench = load_benchmark("sampling")
    args = bench.parse_args(["--preset", "smoke", "--batch-prompts", "2", "--samples", "3", "--max-new-tokens", "5"])
    model, tokenizer = load_model(ModelSpec(source="random:tiny"))
    sampling = ProbeConfig(samples=3, max_new_tokens=5)
    requests = [PromptRequest(f"q{i}", 0, "Q: What is the capital of France?\nA:" + " x" * i) for i in range(3)]
    for name in ("toolkit", "generate"):
        engine = bench.make_engine(name, model, tokenizer, sampling, args, force=True)
        answers = engine.generate(requests)
        assert all(a.greedy_tokens == 5 and a.sample_tokens == [5] * 3 for a in answers)
    lens = [len(tokenizer(r.text, add_special_tokens=False).input_ids) for r in requests]
    ceilings = {"hbm_bytes_per_s": 1e12, "bf16_flops_per_s": 1e15}
    # 3 prompts in batches of 2: 2 batches x (5 - 1) decode steps
    roof = bench.roofline(model, lens, args, True, ceilings, decode_s=0.1, decode_steps=8)
    params = sum(p.numel() for p in model.parameters())
    assert roof["weight_bytes"] == params * 4 and roof["bytes_per_step"] > roof["weight_bytes"]
    assert roof["x_roofline"] == pytest.approx(roof["measured_step_s"] / roof["roofline_step_s"])
    # rows that stopped early break the accounting: no figure rather than a wrong one
    assert bench.roofline(model, lens, args, True, ceilings, decode_s=0.1, decode_steps=5) is None
    assert torch.isfinite(torch.tensor(roof["flops_per_step"]))


def test_bench_fails_clearly_without_the_benchmarks_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADUAL_BENCHMARKS_DIR", str(tmp_path / "missing"))
    assert main(["bench", "train", "--preset", "smoke"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "benchmark script not found" in err and err.count("\n") == 1


def test_memory_table_uses_the_trainers_estimate():
    rows = load_benchmark("train").memory_table()
    assert [r["model"][:3] for r in rows] == ["1B ", "1B ", "8B ", "8B ", "70B", "70B"]
    for r in rows:
        assert r["zero0_gib"] > r["zero1_gib"] > r["zero2_gib"] > r["zero3_gib"] > r["zero3_offload_gib"] > 0
        assert r["zero3_offload_host_gib"] > 0
    adam_1b = rows[0]
    assert adam_1b["params"] == pytest.approx(1.24e9, rel=0.01)
    n = adam_1b["params"]
    # ZeRO-0 with Adam in bf16 (DeepSpeed's FP16 optimizer): bf16 weights (2) + bf16 grads (2) + fp32 master
    # and moments (12) + fp32 copies of every gradient during the step (4) bytes per parameter
    assert adam_1b["zero0_gib"] * 2**30 == pytest.approx(20 * n)
    # ZeRO-1 (zero1.json: immediate_grad_update): bf16 weights + the full fp32 gradient buffer + the bf16
    # all-reduce copy of it, master and moments partitioned over 8
    assert adam_1b["zero1_gib"] * 2**30 == pytest.approx((2 + 4 + 2 + 12 / 8) * n)
    # ZeRO-2: bf16 weights, fp32 gradient and optimizer partitions, one 500M-element bf16 reduce bucket
    assert adam_1b["zero2_gib"] * 2**30 == pytest.approx((2 + 4 / 8 + 12 / 8) * n + 2 * 500_000_000)
    # ZeRO-3 (DeepSpeed's estimator's figure): 18 bytes per parameter over 8, the largest layer (the
    # embedding) gathered as 4 bytes per parameter
    assert adam_1b["zero3_gib"] * 2**30 == pytest.approx(18 * n / 8 + 4 * 128256 * 2048)


def test_readme_section_is_replaced_in_place(tmp_path):
    common = load_benchmark("sampling").common
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n")
    common.update_readme("sampling-cpu", "table 1", readme)
    common.update_readme("train-cpu", "table A", readme)
    common.update_readme("sampling-cpu", "table 2", readme)
    text = readme.read_text()
    assert "table 1" not in text and text.count("table 2") == 1 and "table A" in text and text.startswith("# Benchmarks")


@pytest.mark.slow
def test_sampling_ray_section(tmp_path):
    bench = load_benchmark("sampling")
    started = time.perf_counter()
    assert bench.main(["--preset", "smoke", "--engines", "toolkit", "--actors", "1", "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - started
    ray = only_result(tmp_path, "sampling")["ray"]
    run = ray["runs"][0]
    assert run["actors"] == 1 and run["answers"] == 2 * 3 and 0 < run["probe_wall_s"] < elapsed
    assert run["answers_per_s"] == pytest.approx(run["answers"] / run["probe_wall_s"])
    assert run["shards"] == 2 and run["driver_overhead_per_shard_s"] is not None


@pytest.mark.slow
def test_train_smoke_zero0_and_zero1_on_one_rank(tmp_path):
    from toolkit.train.memory import memory_estimate

    # the real trainer under the deepspeed launcher: 1 CPU rank, 1 step of 2 items per variant
    bench = load_benchmark("train")
    assert bench.main(["--preset", "smoke", "--out", str(tmp_path)]) == 0
    result = only_result(tmp_path, "train")
    # random:tiny: 49152 x 64 tied embeddings, 2 layers of q/o 64x64, k/v 64x32, MLP 3 x 64x128 and 2 norms, a final norm
    assert result["env"]["versions"]["deepspeed"] and result["params"] == 49152 * 64 + 2 * (
        2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 == 3_219_776
    variants = {v["variant"]: v for v in result["variants"]}
    assert set(variants) == {"zero0", "zero1", "zero3"}
    for v in variants.values():
        assert v["status"] == "ok", v
        assert v["steps_timed"] == 1 and 0 < v["step_s"] < v["launch_wall_s"]
        assert v["tokens_per_s"] == pytest.approx(v["tokens_per_step"] / v["step_s"])
        # the rank's peak RSS in bytes: a process with torch and DeepSpeed loaded holds well over 100 MiB
        assert len(v["peak_memory_per_rank"]) == 1 and v["peak_memory_per_rank"][0] > 100 * 2**20
        assert v["model_states_per_rank_bytes"] == memory_estimate(  # CPU: fp32, one rank
            result["params"], v["zero_stage"], 1, False, "adamw", False, largest_layer=49152 * 64)["total"]
        assert v["mfu"] is None  # no MFU on CPU
        parts = v["breakdown_ms"]  # DeepSpeed's own timers (ms in the step), read back from the launch log
        assert set(parts) == {"forward", "backward", "gradient_comm", "optimizer_step"}
        assert 0 < parts["forward"] < 1000 * v["step_s"]
    assert variants["zero0"]["x_zero0"] == 1
    assert len(result["memory_table"]) == 6


def test_probe_loop_rows_are_compared_with_full_sampling_and_the_fp32_reference(monkeypatch):
    """benchmarks/probe_modes.compare on made-up rows: answers saved against the same engine and dtype's
    full sampling, agreement and the largest category-count difference against the own engine's fp32."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # modules import by name
    from probe_modes import compare

    def row(engine, dtype, sampling, answers, seconds, greedy, categories):
        counts = {c: categories.count(c) for c in set(categories)}
        return dict(engine=engine, dtype=dtype, sampling=sampling, answers=answers, seconds=seconds,
                    greedy=greedy, categories=categories, counts=counts)

    H, M, U = "HighlyKnown", "MaybeKnown", "Unknown"
    rows = compare([
        row("toolkit", "float32", "full", 100, 10.0, ["a", "b", "c", "d"], [H, H, M, U]),
        row("toolkit", "float32", "lazy", 60, 5.0, ["a", "b", "c", "d"], [H, H, M, U]),
        row("vllm", "bfloat16", "full", 100, 8.0, ["a", "x", "c", "y"], [H, M, U, U]),
        row("vllm", "bfloat16", "lazy", 75, 4.0, ["a", "x", "c", "y"], [H, M, U, M]),
    ])
    own_lazy, vllm_full, vllm_lazy = rows[1], rows[2], rows[3]
    assert own_lazy["answers_saved"] == pytest.approx(0.4) and own_lazy["categories_equal_to_full"]
    assert own_lazy["x_fp32_full"] == 2.0 and own_lazy["max_count_difference_vs_fp32"] == 0
    assert vllm_lazy["answers_saved"] == pytest.approx(0.25) and not vllm_lazy["categories_equal_to_full"]
    assert vllm_full["greedy_agreement_vs_fp32"] == 0.5 and vllm_full["category_agreement_vs_fp32"] == 0.5
    # counts H 1 / M 1 / U 2 against H 2 / M 1 / U 1: the largest difference is 1, their sum 2
    assert vllm_full["max_count_difference_vs_fp32"] == 1
    assert vllm_lazy["max_count_difference_vs_fp32"] == 1  # H 1 / M 2 / U 1
    assert "greedy" not in vllm_full and "categories" not in vllm_full


def test_bf16_training_comparison_holds_bf16_to_the_noise_between_fp32_seeds(monkeypatch):
    """benchmarks/train_precision.compare on made-up runs: epoch mean losses against the gap two fp32 seeds
    show, best dev against the seeds' gap (or one binomial standard error of the dev set)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_precision import compare

    def run(losses, best, tokens_per_s=10.0):
        epochs = [i // 2 for i in range(len(losses))]  # two steps per epoch
        return {"loss": losses, "epoch": epochs, "tokens_per_s": [tokens_per_s] * len(losses), "trainer_s": 100.0,
                "dev": [{"step": 2, "accuracy": best, "count": 64}], "best_dev_accuracy": best}

    fp32, seed1 = run([4.0, 2.0, 1.0, 0.8], 0.40), run([4.1, 2.1, 1.0, 0.7], 0.375)
    close = compare({"fp32": fp32, "fp32_seed1": seed1, "bf16": run([4.0, 2.1, 1.05, 0.8], 0.39, 15.0)})
    assert close["epoch_mean_loss"]["fp32"] == [3.0, 0.9]
    assert close["loss_gap_bf16"] == pytest.approx([0.05, 0.025]) and close["loss_gap_seed"] == pytest.approx([0.1, -0.05])
    assert close["bf16_within_noise"] and close["x_bf16_tokens_per_s"] == 1.5 and close["x_bf16_trainer_s"] == 1.0
    lagging = compare({"fp32": fp32, "fp32_seed1": seed1, "bf16": run([4.0, 3.8, 1.1, 0.8], 0.40)})
    assert not lagging["same_curve"] and lagging["same_dev"] and not lagging["bf16_within_noise"]
    # dev: the seeds moved 2.5 points, one standard error of 64 items at 40% is 6.1 points
    assert compare({"fp32": fp32, "fp32_seed1": seed1, "bf16": run([4.0, 2.0, 1.0, 0.8], 0.34)})["same_dev"]
    assert not compare({"fp32": fp32, "fp32_seed1": seed1, "bf16": run([4.0, 2.0, 1.0, 0.8], 0.33)})["same_dev"]
