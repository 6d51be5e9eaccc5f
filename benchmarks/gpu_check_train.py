"""The trainer's GPU checks (`python benchmarks/gpu_check.py --train`, listed in its docstring): each a
function(ctx) -> JSON-able dict for gpu_check_rules' runner, on randomly initialised models under the
real `deepspeed` launcher; the plain helpers they use (run configs, launch command and environment, the
figures of a training output, the disk the launches write) are tested on CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from gpu_check_rules import (HOST_COPY_MAX, ZERO1_MAX_REL, Check, Context, disk_need, expect_at_most, launch_disk,
                             relative_loss_gap, resume_expectation)

SMALL_MODEL = "random:smollm2-135m"  # correctness: resume, ZeRO-1 vs ZeRO-2, export
BIG_MODEL = "random:llama-3.2-1b"  # figures: throughput, MFU, memory, checkpoint size
SMOKE_MODEL = "random:tiny"


# ---------------------------------------------------------------- training runs (plain helpers)


def run_config(model: str, data: Path, out: Path, stage: int, *, micro: int, epochs: int = 2, max_len: int = 64,
               stop_after_epoch: int = 0, resume: bool = False, offload: bool = False) -> dict:
    """The training config of one check run: the shipped ds_config of the stage, everything stated."""
    from toolkit.train.config import shipped_ds_config

    return dict(model=str(model), data=str(data), output_dir=str(out), ds_config=shipped_ds_config(stage, offload),
                zero_stage=stage, micro_batch_size=micro, gradient_accumulation_steps=1, epochs=epochs, lr=1e-4,
                warmup_ratio=0.0, grad_clip=1.0, max_len=max_len, eval_batch_size=64, eval_train=False,
                max_new_tokens=8, patience=0, keep_last_n=1, progress=False, seed=0,
                stop_after_epoch=stop_after_epoch, resume=resume)


def train_launches(small_params: int, big_params: int, bf16: bool = True) -> dict:
    """Every launch of --train with the checkpoints it writes (one at each epoch's end) and its export."""
    return {"zero2": launch_disk(small_params, 2, True, bf16),
            "zero2_resume_part1": launch_disk(small_params, 1, False, bf16),
            "zero2_resume_part2": launch_disk(small_params, 1, True, bf16),
            "zero1": launch_disk(small_params, 1, True, bf16),
            "zero3": launch_disk(small_params, 1, True, bf16),
            "throughput_1b": launch_disk(big_params, 1, True, bf16)}


def train_disk_need(small_params: int, big_params: int, same_model: bool, bf16: bool = True) -> dict:
    width = 2 if bf16 else 4  # the materialised models
    models = width * (small_params + (0 if same_model else big_params))
    return disk_need(train_launches(small_params, big_params, bf16), models)


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
    from toolkit.io import read_jsonl

    rows = read_jsonl(out / "losses.jsonl")
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


def train(ctx: Context, name: str, model: str = "small", **overrides) -> tuple[Path, float]:
    """One launch of the trainer; (its output directory, launch wall seconds). Raises on failure."""
    import yaml

    from toolkit.train.strategy import free_port

    out = ctx.work / name
    cfg = run_config(ctx.shared[f"{model}_dir"], ctx.shared["data_dir"], out, micro=ctx.shared["micro"], **overrides)
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


def run_summary(ctx: Context, out: Path, params_key: str = "small_params") -> dict:
    return summarize_run(out, ctx.shared[params_key], ctx.shared["peak_flops"], ctx.ranks)


# ---------------------------------------------------------------- the trainer's checks


def check_setup(ctx: Context) -> dict:
    import torch

    from toolkit.io import write_jsonl
    from train_report import count_params

    data, tokenizer = common.resolve_inputs(ctx.args.inputs, ctx.args.data, ctx.args.tokenizer)
    small = ctx.args.model or (SMALL_MODEL if ctx.on_gpu else SMOKE_MODEL)
    big = ctx.args.big_model or (BIG_MODEL if ctx.on_gpu else SMOKE_MODEL)
    dtype = "bfloat16" if ctx.on_gpu else "float32"
    tick = time.perf_counter()
    for key, model in (("small", small), ("big", big)):
        if key == "big" and big == small:  # --smoke: one tiny model for both
            ctx.shared["big_dir"] = ctx.shared["small_dir"]
        elif model.startswith("random:"):
            ctx.shared[f"{key}_dir"] = common.materialise_random(model, tokenizer, ctx.work / f"model-{key}", dtype)
        else:
            ctx.shared[f"{key}_dir"] = model
        ctx.shared[f"{key}_params"] = count_params(model)
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
    ctx.shared.update(data_dir=str(ctx.work / "data"), micro=micro)
    ceilings = common.measure_ceilings() if ctx.on_gpu else None
    ctx.shared["peak_flops"] = ceilings and ceilings["bf16_flops_per_s"]
    return {"models": {"small": small, "big": big}, "params": {k: ctx.shared[f"{k}_params"] for k in ("small", "big")},
            "dtype": dtype, "ranks": ctx.ranks, "micro_batch_per_rank": micro, "train_items": need,
            "dev_items": len(dev), "materialise_s": materialise_s, "ceilings": ceilings,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if ctx.on_gpu else []}


# A fresh process loads a saved model and reports its host memory (gpu_check_rules.peak_anon_growth).
LOAD_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import transformers.models.llama.modeling_llama  # imported before the window: modules are not weights
from gpu_check_rules import peak_anon_growth
from toolkit.models import ModelSpec, load_model, load_tokenizer
model_dir, device, dtype, way = sys.argv[2:6]
load_tokenizer(model_dir)  # its first load imports and caches: not the model's memory either
if device.startswith("cuda"):
    torch.zeros(1, device=device)  # the CUDA context's host memory is not the model's
def straight():
    return load_model(ModelSpec(source=model_dir, dtype=dtype, device=device))[0]
def via_cpu():  # the old way: the whole model materialised on the CPU, then moved
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
model, growth = peak_anon_growth(straight if way == "straight" else via_cpu)
tensors = [*model.parameters(), *model.buffers()]
print("RESULT " + json.dumps({"host_growth_bytes": growth, "devices": sorted({str(t.device) for t in tensors}),
                              "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def check_load_to_device(ctx: Context) -> dict:
    """The 1B model loaded onto GPU 0 in a dtype other than its file's: the case where a load through
    the CPU holds a full host copy (an fp32 file, as the GGUF conversions are, loaded in bf16). Where
    the dtypes match, transformers 5.19 leaves CPU tensors on the file's mmap pages (no copy either way)."""
    file_dtype = "bfloat16" if ctx.on_gpu else "float32"  # what setup saved
    device, dtype = ("cuda:0", "float32") if ctx.on_gpu else ("cpu", "bfloat16")
    ways = {}
    for way in ("straight", "via_cpu"):
        done = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(common.BENCH_DIR), ctx.shared["big_dir"], device,
                               dtype, way], capture_output=True, text=True, timeout=300,
                              env=launch_env(ctx.on_gpu, 1))
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"loading {way} failed: {done.stderr.strip()[-2000:]}")
        ways[way] = json.loads(line[len("RESULT "):])
    weights = ways["straight"]["weight_bytes"]
    share = {way: w["host_growth_bytes"] / weights for way, w in ways.items()}
    expectations = [expect_at_most("tensors_elsewhere", len(set(ways["straight"]["devices"]) - {device}), 0,
                                   f"every parameter and buffer loads onto {device}")]
    if ctx.on_gpu:  # on the CPU the weights are the host copy
        expectations.append(expect_at_most("host_copy_share", share["straight"], HOST_COPY_MAX,
                                           "host memory while loading / weight bytes: a full host copy is 1.0"))
    return {"device": device, "file_dtype": file_dtype, "load_dtype": dtype, "weight_bytes": weights, "ways": ways,
            "host_share": share, "expectations": expectations}


def check_zero2(ctx: Context) -> dict:
    out, wall = train(ctx, "zero2", stage=2)
    result = {"launch_wall_s": wall, **run_summary(ctx, out)}
    ctx.shared["zero2"] = {"out": str(out), "losses": result["losses"], "peak_memory": result["peak_memory"]}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the export is what the next check reads
    if len(result["losses"]) != 2 * ctx.args.steps_per_epoch or result["export_bytes"] is None:
        raise RuntimeError(f"expected {2 * ctx.args.steps_per_epoch} steps and an export: {result['summary']}")
    return result


def check_export_reload(ctx: Context) -> dict:
    """The exported model, reloaded the way the next probe loads it, gives the trainer's logits."""
    return reload_export(ctx, Path(ctx.shared["zero2"]["out"]))


def reload_export(ctx: Context, out: Path) -> dict:
    import torch

    from toolkit.models import ModelSpec, load_model

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
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "bitwise_equal": diff == 0.0, "reload_s": load_s,
            "expectations": [expect_at_most(
                "reloaded_logits", diff, 1e-3 * max(scale, 1.0), "the same weights and input through the same "
                "kernels: equal but for a kernel choice; a wrong or partial export is off by the logit scale")]}


