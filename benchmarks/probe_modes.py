"""The probe's own choices, measured as a probe runs them (toolkit.probe.slick.probe_items on real
items, real stopping): lazy vs full sampling, bf16 vs fp32, for the own engine (full, lazy in one pass,
lazy in two phases) and for vLLM (full, lazy: always two phases), all on the same items in one run.

Per row: wall time, answers generated, questions/s and answers/s; against full sampling of the same engine and dtype,
the answers saved and whether the categories are identical; against the own engine's fp32 full
sampling, the speed-up and how many greedy answers and categories agree (bf16 and another engine
change some) and the largest difference in a category's count. vLLM's start-up is reported apart."""
from __future__ import annotations

import time
from collections import Counter

import common

from toolkit.probe.slick import CATEGORIES

OWN_MODES = ("full", "one_pass", "two_phase")  # the own engine: full sampling, lazy in one pass or two phases
VLLM_MODES = ("full", "two_phase")  # vLLM's lazy probing is two-phase


def bench_probe_modes(source: str, items: list, pool, args) -> dict | None:
    if not args.probe_items or not args.probe_dtypes:
        return None
    from toolkit.models import ModelSpec, load_model
    from toolkit.probe.engine import FastEngine

    items = items[:args.probe_items]
    rows, loaded = [], {}
    for dtype in args.probe_dtypes:
        model, tokenizer = load_model(ModelSpec(source=source, tokenizer=args.tokenizer, dtype=dtype))
        engine = FastEngine(model, tokenizer, probe_config(args, "full"), max_batch_prompts=args.batch_prompts)
        rows += engine_rows(engine, "toolkit", dtype, OWN_MODES, items, pool, args)
        if "vllm" in args.engines:
            loaded[dtype] = (model, tokenizer)
        else:
            del model
    # vLLM after every own-engine row: its CPU backend sets the process's threading when it starts
    for dtype, (model, tokenizer) in loaded.items():
        engine = common.start_vllm(model, tokenizer, probe_config(args, "full"))
        rows += engine_rows(engine, "vllm", dtype, VLLM_MODES, items, pool, args)  # lazy: always two phases
        engine.close()  # its memory and processes, before the next engine
        common.free_memory()
    return dict(model=source, samples=args.samples, exemplar_sets=args.exemplar_sets, runs=compare(rows))


def engine_rows(engine, name: str, dtype: str, modes, items: list, pool, args, plant_every: int = 0) -> list[dict]:
    """One engine's rows, one per mode, on the same items: the engine's config is set per row (one
    engine: on a GPU one compiled decode step for every mode). plant_every: see plant_gold."""
    base, planted = engine.config, 0
    if plant_every:
        items, planted = plant_gold(engine, items, pool, mode_config(base, "full"), plant_every)
    rows = []
    for mode in modes:
        engine.config = mode_config(base, mode)
        rows.append({**probe_row(engine, name, dtype, mode, items, pool, engine.config), "planted": planted})
    engine.config = base
    return rows


def plant_gold(engine, items: list, pool, cfg, every: int) -> tuple[list, int]:
    """(items, how many were changed) for a model that knows no fact (random weights), on which no question
    would ever settle and lazy probing could show only its overhead: every `every`-th item takes as its
    gold answer the engine's own greedy answer to the item's first prompt under full sampling, as a model
    that knew the fact would answer; the others keep theirs. An empty greedy answer is left alone."""
    from dataclasses import replace

    from toolkit.data.matching import normalize_answer
    from toolkit.probe.slick import probe_items

    engine.config = cfg
    result = probe_items(engine, items, pool, cfg)
    planted = [replace(item, answer=row["greedy_answers"][0], aliases=())
               if i % every == 0 and normalize_answer(row["greedy_answers"][0]) else item
               for i, (item, row) in enumerate(zip(items, result))]
    return planted, sum(a is not b for a, b in zip(planted, items))


def probe_config(args, mode: str):
    """The probe settings of a row: `mode` full, or lazy in one pass / two phases (vLLM's lazy: two phases)."""
    from toolkit.probe.types import ProbeConfig

    return mode_config(ProbeConfig(num_exemplar_sets=args.exemplar_sets, shots=args.shots, samples=args.samples,
                                   max_new_tokens=args.max_new_tokens), mode)


def mode_config(cfg, mode: str):
    """`cfg` in `mode`: full sampling, or lazy in one pass or two phases."""
    import dataclasses

    return dataclasses.replace(cfg, full_sampling=mode == "full", lazy="one_pass" if mode == "one_pass" else "two_phase")


def probe_row(engine, name: str, dtype: str, mode: str, items: list, pool, cfg) -> dict:
    from toolkit.probe.slick import probe_items

    if hasattr(engine, "reset_prefix_cache"):  # vLLM: no prompt cached by the previous row
        engine.reset_prefix_cache()
    probe_items(engine, items[:2], pool, cfg)  # warm-up: the static cache, the first kernels
    start = time.perf_counter()
    result = probe_items(engine, items, pool, cfg)
    seconds = time.perf_counter() - start
    answers = sum(r["num_prompts"] + r["num_samples"] for r in result)
    stats = engine.last_stats
    # rows dropped as settled: answers lazy probing stopped part-way (the work it saved)
    return dict(engine=name, dtype=dtype, sampling=mode, items=len(items), answers=answers, seconds=seconds,
                start_s=getattr(engine, "start_s", None), settled_rows=stats.get("settled_rows", 0),
                decode_rows=stats.get("decode_rows", 0), prefills=stats.get("prefills"),
                prefilled_prompts=stats.get("prefilled_prompts"), phase2_rows=stats.get("phase2_rows"),
                questions_per_s=len(items) / seconds,
                answers_per_s=answers / seconds, counts=dict(Counter(r["category"] for r in result)),
                categories=[r["category"] for r in result],
                greedy=[g for r in result for g in r["greedy_answers"]])


def compare(rows: list[dict]) -> list[dict]:
    """Each row against full sampling of its engine and dtype, and against the own engine's fp32 (or
    first dtype) full sampling."""
    full = {(r["engine"], r["dtype"]): r for r in rows if r["sampling"] == "full"}
    own = [r for r in rows if r["engine"] == "toolkit" and r["sampling"] == "full"]
    reference = next((r for r in own if r["dtype"] == "float32"), own[0] if own else rows[0])
    for r in rows:
        same = full[r["engine"], r["dtype"]]
        r.update(answers_saved=1 - r["answers"] / same["answers"],
                 categories_equal_to_full=r["categories"] == same["categories"],
                 x_fp32_full=reference["seconds"] / r["seconds"],
                 greedy_agreement_vs_fp32=_agreement(r["greedy"], reference["greedy"]),
                 category_agreement_vs_fp32=_agreement(r["categories"], reference["categories"]),
                 max_count_difference_vs_fp32=max(abs(r["counts"].get(c, 0) - reference["counts"].get(c, 0))
                                                  for c in CATEGORIES))
    for r in rows:
        r.pop("greedy")
        r.pop("categories")
    return rows


def _agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(b))
