"""`gradual probe`: flags generated from the probe's three configs (what to probe: RunConfig; what
it computes: ProbeConfig; where its actors run: Placement), validated by the same loader as YAML."""
from __future__ import annotations

import argparse
import json

from toolkit import config as cfglib

from .pool import Placement
from .runner import RunConfig
from .types import ProbeConfig

SECTIONS = ((RunConfig, "what to probe", ()), (ProbeConfig, "the probe (SliCK settings)", ()),
            (Placement, "Ray actors", ("resources_per_actor",)))


def add_probe_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="SliCK knowledge probe on Ray actors: categories per QA item",
                              description="Probe what a model knows about every item: N_ex few-shot prompts x "
                                          "(1 greedy + n sampled answers) on Ray actors; writes categories.jsonl "
                                          "and summary.json. Re-running resumes from the finished shards.")
    for cls, title, exclude in SECTIONS:
        cfglib.add_arguments(p.add_argument_group(title), cls, exclude=exclude, required=("data", "out"))
    p.add_argument("--spread", dest="strategy", action="store_const", const="STRICT_SPREAD", default=argparse.SUPPRESS,
                   help="one actor per node: shorthand for --strategy STRICT_SPREAD")
    p.add_argument("--dry-run", action="store_true",
                   help="check the data, exemplars, model and settings, print the plan (nodes and GPUs seen, "
                        "actors, GPUs and CPUs each, batch budget, shards) and exit: no Ray starts, nothing is written")
    p.set_defaults(func=cmd_probe)


def configs_from_args(args) -> tuple[RunConfig, ProbeConfig, Placement]:
    return tuple(cfglib.from_dict(cls, cfglib.given_arguments(args, cls), source="gradual probe")
                 for cls, _, _ in SECTIONS)


def cmd_probe(args) -> int:
    from .runner import dry_run, run_probe

    run, probe, placement = configs_from_args(args)
    if args.dry_run:
        print("\n".join(dry_run(run, probe, placement)))
        print(f"probe ok (data, exemplars, model and placement checked); it would write to {run.out}")
        return 0
    summary = run_probe(run, probe, placement)  # an ActorGroupError ends in one line, exit 1 (toolkit.cli)
    print(f"probed {summary['items']} items ({summary['total_answers']} answers) in {summary['wall_s']:.1f}s; "
          f"{summary['questions_per_s']:.2f} q/s, {summary['answers_per_s']:.1f} answers/s")
    print(json.dumps(summary["counts"], sort_keys=True))
    print(f"wrote {run.out}/categories.jsonl and {run.out}/summary.json")
    return 0
