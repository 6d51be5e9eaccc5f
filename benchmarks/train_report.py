"""The training benchmark's derived figures and presentation: model-state memory per GPU for 1B/8B/70B,
MFU and the ratio to ZeRO-0, the target checks, the Markdown tables and the plot (also `--replot`)."""
from __future__ import annotations

from pathlib import Path

import common

def count_params(shape: str) -> int:
    from toolkit.train.plan import count_parameters

    return count_parameters(shape)


def memory_table(world: int = 8) -> list[dict]:
    """Model-state bytes per GPU (the trainer's own estimate, toolkit.train.memory.memory_estimate),
    ZeRO-3 also with parameters and optimizer states offloaded to host memory."""
    from toolkit.train.memory import memory_estimate
    from toolkit.train.plan import model_size

    rows = []
    for name, shape in (("1B (llama-3.2-1b)", "random:llama-3.2-1b"), ("8B (llama-3-8b)", "random:llama-3-8b"),
                        ("70B (llama-3-70b)", "random:llama-3-70b")):
        size = model_size(shape)
        n = size.params
        for opt in ("deepspeed_adam", "adamw_8bit"):
            row = dict(model=name, params=n, optimizer=opt, world=world)
            for stage in (0, 1, 2, 3):
                # as the shipped ds_configs set it (zero1.json: bf16.immediate_grad_update)
                row[f"zero{stage}_gib"] = memory_estimate(n, stage, world, True, opt, False,
                                                          immediate_grad_update=stage == 1,
                                                          largest_layer=size.largest_layer)["total"] / 2**30
            offloaded = memory_estimate(n, 3, world, True, opt, True, offload_params=True,
                                        largest_layer=size.largest_layer)
            row["zero3_offload_gib"], row["zero3_offload_host_gib"] = offloaded["total"] / 2**30, offloaded["host"] / 2**30
            rows.append(row)
    return rows


def figures(results: list[dict], n_params: int, peak_flops: float | None, on_gpu: bool, args,
            largest_layer: int = 0) -> None:
    """Per variant: the trainer's model-state estimate (ZeRO-3 needs `largest_layer`), peak memory,
    MFU and speed against ZeRO-0."""
    from toolkit.train.memory import memory_estimate

    bf16 = on_gpu if args.bf16 == "auto" else args.bf16 == "true"
    zero0 = {(r["gradient_checkpointing"], r["optimizer"]): r for r in results if r["status"] == "ok" and r["zero_stage"] == 0}
    for r in results:
        if r["status"] != "ok":
            continue
        r["model_states_per_rank_bytes"] = memory_estimate(
            n_params, r["zero_stage"], args.ranks, bf16, r["optimizer"], r.get("offload", False),
            offload_params=r.get("offload", False) and r["zero_stage"] == 3, largest_layer=largest_layer)["total"]
        r["peak_memory_max_gib"] = max(m or 0 for m in r["peak_memory_per_rank"]) / 2**30
        r["mfu"] = 6 * n_params * r["tokens_per_s"] / (peak_flops * args.ranks) if peak_flops else None
        base = zero0.get((r["gradient_checkpointing"], r["optimizer"]))
        r["x_zero0"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None


def check_targets(results: list[dict], model: str, on_gpu: bool, args) -> list[dict]:
    out = []
    for r in results:
        if r["status"] == "ok" and r["zero_stage"] == 2 and r.get("x_zero0") is not None:
            got = r["x_zero0"]
            out.append(dict(target="ZeRO-2 tokens/s >= 0.9x ZeRO-0", variant=r["variant"], required=0.9, measured=got,
                            met=got >= 0.9, shortfall=None if got >= 0.9 else 0.9 / got))
        if on_gpu and r["status"] == "ok" and "llama-3.2-1b" in model and r.get("mfu") is not None:
            got = r["mfu"]
            out.append(dict(target=f"MFU >= 40% (1B, bf16, {args.ranks} GPU(s))", variant=r["variant"], required=0.4,
                            measured=got,
                            met=got >= 0.4, shortfall=None if got >= 0.4 else 0.4 / got))
    return out


def report(payload: dict, path: Path) -> None:
    cfg = payload["config"]
    ok = [dict(r, states_gib=r["model_states_per_rank_bytes"] / 2**30) for r in payload["variants"] if r["status"] == "ok"]
    parts = [common.env_line(payload["env"], path, "torch", "deepspeed"),
             f"**{payload['model']}** ({payload['params'] / 1e6:.0f}M params), {cfg['ranks']} rank(s), micro-batch "
             f"{cfg['micro_batch']} x accumulation {cfg['accum']}, {cfg['steps']} timed steps after {cfg['warmup_steps']} "
             f"warm-up; peak memory = {ok[0]['peak_memory_kind'] if ok else '-'}, max over ranks\n\n" + common.table(ok, [
                 ("variant", "variant"), ("tokens_per_s", "tokens/s"), ("step_s", "step s"), ("tokens_per_step", "tokens/step"),
                 ("peak_memory_max_gib", "peak GiB/rank"), ("states_gib", "model states GiB/rank"), ("mfu", "MFU"),
                 ("x_zero0", "x ZeRO-0")])]
    parts += [f"{r['variant']}: {r['status']} ({r.get('reason') or r.get('rc')})" for r in payload["variants"]
              if r["status"] != "ok"]
    timed = [dict(variant=r["variant"], **r["breakdown_ms"]) for r in ok if r.get("breakdown_ms")]
    if timed:
        parts.append("Where a step's time goes (DeepSpeed's timers, rank 0, median ms per optimizer step; the "
                     "optimizer step includes ZeRO's parameter all-gather):\n\n" + common.table(timed, [
                         ("variant", "variant"), ("forward", "forward"), ("backward", "backward compute"),
                         ("gradient_comm", "gradient all-reduce / reduce-scatter"),
                         ("optimizer_step", "optimizer step")]))
    parts.append("Model-state memory per GPU on 8 GPUs (bf16 weights and gradients, fp32 master + optimizer states; "
                 "activations not included), GiB:\n\n" + common.table(payload["memory_table"], [
                     ("model", "model"), ("optimizer", "optimizer"), ("zero0_gib", "ZeRO-0"), ("zero1_gib", "ZeRO-1"),
                     ("zero2_gib", "ZeRO-2"), ("zero3_gib", "ZeRO-3"), ("zero3_offload_gib", "ZeRO-3 offload"),
                     ("zero3_offload_host_gib", "its host GiB/rank")]))
    if payload["targets"]:
        parts.append("Targets:\n\n" + common.table(payload["targets"], [("target", "target"), ("variant", "variant"),
                     ("measured", "measured"), ("met", "met"), ("shortfall", "missed by (x)")]))
    common.publish("\n\n".join(parts), path, lambda plt: plot(plt, payload, ok))


def plot(plt, payload: dict, ok: list[dict]):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names, x = [r["variant"] for r in ok], range(len(ok))
    left.bar(names, [r["tokens_per_s"] for r in ok])
    left.set_ylabel("tokens/s")
    left.set_title(f"Training throughput, {payload['model']}, {payload['env']['device']}", fontsize=9)
    right.bar([i - 0.2 for i in x], [r["peak_memory_max_gib"] for r in ok], 0.4, label="measured peak / rank")
    right.bar([i + 0.2 for i in x], [r["states_gib"] for r in ok], 0.4, label="model states / rank (estimate)")
    right.set_xticks(list(x), names)
    right.set_ylabel("GiB")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return fig
