"""The SliCK sampling workload: Q questions x N_ex k-shot prompts (real prompts from the built-in facts)
x (1 greedy + n samples), the toolkit engine against HF `generate` and against itself with one
feature off at a time; the decode roofline on GPU; scaling over Ray actors; an extrapolation to
SliCK's scale. `python benchmarks/bench_sampling.py --preset cpu|gpu` (or `gradual bench sampling`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from toolkit.helpscreen import ScreenParser  # noqa: E402
from probe_modes import bench_probe_modes  # noqa: E402
from sampling_report import ENGINES, OPTIONAL_ENGINES, check_targets, extrapolate, report  # noqa: E402

from toolkit.probe.vllm_engine import INSTALL_HINT, vllm_importable  # noqa: E402

VLLM = ["vllm"] if vllm_importable() else []  # measured beside the others where it is installed
VLLM_NOTE = None if VLLM else f"No vLLM rows: vLLM is not installed here ({INSTALL_HINT})."

FEATURE_OFF = {"no-fanout": "fan_out_kv", "no-cuda-graphs": "compile_decode", "no-bucketing": "bucket_by_length"}
SHAPES = ("random:smollm2-135m", "random:llama-3.2-1b", "random:llama-3-8b")
PRESETS = {
    # real SmolLM2, real stopping at newline; sized for ~5 minutes on 2 cores (generate is the slow part)
    "cpu": dict(models=["smollm2"], questions=12, exemplar_sets=2, shots=4, samples=8, max_new_tokens=16,
                engines=["toolkit", "generate", "no-fanout", "no-bucketing", *VLLM], batch_prompts=16, baseline_prompts=0,
                warmup_prompts=2, repeats=1, prefill_engines=["toolkit"], actors=[1, 2], ray_questions=4,
                shard_size=1, budget_s=0, probe_items=200, probe_dtypes=["float32", "bfloat16"]),
    # random-init real shapes in bf16, generation forced to max_new_tokens; one 10-minute H100 run
    "gpu": dict(models=list(SHAPES), questions=24, exemplar_sets=10, shots=4, samples=16, max_new_tokens=16,
                engines=[*ENGINES, *VLLM], batch_prompts=16, baseline_prompts=32, warmup_prompts=-1, repeats=2,
                prefill_engines=["toolkit", "no-cuda-graphs"], actors=[1, 2], ray_questions=16, shard_size=2,
                inputs=str(common.DEFAULT_INPUTS), budget_s=480, probe_items=0, probe_dtypes=[]),
    # seconds: tests and quick checks
    "smoke": dict(models=["random:tiny"], questions=2, exemplar_sets=1, shots=2, samples=2, max_new_tokens=2,
                  engines=list(ENGINES), batch_prompts=16, baseline_prompts=0, warmup_prompts=1, repeats=1,
                  prefill_engines=["toolkit"], actors=[1], ray_questions=2, shard_size=1, budget_s=0, probe_items=3,
                  probe_dtypes=["float32"]),
}


def parse_args(argv, prog=None):
    p = ScreenParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     docs="benchmarks/README.md")  # --help fits one screen; --help-all: every option's help
    common.add_common_args(p, PRESETS)
    p.add_argument("--models", nargs="+", help="smollm2, a HF dir, random:<tiny|smollm2-135m|llama-3.2-1b|llama-3-8b>")
    p.add_argument("--questions", type=int, help="Q: questions probed")
    p.add_argument("--exemplar-sets", type=int, help="N_ex: few-shot prompts per question")
    p.add_argument("--shots", type=int, help="k: exemplars per prompt")
    p.add_argument("--samples", type=int, help="n: sampled answers per prompt (plus 1 greedy)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--force-full-length", choices=("auto", "on", "off"), default="auto",
                   help="never stop at newline/EOS (auto: on for random-init models)")
    p.add_argument("--engines", nargs="+", choices=ENGINES + OPTIONAL_ENGINES)
    p.add_argument("--batch-prompts", type=int, help="prompts per batch, every engine")
    p.add_argument("--baseline-prompts", type=int, help="time `generate` on only the first P prompts (0: all)")
    p.add_argument("--warmup-prompts", type=int, help="untimed prompts per engine first (-1: a full pass)")
    p.add_argument("--repeats", type=int, help="timed passes per engine (median reported)")
    p.add_argument("--prefill-engines", nargs="*", choices=ENGINES[:1] + ENGINES[2:],
                   help="engines whose prefill is timed alone (max_new_tokens=1): decode step and roofline figures")
    p.add_argument("--actors", nargs="*", type=int, help="Ray actor counts (none: skip the Ray section)")
    p.add_argument("--ray-questions", type=int, help="questions probed in each Ray run")
    p.add_argument("--ray-model", help="model of the Ray section (default: the first of --models)")
    p.add_argument("--shard-size", type=int, help="questions per Ray shard")
    p.add_argument("--dtype", help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--probe-items", type=int, help="the probe's own loop on this many items: full vs lazy sampling (one pass, two phases) "
                   "per dtype, and vLLM when it is among --engines (0: skip)")
    p.add_argument("--probe-dtypes", nargs="*", help="dtypes of the probe-loop section (e.g. float32 bfloat16)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine)")
    p.add_argument("--budget-s", type=float, help="start no new section after this many seconds (0: no limit)")
    p.add_argument("--export-inputs", type=Path, metavar="DIR", help="write the input bundle for a GPU machine; exit")
    return common.apply_preset(p.parse_args(argv), PRESETS)


# ---------------------------------------------------------------- engines


def never_stop(engine, model) -> None:
    """Force full-length generation: stop on a token id no model output can take (== vocab size)."""
    from toolkit.probe.answers import AnswerDecoder

    if hasattr(engine, "ignore_eos"):  # vLLM: its own EOS check, and no ids out of the vocabulary
        engine.ignore_eos, engine.answers = True, AnswerDecoder(engine.tokenizer, stop_ids=[])
        return
    engine.answers = AnswerDecoder(engine.tokenizer, stop_ids=[model.config.vocab_size])


def make_engine(name, model, tokenizer, sampling, args, force):
    from toolkit.probe.engine import FastEngine
    from toolkit.probe.reference import ReferenceEngine

    if name == "vllm":
        engine = common.start_vllm(model, tokenizer, sampling, gpu_share=0.5)
    elif name == "generate":
        engine = ReferenceEngine(model, tokenizer, sampling, batch_size=args.batch_prompts)
    else:
        flags = dict(fan_out_kv=True, bucket_by_length=True, compile_decode=True)  # graphs: CUDA only
        if name in FEATURE_OFF:
            flags[FEATURE_OFF[name]] = False
        engine = FastEngine(model, tokenizer, sampling, max_batch_prompts=args.batch_prompts, **flags)
    if force:
        never_stop(engine, model)
    return engine


def load(source, args, init_on_gpu):
    """(model, tokenizer); a random shape with tied embeddings gets a random head of its own
    (common.untie_random_head: tied, it answers ':' to every prompt, and answers agree trivially)."""
    import contextlib

    import torch

    from toolkit.models import ModelSpec, load_model

    spec = ModelSpec(source=source, tokenizer=args.tokenizer, dtype=args.dtype)
    if not source.startswith("random:"):
        return load_model(spec)
    # initialise on the GPU: an 8B random init on the CPU takes minutes
    with torch.device("cuda") if init_on_gpu else contextlib.nullcontext():
        model, tokenizer = load_model(spec)
    common.untie_random_head(model)
    return model, tokenizer


def roofline(model, prompt_lens, args, bucket, ceilings, decode_s, decode_steps) -> dict | None:
    """Per decode step, the bytes that must move (weights once + every live row's KV context) and the
    FLOPs, against the measured bandwidth and matmul peak; all rows live every step (forced length)."""
    cfg, streams, steps = model.config, 1 + args.samples, args.max_new_tokens - 1
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    width = emb.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * width
    weight_bytes = (params if tied else params - emb.numel()) * width  # an untied input table is only gathered
    matmul_params = params if tied else params - emb.numel()
    lens = sorted(prompt_lens) if bucket else list(prompt_lens)
    chunks = [lens[i:i + args.batch_prompts] for i in range(0, len(lens), args.batch_prompts)]
    if len(chunks) * steps != decode_steps or steps < 1:
        return None  # rows stopped early: the per-step accounting below would not hold
    total_bytes = total_flops = roof_s = 0.0
    for chunk in chunks:
        rows = len(chunk) * streams
        for s in range(1, steps + 1):
            ctx = streams * sum(n + s for n in chunk)
            nbytes = weight_bytes + kv_per_token * ctx
            flops = 2 * matmul_params * rows + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * ctx
            total_bytes, total_flops = total_bytes + nbytes, total_flops + flops
            roof_s += max(nbytes / ceilings["hbm_bytes_per_s"], flops / ceilings["bf16_flops_per_s"])
    from toolkit.probe.memory import cache_length

    cache_len = cache_length(max(lens) + args.max_new_tokens)  # FastEngine's static cache length
    return dict(bytes_per_step=total_bytes / decode_steps, flops_per_step=total_flops / decode_steps,
                weight_bytes=weight_bytes, static_cache_kv_bytes_per_step=kv_per_token * cache_len * streams
                * args.batch_prompts, roofline_step_s=roof_s / decode_steps, measured_step_s=decode_s / decode_steps,
                x_roofline=decode_s / roof_s)


def bench_engine(name, model, tokenizer, requests, args, force, ceilings, prompt_lens) -> dict:
    from toolkit.probe.types import ProbeConfig

    sampling = ProbeConfig(samples=args.samples, max_new_tokens=args.max_new_tokens)
    if name == "generate" and args.baseline_prompts:
        requests = requests[:args.baseline_prompts]  # per-answer rates stay comparable
    base = common.reset_peak_memory()
    engine = make_engine(name, model, tokenizer, sampling, args, force)
    warm = requests if args.warmup_prompts < 0 else requests[:args.warmup_prompts]
    if warm:  # compiles and captures the CUDA graphs, sizes the static cache
        engine.generate(warm[:args.batch_prompts] if name == "generate" else warm)
    runs = [common.timed(lambda: engine.generate(requests)) for _ in range(max(1, args.repeats))]
    answers, seconds = runs[-1][0], statistics.median(s for _, s in runs)
    n_answers = len(requests) * (1 + args.samples)
    tokens = sum(a.total_tokens for a in answers)
    row = dict(engine=name, prompts=len(requests), answers=n_answers, seconds=seconds, seconds_all=[s for _, s in runs],
               answers_per_s=n_answers / seconds, generated_tokens=tokens, generated_tokens_per_s=tokens / seconds,
               tokens_per_answer=tokens / n_answers,
               peak_memory=common.peak_memory(base, sum(p.numel() * p.element_size() for p in model.parameters())),
               start_s=getattr(engine, "start_s", None),  # vLLM's start-up, not in `seconds`
               stats=dict(engine.last_stats), greedy=[a.greedy for a in answers],
               all_answers=[(a.greedy, a.samples) for a in answers])
    engine.close()  # its cache (vLLM: its GPU memory and processes) before the next engine
    if name in args.prefill_engines:  # prefill alone: the same engine settings with max_new_tokens=1
        one = make_engine(name, model, tokenizer, ProbeConfig(samples=args.samples, max_new_tokens=1), args, force)
        one.generate(requests[:args.batch_prompts])
        prefill_s = statistics.median(common.timed(lambda: one.generate(requests))[1]
                                      for _ in range(max(1, args.repeats)))
        steps, decode_s = row["stats"]["decode_steps"], seconds - prefill_s
        ok = steps and decode_s > 0  # a tiny run's timing noise can exceed its decode time
        row.update(prefill_s=prefill_s, prefill_tokens=one.last_stats["prefill_tokens"],
                   prefill_tokens_per_s=one.last_stats["prefill_tokens"] / prefill_s, decode_steps=steps,
                   decode_step_s=decode_s / steps if ok else None)
        if force and ceilings and ok:
            row["roofline"] = roofline(model, prompt_lens, args, name != "no-bucketing", ceilings, decode_s, steps)
    return row


def bench_model(source, requests, args, on_gpu, ceilings) -> dict:
    from toolkit.adapters.transformers_internals import attention_implementation
    from toolkit.data.prompts import token_counts

    try:
        model, tokenizer = load(source, args, on_gpu)
    except Exception as err:  # noqa: BLE001 -- GPU initialisation failed: the slow way still measures
        print(f"loading {source} on the GPU directly failed ({err!r}); loading it the usual way", file=sys.stderr)
        model, tokenizer = load(source, args, False)
    force = args.force_full_length == "on" or (args.force_full_length == "auto" and source.startswith("random:"))
    prompt_lens = token_counts(tokenizer, [r.text for r in requests])
    engines = [e for e in args.engines if on_gpu or e != "no-cuda-graphs"]  # no CUDA graphs on CPU anyway
    rows = []
    for e in engines:
        try:
            rows.append(dict(bench_engine(e, model, tokenizer, requests, args, force, ceilings, prompt_lens), status="ok"))
        except Exception as err:  # noqa: BLE001 -- one failing engine must not cost a scarce GPU run
            print(f"engine {e} on {source} failed: {err!r}", file=sys.stderr)
            rows.append(dict(engine=e, status="failed", error=repr(err)[:1000]))
        common.free_memory()  # the engine's static cache and CUDA graphs went with it
    failed = [r for r in rows if r["status"] != "ok"]
    rows = [r for r in rows if r["status"] == "ok"]
    base = next((r for r in rows if r["engine"] == "generate"), None)
    for r in rows:
        r["x_generate"] = r["answers_per_s"] / base["answers_per_s"] if base else None
        if base and r is not base:  # same prompts, same greedy decoding: a sanity check, not a target
            pairs = list(zip(r["greedy"], base["greedy"]))
            r["greedy_agreement_vs_generate"] = sum(a == b for a, b in pairs) / len(pairs)
    full = next((r for r in rows if r["engine"] == "toolkit"), None)
    for r in rows:  # a feature switched off must not change any answer, sampled ones included
        if full and r["engine"] in FEATURE_OFF:
            r["same_answers_as_toolkit"] = r["all_answers"] == full["all_answers"]
    for r in rows:
        r.pop("greedy")
        r.pop("all_answers")
    gains = {FEATURE_OFF[r["engine"]]: full["answers_per_s"] / r["answers_per_s"]
             for r in rows if full and r["engine"] in FEATURE_OFF}
    result = dict(model=source, params=sum(p.numel() for p in model.parameters()),
                  dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  attention=attention_implementation(model), forced_full_length=force,
                  prompt_tokens_mean=statistics.mean(prompt_lens), prompt_tokens_max=max(prompt_lens),
                  engines=rows, failed=failed, feature_gain=gains)
    del model
    if on_gpu:
        import torch

        torch._dynamo.reset()  # drop compiled graphs and CUDA graph pools with the model
    common.free_memory()
    return result


# ---------------------------------------------------------------- Ray scaling


def bench_ray(args, on_gpu, tmp: Path) -> dict | None:
    if not args.actors:
        return None
    import ray

    from toolkit.probe.pool import Placement
    from toolkit.probe.runner import RunConfig, run_probe
    from toolkit.probe.types import ProbeConfig

    data_dir = args.data
    if not data_dir:  # the runner reads a dataset from disk
        from toolkit.data.facts import build_facts

        build_facts(data_dir := tmp / "facts")
    source = args.ray_model or args.models[0]
    if source.startswith("random:") and args.tokenizer:  # actors load by source: give them a full HF dir
        source = common.materialise_random(source, args.tokenizer, tmp / "ray-model", args.dtype or
                                           ("bfloat16" if on_gpu else "float32"))
    probe = ProbeConfig(num_exemplar_sets=args.exemplar_sets, shots=args.shots, samples=args.samples,
                        max_new_tokens=args.max_new_tokens)
    ray.init(address="local", num_cpus=max(max(args.actors), 2), include_dashboard=False, logging_level="WARNING",
             object_store_memory=256 * 2**20)
    rows = []
    try:
        for k in args.actors:
            run = RunConfig(data=str(data_dir), out=str(tmp / f"ray-{k}"), model=source, shard_size=args.shard_size,
                            limit=args.ray_questions, progress=False)
            s = run_probe(run, probe, Placement(num_actors=k, cpus_per_actor=1.0,
                                                gpus_per_actor=1.0 / k if on_gpu else 0.0))
            busy = sum(w["seconds"] for w in s["workers"])
            rows.append(dict(actors=k, answers=s["probed_answers"], probe_wall_s=s["probe_wall_s"],
                             answers_per_s=s["answers_per_s"], actor_start_s=s["actor_start_s"], shards=s["num_shards"],
                             actor_busy_s=busy, driver_overhead_per_shard_s=(s["probe_wall_s"] * k - busy) / s["num_shards"]))
    finally:
        ray.shutdown()
    for r in rows:
        r["speedup_vs_1"] = r["answers_per_s"] / rows[0]["answers_per_s"] * rows[0]["actors"]
    return dict(model=args.ray_model or args.models[0], gpus_per_actor="1/k" if on_gpu else 0, cpus_per_actor=1,
                questions=args.ray_questions, shard_size=args.shard_size, runs=rows,
                note="real stopping inside actors (no force-full-length hook in ProbeWorker); overhead per shard = "
                     "(wall x actors - actor busy time) / shards, tail idle included")


def main(argv=None, prog=None) -> int:
    started, args = time.perf_counter(), parse_args(argv, prog)
    if args.export_inputs:
        print(f"wrote {common.export_inputs(args.export_inputs)} (carry it to the GPU machine; --inputs DIR)")
        return 0
    if args.replot:
        report(json.loads(args.replot.read_text()), args.replot)
        return 0
    import torch

    from toolkit.data.prompts import ExemplarPool
    from toolkit.probe.slick import build_requests
    from toolkit.probe.types import ProbeConfig

    args.data, args.tokenizer = common.resolve_inputs(args.inputs, args.data, args.tokenizer)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    ceilings = common.measure_ceilings()
    train, dev = common.load_items(args.data)
    probe = ProbeConfig(num_exemplar_sets=args.exemplar_sets, shots=args.shots, samples=args.samples,
                        max_new_tokens=args.max_new_tokens)
    requests = [r for it in common.spread(train, args.questions) for r in build_requests(it, ExemplarPool(dev), probe)]
    payload = dict(benchmark="sampling", env=common.environment(), config=common.config_of(args), ceilings=ceilings,
                   models=[], ray=None, probe_modes=None, vllm_note=VLLM_NOTE)
    path = common.result_path("sampling", args.out, args.tag)

    def save() -> None:  # after every section: a run cut short by its time limit keeps what it measured
        payload.update(extrapolation=extrapolate(payload["models"]), targets=check_targets(payload["models"], on_gpu))
        common.write_result(path, payload)

    def over_budget(what: str) -> bool:  # a remote run is killed at its limit: skip rather than lose the JSON
        late = bool(args.budget_s) and time.perf_counter() - started > args.budget_s
        if late:
            print(f"skipping {what}: past --budget-s {args.budget_s:g}", file=sys.stderr)
        return late

    for source in args.models:
        if over_budget(source):
            payload["models"].append(dict(model=source, error="skipped: time budget", engines=[], failed=[]))
            continue
        try:
            payload["models"].append(bench_model(source, requests, args, on_gpu, ceilings))
        except Exception as err:  # noqa: BLE001 -- e.g. out of memory: the other shapes still count
            print(f"model {source} failed: {err!r}", file=sys.stderr)
            payload["models"].append(dict(model=source, error=repr(err)[:1000], engines=[], failed=[]))
            common.free_memory()
        save()
    if not over_budget("the lazy/full section"):
        try:  # the real model only: a random-init one knows nothing, so lazy sampling has nothing to skip
            payload["probe_modes"] = bench_probe_modes(args.models[0], common.spread(train, args.probe_items or 0,
                                                       salt="probe-modes"), ExemplarPool(dev), args)
        except Exception as err:  # noqa: BLE001 -- keep the engine figures
            print(f"lazy/full section failed: {err!r}", file=sys.stderr)
            payload["probe_modes"] = dict(error=repr(err)[:1000], runs=[])
        save()
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        try:
            payload["ray"] = None if over_budget("the Ray section") else bench_ray(args, on_gpu, Path(tmp))
        except Exception as err:  # noqa: BLE001 -- keep the engine figures of a scarce run
            print(f"Ray section failed: {err!r}", file=sys.stderr)
            payload["ray"] = dict(error=repr(err)[:1000], runs=[], model=args.ray_model or args.models[0])
    save()
    report(payload, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
