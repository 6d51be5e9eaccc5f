"""GPU checks, ready to run: one command on a GPU machine, one JSON in benchmarks/results/.

    python benchmarks/gpu_check.py --train            the trainer's checks (below)
    python benchmarks/gpu_check.py --probe            the probe engine's checks (PARTS["probe"])
    python benchmarks/gpu_check.py --train --probe    both, one JSON

--train, with every GPU present, on a randomly initialised 1B-shape model (Llama-3.2-1B's config: the
GPU machine can download no weights) doing closed-book SFT of the built-in facts:
  setup          the model materialised in bf16 with the input bundle's tokenizer; the data; HBM and bf16
                 matmul ceilings
  zero2          ZeRO-2 bf16 training under the real `deepspeed` launcher, 2 epochs (a checkpoint after
                 each), dev evaluation sharded over the ranks, the HF export; losses, tokens/s, MFU, peak
                 memory per rank during training and during the export, checkpoint and export sizes on disk
  export_reload  the exported model reloaded: its logits against the trainer's own on the same input
  zero2_resume   the same run stopped after epoch 1 and resumed: the losses must continue exactly
  zero1          ZeRO-1 bf16 (DeepSpeed's BF16_Optimizer with fp32 accumulation), same data: losses
                 against ZeRO-2, memory, tokens/s
  turn_taking    the driver's evaluation model leaves no GPU memory behind; a rank waits for its GPU
                 while another process still holds memory there, then starts
  build_tools    whether this node can build DeepSpeed's FusedAdam / CPUAdam (optimizer: deepspeed_adam)

Every check is a function returning a JSON-able dict (PARTS); a check whose inputs failed is skipped,
and so is one that would not finish within --budget-s (default 450 s: the machine gives 10 minutes,
its start takes some). The JSON is rewritten after each check, so a run cut short keeps what it
measured. `--smoke` runs the same checks on CPU with a tiny model (2 CPU ranks, fp32): it checks this
script, not the hardware.

On the project's GPU machine (../shared/device/README.md; no network): prepare here
    bash ../shared/device/fetch-wheels.sh core
    python benchmarks/bench_sampling.py --export-inputs .cache/bench-inputs   # facts + tokenizer
carry `.whl` and `.cache/bench-inputs`, and run
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PWD:/tmp/site && python3 benchmarks/gpu_check.py --train --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from gpu_check_probe import probe_checks  # noqa: E402

TRAIN_MODEL = "random:llama-3.2-1b"
SMOKE_MODEL = "random:tiny"
BUDGET_S = 450


# ---------------------------------------------------------------- the check runner (plain logic)


@dataclass
class Check:
    name: str
    run: Callable[["Context"], dict]
    needs: tuple[str, ...] = ()  # checks whose success this one builds on
    estimate_s: float = 30  # a GPU run's expected wall time, for the budget


@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    on_gpu: bool
    ranks: int
    started: float = field(default_factory=time.perf_counter)
    results: dict = field(default_factory=dict)  # check name -> result
    shared: dict = field(default_factory=dict)  # what checks hand to later checks (paths, sizes)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def decide(check: Check, results: dict, elapsed_s: float, budget_s: float) -> str | None:
    """Why `check` is skipped (None: run it): an input check did not succeed, or the budget is spent."""
    for need in check.needs:
        if results.get(need, {}).get("status") != "ok":
            return f"needs {need} ({results.get(need, {}).get('status', 'not run')})"
    if budget_s and elapsed_s + check.estimate_s > budget_s:
        return f"budget: {elapsed_s:.0f} s spent + ~{check.estimate_s:g} s > --budget-s {budget_s:g}"
    return None


def run_checks(checks: list[Check], ctx: Context, save: Callable[[], None] = lambda: None,
               echo: Callable[[str], None] = print) -> dict:
    """Run each check in order (or skip it, see `decide`); a check that raises is recorded as failed with
    its error, and the others go on. `save` runs after every check."""
    for check in checks:
        why = decide(check, ctx.results, ctx.elapsed(), ctx.args.budget_s)
        if why:
            ctx.results[check.name] = {"status": "skipped", "reason": why}
        else:
            echo(f"== {check.name}")
            tick = time.perf_counter()
            try:
                result = {"status": "ok", **check.run(ctx)}
            except Exception as err:  # noqa: BLE001 -- recorded; the next checks still run
                result = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            result["wall_s"] = round(time.perf_counter() - tick, 2)
            ctx.results[check.name] = result
        echo(f"   {check.name}: {ctx.results[check.name]['status']} "
             f"{ctx.results[check.name].get('reason') or ctx.results[check.name].get('error') or ''}".rstrip())
        save()
    return ctx.results


def summary(results: dict) -> dict:
    return {status: [name for name, r in results.items() if r["status"] == status]
            for status in ("ok", "failed", "skipped")}


# ---------------------------------------------------------------- training runs (plain helpers)


def run_config(model: str, data: Path, out: Path, stage: int, *, micro: int, epochs: int = 2, max_len: int = 64,
               stop_after_epoch: int = 0, resume: bool = False) -> dict:
    """The training config of one check run: the shipped ds_config of the stage, everything stated."""
    return dict(model=str(model), data=str(data), output_dir=str(out), ds_config="zero1" if stage == 1 else "zero2",
                zero_stage=stage, micro_batch_size=micro, gradient_accumulation_steps=1, epochs=epochs, lr=1e-4,
                warmup_ratio=0.0, grad_clip=1.0, max_len=max_len, eval_batch_size=64, eval_train=False,
                max_new_tokens=8, patience=0, keep_last_n=1, progress=False, seed=0,
                stop_after_epoch=stop_after_epoch, resume=resume)


def launch_command(ranks: int, on_gpu: bool, port: int, config: Path, python: str = sys.executable) -> list[str]:
    """The deepspeed launcher as a module (a `pip install --target` has no `deepspeed` script on PATH)."""
    return [python, "-m", "deepspeed.launcher.runner", "--num_gpus" if on_gpu else "--num_accelerators", str(ranks),
            "--master_port", str(port), "--module", "toolkit.train", "--config", str(config)]


def launch_env(on_gpu: bool, ranks: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO_ROOT), env.get("PYTHONPATH")]))
    bins = [str(Path(d) / "bin") for d in sys.path if d and (Path(d) / "bin" / "ninja").exists()]
    env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])  # ninja of a `pip install --target`
    env.setdefault("TORCH_EXTENSIONS_DIR", str(common.REPO_ROOT / ".cache" / "torch_extensions"))
    if not on_gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return env


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def compare_losses(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return {"steps": [len(a), len(b)], "max_abs_diff": max(diffs) if diffs else None,
            "bitwise_equal": len(a) == len(b) and a == b, "compared": n}


def mfu(num_params: int, tokens_per_s: float | None, peak_flops: float | None, ranks: int) -> float | None:
    """Model FLOPs utilisation: 6 N FLOPs per trained token against the ranks' bf16 peak."""
    if not tokens_per_s or not peak_flops:
        return None
    return 6 * num_params * tokens_per_s / (peak_flops * ranks)


