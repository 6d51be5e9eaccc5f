"""The sampling benchmark's derived figures and presentation: the extrapolation to SliCK's scale, the
target checks, the Markdown tables and the plot (also used by `--replot` on a result file)."""
from __future__ import annotations

from pathlib import Path

import common

SLICK_QUESTIONS, SLICK_ANSWERS = 81_700, 170  # SliCK's probe: 81,700 questions x (10 x (1 + 16)) answers
ENGINES = ("toolkit", "generate", "no-fanout", "no-cuda-graphs", "no-bucketing")
OPTIONAL_ENGINES = ("vllm",)  # where installed (toolkit/probe/vllm_engine.py)


def extrapolate(models) -> list[dict]:
    total = SLICK_QUESTIONS * SLICK_ANSWERS
    rows = []
    for m in models:
        rate = next((r["answers_per_s"] for r in m["engines"] if r["engine"] == "toolkit"), None)
        if rate:
            hours = total / rate / 3600
            rows.append(dict(model=m["model"], answers_per_s_per_device=rate, hours_1=hours, hours_8=hours / 8,
                             tokens_per_answer=next(r["tokens_per_answer"] for r in m["engines"] if r["engine"] == "toolkit")))
    return rows


def check_targets(models, on_gpu) -> list[dict]:
    out = []
    for m in models:
        name, rows = m["model"], {r["engine"]: r for r in m["engines"]}
        real_smollm2 = name in ("smollm2", None) and not on_gpu
        if (real_smollm2 or (on_gpu and name.endswith("llama-3.2-1b"))) and "generate" in rows and "toolkit" in rows:
            need, got = (10.0 if on_gpu else 3.0), rows["toolkit"]["x_generate"]
            out.append(dict(target=f"toolkit >= {need:g}x generate answers/s", model=name, required=need, measured=got,
                            met=got >= need, shortfall=None if got >= need else need / got))
        roof = (rows.get("toolkit") or {}).get("roofline")
        if on_gpu and roof and name.endswith(("llama-3.2-1b", "llama-3-8b")):
            got = roof["x_roofline"]
            out.append(dict(target="decode step <= 2x roofline", model=name, required=2.0, measured=got,
                            met=got <= 2.0, shortfall=None if got <= 2.0 else got / 2.0))
    return out


def report(payload: dict, path: Path) -> None:
    cols = [("engine", "engine"), ("prompts", "prompts"), ("answers_per_s", "answers/s"), ("generated_tokens_per_s",
            "gen tok/s"), ("prefill_tokens_per_s", "prefill tok/s"), ("peak_gib", "peak GiB"), ("x_generate", "x generate"),
            ("decode_ms", "decode step ms"), ("x_roof", "x roofline"), ("start_s", "start s (apart)")]
    parts = [common.env_line(payload["env"], path, "torch", "transformers")]
    if payload["ceilings"]:
        c = payload["ceilings"]
        parts[0] += f"; measured HBM {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
    for m in payload["models"]:
        if m.get("error"):
            parts.append(f"**{m['model']}** not measured: {m['error']}")
            continue
        rows = [dict(r, peak_gib=r["peak_memory"].get("alone_bytes", r["peak_memory"]["bytes"]) / 2**30, decode_ms=(r.get("decode_step_s") or 0) * 1e3 or None,
                     x_roof=(r.get("roofline") or {}).get("x_roofline")) for r in m["engines"]]
        parts.append(f"**{m['model']}** ({m['params'] / 1e6:.0f}M params, {m['dtype']}, {m['attention']}, prompts of "
                     f"{m['prompt_tokens_mean']:.0f} tokens on average, forced full length: {m['forced_full_length']})\n\n"
                     + common.table(rows, cols) + "".join(f"\n\n{f['engine']} failed: {f['error']}" for f in m.get("failed", [])))
    ray = payload.get("ray") or {}
    if ray.get("error"):
        parts.append(f"Ray section failed: {ray['error']}")
    elif ray:
        parts.append(f"Ray actors ({ray['model']}):\n\n" + common.table(ray["runs"], [
            ("actors", "actors"), ("answers_per_s", "answers/s"), ("speedup_vs_1", "speed-up"),
            ("driver_overhead_per_shard_s", "driver overhead/shard s"), ("actor_start_s", "actor start s")]))
    modes = payload.get("probe_modes") or {}
    if modes.get("error"):
        parts.append(f"Lazy/full section failed: {modes['error']}")
    elif modes:
        parts.append(f"The probe's own loop on the same items ({modes['model']}, N_ex={modes['exemplar_sets']}, "
                     f"n={modes['samples']}): engines, full sampling vs lazy (one pass, two phases), bf16 vs fp32; compared "
                     "with the "
                     "toolkit engine's fp32 full sampling:\n\n"
                     + common.table(modes["runs"], [
                         ("engine", "engine"), ("dtype", "dtype"), ("sampling", "sampling"), ("items", "items"),
                         ("answers", "answers"), ("answers_saved", "saved vs full"), ("settled_rows", "rows settled"),
                         ("phase2_rows", "phase-2 rows"), ("questions_per_s", "questions/s"),
                         ("answers_per_s", "answers/s"), ("x_fp32_full", "x fp32 full"),
                         ("categories_equal_to_full", "categories = full"),
                         ("greedy_agreement_vs_fp32", "greedy = fp32"),
                         ("category_agreement_vs_fp32", "categories = fp32"),
                         ("max_count_difference_vs_fp32", "max count diff"), ("start_s", "start s (apart)")]))
    if payload.get("vllm_note"):
        parts.append(payload["vllm_note"])
    unit = "GPU" if payload["ceilings"] else "machine like this one (CPU)"
    parts.append(f"Probing SliCK's scale ({SLICK_QUESTIONS:,} questions x {SLICK_ANSWERS} answers) per {unit} at the toolkit "
                 "engine's rate (8 devices: 8 independent actors, linear):\n\n" + common.table(payload["extrapolation"], [
                     ("model", "model"), ("answers_per_s_per_device", "answers/s"), ("tokens_per_answer", "tokens/answer"),
                     ("hours_1", "hours on 1"), ("hours_8", "hours on 8")]))
    if payload["targets"]:
        parts.append("Targets:\n\n" + common.table(payload["targets"], [("target", "target"), ("model", "model"),
                     ("measured", "measured"), ("met", "met"), ("shortfall", "missed by (x)")]))
    common.publish("\n\n".join(parts), path, lambda plt: plot(plt, payload))


def plot(plt, payload: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = [m for m in payload["models"] if m["engines"]]
    engines = [e for e in ENGINES + OPTIONAL_ENGINES if any(r["engine"] == e for m in models for r in m["engines"])]
    width = 0.8 / max(1, len(engines))
    for i, e in enumerate(engines):
        vals = [next((r["answers_per_s"] for r in m["engines"] if r["engine"] == e), 0) for m in models]
        left.bar([j + i * width for j in range(len(vals))], vals, width, label=e)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [m["model"].removeprefix("random:") for m in models])
    left.set(yscale="log", ylabel="answers/s", title=f"SliCK sampling, {payload['env']['device']}")
    if engines:
        left.legend(fontsize=8)
    runs = (payload.get("ray") or {}).get("runs") or []
    right.plot([r["actors"] for r in runs], [r["answers_per_s"] for r in runs], "o-")
    right.set(xlabel="Ray actors", ylabel="answers/s", title="Scaling across actors" if runs else "no Ray run")
    return fig
