"""The probe engine's GPU checks (`python benchmarks/gpu_check.py --probe`), on randomly initialised
Llama-3.2-1B and Llama-3-8B shapes in bf16 (no weights to download), generation forced to
max_new_tokens so every step is full:

  engine_1b, engine_8b  the toolkit engine with CUDA graphs, the same engine eager, eager with half
                        the batch, and HF `generate`, on the same prompts: answers/s, the decode step
                        against the HBM roofline (bench_sampling's accounting), peak memory, and how
                        often their answers agree (gpu_check_rules.GPU_RULES: rates with counts);
                        then the probe's own loop (benchmarks/probe_modes.py) in full sampling, lazy in
                        one pass and lazy in two phases, and vLLM full and lazy where vLLM is installed:
                        questions/s, answers saved and categories against full sampling. Random
                        weights know no fact, so half the questions get the engine's own greedy
                        answer as gold (probe_modes.plant_gold): a model that knows half its facts
  actors                Ray actors: two sharing one GPU (0.5 each) both on that GPU, one without a GPU
                        share on the CPU; their categories against each other
  planning              the probe's auto placement on this node (one actor per visible GPU), and that
                        reading the node (the probe's and the trainer's) leaves no CUDA context behind
                        in the driver, whose GPU memory would count against the training ranks

Each check is a function(ctx) -> JSON-able dict for gpu_check_rules' runner; `--smoke` runs them on
CPU with a tiny model (checks this script, not the hardware).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import common
from gpu_check_rules import Check, agreement, expect_at_least, expect_at_most, expect_rate, optional_present, rule

PROBE_SHAPES = {"engine_1b": "random:llama-3.2-1b", "engine_8b": "random:llama-3-8b"}
SMOKE_SHAPE = "random:tiny"

# The probe loop's workload per shape: questions (half of them with planted gold), N_ex, samples, tokens
LAZY_WORKLOAD = dict(questions=32, exemplar_sets=2, shots=4, samples=8, max_new_tokens=16)
SMOKE_LAZY_WORKLOAD = dict(questions=6, exemplar_sets=2, shots=2, samples=4, max_new_tokens=4)
MIN_SAVED_TWO_PHASE = 0.2  # half the questions settle by their greedy answer: ~0.44 of the answers if all do

# (row name, bench_sampling engine, settings changed): the engine runs each shape check makes.
ENGINE_RUNS = (("toolkit", "toolkit", {}), ("eager", "no-cuda-graphs", {}),
               ("eager_batch8", "no-cuda-graphs", {"batch_prompts": 8, "prefill_engines": []}),
               ("generate", "generate", {}))


def engine_args(ctx, on_gpu: bool) -> SimpleNamespace:
    """bench_sampling's settings for one model: the SliCK workload, sized for about a minute per shape."""
    return SimpleNamespace(samples=16 if on_gpu else 2, max_new_tokens=16 if on_gpu else 3, batch_prompts=16,
                           baseline_prompts=16 if on_gpu else 0, warmup_prompts=-1, repeats=2 if on_gpu else 1,
                           prefill_engines=["toolkit", "no-cuda-graphs"], force_full_length="on",
                           tokenizer=ctx.shared.get("tokenizer"), dtype="bfloat16" if on_gpu else "float32")


def probe_requests(data, questions: int, exemplar_sets: int):
    from toolkit.data.prompts import ExemplarPool
    from toolkit.probe.slick import build_requests
    from toolkit.probe.types import ProbeConfig

    train, dev = common.load_items(data)
    cfg = ProbeConfig(num_exemplar_sets=exemplar_sets, shots=4)
    return [r for it in common.spread(train, questions) for r in build_requests(it, ExemplarPool(dev), cfg)]


def every_answer(row: dict) -> list[str]:
    """A row's answers in one list: per prompt its greedy answer, then its seeded samples."""
    return [answer for greedy, samples in row["all_answers"] for answer in (greedy, *samples)]


