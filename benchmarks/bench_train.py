"""Training throughput of the real trainer (`python -m toolkit.train` under the deepspeed launcher) on
closed-book SFT of the built-in facts: tokens/s, step time, peak memory per rank and, on GPU, MFU for
ZeRO-0 (plain data parallel), ZeRO-1, ZeRO-2 and ZeRO-3 (and ZeRO-3 with its parameters and optimizer
states offloaded to host memory), with and without gradient checkpointing, DeepSpeed's Adam / torch AdamW
vs bitsandbytes 8-bit AdamW; plus model-state memory per GPU for 1B/8B/70B on 8 GPUs.
`python benchmarks/bench_train.py --preset cpu|gpu` (or `gradual bench train`).

Each variant is one launch of this file as the per-rank entry (`--rank-entry DIR`): it runs the trainer
unchanged and then records the rank's peak memory. Checkpoint and export I/O is skipped (`--no-save`):
the trainer has no step limit, so every run would end with a full DeepSpeed checkpoint otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from toolkit.helpscreen import ScreenParser  # noqa: E402
from train_report import check_targets, count_params, figures, memory_table, report  # noqa: E402

PRESETS = {
    "cpu": dict(model="smollm2", ranks=2, micro_batch=4, accum=1, steps=6, warmup_steps=2,
                variants=["zero0", "zero1", "zero2", "zero3", "zero3-offload", "zero2-ckpt", "zero2-adamw_8bit"],
                optimizer="adamw", budget_s=0,
                timeout=900),
    # ranks: every GPU of the machine (ZeRO's communication only exists between ranks)
    "gpu": dict(model="random:llama-3.2-1b", ranks=None, micro_batch=256, accum=1, steps=10, warmup_steps=3,
                variants=["zero0", "zero1", "zero2", "zero3", "zero0-ckpt", "zero2-ckpt", "zero2-deepspeed_adam",
                          "zero3-offload", "zero2-adamw_8bit"],
                optimizer="adamw", inputs=str(common.DEFAULT_INPUTS), budget_s=480, timeout=300),
    "smoke": dict(model="random:tiny", ranks=1, micro_batch=2, accum=1, steps=1, warmup_steps=0,
                  variants=["zero0", "zero1", "zero3"], optimizer="adamw", budget_s=0, timeout=300),
}


def parse_args(argv, prog=None):
    p = ScreenParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     docs="benchmarks/README.md")  # --help fits one screen; --help-all: every option's help
    common.add_common_args(p, PRESETS)
    p.add_argument("--model", help="smollm2, a HF directory, or random:<shape>")
    p.add_argument("--ranks", type=int, help="processes (GPUs, or CPU ranks); the gpu preset: every GPU present")
    p.add_argument("--micro-batch", type=int, help="micro_batch_size per rank")
    p.add_argument("--accum", type=int, help="gradient_accumulation_steps")
    p.add_argument("--steps", type=int, help="timed optimizer steps per variant")
    p.add_argument("--warmup-steps", type=int, help="untimed optimizer steps first")
    p.add_argument("--variants", nargs="+", help="zero{0,1,2,3}[-offload][-ckpt][-<optimizer>], e.g. "
                   "zero2-ckpt-adamw_8bit; -offload: ds_configs/zero2_offload or zero3_offload (DeepSpeed's CPU Adam)")
    p.add_argument("--optimizer", help="optimizer of variants that name none (adamw, deepspeed_adam, adamw_8bit)")
    p.add_argument("--bf16", choices=("auto", "true", "false"), default="auto")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--timeout", type=int, help="seconds per variant before it is killed")
    p.add_argument("--budget-s", type=float, help="launch no new variant after this many seconds (0: no limit)")
    p.add_argument("--keep", type=Path, help="keep the runs' files (configs, logs, losses) in this directory")
    return common.apply_preset(p.parse_args(argv), PRESETS)


# ---------------------------------------------------------------- the per-rank entry


def rank_entry(argv: list[str]) -> int:
    """Run the trainer in this process, then write this rank's peak memory to DIR/rank<R>.json."""
    i = argv.index("--rank-entry")
    out, rest = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    if "--no-save" in rest:
        rest.remove("--no-save")
        from toolkit.train import loop, strategy

        # Checkpoint and export I/O is not what is measured (and is minutes for a 1B model with Adam states).
        strategy.DeepSpeedStrategy.save_checkpoint = lambda self, *a, **k: None
        strategy.DeepSpeedStrategy.rotate_checkpoints = lambda self, *a, **k: []
        strategy.DeepSpeedStrategy.save_hf_model = lambda self, *a, **k: None
        loop._export_reference = lambda *a, **k: None
    if importlib.util.find_spec("tensorboard") is None:
        stub_tensorboard()
    from toolkit.train.__main__ import main as train_main

    rc = train_main(rest)
    import torch

    mem = {"rank": int(os.environ.get("RANK", 0)), "rc": rc,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        mem.update(cuda_max_allocated=torch.cuda.max_memory_allocated(), cuda_max_reserved=torch.cuda.max_memory_reserved())
    (out / f"rank{mem['rank']}.json").write_text(json.dumps(mem))
    return rc


def stub_tensorboard() -> None:
    """A no-op SummaryWriter where tensorboard is missing (the GPU machine's wheel bundle lacks it): the
    trainer's rank 0 only logs scalars to it; losses.jsonl, which this benchmark reads, is unaffected."""
    import types

    class SummaryWriter:
        def __init__(self, *args, **kwargs):
            pass

        add_scalar = flush = close = __init__

    sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=SummaryWriter)