def summarize_run(out: Path, num_params: int, peak_flops: float | None, ranks: int) -> dict:
    """What a finished (or interrupted) training output holds: losses, speed, memory, sizes on disk."""
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines() if line.strip()]
    s = json.loads((out / "train_summary.json").read_text())
    timed = rows[1:] or rows  # the first step pays for kernel selection and warm-up
    tps = statistics.median(r["tokens_per_s"] for r in timed) if timed else None
    ckpt = out / "checkpoints"
    tags = {p.name: dir_bytes(p) for p in sorted(ckpt.glob("step*"))} if ckpt.exists() else {}
    return {"losses": [r["loss"] for r in rows], "steps": len(rows), "tokens_per_step": statistics.median(
                r["tokens"] for r in rows) if rows else None,
            "tokens_per_s": tps, "step_s": statistics.median(r["tokens"] / r["tokens_per_s"] for r in timed) if timed
            else None, "mfu": mfu(num_params, tps, peak_flops, ranks), "peak_memory": s.get("peak_memory"),
            "checkpoint_bytes": tags, "export_bytes": dir_bytes(out / "model") if (out / "model").exists() else None,
            "train_seconds": s.get("seconds"), "summary": {k: s.get(k) for k in (
                "global_step", "best_step", "best_dev_accuracy", "interrupted", "world_size", "zero_stage",
                "train_batch_size", "model_dir")}}


