"""The probe's own choices, measured as a probe runs them (toolkit.probe.slick.probe_items on real
items, real stopping): lazy vs full sampling, and bf16 vs fp32, all on the same items in one run.

Per row: wall time, answers generated, questions/s; against full sampling in the same dtype, the
answers saved and whether the categories are identical; against fp32 full sampling, the speed-up and
how many greedy answers and categories agree (bf16 changes some)."""
from __future__ import annotations

import time
from collections import Counter


def bench_probe_modes(source: str, items: list, pool, args) -> dict | None:
    if not args.probe_items or not args.probe_dtypes:
        return None
    from toolkit.models import ModelSpec, load_model
    from toolkit.probe.engine import FastEngine
    from toolkit.probe.slick import probe_items
    from toolkit.probe.types import ProbeConfig

    items = items[:args.probe_items]
    rows = []
    for dtype in args.probe_dtypes:
        model, tokenizer = load_model(ModelSpec(source=source, tokenizer=args.tokenizer, dtype=dtype))
        for mode in ("full", "lazy"):
            cfg = ProbeConfig(num_exemplar_sets=args.exemplar_sets, shots=args.shots, samples=args.samples,
                              max_new_tokens=args.max_new_tokens, full_sampling=mode == "full")
            engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=args.batch_prompts)
            probe_items(engine, items[:2], pool, cfg)  # warm-up: the static cache, the first kernels
            start = time.perf_counter()
            result = probe_items(engine, items, pool, cfg)
            seconds = time.perf_counter() - start
            answers = sum(r["num_prompts"] + r["num_samples"] for r in result)
            # rows dropped as settled: answers lazy probing stopped part-way (the work it saved)
            rows.append(dict(dtype=dtype, sampling=mode, items=len(items), answers=answers, seconds=seconds,
                             settled_rows=engine.last_stats.get("settled_rows", 0),
                             decode_rows=engine.last_stats.get("decode_rows", 0),
                             questions_per_s=len(items) / seconds, answers_per_s=answers / seconds,
                             counts=dict(Counter(r["category"] for r in result)),
                             categories=[r["category"] for r in result],
                             greedy=[g for r in result for g in r["greedy_answers"]]))
        del model
    return dict(model=source, samples=args.samples, exemplar_sets=args.exemplar_sets, runs=compare(rows))


def compare(rows: list[dict]) -> list[dict]:
    """Each row against full sampling in its dtype and against fp32 (or the first dtype) full sampling."""
    full = {r["dtype"]: r for r in rows if r["sampling"] == "full"}
    reference = full.get("float32") or next(iter(full.values()))
    for r in rows:
        same = full[r["dtype"]]
        r.update(answers_saved=1 - r["answers"] / same["answers"],
                 categories_equal_to_full=r["categories"] == same["categories"],
                 x_fp32_full=reference["seconds"] / r["seconds"],
                 greedy_agreement_vs_fp32=_agreement(r["greedy"], reference["greedy"]),
                 category_agreement_vs_fp32=_agreement(r["categories"], reference["categories"]))
    for r in rows:
        r.pop("greedy")
        r.pop("categories")
    return rows


def _agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(b))
