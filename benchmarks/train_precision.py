"""bf16 mixed precision against fp32 for CPU training: the same run of the real trainer (`gradual train`,
DeepSpeed ZeRO-2 over 2 CPU ranks, the committed benchmarks/results/train-smollm2-zero2-cpu/train.yaml by
default) three times: fp32 seed 0, bf16 seed 0 (DeepSpeed bf16: bf16 weights and gradients, fp32 master
weights and Adam states), fp32 seed 1. The second fp32 seed is the yardstick: two equally valid fp32 runs
that differ only in data order show how far curves and dev accuracy move without any change of precision.

Written: benchmarks/results/train-precision-cpu-<date>.json with per run the loss per step and per epoch,
the dev accuracy per evaluation, tokens/s and wall time; the gaps bf16 - fp32 and seed 1 - seed 0; and a
verdict: bf16 keeps the curve when every epoch's mean loss moves less than the seeds move it, and the best
dev accuracy by no more than the seeds move it (or one binomial standard error of the dev set, if larger).
Runs are kept under --work and not redone (delete a run's directory to redo it).

    .venv/bin/python benchmarks/train_precision.py [--config YAML] [--data DIR] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_CONFIG = common.RESULTS_DIR / "train-smollm2-zero2-cpu" / "train.yaml"
# (name, bf16, seed): fp32 and bf16 on the same data order, then fp32 on another one (the yardstick)
RUNS = (("fp32", False, 0), ("bf16", True, 0), ("fp32_seed1", False, 1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (YAML)")
    p.add_argument("--data", type=Path, help="QA data directory (default: 256 train / 64 dev items of the "
                   "built-in facts, built under --work)")
    p.add_argument("--work", type=Path, default=common.REPO_ROOT / "runs" / "train-precision", help="the runs")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more training overrides")
    p.add_argument("--replot", type=Path, help="redraw the figure and README section of a results JSON")
    return p.parse_args(argv)


def gradual(*args: str, log: Path | None = None) -> None:
    command = [sys.executable, "-m", "toolkit.cli", *args]
    with open(log, "w") if log else open("/dev/null", "w") as sink:
        subprocess.run(command, check=True, stdout=sink, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT)


def default_data(work: Path) -> Path:
    data = work / "data"
    if not (data / "train.jsonl").exists():
        gradual("data", "build-facts", "--out", str(work / "facts"))
        gradual("data", "subset", str(work / "facts"), "--out", str(data), "--train-items", "256", "--dev-items", "64")
    return data


def run_training(args, data: Path, name: str, bf16: bool, seed: int) -> dict:
    out = args.work / name
    if not (out / "train_summary.json").exists():
        overrides = [f"data={data}", f"output_dir={out}", f"bf16={str(bf16).lower()}", f"seed={seed}", *args.set]
        print(f"training {name} ...", flush=True)
        tick = time.perf_counter()
        gradual("train", "--config", str(args.config), "--num-accelerators", str(args.ranks),
                *[x for kv in overrides for x in ("--set", kv)], log=args.work / f"{name}.log")
        (out / "wall_s.json").write_text(json.dumps({"wall_s": time.perf_counter() - tick}))
    return read_run(out, bf16, seed)


def read_run(out: Path, bf16: bool, seed: int) -> dict:
    from toolkit.io import read_jsonl

    losses, evals = read_jsonl(out / "losses.jsonl"), read_jsonl(out / "evals.jsonl")
    summary = json.loads((out / "train_summary.json").read_text())
    wall = out / "wall_s.json"
    return {"bf16": bf16, "seed": seed, "loss": [r["loss"] for r in losses], "epoch": [r["epoch"] for r in losses],
            "tokens_per_s": [r["tokens_per_s"] for r in losses],
            "dev": [{"step": e["step"], "accuracy": e["dev"]["accuracy"], "count": e["dev"]["count"]} for e in evals],
            "best_dev_accuracy": summary["best_dev_accuracy"], "trainer_s": summary["seconds"],
            "wall_s": json.loads(wall.read_text())["wall_s"] if wall.exists() else None}


def epoch_means(run: dict) -> list[float]:
    per: dict[int, list[float]] = {}
    for epoch, loss in zip(run["epoch"], run["loss"]):
        per.setdefault(epoch, []).append(loss)
    return [statistics.fmean(per[e]) for e in sorted(per)]


def compare(runs: dict) -> dict:
    """bf16 against fp32 (same seed) and fp32 seed 1 against seed 0, per epoch's mean loss and in best dev
    accuracy; the verdict (see the module docstring)."""
    fp32, bf16, other = runs["fp32"], runs["bf16"], runs["fp32_seed1"]
    means = {name: epoch_means(run) for name, run in runs.items()}
    loss_gap = [b - a for a, b in zip(means["fp32"], means["bf16"])]
    seed_gap = [b - a for a, b in zip(means["fp32"], means["fp32_seed1"])]
    dev_count = fp32["dev"][-1]["count"] if fp32["dev"] else 0
    p = fp32["best_dev_accuracy"]
    dev_se = math.sqrt(p * (1 - p) / dev_count) if dev_count else 0.0
    dev_gap = bf16["best_dev_accuracy"] - p
    dev_seed_gap = other["best_dev_accuracy"] - p
    dev_allowed = max(abs(dev_seed_gap), dev_se)
    speed = {name: statistics.median(run["tokens_per_s"][1:] or run["tokens_per_s"]) for name, run in runs.items()}
    same_curve = max(map(abs, loss_gap), default=0.0) <= max(map(abs, seed_gap), default=0.0)
    same_dev = abs(dev_gap) <= dev_allowed + 1e-12
    return {"epoch_mean_loss": means, "loss_gap_bf16": loss_gap, "loss_gap_seed": seed_gap,
            "step_loss_max_abs_gap_bf16": max((abs(a - b) for a, b in zip(fp32["loss"], bf16["loss"])), default=None),
            "best_dev": {name: run["best_dev_accuracy"] for name, run in runs.items()},
            "dev_gap_bf16": dev_gap, "dev_gap_seed": dev_seed_gap, "dev_standard_error": dev_se,
            "median_tokens_per_s": speed, "x_bf16_tokens_per_s": speed["bf16"] / speed["fp32"],
            "x_bf16_trainer_s": fp32["trainer_s"] / bf16["trainer_s"],
            "same_curve": same_curve, "same_dev": same_dev, "bf16_within_noise": same_curve and same_dev}


def report(payload: dict, path: Path) -> str:
    """The README section: per run the epoch losses, best dev, tokens/s; the verdict."""
    c, env = payload["comparison"], payload["env"]
    rows = [{"run": name, "bf16": run["bf16"], "seed": run["seed"],
             **{f"loss_e{i}": loss for i, loss in enumerate(c["epoch_mean_loss"][name])},
             "first_dev": run["dev"][0]["accuracy"] if run["dev"] else None, "best_dev": run["best_dev_accuracy"],
             "tokens_per_s": c["median_tokens_per_s"][name], "trainer_s": run["trainer_s"]}
            for name, run in payload["runs"].items()]
    columns = [("run", "run"), ("bf16", "bf16"), ("seed", "seed")]
    columns += [(f"loss_e{i}", f"loss epoch {i}") for i in range(len(c["epoch_mean_loss"]["fp32"]))]
    columns += [("first_dev", "dev at 1st eval"), ("best_dev", "best dev"), ("tokens_per_s", "tokens/s"),
                ("trainer_s", "trainer s")]
    verdict = ("bf16 keeps the fp32 curve within seed noise" if c["bf16_within_noise"] else
               f"bf16 does not keep the fp32 curve: epoch loss gaps {', '.join(f'{g:+.2f}' for g in c['loss_gap_bf16'])}"
               f" against seed gaps {', '.join(f'{g:+.2f}' for g in c['loss_gap_seed'])}; best dev "
               f"{c['dev_gap_bf16']:+.3f} (seeds {c['dev_gap_seed']:+.3f})")
    return (f"{common.env_line(env, path, 'torch', 'deepspeed')}\n\n{common.table(rows, columns)}\n\n"
            f"bf16 {c['x_bf16_tokens_per_s']:.2f}x fp32's tokens/s ({c['x_bf16_trainer_s']:.2f}x in trainer "
            f"time); {verdict}.")


def plot(payload: dict):
    def draw(plt):
        fig, (losses, dev) = plt.subplots(1, 2, figsize=(11, 4))
        for name, run in payload["runs"].items():
            losses.plot(range(1, len(run["loss"]) + 1), run["loss"], label=name)
            dev.plot([e["step"] for e in run["dev"]], [e["accuracy"] for e in run["dev"]], marker="o", label=name)
        losses.set(xlabel="optimizer step", ylabel="loss (answer tokens)", yscale="log", title="training loss")
        dev.set(xlabel="optimizer step", ylabel="dev exact match", title="dev accuracy")
        losses.legend()
        dev.legend()
        return fig
    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        payload = json.loads(args.replot.read_text())
        common.publish(report(payload, args.replot), args.replot, plot(payload))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data or default_data(args.work)
    env = common.environment()
    runs = {name: run_training(args, data, name, bf16, seed) for name, bf16, seed in RUNS}
    payload = {"benchmark": "train_precision", "env": env, "config": str(args.config), "overrides": args.set,
               "runs": runs, "comparison": compare(runs)}
    path = common.result_path("train-precision", args.out)
    common.write_result(path, payload)
    common.publish(report(payload, path), path, plot(payload))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