def engine_comparisons(rows: dict, on_gpu: bool) -> tuple[dict, list[dict]]:
    """(agreements, expectations) between the engine rows present (a row that failed compares nothing)."""
    pairs = {"graphs_vs_eager": ("toolkit", "eager"), "batch_8_vs_16": ("eager_batch8", "eager")}
    found, expectations = {}, []
    for name, (a, b) in pairs.items():
        if a in rows and b in rows:
            found[name] = {"answers": agreement(every_answer(rows[a]), every_answer(rows[b])),
                           "greedy": agreement(rows[a]["greedy"], rows[b]["greedy"])}
            expectations.append(expect_rate(name, found[name]["answers"], rule(name, on_gpu)))
    if "toolkit" in rows and "generate" in rows:  # generate ran the first prompts only
        n = len(rows["generate"]["greedy"])
        found["engine_vs_generate"] = {"greedy": agreement(rows["toolkit"]["greedy"][:n], rows["generate"]["greedy"])}
        expectations.append(expect_rate("engine_vs_generate", found["engine_vs_generate"]["greedy"],
                                        rule("engine_vs_generate", on_gpu)))
    return found, expectations


def ratio(speed: dict, a: str, b: str) -> float | None:
    """speed[a] / speed[b], or None where either row is missing (an engine that failed or did not run)."""
    return speed[a] / speed[b] if a in speed and b in speed else None


def engine_check(shape_key: str):
    def run(ctx) -> dict:
        import bench_sampling

        from toolkit.data.prompts import token_counts

        data, tokenizer = common.resolve_inputs(ctx.args.inputs, ctx.args.data, ctx.args.tokenizer)
        ctx.shared["tokenizer"] = tokenizer
        source = PROBE_SHAPES[shape_key] if ctx.on_gpu else SMOKE_SHAPE
        args = engine_args(ctx, ctx.on_gpu)
        requests = probe_requests(data, questions=16 if ctx.on_gpu else 2, exemplar_sets=2)
        ceilings = ctx.shared.get("ceilings") or (common.measure_ceilings() if ctx.on_gpu else None)
        ctx.shared["ceilings"] = ceilings
        model, tok = bench_sampling.load(source, args, ctx.on_gpu)
        params = sum(p.numel() for p in model.parameters())  # with an untied head: the shape's compute, more memory
        prompt_lens = token_counts(tok, [r.text for r in requests])
        rows, failed = {}, {}
        for name, engine, changes in ENGINE_RUNS:
            try:
                rows[name] = bench_sampling.bench_engine(engine, model, tok, requests, SimpleNamespace(
                    **{**vars(args), **changes}), True, ceilings, prompt_lens)
            except Exception as err:  # noqa: BLE001 -- recorded: the other engines' figures still count
                failed[name] = repr(err)[:1000]
            common.free_memory()
        lazy = lazy_comparison(model, tok, data, args.dtype, ctx.on_gpu)
        del model
        if ctx.on_gpu:
            import torch

            torch._dynamo.reset()  # drop compiled graphs and CUDA graph pools with the model
        common.free_memory()
        agreements, expectations = engine_comparisons(rows, ctx.on_gpu)
        expectations.append(expect_at_most("engines_failed", len(failed), 0, "every engine runs"))
        expectations += lazy.pop("expectations")
        speed = {name: r["answers_per_s"] for name, r in rows.items()}
        return {"model": source, "params": params, "prompts": len(requests), "answers_per_s": speed,
                "x_generate": ratio(speed, "toolkit", "generate"), "x_eager": ratio(speed, "toolkit", "eager"),
                "decode_step_ms": {n: r["decode_step_s"] * 1e3 for n, r in rows.items() if r.get("decode_step_s")},
                "roofline": rows.get("toolkit", {}).get("roofline"),
                "peak_memory": {n: r["peak_memory"] for n, r in rows.items()}, "ceilings": ceilings,
                "failed_engines": failed, "agreement": agreements, "lazy_probe": lazy, "expectations": expectations}
    return run


