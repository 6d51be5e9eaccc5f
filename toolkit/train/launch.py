"""`gradual train`: validate the run here (one clear error, exit 2, nothing launched), then start the
`deepspeed` launcher: `--num_accelerators N` on CPU, `--num_gpus N` on GPU, `--hostfile` for several
nodes (pdsh by default; `--node-rank` for one launch per node without ssh). The resolved command is
printed before it runs."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .__main__ import add_run_arguments, config_from_args
from .config import TrainConfigError

MULTI_NODE_PORT = 29500  # torch.distributed's usual default, the same on every node


def deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"  # the venv's launcher, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise TrainConfigError("the `deepspeed` launcher is not installed (pip install deepspeed)")
    return found


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="full-parameter SFT with DeepSpeed ZeRO (starts the deepspeed launcher)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    g = p.add_argument_group("launcher")
    g.add_argument("--num-gpus", type=int, help="GPUs per node (default: all visible)")
    g.add_argument("--num-accelerators", type=int,
                   help="CPU ranks per node when there is no GPU (default 1; DeepSpeed's own default is the "
                        "number of NUMA nodes)")
    g.add_argument("--hostfile", help="DeepSpeed hostfile ('<host> slots=<n>' lines) for multi-node runs")
    g.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    g.add_argument("--master-addr", help="address of node 0 (required with --node-rank)")
    g.add_argument("--master-port", type=int,
                   help="rendezvous port (default: a free port on one node; 29500 with --hostfile, "
                        "where every node must name the same one)")
    g.add_argument("--node-rank", type=int, help="launch only this node's ranks, without ssh (run once per node)")
    g.add_argument("--launcher", default="pdsh", help="multi-node backend: pdsh (default), openmpi, slurm, ...")
    g.add_argument("--print-only", action="store_true", help="print the resolved command and exit")
    p.set_defaults(func=cmd_train)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_command(args, on_gpu: bool) -> tuple[list[str], int, dict | None]:
    """(deepspeed command, world size, hostfile hosts)."""
    from .dsconfig import read_hostfile, world_size_for
    from .strategy import free_port

    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    if args.node_rank is not None:
        if not hosts:
            raise TrainConfigError("--node-rank needs --hostfile (every node must see the same host list)")
        if not args.master_addr:
            raise TrainConfigError("--node-rank needs --master-addr (the address of node 0)")
        nodes = min(args.num_nodes or len(hosts), len(hosts))
        if not 0 <= args.node_rank < nodes:
            raise TrainConfigError(f"--node-rank {args.node_rank} is outside 0..{nodes - 1}")
    if on_gpu and args.num_accelerators:
        raise TrainConfigError("--num-accelerators is for CPU runs; use --num-gpus on a GPU machine")
    per_node = args.num_gpus if on_gpu else (args.num_accelerators or (None if hosts else 1))
    if not on_gpu and args.num_gpus:
        raise TrainConfigError("no GPU here: use --num-accelerators for CPU ranks")
    if per_node is None and on_gpu and not hosts:
        import torch

        per_node = torch.cuda.device_count()
    world = world_size_for(hosts, per_node, args.num_nodes)
    cmd = [deepspeed_executable()]
    if per_node is not None:
        cmd += ["--num_gpus" if on_gpu else "--num_accelerators", str(per_node)]
    if hosts:
        cmd += ["--hostfile", str(Path(args.hostfile).resolve())]
        if args.num_nodes:
            cmd += ["--num_nodes", str(args.num_nodes)]
        if args.launcher != "pdsh":
            cmd += ["--launcher", args.launcher]
        if args.node_rank is not None:
            cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    # a fixed single-node default collides when two runs share a machine (the pipeline's stages, tests)
    port = args.master_port or (MULTI_NODE_PORT if hosts else free_port())
    cmd += ["--master_port", str(port), "--module", "toolkit.train"]
    if args.config:
        cmd += ["--config", str(Path(args.config).resolve())]
    for pair in args.overrides:
        cmd += ["--set", pair]
    if args.ds_config:
        cmd += ["--ds-config", args.ds_config]
    if args.resume is not None:
        cmd += ["--resume"] + ([] if args.resume is True else [str(args.resume)])
    return cmd, world, hosts


def cmd_train(args) -> int:
    from .plan import describe, prepare

    # a GPU cluster may be launched from a node without GPUs: --num-gpus with a hostfile says so
    on_gpu = _on_gpu() or bool(args.num_gpus and args.hostfile)
    cmd, world, hosts = build_command(args, on_gpu)
    plan = prepare(config_from_args(args), world, on_gpu=on_gpu, hosts=hosts)  # raises before any launch
    if args.dry_run:
        print(describe(plan))
        print(f"== launch command\n{shlex.join(cmd)}")
        return 0
    print(f"[gradual train] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if args.print_only:
        return 0
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"))
    return subprocess.call(cmd, env=env)
