"""`gradual`: the command line. Thin: parse, validate at the edge, call the package, map errors to
exit code 2 with one clear line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from toolkit.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED


class UsageError(ValueError):
    """Bad arguments or configuration found by the CLI itself."""


def _user_errors() -> tuple[type[Exception], ...]:
    from toolkit.config import ConfigError  # probe and training config errors included
    from toolkit.data.schema import DataError
    from toolkit.gradual.selection import SelectionError
    from toolkit.models import ModelError
    from toolkit.report.render import ReportError

    return (DataError, ModelError, UsageError, ConfigError, SelectionError, ReportError, FileNotFoundError)


def _runtime_failures() -> tuple[type[Exception], ...]:
    """Work that started and failed (a training stage, an actor group, a busy GPU): its message, exit 1."""
    from toolkit.gradual.pipeline import PipelineError
    from toolkit.probe.pool import ActorGroupError
    from toolkit.train.devices import DeviceBusyError

    return (PipelineError, ActorGroupError, DeviceBusyError)


# ---------------------------------------------------------------- data


def cmd_data_build_facts(args) -> int:
    from toolkit.data.facts import build_facts

    stats = build_facts(args.out, seed=args.seed)
    print(f"wrote {stats['total']} items in {len(stats['relations'])} relations to {args.out}")
    print(json.dumps(stats["splits"], sort_keys=True))
    return 0


def cmd_data_subset(args) -> int:
    from toolkit.data.subset import write_subset

    caps = {"train": args.train_items, "dev": args.dev_items, "test": args.test_items}
    for split, cap in caps.items():
        if cap is not None and cap < 1:
            raise UsageError(f"--{split}-items={cap} must be >= 1 (leave it out for all items)")
    counts = write_subset(args.data, args.out, caps, seed=args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


def cmd_data_validate(args) -> int:
    from toolkit.data.loading import load_qa

    items = load_qa(args.path, splits=tuple(args.split) if args.split else None)
    counts = Counter((it.relation, it.split) for it in items)
    relations = sorted({rel for rel, _ in counts})
    splits = sorted({sp for _, sp in counts})
    width = max(len("relation"), *(len(r) for r in relations))
    print(f"{'relation':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for rel in relations:
        print(f"{rel:<{width}}  " + "  ".join(f"{counts[(rel, s)]:>6}" for s in splits))
    print(f"{'total':<{width}}  " + "  ".join(
        f"{sum(counts[(r, s)] for r in relations):>6}" for s in splits))
    print(f"ok: {len(items)} items")
    return 0


# ---------------------------------------------------------------- doctor


def cmd_doctor(args) -> int:
    from toolkit.doctor import environment_report

    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:<22} {value}")
    return 0


# ---------------------------------------------------------------- parser

# the page of docs/ that says more about each command (its --help ends with it)
DOCS = {"": "README.md", "data": "docs/data.md", "probe": "docs/probing.md", "train": "docs/training.md",
        "run": "docs/pipeline.md", "report": "docs/pipeline.md", "bench": "benchmarks/README.md",
        "doctor": "docs/probing.md"}


def build_parser() -> argparse.ArgumentParser:
    from toolkit.bench import add_bench_parser
    from toolkit.gradual.cli import add_report_parser, add_run_parser
    from toolkit.probe.cli import add_probe_parser
    from toolkit.train.launch import add_train_parser

    from toolkit.helpscreen import ScreenParser

    parser = ScreenParser(  # its subcommands' parsers are ScreenParsers too: each --help fits one screen
        prog="gradual", docs=DOCS[""],
        description="Knowledge-aware fine-tuning: SliCK probing, DeepSpeed training, Gradual Learning. "
                    "`gradual COMMAND --help` for a command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="build, subset and validate QA datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    build = data_sub.add_parser("build-facts", help="build the built-in real-facts QA benchmark offline")
    build.add_argument("--out", required=True, type=Path, help="output directory")
    build.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    build.set_defaults(func=cmd_data_build_facts)
    subset = data_sub.add_parser("subset", help="write a seeded subset, balanced across relations, capped per split")
    subset.add_argument("data", type=Path, help="QA dataset: file or directory")
    subset.add_argument("--out", required=True, type=Path, help="output directory (<split>.jsonl)")
    for split in ("train", "dev", "test"):
        subset.add_argument(f"--{split}-items", type=int, metavar="N", help=f"at most N {split} items (default: all)")
    subset.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    subset.set_defaults(func=cmd_data_subset)
    validate = data_sub.add_parser("validate", help="validate a QA dataset; print counts or the first error")
    validate.add_argument("path", type=Path, help="file (jsonl/json/csv/parquet) or directory")
    validate.add_argument("--split", action="append", help="only this split (repeatable)")
    validate.set_defaults(func=cmd_data_validate)
    add_probe_parser(sub)
    add_train_parser(sub)
    add_run_parser(sub)
    add_report_parser(sub)
    add_bench_parser(sub)

    doctor = sub.add_parser("doctor", help="report versions, devices, attention backend, embedded model")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)
    for name, command in sub.choices.items():
        command.docs, command.config_keys = DOCS[name], name in ("probe", "train")
        for inner in getattr(command, "_subparsers", None) and command._subparsers._group_actions or ():
            for sub_command in getattr(inner, "choices", {}).values():
                sub_command.docs = DOCS[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _runtime_failures() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