def lazy_comparison(model, tokenizer, data, dtype: str, on_gpu: bool) -> dict:
    """The probe's own loop on `model` (probe_modes.engine_rows): the own engine in full sampling, lazy in one
    pass and in two phases, then vLLM full and lazy where it is installed (not with --smoke: its CPU start-up
    takes a minute, and the sampling benchmark runs it there); questions/s, answers saved, categories
    against full sampling, with planted gold (probe_modes.plant_gold)."""
    import probe_modes

    from toolkit.data.prompts import ExemplarPool
    from toolkit.probe.engine import FastEngine

    work = LAZY_WORKLOAD if on_gpu else SMOKE_LAZY_WORKLOAD
    args = SimpleNamespace(**work, batch_prompts=None if on_gpu else 8)
    train, dev = common.load_items(data)
    items, pool = common.spread(train, work["questions"]), ExemplarPool(dev)
    engine = FastEngine(model, tokenizer, probe_modes.probe_config(args, "full"), max_batch_prompts=args.batch_prompts)
    rows = probe_modes.engine_rows(engine, "toolkit", dtype, probe_modes.OWN_MODES, items, pool, args, plant_every=2)
    del engine
    common.free_memory()
    vllm = "not installed" if not optional_present()["vllm"] else "skipped with --smoke" if not on_gpu else "ran"
    if vllm == "ran":
        try:
            engine = common.start_vllm(model, tokenizer, probe_modes.probe_config(args, "full"), gpu_share=0.5)
            rows += probe_modes.engine_rows(engine, "vllm", dtype, probe_modes.VLLM_MODES, items, pool, args,
                                            plant_every=2)
            engine.close()
        except Exception as err:  # noqa: BLE001 -- recorded: the own engine's figures still count
            vllm = f"failed: {err!r}"[:1000]
        common.free_memory()
    expectations = []
    for r in rows:
        if r["sampling"] != "full":
            full = next(f for f in rows if f["engine"] == r["engine"] and f["sampling"] == "full")
            name = f"{r['engine']}_{r['sampling']}_vs_full"
            expectations.append(expect_rate(name, agreement(r["categories"], full["categories"]),
                                            rule("lazy_vs_full", on_gpu)))
    rows = probe_modes.compare(rows)
    speed = {f"{r['engine']}_{r['sampling']}": r["questions_per_s"] for r in rows}
    saved = {f"{r['engine']}_{r['sampling']}": r["answers_saved"] for r in rows if r["sampling"] != "full"}
    expectations.append(expect_at_least("toolkit_two_phase_answers_saved", saved["toolkit_two_phase"],
                                        MIN_SAVED_TWO_PHASE, "two phases skip the samples of every question "
                                        "its greedy answers settle (half of them are planted)"))
    two_phase = "toolkit_two_phase"
    return {"workload": work, "planted": rows[0]["planted"], "vllm": vllm, "questions_per_s": speed,
            "answers_saved": saved, "x_two_phase_vs_one_pass": ratio(speed, two_phase, "toolkit_one_pass"),
            "x_two_phase_vs_full": ratio(speed, two_phase, "toolkit_full"),
            "x_two_phase_vs_vllm_lazy": ratio(speed, two_phase, "vllm_two_phase"),
            "x_two_phase_vs_vllm_full": ratio(speed, two_phase, "vllm_full"), "runs": rows,
            "expectations": expectations}


