"""`gradual run` (the whole schedule) and `gradual report` (re-render a run's report)."""
from __future__ import annotations

import json
from pathlib import Path


def add_run_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="the two-stage Gradual Learning schedule end to end (the main job)",
        description="Probe the base model, train stage 1 on partially known facts, re-probe, train stage 2 on "
                    "upgraded facts with replay, re-probe, evaluate M0/M1/M2 (and baselines) on test, write "
                    "metrics.json and a report. Every step is skipped on re-run once complete. With no "
                    "arguments: the 'default' preset (real SmolLM2-135M, built-in real-facts benchmark, CPU).")
    p.add_argument("config", nargs="?", type=Path, help="pipeline config (YAML); default: the chosen preset")
    p.add_argument("--preset", help="start from a preset: default (CPU, minutes) or paper (GPU cluster)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set probe.samples=8 --set train.options.lr=1e-5 "
                        "--set probe.placement.num_actors=4")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<preset>)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2; on a finished run: seeds to add (the "
                                   "run's own are kept and not redone)")
    p.add_argument("--baselines", help="'all' or a comma-separated list: natural, known_only, one_stage_longer, "
                                       "random_stage2 (controls), no_replay, upgraded_only, remained_maybe")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and exit")
    p.set_defaults(func=cmd_run)


def add_report_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="recompute RUN_DIR/metrics.json from its per-item files and render "
                                             "RUN_DIR/report (HTML + Markdown); or a training output's curves.png",
                              description="A `gradual run` directory: metrics.json is recomputed from each seed's "
                                          "items.jsonl.gz and stages.json (where they exist), then the report is "
                                          "rendered. --merge combines runs of the same settings and other seeds.")
    p.add_argument("run_dir", type=Path, nargs="?", help="a `gradual run` directory, or a `gradual train` output_dir")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RUN_DIR",
                   help="runs with identical settings and different seeds, combined into --out")
    p.add_argument("--out", type=Path, help="with --merge: the new run directory (must not exist or be empty)")
    p.add_argument("--compare", metavar="DIR", help="only compare RUN_DIR's headline numbers with a committed "
                   "result's, in one line; '{dtype}' in DIR becomes the dtype the run's probes resolved "
                   "(make demo: 'benchmarks/results/demo-cpu-{dtype}'). Nothing is rewritten")
    p.add_argument("--readme-table", action="store_true",
                   help="only print the README's demo table (Markdown) from RUN_DIR/metrics.json")
    p.set_defaults(func=cmd_report)


def _resolve(args):
    from .config import load_pipeline_config

    overrides = list(args.overrides)
    if args.seeds:
        overrides.append(f"seeds={args.seeds}")
    if args.baselines:
        overrides.append(f"baselines={args.baselines}")
    return load_pipeline_config(args.config, overrides, preset=args.preset)


def _difference(d: dict) -> str:
    from toolkit.report.format import pct, significant

    verdict = significant(d)
    if verdict is None:
        return f"{pct(d['difference'], True)} (no interval)"
    return (f"{pct(d['difference'], True)} [{pct(d['low'], True)}, {pct(d['high'], True)}] "
            f"({'significant' if verdict else 'not significant'})")


def headline(metrics: dict) -> list[str]:
    from toolkit.report.format import pct

    lines = []
    for seed, m in metrics["seeds"].items():
        acc = m["test_accuracy"]
        k, f = m["knowledge_acquired"]["M2"], m["forgetting"]["M2"]
        lines.append(f"seed {seed}: test accuracy " + ", ".join(
            f"{name} {pct(a['overall']['accuracy'])}" for name, a in acc.items()))
        lines.append(f"  HighlyKnown train items: {k['highly_known_M0']} base -> {k['highly_known_M1']} after stage 1 "
                     f"-> {k['highly_known']} after stage 2 (acquired gain {pct(k['acquired_gain'], True)}, "
                     f"retained ratio {pct(k['retained_ratio'], True)})")
        lines.append(f"  forgetting: {f['dropped']} of {f['base_highly_known']} base HighlyKnown items dropped")
        lines.append(f"  two stages vs one on test: {_difference(m['comparisons']['M2 vs M1 (two stages vs one)'])}")
        for name, d in m.get("item_comparisons", {}).items():
            if name != "M2 vs M1":
                lines.append(f"  HighlyKnown train items, {name}: {_difference(d)}")
    return lines


def cmd_run(args) -> int:
    from toolkit import config as cfglib

    from .pipeline import Pipeline
    from .preflight import preflight

    cfg = _resolve(args)
    out = args.out or Path("runs") / cfg.preset
    if args.dry_run:
        checks = preflight(cfg, check_devices=False, describe_probe=True)
        print(json.dumps(cfglib.to_dict(cfg), indent=2))
        print("\n".join(checks["probe_plan"]))
        print(f"training launch: {checks['train_batch']}")
        print("\n".join(checks["train_devices"] + checks["train_memory"]))
        print(f"training disk: {checks['train_disk_line']}")
        print(f"config ok (data, model and training launch checked: {checks['train_world_size']} training "
              f"rank(s)); the run would write to {out}")
        return 0
    metrics = Pipeline(cfg, out).run()
    print("\n".join(headline(metrics)))
    run_info = metrics.get("run", {})
    print(f"probed in {run_info.get('probe dtype', 'an unrecorded dtype')} on {run_info.get('device', 'an unrecorded device')}")
    print(f"report: {out / 'report' / 'report.html'} (and report.md); metrics: {out / 'metrics.json'}")
    return 0


def cmd_report(args) -> int:
    from toolkit.cli import UsageError
    from toolkit.io import write_json
    from toolkit.report.collect import recollect, run_seeds
    from toolkit.report.render import render_report, render_training

    if args.merge:
        from .merge import merge_runs

        if args.out is None or args.run_dir is not None:
            raise UsageError("--merge RUN_DIR ... needs --out DIR (and no positional run_dir)")
        metrics = merge_runs(args.merge, args.out)
        args.run_dir = args.out
        print(f"merged seeds {', '.join(metrics['seeds'])} into {args.out}")
    elif args.run_dir is None:
        raise UsageError("give a run directory, or --merge RUN_DIR ... --out DIR")
    elif args.compare or args.readme_table:  # read-only: the run directory is left as it is
        from toolkit.report import reproduce

        if args.compare:
            print(reproduce.compare_line(args.run_dir, args.compare))
        if args.readme_table:
            print(reproduce.readme_table(reproduce.read_metrics(args.run_dir), args.run_dir.as_posix()))
        return 0
    elif run_seeds(args.run_dir):  # the per-item files: metrics.json is recomputed from them
        write_json(args.run_dir / "metrics.json", recollect(args.run_dir), strict=True)
    if (args.run_dir / "losses.jsonl").exists() and not (args.run_dir / "metrics.json").exists():
        summary = render_training(args.run_dir)
        print(f"training curves: {summary['figure']}; best dev accuracy {summary['best_dev_accuracy']} "
              f"at step {summary['best_step']} of {summary['steps']}")
        return 0
    paths = render_report(args.run_dir)
    print(f"report: {paths['html']} and {paths['markdown']} ({len(paths['figures'])} figures)")
    return 0