def train(ctx: Context, name: str, **overrides) -> tuple[Path, float]:
    """One launch of the trainer; (its output directory, launch wall seconds). Raises on failure."""
    import yaml

    from toolkit.train.strategy import free_port

    out = ctx.work / name
    cfg = run_config(ctx.shared["model_dir"], ctx.shared["data_dir"], out, micro=ctx.shared["micro"], **overrides)
    path = ctx.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = ctx.work / f"{name}.log"
    tick = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.Popen(launch_command(ctx.ranks, ctx.on_gpu, free_port(), path), cwd=common.REPO_ROOT,
                                stdout=fh, stderr=subprocess.STDOUT, env=launch_env(ctx.on_gpu, ctx.ranks),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=ctx.args.launch_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
    wall = time.perf_counter() - tick
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        raise RuntimeError(f"{name}: the launch failed (exit {rc}): " + " | ".join(tail))
    return out, wall


# ---------------------------------------------------------------- the trainer's checks


def check_setup(ctx: Context) -> dict:
    import torch

    from toolkit.io import write_jsonl
    from train_report import count_params

    data, tokenizer = common.resolve_inputs(ctx.args.inputs, ctx.args.data, ctx.args.tokenizer)
    model = ctx.args.model or (TRAIN_MODEL if ctx.on_gpu else SMOKE_MODEL)
    dtype = "bfloat16" if ctx.on_gpu else "float32"
    tick = time.perf_counter()
    model_dir = common.materialise_random(model, tokenizer, ctx.work / "model", dtype) if model.startswith(
        "random:") else model
    materialise_s = time.perf_counter() - tick
    train_items, dev_items = common.load_items(data)
    micro = ctx.args.micro_batch or (64 if ctx.on_gpu else 2)
    need = ctx.args.steps_per_epoch * micro * ctx.ranks
    rows = []
    for i in range(need):  # exactly steps_per_epoch global batches (items repeat if the split is smaller)
        row = train_items[i % len(train_items)].to_dict()
        rows.append({**row, "id": f"{row['id']}~{i // len(train_items)}", "split": "train"})
    dev = common.spread(dev_items, ctx.args.dev_items)
    write_jsonl(ctx.work / "data" / "train.jsonl", rows)
    write_jsonl(ctx.work / "data" / "dev.jsonl", [dict(it.to_dict(), split="dev") for it in dev])
    ctx.shared.update(model_dir=str(model_dir), data_dir=str(ctx.work / "data"), micro=micro,
                      params=count_params(model))
    ceilings = common.measure_ceilings() if ctx.on_gpu else None
    ctx.shared["peak_flops"] = ceilings and ceilings["bf16_flops_per_s"]
    return {"model": model, "params": ctx.shared["params"], "dtype": dtype, "ranks": ctx.ranks,
            "micro_batch_per_rank": micro, "train_items": need, "dev_items": len(dev),
            "materialise_s": materialise_s, "ceilings": ceilings,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if ctx.on_gpu else []}


def check_zero2(ctx: Context) -> dict:
    out, wall = train(ctx, "zero2", stage=2)
    result = {"launch_wall_s": wall, **summarize_run(out, ctx.shared["params"], ctx.shared["peak_flops"], ctx.ranks)}
    ctx.shared["zero2"] = {"out": str(out), "losses": result["losses"]}
    if len(result["losses"]) != 2 * ctx.args.steps_per_epoch or result["export_bytes"] is None:
        raise RuntimeError(f"expected {2 * ctx.args.steps_per_epoch} steps and an export: {result['summary']}")
    return result


def check_export_reload(ctx: Context) -> dict:
    """The exported model, reloaded the way the next probe loads it, gives the trainer's logits."""
    import torch

    from toolkit.models import ModelSpec, load_model

    out = Path(ctx.shared["zero2"]["out"])
    ref = torch.load(out / "export_check.pt")
    tick = time.perf_counter()
    model, _ = load_model(ModelSpec(source=str(out / "model"), dtype="bfloat16" if ctx.on_gpu else "float32",
                                    device="cuda" if ctx.on_gpu else "cpu"))
    load_s = time.perf_counter() - tick
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"].to(model.device)).logits.float().cpu()
    diff = (logits - ref["logits"]).abs().max().item()
    scale = ref["logits"].abs().max().item()
    del model
    common.free_memory()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the disk is needed by the next runs
    if diff > 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"reloaded logits differ by {diff:g} (logit scale {scale:g})")
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "bitwise_equal": diff == 0.0, "reload_s": load_s}


