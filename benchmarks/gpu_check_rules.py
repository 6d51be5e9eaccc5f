"""The plain logic of benchmarks/gpu_check.py, tested on CPU (tests/test_gpu_check.py): the check
runner and its time budget, the imports the check needs, the expectations each comparison is held
to (agreement rates where floating point may legitimately differ, equality where it must hold), the
final verdict, and the disk the --train part writes.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Each part (--probe, --train) must end within 8 minutes on one H100; its start-up (imports, CUDA
# context) takes about 30 s of that, so its checks get the rest.
BUDGET_S = 450


# ---------------------------------------------------------------- the check runner


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
    started: float = field(default_factory=time.perf_counter)  # when this part started: its budget
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
    its error, and the others go on. A check's figures and expectations are kept whatever they say.
    `save` runs after every check."""
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
        r = ctx.results[check.name]
        unmet = [e["name"] for e in r.get("expectations", []) if not e["passed"]]
        echo(f"   {check.name}: {r['status']} {r.get('reason') or r.get('error') or ''}".rstrip()
             + (f" (expectations not met: {', '.join(unmet)})" if unmet else ""))
        save()
    return ctx.results


def summary(results: dict) -> dict:
    by_status = {status: [name for name, r in results.items() if r["status"] == status]
                 for status in ("ok", "failed", "skipped")}
    by_status["expectations_failed"] = [f"{name}/{e['name']}" for name, r in results.items()
                                        for e in r.get("expectations", []) if not e["passed"]]
    return by_status


def verdict(parts: dict[str, dict]) -> dict:
    """The run's verdict over every part's results: 'failed' when a check failed or an expectation was
    not met, 'incomplete' when checks were skipped (not verified: never counted as passed), else
    'passed'; with one line per failure and per skipped check."""
    failed, unmet, skipped, met = [], [], [], 0
    for part, results in parts.items():
        for name, r in results.items():
            where = f"{part}/{name}"
            if r["status"] == "failed":
                failed.append(f"{where}: {r['error']}")
            elif r["status"] == "skipped":
                skipped.append(f"{where}: {r['reason']}")
            for e in r.get("expectations", []):
                met += e["passed"]
                if not e["passed"]:
                    unmet.append(f"{where}/{e['name']}: {describe(e)}")
    word = "failed" if failed or unmet else "incomplete" if skipped else "passed"
    return {"verdict": word, "failed_checks": failed, "failed_expectations": unmet, "skipped_checks": skipped,
            "expectations_met": met}


# ---------------------------------------------------------------- what the check needs installed

# (module imported, name pip knows it by). DeepSpeed and Ray import msgpack, protobuf, requests and
# click deep inside a launch or an actor, where a missing one reads as an unrelated crash.
REQUIRED_IMPORTS = (("torch", "torch"), ("transformers", "transformers"), ("accelerate", "accelerate"),
                    ("safetensors", "safetensors"), ("deepspeed", "deepspeed"), ("ray", "ray"),
                    ("msgpack", "msgpack"), ("google.protobuf", "protobuf"), ("requests", "requests"),
                    ("click", "click"), ("yaml", "pyyaml"))
OPTIONAL_IMPORTS = (("vllm", "vllm"), ("flash_attn", "flash-attn"))


def import_problems(modules=REQUIRED_IMPORTS, importer: Callable = importlib.import_module) -> dict[str, str]:
    """pip name -> why its module does not import, for each module that does not."""
    problems = {}
    for module, package in modules:
        try:
            importer(module)
        except Exception as err:  # noqa: BLE001 -- a broken install raises anything, not only ImportError
            problems[package] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return problems


def optional_present(modules=OPTIONAL_IMPORTS, find: Callable = importlib.util.find_spec) -> dict[str, bool]:
    """Whether each optional package is installed (found, not imported: vLLM takes seconds to import)."""
    return {package: find(module) is not None for module, package in modules}


def import_error_line(problems: dict[str, str]) -> str | None:
    """One line naming every package that does not import, or None."""
    if not problems:
        return None
    named = "; ".join(f"{package} ({why})" for package, why in problems.items())
    return (f"error: the GPU check needs {', '.join(problems)}, which do not import here: {named}. "
            f"Install the project into this environment first (`make setup`, see benchmarks/README.md)")


def cuda_problem(torch_version: str, cuda_build: str | None, gpu_count: int, smoke: bool) -> str | None:
    """Why this machine cannot run the GPU checks (None: it can, or --smoke needs no GPU)."""
    if smoke:
        return None
    if cuda_build is None:
        return (f"error: torch {torch_version} is a CPU build: install a CUDA torch before `make setup` "
                "(setup keeps a CUDA torch it finds); or use --smoke to check the script on CPU")
    if gpu_count == 0:
        return (f"error: no GPU here (torch {torch_version}, CUDA {cuda_build}: check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES; use --smoke to check the script on CPU)")
    return None