def check_actors(ctx) -> dict:
    """Two actors sharing one GPU each on the GPU, an actor without a share on the CPU; their categories."""
    import ray

    from toolkit.io import read_jsonl, write_jsonl
    from toolkit.probe.pool import Placement
    from toolkit.probe.runner import RunConfig, run_probe
    from toolkit.probe.types import ProbeConfig

    data, tokenizer = common.resolve_inputs(ctx.args.inputs, ctx.args.data, ctx.args.tokenizer)
    train, dev = common.load_items(data)
    work = Path(ctx.work)
    write_jsonl(work / "facts" / "train.jsonl", [it.to_dict() for it in common.spread(train, 8)])
    write_jsonl(work / "facts" / "dev.jsonl", [it.to_dict() for it in dev])
    model = common.materialise_random(SMOKE_SHAPE, tokenizer, work / "actor-model", "float32")
    probe = ProbeConfig(num_exemplar_sets=2, shots=2, samples=4, max_new_tokens=4, dtype="float32")
    share = 0.5 if ctx.on_gpu else 0.0
    runs = {}
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        for name, placement in (("two_actors_one_gpu", Placement(num_actors=2, gpus_per_actor=share)),
                                ("cpu_actor", Placement(num_actors=1, gpus_per_actor=0.0))):
            tick = time.perf_counter()
            run = RunConfig(data=str(work / "facts"), out=str(work / name), model=model, shard_size=2, progress=False)
            summary = run_probe(run, probe, placement)
            runs[name] = {"wall_s": time.perf_counter() - tick,
                          "workers": [{k: w.get(k) for k in ("pid", "device", "gpu_ids", "shards")}
                                      for w in summary["workers"]],
                          "rows": read_jsonl(work / name / "categories.jsonl")}
    finally:
        ray.shutdown()
    devices = {name: sorted({w["device"] for w in r["workers"]}) for name, r in runs.items()}
    expected = {"two_actors_one_gpu": ["cuda" if ctx.on_gpu else "cpu"], "cpu_actor": ["cpu"]}
    if devices != expected:
        raise RuntimeError(f"actor devices {devices}, expected {expected}")
    rows = {name: r.pop("rows") for name, r in runs.items()}
    categories = {name: [(row["id"], row["category"]) for row in r] for name, r in rows.items()}
    agreed = agreement(categories["two_actors_one_gpu"], categories["cpu_actor"])
    return {"devices": devices, "runs": runs, "rows_equal": rows["two_actors_one_gpu"] == rows["cpu_actor"],
            "category_agreement": agreed,
            "expectations": [expect_rate("actor_rows", agreed, rule("actor_rows", ctx.on_gpu))]}

# Run in a fresh interpreter: gpu_check's own process has touched CUDA long before this check.
PLANNING_SCRIPT = """
import json, os
from toolkit.probe.placement import local_node, plan_placement
from toolkit.probe.pool import Placement
from toolkit.train.devices import query_nvidia_smi, this_node
node, train_node = local_node(), this_node()
plan = plan_placement(Placement(), [node], "fast")
smi = query_nvidia_smi()
own = None if smi is None else sum(mib for g in smi for pid, _, mib in g.processes if pid == os.getpid())
print(json.dumps({"gpus": node.gpus, "gpu_memory_bytes": node.gpu_memory_bytes, "train_gpus": train_node.count,
                  "plan": plan.line(), "num_actors": plan.placement.num_actors,
                  "gpus_per_actor": plan.placement.gpus_per_actor, "driver_gpu_mib": own}))
"""


def check_planning(ctx) -> dict:
    """The auto plan on this node, read by a process that has done nothing else, and the GPU memory
    that reading left to that process (nvidia-smi's compute apps; None where nvidia-smi is missing)."""
    done = subprocess.run([sys.executable, "-c", PLANNING_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=common.REPO_ROOT, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    expectations = []
    if ctx.on_gpu:  # on CPU there is no context to leave and no GPU to plan for
        expectations.append(expect_at_most("auto_actors_short_of_gpus", seen["gpus"] - seen["num_actors"], 0,
                                           "auto placement runs one own-engine actor per visible GPU"))
        if seen["driver_gpu_mib"] is not None:  # None: no nvidia-smi to ask
            expectations.append(expect_at_most(
                "planning_context_mib", seen["driver_gpu_mib"], 0, "planning reads the devices without a CUDA "
                "context (it would hold GPU memory through every training stage)"))
    return {**seen, "expectations": expectations}


PROBE_CHECKS = [Check("planning", check_planning, estimate_s=20),
                Check("engine_1b", engine_check("engine_1b"), estimate_s=120),
                Check("engine_8b", engine_check("engine_8b"), estimate_s=240),
                Check("actors", check_actors, estimate_s=60)]