def check_zero2_resume(ctx: Context) -> dict:
    """Stopped after epoch 1 (as if pre-empted, checkpoint written), then resumed: the same losses."""
    part1, wall1 = train(ctx, "zero2-resume", stage=2, stop_after_epoch=1)
    first = summarize_run(part1, ctx.shared["params"], ctx.shared["peak_flops"], ctx.ranks)
    part2, wall2 = train(ctx, "zero2-resume", stage=2, resume=True)
    both = summarize_run(part2, ctx.shared["params"], ctx.shared["peak_flops"], ctx.ranks)
    compared = compare_losses(ctx.shared["zero2"]["losses"], both["losses"])
    shutil.rmtree(part2 / "checkpoints", ignore_errors=True)
    if compared["steps"][0] != compared["steps"][1] or compared["max_abs_diff"] > 1e-3:
        raise RuntimeError(f"the resumed run does not continue the same losses: {compared}")
    return {"part1_steps": first["steps"], "part1_interrupted": first["summary"]["interrupted"],
            "part1_checkpoint_bytes": first["checkpoint_bytes"], "launch_wall_s": [wall1, wall2],
            "losses": both["losses"], "against_uninterrupted": compared}


def check_zero1(ctx: Context) -> dict:
    out, wall = train(ctx, "zero1", stage=1)
    result = {"launch_wall_s": wall, **summarize_run(out, ctx.shared["params"], ctx.shared["peak_flops"], ctx.ranks)}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    result["against_zero2"] = compare_losses(ctx.shared["zero2"]["losses"], result["losses"])
    return result


def check_turn_taking(ctx: Context) -> dict:
    """(1) The pipeline's test-set evaluation on the driver frees its model and the allocator's cache.
    (2) A rank's GPU wait: another process holds memory on GPU 0 for a few seconds; the wait ends when
    it exits."""
    import torch

    from toolkit.gradual.config import load_pipeline_config
    from toolkit.gradual.pipeline import Pipeline
    from toolkit.io import write_jsonl
    from toolkit.train.devices import query_nvidia_smi, wait_for_free_gpu

    run = ctx.work / "turn-taking"
    items = [json.loads(line) for line in (ctx.work / "data" / "dev.jsonl").read_text().splitlines()][:16]
    write_jsonl(run / "data" / "subset" / "test.jsonl", [dict(it, split="test") for it in items])
    pipeline = Pipeline(load_pipeline_config(None, ["train.eval_batch_size=16", "probe.max_new_tokens=4"]), run,
                        echo=lambda line: None)
    model = ctx.shared["model_dir"]
    before = torch.cuda.memory_reserved() if ctx.on_gpu else None
    pipeline.evaluate(run, "M", model)
    result = {"reserved_before_bytes": before, "reserved_after_eval_bytes": torch.cuda.memory_reserved()
              if ctx.on_gpu else None}
    if ctx.on_gpu and result["reserved_after_eval_bytes"] > (before or 0) + (64 << 20):
        raise RuntimeError(f"the driver kept {result['reserved_after_eval_bytes']} bytes after its evaluation")
    if not ctx.on_gpu or query_nvidia_smi() is None:
        return {**result, "gpu_wait": "not checked (no GPU or no nvidia-smi)"}
    hold_s = 6
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, torch; x = torch.empty(4 << 30, dtype=torch.uint8, device='cuda:0'); "
        f"print('held', flush=True); time.sleep({hold_s})")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    held_at = time.perf_counter()
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")) or None
    waited = wait_for_free_gpu(uuid, None if uuid else 0, {os.getpid()}, busy_mib=2048, timeout_s=60, poll_s=0.5)
    released = time.perf_counter() - held_at
    holder.wait()
    if waited is None or waited < 1:
        raise RuntimeError(f"the wait did not see the 4 GiB held on GPU 0 (waited {waited})")
    return {**result, "gpu_wait_s": waited, "holder_released_after_s": released, "holder_hold_s": hold_s}