# ---------------------------------------------------------------- variants


def resolve_ranks(ranks: int | None, on_gpu: bool, gpus: int) -> int:
    """The ranks a variant runs with: as given, else every GPU present (1 rank on a CPU)."""
    if ranks:
        return ranks
    return gpus if on_gpu and gpus else 1


def parse_variant(name: str, default_optimizer: str) -> dict:
    parts = name.split("-")
    offload = "offload" in parts[1:]
    stage = parts[0][4:] if parts[0].startswith("zero") else ""
    if stage not in ("0", "1", "2", "3") or (offload and stage in ("0", "1")):
        raise SystemExit(f"error: variant '{name}': expected zero0|zero1|zero2|zero3[-offload][-ckpt][-<optimizer>] "
                         "(-offload with zero2 or zero3)")
    ckpt = "ckpt" in parts[1:]
    rest = [p for p in parts[1:] if p not in ("ckpt", "offload")]
    return dict(variant=name, zero_stage=int(stage), gradient_checkpointing=ckpt, offload=offload,
                optimizer="deepspeed_adam" if offload else (rest[0] if rest else default_optimizer))


def write_data(args, path: Path, global_batch: int) -> int:
    """A capped SFT set: exactly (warm-up + timed) steps of one epoch (items repeat if too few)."""
    from toolkit.io import write_jsonl

    train, _ = common.load_items(args.data, with_dev=False)
    need = (args.warmup_steps + args.steps) * global_batch
    rows = []
    for i in range(need):
        row = train[i % len(train)].to_dict()
        row.update(id=f"{row['id']}~{i // len(train)}", split="train")
        rows.append(row)
    write_jsonl(path / "train.jsonl", rows)
    return need


BREAKDOWN_RE = re.compile(r"\[Rank 0\] time \(ms\) \| fwd: ([\d.]+) \| bwd: [\d.]+ \| bwd_inner: ([\d.]+) "
                          r"\| bwd_allreduce: ([\d.]+) \| step: ([\d.]+)")
BREAKDOWN_PARTS = ("forward", "backward", "gradient_comm", "optimizer_step")


def timed_ds_config(zero_stage: int, run_dir: Path, offload: bool = False) -> Path:
    """The shipped ds_config with DeepSpeed's per-step timers on (printed every step by rank 0)."""
    from toolkit.train.config import DS_CONFIG_DIR, shipped_ds_config

    ds = json.loads((DS_CONFIG_DIR / f"{shipped_ds_config(zero_stage, offload)}.json").read_text())
    ds.update(wall_clock_breakdown=True, steps_per_print=1)
    path = run_dir / "ds_config.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def step_breakdown(log: str, warmup_steps: int) -> dict | None:
    """Median ms per optimizer step from DeepSpeed's timers: forward, backward compute, gradient
    communication (all-reduce, or ZeRO's reduce-scatter), optimizer step (with ZeRO's parameter all-gather)."""
    rows = [tuple(map(float, m.groups())) for m in BREAKDOWN_RE.finditer(log)][warmup_steps:]
    if not rows:
        return None
    return {name: statistics.median(r[i] for r in rows) for i, name in enumerate(BREAKDOWN_PARTS)}


