"""GPU checks, ready to run: one command on a GPU node, one JSON in benchmarks/results/.

    .venv/bin/python benchmarks/gpu_check.py --probe            the probe engine's checks
    .venv/bin/python benchmarks/gpu_check.py --train            the trainer's checks (below)
    .venv/bin/python benchmarks/gpu_check.py --train --probe    both, one JSON

First, before anything heavy: every package the checks import (one line naming each that does not
import, exit 2), a CUDA torch and a visible GPU, and for --train the disk its runs write (printed;
exit 2 when --work has too little free).

--train, with every GPU present, on randomly initialised models (no weights to download) in bf16 doing
closed-book SFT of the built-in facts under the real `deepspeed` launcher, keep_last_n=1:
  setup          the models materialised with the facts' tokenizer (SmolLM2-135M and Llama-3.2-1B
                 shapes); the data; HBM and bf16 matmul ceilings
  build_tools    whether this node can build DeepSpeed's FusedAdam / CPUAdam
  load_to_device host memory while the 1B model loads onto GPU 0 in fp32 from its bf16 file (load_model)
                 against the old way (materialised on the CPU, then moved)
  zero2          ZeRO-2 on the 135M shape, 2 epochs, sharded dev evaluation, the HF export
  export_reload  the export reloaded: its logits against the trainer's own
  zero2_resume   the same run stopped after epoch 1 and resumed: the losses continue
  zero1          ZeRO-1 (BF16_Optimizer, fp32 gradient accumulation), 1 epoch: losses against ZeRO-2
  zero3          ZeRO-3, 1 epoch (one GPU: with parameter and optimizer offload): losses and peak memory
                 against ZeRO-2, evaluation on partitioned weights, the sharded export reloaded
  throughput_1b  one epoch on the 1B shape: tokens/s, MFU, peak memory per rank in training and in the
                 export, checkpoint size against the trainer's disk estimate
  turn_taking    the driver's evaluation leaves no GPU memory behind; a rank waits for its GPU while
                 another process holds memory there

--probe: benchmarks/gpu_check_probe.py. A comparison where floating point may legitimately differ is
held to an agreement rate (gpu_check_rules.GPU_RULES, the reason beside each), reported with counts;
a disagreement never discards the other figures. Each part has its own time budget (--budget-s, 450 s:
8 minutes on one H100 with start-up); a check that would end later is skipped and reported as skipped,
never as passed. The JSON is rewritten after every check and ends with the verdict. `--smoke` runs the
same checks on CPU with a tiny model (2 CPU ranks, fp32): it checks this script, not the hardware.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from gpu_check_probe import PROBE_CHECKS  # noqa: E402
from gpu_check_rules import (BUDGET_S, Check, Context, cuda_problem, disk_problem, import_error_line,  # noqa: E402
                             import_problems, optional_present, run_checks, summary, verdict)
from gpu_check_train import BIG_MODEL, SMALL_MODEL, SMOKE_MODEL, TRAIN_CHECKS, train_disk_need  # noqa: E402

# The checks of each part: benchmarks/gpu_check_train.py and benchmarks/gpu_check_probe.py.
PARTS: dict[str, list[Check]] = {"train": TRAIN_CHECKS, "probe": PROBE_CHECKS}


# ---------------------------------------------------------------- command line


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="the trainer's checks")
    p.add_argument("--probe", action="store_true", help="the probe engine's checks")
    p.add_argument("--smoke", action="store_true", help="on CPU with a tiny model (2 CPU ranks): checks this script")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--tag", help="extra part of the result file name")
    p.add_argument("--inputs", default=str(common.DEFAULT_INPUTS) if common.DEFAULT_INPUTS.exists() else None,
                   help="input bundle (facts/ + tokenizer/) from bench_sampling.py --export-inputs, for a machine "
                        "without the project's install (default: the built-in facts and the embedded tokenizer)")
    p.add_argument("--data", help="QA dataset (default: the bundle's facts, else the built-in facts)")
    p.add_argument("--tokenizer", help="tokenizer directory for the random models (default: the bundle's)")
    p.add_argument("--model", help=f"--train's model for the correctness runs (default {SMALL_MODEL})")
    p.add_argument("--big-model", help=f"--train's model for the throughput figures (default {BIG_MODEL})")
    p.add_argument("--ranks", type=int, help="training ranks (default: every GPU; 2 with --smoke)")
    p.add_argument("--micro-batch", type=int, help="sequences per rank per step (default 64 on GPU, 2 with --smoke)")
    p.add_argument("--steps-per-epoch", type=int, default=4, help="optimizer steps per epoch")
    p.add_argument("--dev-items", type=int, default=64, help="dev items evaluated after each epoch")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="per part: skip checks that would end later "
                   "(0: no limit)")
    p.add_argument("--launch-timeout", type=int, default=300, help="seconds per training launch")
    p.add_argument("--work", type=Path, help="the runs' files (--train writes GiBs: see the estimate it prints; "
                   "default: a temporary directory, deleted at the end)")
    args = p.parse_args(argv)
    if not (args.train or args.probe):
        p.error("choose --train and/or --probe")
    return args


def preflight(args) -> tuple[str | None, dict]:
    """(the line that stops the run, or None; what it found): imports, CUDA, --train's disk."""
    found = {"optional": optional_present()}
    line = import_error_line(import_problems())
    if line:
        return line, found
    import torch

    line = cuda_problem(torch.__version__, torch.version.cuda, torch.cuda.device_count(), args.smoke)
    if line or not args.train:
        return line, found
    from toolkit.train.plan import count_parameters

    on_gpu = not args.smoke
    small = args.model or (SMALL_MODEL if on_gpu else SMOKE_MODEL)
    big = args.big_model or (BIG_MODEL if on_gpu else SMOKE_MODEL)
    need = train_disk_need(count_parameters(small), count_parameters(big), small == big, bf16=on_gpu)
    found["disk"] = need
    work = args.work or Path(tempfile.gettempdir())
    probe_dir = work if work.exists() else next(p for p in work.parents if p.exists())
    print(f"--train writes about {need['written_bytes'] / 2**30:.1f} GiB under {work}, at most "
          f"{need['peak_bytes'] / 2**30:.1f} GiB at once", flush=True)
    return disk_problem(need, shutil.disk_usage(probe_dir).free, work), found


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    line, found = preflight(args)
    if line:
        print(line, file=sys.stderr)
        return 2
    import torch

    on_gpu = not args.smoke
    ranks = args.ranks or (torch.cuda.device_count() if on_gpu else 2)
    parts = [name for name in PARTS if getattr(args, name)]
    path = common.result_path("gpu-check", args.out, "-".join(filter(None, ["smoke" if args.smoke else None,
                                                                             args.tag])) or None)
    payload = {"check": "gpu", "parts": parts, "env": common.environment(), "config": common.config_of(args),
               "preflight": found, "results": {}}

    def save() -> None:
        payload["summary"] = {part: summary(payload["results"].get(part, {})) for part in parts}
        payload["verdict"] = verdict(payload["results"])
        common.write_result(path, payload)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for part in parts:  # each part has its own budget
            ctx = Context(args, work / part, on_gpu, ranks)
            ctx.work.mkdir(parents=True, exist_ok=True)
            payload["results"][part] = ctx.results
            run_checks(PARTS[part], ctx, save)
    payload["wall_s"] = time.perf_counter() - started
    save()
    print(json.dumps(payload["verdict"], indent=1))
    print(f"wrote {path}")
    return 1 if payload["verdict"]["verdict"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