# ---------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Rule:
    min_rate: float  # the share of compared items that must be equal (1.0: every one)
    why: str


# Agreement of answers (strings: greedy and seeded samples) between two runs of one model on the same
# prompts. On a random-init model every logit is near its neighbours, so a rounding difference flips
# an argmax now and then; a flip changes the rest of that answer, never the other answers.
GPU_RULES = {
    "graphs_vs_eager": Rule(0.99, "bf16: Inductor fuses the decode step's elementwise ops and skips "
                            "roundings to bf16 that eager does; the same matmuls, so flips are rare"),
    "batch_8_vs_16": Rule(0.97, "bf16: another batch shape lets cuBLAS/SDPA pick other kernels and "
                          "reduction orders for every matmul, a larger perturbation than fusion"),
    "engine_vs_generate": Rule(0.75, "greedy only (their samplers draw differently): generate pads a "
                               "batch and runs other shapes and masks; catches a broken KV fan-out or "
                               "cache (those agree on far fewer), not rounding"),
    "actor_rows": Rule(0.75, "categories of 8 items from GPU actors against a CPU actor: other devices, "
                       "other kernels; a category needs several answers to move"),
    "lazy_vs_full": Rule(0.75, "bf16, random weights (near-flat logits): lazy rows decode in batches of other "
                         "shapes than full sampling's, so a planted greedy answer can flip and leave its "
                         "question unsettled; a broken settle rule or KV fan-out moves most planted items"),
}
# On the CPU in fp32 the kernels do not depend on batch composition or process (README "Determinism")
CPU_RULES = {
    "graphs_vs_eager": Rule(1.0, "CPU: no CUDA graphs, the same eager engine twice"),
    "batch_8_vs_16": Rule(1.0, "CPU fp32: answers do not depend on batch composition"),
    "engine_vs_generate": GPU_RULES["engine_vs_generate"],
    "actor_rows": Rule(1.0, "CPU fp32: the same model on the same device under any actor count"),
    "lazy_vs_full": Rule(1.0, "CPU fp32: every answer lazy probing produces is full sampling's"),
}


def rule(name: str, on_gpu: bool) -> Rule:
    return (GPU_RULES if on_gpu else CPU_RULES)[name]


def agreement(a: list, b: list, show: int = 3) -> dict:
    """Items equal position by position: counts, the rate, and the first few that differ."""
    if len(a) != len(b):
        raise ValueError(f"comparing {len(a)} items with {len(b)}")
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return {"equal": len(a) - len(differ), "total": len(a), "rate": (len(a) - len(differ)) / len(a) if a else None,
            "examples": [{"index": i, "a": a[i], "b": b[i]} for i in differ[:show]]}


def expect_rate(name: str, counts: dict, r: Rule) -> dict:
    """An expectation on an agreement: passed when the equal share reaches the rule's minimum."""
    passed = counts["total"] > 0 and counts["equal"] >= r.min_rate * counts["total"] - 1e-9
    return {"name": name, "kind": "rate", "equal": counts["equal"], "total": counts["total"], "rate": counts["rate"],
            "min_rate": r.min_rate, "passed": passed, "why": r.why, "examples": counts.get("examples", [])}


def expect_at_most(name: str, value: float | None, limit: float, why: str) -> dict:
    return {"name": name, "kind": "at_most", "value": value, "limit": limit,
            "passed": value is not None and value <= limit, "why": why}


def expect_at_least(name: str, value: float | None, limit: float, why: str) -> dict:
    return {"name": name, "kind": "at_least", "value": value, "limit": limit,
            "passed": value is not None and value >= limit, "why": why}


def describe(e: dict) -> str:
    if e["kind"] == "rate":
        rate = "-" if e["rate"] is None else f"{e['rate']:.3f}"
        return f"{e['equal']}/{e['total']} equal = {rate} < {e['min_rate']} ({e['why']})"
    return f"{e['value']} {'<' if e['kind'] == 'at_least' else '>'} {e['limit']} ({e['why']})"


# Losses of two launches of one training run (ZeRO-2, same data and seed) on the same GPUs.
RESUME_FLOOR_REL = 1e-3  # bf16 logits, fp32 loss: run-to-run differences well below this per step
RESUME_GROWTH = 10  # two trajectories that start apart drift further apart over the next steps


