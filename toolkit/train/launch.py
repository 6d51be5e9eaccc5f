"""`gradual train`: validate the run here (one clear error, exit 2, nothing launched: the model states
must fit the GPUs too), then start the `deepspeed` launcher: `--num_accelerators N` on CPU; on GPU
`--include localhost:<ids>` for the GPUs CUDA_VISIBLE_DEVICES names (the first N of them with
--num-gpus N), else `--num_gpus N`; `--hostfile` for several nodes (pdsh by default; `--node-rank` for
one launch per node without ssh), where each node's ranks get its first `slots` GPUs. The resolved
command is printed before it runs."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from toolkit.config import add_arguments, from_dict, given_arguments, knob, require, to_dict
from toolkit.io import write_text

from .__main__ import add_run_arguments, config_from_args
from .config import REPO_ROOT, TrainConfig, TrainConfigError, replace
from .dsconfig import AUTO
from .devices import NodeGpus, describe_devices, launch_gpu_ids, mask_names_uuids, this_node
from .memory import GIB, check_fit, describe_memory, states_for

MULTI_NODE_PORT = 29500  # torch.distributed's usual default, the same on every node
RESOLVED_CONFIG = "train_config.yaml"  # written into output_dir; the ranks read it


@dataclass(frozen=True)
class LaunchConfig:
    """How the `deepspeed` launcher starts the ranks (not what they compute)."""

    num_gpus: Optional[int] = knob(None, "GPUs per node (default: all visible)")
    num_accelerators: Optional[int] = knob(
        None, "CPU ranks per node when there is no GPU (default 1; DeepSpeed's own default is the number of NUMA nodes)")
    hostfile: Optional[str] = knob(None, "DeepSpeed hostfile ('<host> slots=<n>' lines) for multi-node runs")
    num_nodes: Optional[int] = knob(None, "use the first N hosts of the hostfile")
    master_addr: Optional[str] = knob(None, "address of node 0 (required with --node-rank)")
    master_port: Optional[int] = knob(None, "rendezvous port (default: a free port on one node; 29500 with a "
                                            "hostfile, where every node must name the same one)")
    node_rank: Optional[int] = knob(None, "launch only this node's ranks, without ssh (run once per node)")
    launcher: str = knob("pdsh", "multi-node backend: pdsh, openmpi, slurm, ...")
    gpu_memory_gib: Optional[float] = knob(
        None, "memory of each GPU in GiB, for the dry run's fit check on a machine without the GPUs "
              "(default: measured)")
    host_memory_gib: Optional[float] = knob(
        None, "host memory of each node in GiB: offloaded model states beyond it are refused, and a way out "
              "that would need more is not proposed (default: not checked)")

    def __post_init__(self):
        for name in ("num_gpus", "num_accelerators", "num_nodes", "master_port"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1")
        for name in ("gpu_memory_gib", "host_memory_gib"):
            value = getattr(self, name)
            require(value is None or value > 0, name, value, "must be > 0")

    def on_gpu(self) -> bool:
        """GPU ranks: this machine has a GPU, or GPUs are stated (--num-gpus): a dry run plans them
        on any machine (a cluster's login node), a launch needs them (`check_launchable`)."""
        import torch

        return torch.cuda.is_available() or bool(self.num_gpus)


def check_launchable(launch: LaunchConfig, gpus_here: int | None = None) -> None:
    """What only a real launch needs: the GPUs it asks for on this machine (a hostfile's nodes are
    checked by their own ranks). A dry run plans without them."""
    if launch.num_gpus is None or launch.hostfile:
        return
    mask = ""
    if gpus_here is None:
        import torch

        gpus_here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            mask = f" visible (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
    if gpus_here == 0:
        raise TrainConfigError(f"num_gpus={launch.num_gpus}: this machine has no GPU{mask}; a dry run plans it "
                               "(--dry-run), a launch needs the GPUs (or a hostfile naming GPU nodes; "
                               "num_accelerators for CPU ranks)")
    if launch.num_gpus > gpus_here:
        raise TrainConfigError(f"num_gpus={launch.num_gpus}: this machine has {gpus_here} GPU(s){mask}")


def deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"  # the venv's launcher, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise TrainConfigError("the `deepspeed` launcher is not installed (pip install deepspeed)")
    return found


def launch_env(launch: LaunchConfig | None = None, out_dir: Path | None = None) -> dict[str, str]:
    """The launcher's environment: JIT-built DeepSpeed ops are cached in the project, not rebuilt, and
    the venv's bin/ is on PATH (its ninja, which DeepSpeed's JIT builds run). A multi-node launch from
    one command (hostfile, no node_rank) also gets <out_dir>/deepspeed_env, the variables the remote
    ranks need (toolkit.train.envfile), named by DS_ENV_FILE."""
    from .envfile import write_env_file
    from .ops import with_venv_path

    env = with_venv_path(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    if launch is not None and not launch.hostfile and mask_names_uuids(env.get("CUDA_VISIBLE_DEVICES")):
        # the --include indices came from nvidia-smi, which numbers GPUs in PCI bus order; CUDA's
        # default order (fastest first) may differ on a node of mixed GPUs
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if launch is not None and launch.hostfile and launch.node_rank is None and out_dir is not None:
        env["DS_ENV_FILE"] = write_env_file(Path(out_dir) / "deepspeed_env", env)["path"]
    return env


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="full-parameter SFT with DeepSpeed ZeRO (starts the deepspeed launcher)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    g = p.add_argument_group("launcher")
    add_arguments(g, LaunchConfig)
    g.add_argument("--print-only", action="store_true", help="write the resolved config, print the command and exit")
    p.set_defaults(func=cmd_train)


def launch_from_args(args) -> LaunchConfig:
    return from_dict(LaunchConfig, given_arguments(args, LaunchConfig), source="gradual train")


class LaunchTarget(NamedTuple):
    cmd: list[str]  # the deepspeed command
    world: int
    hosts: dict | None  # the hostfile's hosts and slots
    devices: dict[str, list[int]]  # per node: the GPU indices (CPU runs: rank slots) its ranks get


def build_command(launch: LaunchConfig, config_path: Path, on_gpu: bool, node: NodeGpus = NodeGpus()) -> LaunchTarget:
    """The deepspeed command for ranks that read `config_path`, and where they run. `node`: this
    node's GPUs (`devices.this_node()`; for a single-node GPU launch).

    On one node the command names the GPUs itself. DeepSpeed 0.19's runner (launcher/runner.py
    main(), lines 448-460) reads CUDA_VISIBLE_DEVICES only when no hostfile is given, ignores it
    ("ignoring it because ... --num_gpus ... cl args were used") whenever --include, --exclude,
    --num_gpus or --num_nodes is passed, and deletes it from the environment either way; the ranks
    then get GPUs 0..N-1 of the node (lines 385-406, apply_num_nodes_and_gpus: `list(range(num_gpus))`).
    So a mask of 4,5,6,7 with --num_gpus 4 trained on GPUs 0-3. `--include localhost:4,5,6,7` (never
    beside --num_gpus: lines 462-464 raise) makes its launch.py give every rank
    CUDA_VISIBLE_DEVICES=4,5,6,7 (and LOCAL_RANK) instead; the runner still prints that it ignores
    the mask, which it no longer needs. It checks the ids against the node's GPU count taken after it
    deleted the mask (torch.cuda.device_count asks NVML, which reads the environment at each call;
    were NVML to fail, the CUDA runtime's masked count would refuse ids beyond it).

    With a hostfile, the hostfile decides: each node's ranks get its first `slots` GPUs (or the first
    num_gpus) and a local mask is ignored. Other GPUs of a host are DeepSpeed's `--include
    host1:4,5,6,7@host2:4,5,6,7` with the deepspeed launcher itself (see launchers/README.md)."""
    from .dsconfig import read_hostfile, world_size_for
    from .strategy import free_port

    hosts = read_hostfile(launch.hostfile) if launch.hostfile else None
    if launch.node_rank is not None:
        if not hosts:
            raise TrainConfigError("--node-rank needs --hostfile (every node must see the same host list)")
        if not launch.master_addr:
            raise TrainConfigError("--node-rank needs --master-addr (the address of node 0)")
        nodes = min(launch.num_nodes or len(hosts), len(hosts))
        if not 0 <= launch.node_rank < nodes:
            raise TrainConfigError(f"--node-rank {launch.node_rank} is outside 0..{nodes - 1}")
    if on_gpu and launch.num_accelerators:
        raise TrainConfigError("--num-accelerators is for CPU runs; use --num-gpus on a GPU machine")
    cmd = [deepspeed_executable()]
    gpu_ids = launch_gpu_ids(node, launch.num_gpus) if on_gpu and not hosts else None
    if gpu_ids is not None:
        world, devices = len(gpu_ids), {"localhost": gpu_ids}
        cmd += ["--include", f"localhost:{','.join(map(str, gpu_ids))}"]
    else:
        per_node = launch.num_gpus if on_gpu else (launch.num_accelerators or (None if hosts else 1))
        if per_node is None and on_gpu and not hosts:
            per_node = node.count
        world = world_size_for(hosts, per_node, launch.num_nodes)
        slots = list(hosts.items())[: launch.num_nodes or len(hosts)] if hosts else [("localhost", world)]
        devices = {host: list(range(min(n, per_node) if per_node else n)) for host, n in slots}
        if per_node is not None:
            cmd += ["--num_gpus" if on_gpu else "--num_accelerators", str(per_node)]
    if hosts:
        cmd += ["--hostfile", str(Path(launch.hostfile).resolve())]
        if launch.num_nodes:
            cmd += ["--num_nodes", str(launch.num_nodes)]
        if launch.launcher != "pdsh":
            cmd += ["--launcher", launch.launcher]
        if launch.node_rank is not None:
            cmd += ["--no_ssh", "--node_rank", str(launch.node_rank)]
    if launch.master_addr:
        cmd += ["--master_addr", launch.master_addr]
    # a fixed single-node default collides when two runs share a machine (the pipeline's stages, tests)
    port = launch.master_port or (MULTI_NODE_PORT if hosts else free_port())
    cmd += ["--master_port", str(port), "--module", "toolkit.train", "--config", str(Path(config_path).resolve())]
    return LaunchTarget(cmd, world, hosts, devices)


def gpu_memory(launch: LaunchConfig, node: NodeGpus, ranks_here: int) -> tuple[int | None, str]:
    """(bytes of each GPU, where the figure came from): gpu_memory_gib when given, else the
    smallest of the GPUs this node's ranks use (torch numbers them in mask order), else unknown."""
    if launch.gpu_memory_gib:
        return int(launch.gpu_memory_gib * GIB), "gpu_memory_gib"
    if node.memory_bytes:
        return min(node.memory_bytes[: ranks_here or None]), "measured on this node"
    return None, ""


def launch_gpu_memory(launch: LaunchConfig, node: NodeGpus, target: LaunchTarget,
                      on_gpu: bool) -> tuple[int | None, str, int]:
    """(bytes of each GPU or None, where the figure came from, ranks per node) of this launch."""
    from .plan import ranks_per_node

    ranks_here = ranks_per_node(target.devices, target.world)
    return (*(gpu_memory(launch, node, ranks_here) if on_gpu else (None, "")), ranks_here)


def fit_check(cfg: TrainConfig, ds: dict, target: LaunchTarget, launch: LaunchConfig, node: NodeGpus, on_gpu: bool,
              model: str, stage_line: str | None = None) -> list[str]:
    """Refuse (TrainConfigError, one line) model states that cannot fit the GPUs (or the stated host
    memory); the memory lines (`stage_line`: how zero_stage=auto was decided)."""
    from .plan import model_size

    size = model_size(model)
    states = states_for(size.params, size.largest_param, ds, cfg.optimizer, target.world, size.largest_layer)
    gpu_bytes, source, ranks_here = launch_gpu_memory(launch, node, target, on_gpu)
    host_bytes = launch.host_memory_gib * GIB if launch.host_memory_gib else None
    if on_gpu:
        check_fit(states, gpu_bytes, ranks_here, host_bytes)
    return describe_memory(states, gpu_bytes, source, on_gpu, ranks_here, host_bytes, stage_line)


def plan_launch(cfg: TrainConfig, launch: LaunchConfig, dry_run: bool = False, node: NodeGpus | None = None):
    """Every check of a launch, nothing written: (deepspeed command, RunPlan). A dry run plans the
    stated GPUs on a machine without them. `node`: this machine's GPUs (default: read them).
    zero_stage=auto is decided here, for the launch's GPUs: plan.cfg.zero_stage."""
    from .plan import prepare

    if not dry_run:
        check_launchable(launch)
    on_gpu = launch.on_gpu()
    node = node or (this_node() if on_gpu else NodeGpus())
    target = build_command(launch, cfg.out / RESOLVED_CONFIG, on_gpu, node)
    gpu_bytes, _, ranks_here = launch_gpu_memory(launch, node, target, on_gpu)
    # raises before any launch; bf16 decided as the ranks decide it (plan.training_bf16)
    plan = prepare(cfg, target.world, on_gpu=on_gpu, hosts=target.hosts, gpu_bf16=node.bf16, gpu_bytes=gpu_bytes,
                   node_ranks=ranks_here)
    if on_gpu and node.bf16 is None and cfg.bf16 == "auto":
        plan.notes.append("bf16 assumed: the GPUs are not on this machine; ranks on GPUs without bf16 (before "
                          "Ampere) train in fp32")
    plan.devices = target.devices
    plan.memory_lines = fit_check(plan.cfg, plan.ds_config, target, launch, node, on_gpu, plan.cfg.model,
                                  plan.zero_stage_line)
    return target.cmd, plan


def check_training(cfg: TrainConfig, launch: LaunchConfig, launching: bool = True, model: str | None = None,
                   node: NodeGpus | None = None) -> dict:
    """The checks of a launch that need no data (hostfile, world size, ds_config, batch arithmetic,
    DeepSpeed's own parser, the fit of the model states when the model is known: `model` or
    cfg.model, and for a real launch the GPUs), for a caller that checks before its first step.
    Returns what was planned: world size, batch arithmetic, precision, the lines of the devices and of
    the memory plan. `node`: this machine's GPUs (default: read them)."""
    from .dsconfig import derived_batch_note, load_ds_config, resolve
    from .plan import model_size, settle_zero_stage, training_bf16

    if launching:
        check_launchable(launch)
    on_gpu = launch.on_gpu()
    node = node or (this_node() if on_gpu else NodeGpus())
    target = build_command(launch, Path(RESOLVED_CONFIG), on_gpu, node)
    world = target.world
    model = model or cfg.model
    gpu_bytes, _, ranks_here = launch_gpu_memory(launch, node, target, on_gpu)
    ds_path = cfg.ds_config_path()
    raw = load_ds_config(ds_path)
    cfg = replace(cfg, bf16=training_bf16(cfg.bf16, on_gpu, node.bf16))  # as the ranks decide it
    cfg, stage_line = settle_zero_stage(cfg, raw, world, on_gpu, gpu_bytes, str(ds_path), model, ranks_here)
    # ZeRO-3's "auto" bucket sizes come from the model's hidden size (the pipeline's model, not cfg.model)
    resolved, ds = resolve(cfg, raw, world, on_gpu, str(ds_path),
                           hidden_size=model_size(model).hidden if model else None)
    note = derived_batch_note(cfg, world, raw)
    memory = fit_check(resolved, ds, target, launch, node, on_gpu, model, stage_line) if model else []
    return {"world_size": world, "on_gpu": on_gpu, "bf16": ds["bf16"]["enabled"], "config": resolved,
            "ds_config": ds, "devices": describe_devices(target.devices, on_gpu), "memory": memory,
            "batch": f"train_batch_size {ds['train_batch_size']} = micro_batch_size "
                     f"{ds['train_micro_batch_size_per_gpu']} x gradient_accumulation_steps "
                     f"{ds['gradient_accumulation_steps']} x world size {world}" + (f" ({note})" if note else "")}


def write_resolved_config(cfg: TrainConfig, chosen_stage: int | None = None) -> Path:
    """The keys the user (or the pipeline) set, merged from YAML, --set and flags: what every rank
    loads. Keys left out keep their defaults, so explicit ds_config values can still fill them.
    zero_stage=auto is written as `chosen_stage`, the launch's decision, so every rank runs it."""
    if cfg.zero_stage == AUTO and chosen_stage is not None:
        cfg = replace(cfg, zero_stage=chosen_stage)
    path = cfg.out / RESOLVED_CONFIG
    write_text(path, yaml.safe_dump(to_dict(cfg, given_only=True), sort_keys=True))
    return path


def cmd_train(args) -> int:
    from .plan import describe

    cfg = config_from_args(args)
    launch = launch_from_args(args)
    cmd, plan = plan_launch(cfg, launch, dry_run=args.dry_run or args.print_only)
    if args.dry_run:
        print(describe(plan))
        print(f"== launch command\n{shlex.join(cmd)}")
        return 0
    write_resolved_config(cfg, plan.cfg.zero_stage)
    env = launch_env(launch, cfg.out)
    shown = f"DS_ENV_FILE={env['DS_ENV_FILE']} " if "DS_ENV_FILE" in env else ""
    print(f"[gradual train] {shown}{shlex.join(cmd)}", file=sys.stderr, flush=True)
    if args.print_only:
        return 0
    return subprocess.call(cmd, env=env)
