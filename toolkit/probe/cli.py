"""`gradual probe`: argparse wiring for the SliCK probe driver."""
from __future__ import annotations

import json
import sys

from .slick import ENGINES, ProbeConfig


def add_probe_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="SliCK knowledge probe on Ray actors: categories per QA item")
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file, hub id or random:<shape> (default: the embedded SmolLM2)")
    p.add_argument("--data", required=True, help="QA file or directory (see `gradual data validate`)")
    p.add_argument("--split", default="train", help="split to probe (default train)")
    p.add_argument("--out", required=True, help="output directory (re-running resumes it)")
    p.add_argument("--exemplar-split", default="dev", help="split the few-shot exemplars come from (default dev)")
    p.add_argument("--exemplar-data", default=None, help="dataset for exemplars (default: --data)")
    d = ProbeConfig()
    p.add_argument("--num-exemplar-sets", type=int, default=d.num_exemplar_sets, help="N_ex prompts per item")
    p.add_argument("--shots", type=int, default=d.shots, help="k exemplars per prompt")
    p.add_argument("--samples", type=int, default=d.samples, help="n sampled answers per prompt")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--engine", choices=ENGINES, default=d.engine)
    p.add_argument("--keep-samples", action="store_true", help="store every sampled answer in the rows")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas (Ray actors)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--spread", action="store_true", help="one actor per node (STRICT_SPREAD placement)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of the shard plan")
    p.add_argument("--shard-size", type=int, default=32, help="items per shard (fixes the plan)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    from .pool import ActorGroupError
    from .runner import RunConfig, run_probe

    try:
        probe = ProbeConfig(num_exemplar_sets=args.num_exemplar_sets, shots=args.shots, samples=args.samples,
                            temperature=args.temperature, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, keep_samples=args.keep_samples, engine=args.engine)
        run = RunConfig(data=str(args.data), out=str(args.out), model=args.model, split=args.split,
                        exemplar_split=args.exemplar_split, exemplar_data=args.exemplar_data,
                        shard_size=args.shard_size, limit=args.limit, num_actors=args.num_actors,
                        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                        strategy="STRICT_SPREAD" if args.spread else "PACK", ray_address=args.ray_address,
                        progress=not args.no_progress)
        summary = run_probe(run, probe)
    except ActorGroupError as err:  # a runtime failure (placement, repeated deaths): one line, exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"probed {summary['items']} items ({summary['total_answers']} answers) in {summary['wall_s']:.1f}s; "
          f"{summary['questions_per_s']:.2f} q/s, {summary['answers_per_s']:.1f} answers/s")
    print(json.dumps(summary["counts"], sort_keys=True))
    print(f"wrote {args.out}/categories.jsonl and {args.out}/summary.json")
    return 0