def check_zero2_resume(ctx: Context) -> dict:
    """Stopped after epoch 1 (as if pre-empted, checkpoint written), then resumed: the same losses."""
    part1, wall1 = train(ctx, "zero2-resume", stage=2, stop_after_epoch=1)
    first = run_summary(ctx, part1)
    part2, wall2 = train(ctx, "zero2-resume", stage=2, resume=True)
    both = run_summary(ctx, part2)
    shutil.rmtree(part2 / "checkpoints", ignore_errors=True)
    uninterrupted = ctx.shared["zero2"]["losses"]
    return {"part1_steps": first["steps"], "part1_interrupted": first["summary"]["interrupted"],
            "part1_checkpoint_bytes": first["checkpoint_bytes"], "launch_wall_s": [wall1, wall2],
            "losses": both["losses"], "against_uninterrupted": compare_losses(uninterrupted, both["losses"]),
            "expectations": [resume_expectation(uninterrupted, both["losses"], ctx.args.steps_per_epoch)]}


def check_zero1(ctx: Context) -> dict:
    out, wall = train(ctx, "zero1", stage=1, epochs=1)
    result = {"launch_wall_s": wall, **run_summary(ctx, out)}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    zero2 = ctx.shared["zero2"]["losses"]
    result["against_zero2"] = compare_losses(zero2, result["losses"])
    result["expectations"] = [expect_at_most(
        "losses_vs_zero2", relative_loss_gap(result["losses"], zero2), ZERO1_MAX_REL,
        "max relative loss gap over the same steps: other optimizers (fp32 vs bf16 gradients) drift a little; "
        "one that does not step is tens of % off")]
    return result