def run_variant(v: dict, args, model: str, data: Path, work: Path, on_gpu: bool) -> dict:
    import yaml

    from toolkit.train.strategy import free_port

    run_dir, rank_dir = work / v["variant"], work / v["variant"] / "ranks"
    rank_dir.mkdir(parents=True, exist_ok=True)
    if v["optimizer"] == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return dict(v, status="skipped", reason="bitsandbytes is not installed")
    cfg = dict(model=model, data=str(data), output_dir=str(run_dir / "out"), dev_split=None, eval_train=False,
               ds_config=str(timed_ds_config(v["zero_stage"], run_dir, v["offload"])), zero_stage=v["zero_stage"],
               optimizer=v["optimizer"], gradient_checkpointing=v["gradient_checkpointing"],
               micro_batch_size=args.micro_batch, gradient_accumulation_steps=args.accum, epochs=1, lr=1e-5,
               bf16=args.bf16 if args.bf16 == "auto" else args.bf16 == "true", max_len=args.max_len, progress=False,
               patience=0, seed=0)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # The launcher as a module: on the GPU machine deepspeed is pip-installed with --target (no script on PATH).
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus" if on_gpu else "--num_accelerators",
           str(args.ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--rank-entry", str(rank_dir), "--no-save", "--config", str(run_dir / "train.yaml")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    bins = [str(Path(d) / "bin") for d in sys.path if d and (Path(d) / "bin" / "ninja").exists()]
    env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])  # ninja of a `pip install --target` (DeepSpeed JIT ops)
    if not on_gpu:  # ranks share the cores instead of each spawning one thread per core
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    log = run_dir / "launch.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher's own session: its ranks go too
            rc = proc.wait()
    wall = time.perf_counter() - start
    losses_path = run_dir / "out" / "losses.jsonl"
    steps = [json.loads(line) for line in losses_path.read_text().splitlines()] if losses_path.exists() else []
    if rc != 0 or len(steps) < args.warmup_steps + args.steps:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        return dict(v, status="failed", rc=rc, launch_wall_s=wall, log_tail=tail)
    timed = steps[args.warmup_steps:]
    breakdown = step_breakdown(log.read_text(errors="replace"), args.warmup_steps)
    step_s = [r["tokens"] / r["tokens_per_s"] for r in timed]
    ranks = [json.loads(p.read_text()) for p in sorted(rank_dir.glob("rank*.json"))]
    key = "cuda_max_allocated" if on_gpu else "peak_rss_bytes"
    return dict(v, status="ok", launch_wall_s=wall, steps_timed=len(timed), tokens_per_step=sum(r["tokens"] for r in timed) / len(timed),
                tokens_per_s=sum(r["tokens"] for r in timed) / sum(step_s), step_s=sorted(step_s)[len(step_s) // 2],
                step_s_all=step_s, final_loss=timed[-1]["loss"], peak_memory_per_rank=[r.get(key) for r in ranks],
                peak_memory_kind=key, ranks=ranks, breakdown_ms=breakdown)


def main(argv=None, prog=None) -> int:
    started, args = time.perf_counter(), parse_args(argv, prog)
    if args.replot:
        report(json.loads(args.replot.read_text()), args.replot)
        return 0
    import torch

    args.data, args.tokenizer = common.resolve_inputs(args.inputs, args.data, args.tokenizer)
    on_gpu = torch.cuda.is_available()
    args.ranks = resolve_ranks(args.ranks, on_gpu, torch.cuda.device_count() if on_gpu else 0)
    ceilings = common.measure_ceilings()
    variants = [parse_variant(v, args.optimizer) for v in args.variants]
    from toolkit.train.plan import model_size

    n_params, largest_layer = count_params(args.model), model_size(args.model).largest_layer
    payload = dict(benchmark="train", env=common.environment(), config=common.config_of(args), ceilings=ceilings,
                   model=args.model, params=n_params, variants=[], memory_table=memory_table())
    path = common.result_path("train", args.out, args.tag)

    def save() -> None:  # after every variant: a run cut short by its time limit keeps what it measured
        figures(payload["variants"], n_params, ceilings and ceilings["bf16_flops_per_s"], on_gpu, args, largest_layer)
        payload["targets"] = check_targets(payload["variants"], args.model, on_gpu, args)
        common.write_result(path, payload)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = args.keep or Path(tmp)
        model = args.model
        if model.startswith("random:") and args.tokenizer:  # the trainer loads the tokenizer by model source
            model = common.materialise_random(model, args.tokenizer, work / "model",
                                              "bfloat16" if on_gpu and args.bf16 != "false" else "float32")
        write_data(args, work / "data", args.micro_batch * args.accum * args.ranks)
        for v in variants:
            print(f"== {v['variant']}", flush=True)
            if args.budget_s and time.perf_counter() - started > args.budget_s:  # a remote run is killed at its limit
                payload["variants"].append(dict(v, status="skipped", reason=f"past --budget-s {args.budget_s:g}"))
                continue
            payload["variants"].append(run_variant(v, args, model, work / "data", work, on_gpu))
            print(json.dumps({k: payload["variants"][-1].get(k) for k in ("status", "tokens_per_s", "step_s",
                                                                          "launch_wall_s")}), flush=True)
            save()
    save()
    report(payload, path)
    return 0


if __name__ == "__main__":
    if "--rank-entry" in sys.argv:
        sys.exit(rank_entry(sys.argv[1:]))
    sys.exit(main())