def resume_expectation(uninterrupted: list[float], resumed: list[float], resumed_after: int) -> dict:
    """The resumed run against the uninterrupted one. Both launches ran the first `resumed_after`
    steps from scratch, so their difference there is this GPU's run-to-run noise (atomics in backward
    kernels, reduction order); the resumed steps may differ by that noise grown, no more. A resume that
    lost the optimizer state, the schedule or the data order moves the loss by far more."""
    if len(uninterrupted) != len(resumed) or resumed_after >= len(resumed):
        return expect_at_most("resumed_losses", None, 0.0, f"steps {len(uninterrupted)} vs {len(resumed)}: "
                              f"the resumed run did not finish the same steps")
    noise = max((abs(a - b) for a, b in zip(uninterrupted[:resumed_after], resumed[:resumed_after])), default=0.0)
    after = max(abs(a - b) for a, b in zip(uninterrupted[resumed_after:], resumed[resumed_after:]))
    scale = max(abs(x) for x in uninterrupted)
    limit = max(RESUME_FLOOR_REL * scale, RESUME_GROWTH * noise)
    return {**expect_at_most("resumed_losses", after, limit,
                             f"max |loss difference| after the resume <= max({RESUME_FLOOR_REL:g} x loss scale, "
                             f"{RESUME_GROWTH} x the fresh steps' run-to-run difference {noise:.3g})"),
            "fresh_steps_max_abs_diff": noise}


# ZeRO-1 (BF16_Optimizer, fp32 gradient accumulation) against ZeRO-2 (bf16 gradients): other
# optimizers, so the losses drift apart a little; one that does not step at all is tens of % off.
ZERO1_MAX_REL = 0.05


def relative_loss_gap(a: list[float], b: list[float]) -> float | None:
    pairs = list(zip(a, b))
    return max(abs(x - y) / max(abs(y), 1e-9) for x, y in pairs) if pairs else None


# ---------------------------------------------------------------- disk


def launch_disk(params: int, checkpoints: int, export: bool, bf16: bool = True) -> dict:
    """What one launch writes and holds at its peak with keep_last_n=1: each checkpoint (weights +
    fp32 master + Adam moments, toolkit.train.dsconfig.checkpoint_bytes) replaces the last after it is
    written (two whole for a moment) and the best one's weights stay; then the export."""
    from toolkit.train.dsconfig import checkpoint_bytes

    ckpt = checkpoint_bytes(params, bf16, "adamw")
    export_bytes = ckpt["weights"] if export else 0
    peak = min(checkpoints, 2) * ckpt["full"] + (ckpt["weights"] if checkpoints > 1 else 0) + export_bytes
    return {"written": checkpoints * ckpt["full"] + export_bytes, "peak": peak, "checkpoint": ckpt["full"],
            "export": export_bytes}


def disk_need(launches: dict[str, dict], model_dirs_bytes: float) -> dict:
    """The --train part's disk: every launch's writes, and its peak (the models it trains from, every
    export kept, and the largest launch's checkpoints: each check deletes its checkpoints when done)."""
    written = sum(launch["written"] for launch in launches.values())
    exports = sum(launch["export"] for launch in launches.values())
    peak = model_dirs_bytes + exports + max((launch["peak"] - launch["export"] for launch in launches.values()),
                                            default=0)
    return {"written_bytes": written, "peak_bytes": peak, "model_dirs_bytes": model_dirs_bytes,
            "launches": launches}


def disk_problem(need: dict, free_bytes: int, work: Path) -> str | None:
    if free_bytes >= 1.1 * need["peak_bytes"]:
        return None
    return (f"error: --work {work}: {free_bytes / 2**30:.1f} GiB free, the --train checks need about "
            f"{need['peak_bytes'] / 2**30:.1f} GiB at their peak: point --work at a larger disk")


# ---------------------------------------------------------------- host memory while loading


def anon_rss_bytes(text: str | None = None) -> int:
    """This process's anonymous resident memory: heap and tensors, not the pages of files it maps (a
    safetensors file read through mmap is page cache, shared). Read from /proc/self/smaps_rollup, which
    walks the page tables: /proc/self/status's RssAnon comes from per-thread counters that older kernels
    sync only every 64 page faults, so 256 MiB filled by two threads in 2 MiB huge pages can stay
    invisible there (a CI machine saw 4 KiB)."""
    if text is None:
        rollup = Path("/proc/self/smaps_rollup")
        text = rollup.read_text() if rollup.exists() else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith(("Anonymous:", "RssAnon:")):
            return int(line.split()[1]) * 1024
    raise ValueError("no Anonymous or RssAnon line in /proc/self/smaps_rollup or /proc/self/status")


def peak_anon_growth(fn: Callable, interval_s: float = 0.005):
    """(fn(), the most anonymous memory the process held above its start while fn ran), sampled from
    another thread (loading copies release the GIL)."""
    import threading

    start, peak, done = anon_rss_bytes(), [anon_rss_bytes()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], anon_rss_bytes()) - start


# A full host copy of the weights is 1.0x their bytes. Loading straight to the GPU holds a few tensors
# in flight (4 loader threads; the largest is the embedding, 21% of Llama-3.2-1B) plus what the
# allocator keeps after freeing them.
HOST_COPY_MAX = 0.6