def check_zero3(ctx: Context) -> dict:
    """ZeRO-3 on the 135M shape, 1 epoch, every GPU (one GPU: parameters and optimizer states offloaded
    to host memory, since ZeRO-3 over one rank partitions nothing): losses against ZeRO-2's, the peak
    GPU memory per rank below ZeRO-2's, dev evaluation with partitioned weights, the sharded export."""
    offload = ctx.ranks == 1
    out, wall = train(ctx, "zero3", stage=3, epochs=1, offload=offload)
    result = {"launch_wall_s": wall, "offload": offload, **run_summary(ctx, out)}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    zero2 = ctx.shared["zero2"]
    result["against_zero2"] = compare_losses(zero2["losses"], result["losses"])
    peak = max(result["peak_memory"]["train"]) if result["peak_memory"] else None
    zero2_peak = max(zero2["peak_memory"]["train"]) if zero2.get("peak_memory") else None
    reload = reload_export(ctx, out)
    result.update(peak_train_bytes=peak, zero2_peak_train_bytes=zero2_peak, export_reload=reload)
    result["expectations"] = [
        expect_at_most("losses_vs_zero2", relative_loss_gap(result["losses"], zero2["losses"]), ZERO1_MAX_REL,
                       "max relative loss gap over the same steps: bf16 reductions in another order drift a "
                       "little; weights gathered wrongly are tens of % off"),
        *reload["expectations"]]
    if ctx.on_gpu:  # on CPU the peak is the process's RSS, mostly the libraries
        result["expectations"].append(expect_at_most(
            "peak_memory_vs_zero2", None if not (peak and zero2_peak) else peak / zero2_peak, 0.9,
            "ZeRO-3 keeps 1/W of the weights (or none, offloaded) on a GPU: lower than ZeRO-2's peak"))
    return result


