"""The probe engine's GPU checks (`python benchmarks/gpu_check.py --probe`), on randomly initialised
Llama-3.2-1B and Llama-3-8B shapes in bf16 (the GPU machine downloads no weights), generation forced
to max_new_tokens so every step is full:

  engine_1b, engine_8b  the toolkit engine with CUDA graphs, the same engine eager, and HF `generate`
                        on the same prompts: answers/s, CUDA graphs vs eager answers identical (greedy
                        and sampled), greedy agreement with generate, the decode step against the HBM
                        roofline (bench_sampling's accounting), peak memory
  actors                Ray actors: two sharing one GPU (0.5 each) both on that GPU, one without a GPU
                        share on the CPU; their rows equal one in-process probe's

Each check is a function(ctx) -> JSON-able dict for gpu_check.py's runner; `--smoke` runs them on CPU
with a tiny model (checks this script, not the hardware).
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import common

PROBE_SHAPES = {"engine_1b": "random:llama-3.2-1b", "engine_8b": "random:llama-3-8b"}
SMOKE_SHAPE = "random:tiny"


def engine_args(ctx, on_gpu: bool) -> SimpleNamespace:
    """bench_sampling's settings for one model: the SliCK workload, sized for about a minute per shape."""
    return SimpleNamespace(samples=16 if on_gpu else 2, max_new_tokens=16 if on_gpu else 3, batch_prompts=16,
                           baseline_prompts=16 if on_gpu else 0, warmup_prompts=-1, repeats=2 if on_gpu else 1,
                           engines=["toolkit", "no-cuda-graphs", "generate"],
                           prefill_engines=["toolkit", "no-cuda-graphs"], force_full_length="on",
                           tokenizer=ctx.shared.get("tokenizer"), dtype="bfloat16" if on_gpu else "float32")


def probe_requests(data, questions: int, exemplar_sets: int):
    from toolkit.data.prompts import ExemplarPool
    from toolkit.probe.slick import build_requests
    from toolkit.probe.types import ProbeConfig

    train, dev = common.load_items(data)
    cfg = ProbeConfig(num_exemplar_sets=exemplar_sets, shots=4)
    return [r for it in common.spread(train, questions) for r in build_requests(it, ExemplarPool(dev), cfg)]


def engine_check(shape_key: str):
    def run(ctx) -> dict:
        import bench_sampling

        data, tokenizer = common.resolve_inputs(ctx.args.inputs, ctx.args.data, ctx.args.tokenizer)
        ctx.shared["tokenizer"] = tokenizer
        source = PROBE_SHAPES[shape_key] if ctx.on_gpu else SMOKE_SHAPE
        args = engine_args(ctx, ctx.on_gpu)
        requests = probe_requests(data, questions=16 if ctx.on_gpu else 2, exemplar_sets=2)
        ceilings = ctx.shared.get("ceilings") or (common.measure_ceilings() if ctx.on_gpu else None)
        ctx.shared["ceilings"] = ceilings
        result = bench_sampling.bench_model(source, requests, args, ctx.on_gpu, ceilings)
        rows = {r["engine"]: r for r in result["engines"]}
        if result["failed"]:
            raise RuntimeError(f"engines failed: {result['failed']}")
        eager = rows.get("no-cuda-graphs")
        if eager is not None and not eager["same_answers_as_toolkit"]:
            raise RuntimeError("CUDA graphs changed answers: the eager engine's differ")
        toolkit = rows["toolkit"]
        return {"model": source, "params": result["params"], "prompts": toolkit["prompts"],
                "answers_per_s": {e: r["answers_per_s"] for e, r in rows.items()},
                "x_generate": toolkit["x_generate"], "x_eager": eager and toolkit["answers_per_s"] / eager["answers_per_s"],
                "graphs_same_answers_as_eager": eager and eager["same_answers_as_toolkit"],
                "greedy_agreement_vs_generate": toolkit.get("greedy_agreement_vs_generate"),
                "decode_step_ms": {e: (r.get("decode_step_s") or 0) * 1e3 for e, r in rows.items() if e != "generate"},
                "roofline": toolkit.get("roofline"), "peak_memory": toolkit["peak_memory"], "ceilings": ceilings}
    return run


def check_actors(ctx) -> dict:
    """Two actors sharing one GPU each on the GPU, an actor without a share on the CPU; same rows."""
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
    same_rows = runs["two_actors_one_gpu"]["rows"] == runs["cpu_actor"]["rows"] if not ctx.on_gpu else None
    for r in runs.values():
        r.pop("rows")
    return {"devices": devices, "runs": runs, "cpu_rows_equal": same_rows}


def probe_checks(check_cls) -> list:
    """The checks, as gpu_check.py's Check objects (its class, passed in: no import cycle)."""
    return [check_cls("engine_1b", engine_check("engine_1b"), estimate_s=90),
            check_cls("engine_8b", engine_check("engine_8b"), estimate_s=180),
            check_cls("actors", check_actors, estimate_s=60)]