def check_build_tools(ctx: Context) -> dict:
    from toolkit.train.ops import deepspeed_adam_problem, find_build_tools

    tools = find_build_tools()
    return {"cuda_home": tools.cuda_home, "nvcc": tools.nvcc, "ninja": tools.ninja, "cxx": tools.cxx,
            "prebuilt": sorted(tools.prebuilt), "fused_adam_problem": deepspeed_adam_problem(False, tools),
            "cpu_adam_problem": deepspeed_adam_problem(True, tools)}


TRAIN_CHECKS = [
    Check("setup", check_setup, estimate_s=40),
    Check("build_tools", check_build_tools, estimate_s=5),
    Check("zero2", check_zero2, ("setup",), estimate_s=100),
    Check("export_reload", check_export_reload, ("zero2",), estimate_s=20),
    Check("zero2_resume", check_zero2_resume, ("zero2",), estimate_s=150),
    Check("zero1", check_zero1, ("zero2",), estimate_s=100),
    Check("turn_taking", check_turn_taking, ("setup",), estimate_s=25),
]

# The probe engine's GPU checks: benchmarks/gpu_check_probe.py (engine vs generate, CUDA graphs vs
# eager, the decode roofline on 1B and 8B shapes; actors on their own devices).
PARTS: dict[str, list[Check]] = {"train": TRAIN_CHECKS, "probe": probe_checks(Check)}


# ---------------------------------------------------------------- command line


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="the trainer's checks")
    p.add_argument("--probe", action="store_true", help="the probe engine's checks")
    p.add_argument("--smoke", action="store_true", help="on CPU with a tiny model (2 CPU ranks): checks this script")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--tag", help="extra part of the result file name")
    p.add_argument("--inputs", default=str(common.DEFAULT_INPUTS) if common.DEFAULT_INPUTS.exists() else None,
                   help="input bundle (facts/ + tokenizer/) from bench_sampling.py --export-inputs")
    p.add_argument("--data", help="QA dataset (default: the bundle's facts, else the built-in facts)")
    p.add_argument("--tokenizer", help="tokenizer directory for the random model (default: the bundle's)")
    p.add_argument("--model", help=f"model (default {TRAIN_MODEL} on GPU, {SMOKE_MODEL} with --smoke)")
    p.add_argument("--ranks", type=int, help="training ranks (default: every GPU; 2 with --smoke)")
    p.add_argument("--micro-batch", type=int, help="sequences per rank per step (default 64 on GPU, 2 with --smoke)")
    p.add_argument("--steps-per-epoch", type=int, default=4, help="optimizer steps per epoch (2 epochs)")
    p.add_argument("--dev-items", type=int, default=64, help="dev items evaluated after each epoch")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="skip checks that would end later (0: no limit)")
    p.add_argument("--launch-timeout", type=int, default=300, help="seconds per training launch")
    p.add_argument("--work", type=Path, help="keep the runs' files here (default: a temporary directory)")
    args = p.parse_args(argv)
    if not (args.train or args.probe):
        p.error("choose --train and/or --probe")
    return args


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    import torch

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("error: no GPU here (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    ranks = args.ranks or (torch.cuda.device_count() if on_gpu else 2)
    parts = [name for name in PARTS if getattr(args, name)]
    path = common.result_path("gpu-check", args.out, "-".join(filter(None, ["smoke" if args.smoke else None,
                                                                             args.tag])) or None)
    payload = {"check": "gpu", "parts": parts, "env": common.environment(), "config": common.config_of(args),
               "results": {}}

    def save() -> None:
        payload["summary"] = {part: summary(payload["results"].get(part, {})) for part in parts}
        common.write_result(path, payload)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for part in parts:
            ctx = Context(args, work / part, on_gpu, ranks, started=started)
            ctx.work.mkdir(parents=True, exist_ok=True)
            payload["results"][part] = ctx.results
            run_checks(PARTS[part], ctx, save)
    payload["wall_s"] = time.perf_counter() - started
    save()
    print(json.dumps(payload["summary"], indent=1))
    print(f"wrote {path}")
    failed = any(s["failed"] for s in payload["summary"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