def check_throughput_1b(ctx: Context) -> dict:
    from toolkit.train.dsconfig import checkpoint_bytes

    out, wall = train(ctx, "throughput-1b", model="big", stage=2, epochs=1)
    result = {"launch_wall_s": wall, **run_summary(ctx, out, "big_params")}
    shutil.rmtree(out, ignore_errors=True)  # 17 GB of checkpoint for the 1B shape: measured, not needed
    sizes = list(result["checkpoint_bytes"].values())
    expected = checkpoint_bytes(ctx.shared["big_params"], ctx.on_gpu, "adamw")["full"]
    gap = abs(sizes[-1] - expected) / expected if sizes else None
    result["expectations"] = [expect_at_most("checkpoint_size_vs_estimate", gap, 0.15, "the trainer's disk "
                                             "estimate (dsconfig.checkpoint_bytes) leaves out pickling overhead")]
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
    pipeline = Pipeline(load_pipeline_config(None, ["train.options.eval_batch_size=16", "probe.max_new_tokens=4"]), run,
                        echo=lambda line: None)
    before = torch.cuda.memory_reserved() if ctx.on_gpu else None
    pipeline.evaluate(run, "M", ctx.shared["small_dir"])
    after = torch.cuda.memory_reserved() if ctx.on_gpu else None
    result = {"reserved_before_bytes": before, "reserved_after_eval_bytes": after, "expectations": []}
    if ctx.on_gpu:
        result["expectations"].append(expect_at_most("reserved_after_eval_bytes", after - (before or 0), 64 << 20,
                                                     "the driver's evaluation frees its model and cache"))
    if not ctx.on_gpu or query_nvidia_smi() is None:
        return {**result, "gpu_wait": "not checked (no GPU or no nvidia-smi)"}
    hold_s = 6
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, torch; x = torch.empty(4 << 30, dtype=torch.uint8, device='cuda:0'); "
        f"print('held', flush=True); time.sleep({hold_s})")], stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        raise RuntimeError("the process holding 4 GiB on GPU 0 did not start")
    held_at = time.perf_counter()
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")) or None
    waited = wait_for_free_gpu(uuid, None if uuid else 0, {os.getpid()}, busy_mib=2048, timeout_s=60, poll_s=0.5)
    released = time.perf_counter() - held_at
    holder.wait()
    result["expectations"].append(expect_at_most("gpu_wait_missed", 0 if waited and waited >= 1 else 1, 0,
                                                 "the wait sees the 4 GiB another process holds on GPU 0"))
    return {**result, "gpu_wait_s": waited, "holder_released_after_s": released, "holder_hold_s": hold_s}


def check_build_tools(ctx: Context) -> dict:
    from toolkit.train.ops import deepspeed_adam_problem, find_build_tools

    tools = find_build_tools()
    return {"cuda_home": tools.cuda_home, "nvcc": tools.nvcc, "ninja": tools.ninja, "cxx": tools.cxx,
            "prebuilt": sorted(tools.prebuilt), "fused_adam_problem": deepspeed_adam_problem(False, tools),
            "cpu_adam_problem": deepspeed_adam_problem(True, tools)}


TRAIN_CHECKS = [
    Check("setup", check_setup, estimate_s=50),
    Check("build_tools", check_build_tools, estimate_s=5),
    Check("load_to_device", check_load_to_device, ("setup",), estimate_s=30),
    Check("zero2", check_zero2, ("setup",), estimate_s=60),
    Check("export_reload", check_export_reload, ("zero2",), estimate_s=10),
    Check("zero2_resume", check_zero2_resume, ("zero2",), estimate_s=100),
    Check("zero1", check_zero1, ("zero2",), estimate_s=45),
    Check("zero3", check_zero3, ("zero2",), estimate_s=45),
    Check("throughput_1b", check_throughput_1b, ("setup",), estimate_s=80),
    Check("turn_taking", check_turn_taking, ("setup",), estimate_s=25),
]
