"""`python -m toolkit.train`: the per-rank entry point that the `deepspeed` launcher starts
(`deepspeed --num_gpus 8 --module toolkit.train --config train.yaml --set lr=1e-5`).

Every rank validates everything (config, ds_config, batch arithmetic, data, resume directory) before
deepspeed.init_distributed, so bad input ends every rank with exit code 2 and one error line (from
rank 0) instead of a hang in the first collective."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from toolkit.config import add_arguments, given_arguments
from toolkit.exit_codes import EXIT_BAD_INPUT

from .config import TrainConfig


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by `python -m toolkit.train` and `gradual train`: a YAML file, `--set`
    overrides, and one flag per training config key (they win over both)."""
    parser.add_argument("--config", help="training config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config key (repeatable)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="validate, print the resolved setup, a tokenised example and the memory estimate; exit")
    add_arguments(parser.add_argument_group("training config (each key also as --set KEY=VALUE or in the YAML)"),
                  TrainConfig, underscore_aliases=True)


def config_from_args(args) -> TrainConfig:
    from .config import load_config

    return load_config(args.config, args.overrides, given_arguments(args, TrainConfig))


def user_errors() -> tuple[type[Exception], ...]:
    from toolkit.config import ConfigError
    from toolkit.data.schema import DataError
    from toolkit.models import ModelError

    return (ConfigError, DataError, ModelError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to plan for in a dry run outside the launcher (default: $WORLD_SIZE or 1)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    try:
        from .plan import describe, prepare

        plan = prepare(config_from_args(args), world_size)
        if args.dry_run:
            if rank == 0:
                print(describe(plan))
            return 0
    except user_errors() as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .devices import DeviceBusyError, wait_for_this_ranks_gpu

    try:  # the GPU this rank is given must be free (a probe's actors exit asynchronously)
        wait_for_this_ranks_gpu(plan.cfg.gpu_wait_s, plan.cfg.gpu_busy_mib, log=logging.getLogger("toolkit.train").warning)
    except DeviceBusyError as err:  # any rank: its own GPU
        print(f"error: rank {rank}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from .loop import train

    train(plan)
    return 0


def leave(code: int) -> None:
    """End the rank. After a finished run (every output written and closed, the process group destroyed)
    leave without the interpreter's teardown: a rank once aborted there in CI after a finished ZeRO-3
    CPU launch ("terminate called without an active exception": a library's C++ thread still joinable
    at static destruction; not reproduced in 4 reruns), and the launcher then reported the finished
    run as failed."""
    if code != 0:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    leave(main())
