"""The one object around DeepSpeed (OpenRLHF's "strategy"): process group, optimizer + schedule +
deepspeed.initialize, backward/step, checkpoints with client state and rotation, the HF export."""
from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
from pathlib import Path

from toolkit.io import write_json, write_text

from .config import TrainConfig
from .plan import STATE_FILE

log = logging.getLogger("toolkit.train")
TAG_RE = re.compile(r"^step(\d+)$")


def checkpoint_tag(step: int) -> str:
    """The DeepSpeed checkpoint tag of an optimizer step (TAG_RE reads it back)."""
    return f"step{step:06d}"


def free_port() -> int:
    """A TCP port free on this machine now, for a master port nobody chose."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    """Multiplier of the peak lr at optimizer step `s`: linear warm-up from lr/warmup, then
    linear decay towards 0, a cosine, or constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


def set_collective_timeout(minutes: int):
    """The timeout of every process group of this process: the default one (returned, for
    init_distributed's public timeout argument) and those created later without a timeout of their
    own, which torch would give its backend default (NCCL: 10 min), as DeepSpeed's copy of the world
    group, used by ZeRO, is (DeepSpeed 0.19 passes no timeout to new_group; the adapter says why)."""
    from datetime import timedelta

    from toolkit.adapters.torch_internals import set_default_group_timeout

    timeout = timedelta(minutes=minutes)
    set_default_group_timeout(timeout)
    return timeout


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def full_shape(param):
    """A parameter's shape; under ZeRO-3 the tensor is an empty placeholder and DeepSpeed keeps the
    shape in `ds_shape` (the attribute its own GatheredParameters docs and HF's integration read)."""
    return tuple(getattr(param, "ds_shape", param.shape))


class DeepSpeedStrategy:
    def __init__(self, cfg: TrainConfig, ds_config: dict):
        self.cfg, self.ds_config = cfg, ds_config
        self._own_grad_norm: float | None = None  # ZeRO-0 in fp32 clips but does not keep the norm
        self.engine = None
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self._hf_zero3 = None  # transformers' handle on the ZeRO-3 config, alive while the model is

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: every weight is split across the ranks; a forward pass gathers each layer's weights
        from all of them, so every rank must run the same forward passes (evaluation, the export)."""
        return int(self.ds_config["zero_optimization"]["stage"]) == 3

    def partition_on_load(self) -> None:
        """Before the model is built under ZeRO-3: transformers' from_pretrained / from_config then
        build it inside deepspeed.zero.Init and load each checkpoint tensor straight into the ranks'
        partitions, so no rank ever holds the whole model. transformers finds the config through a
        weak reference, so this object keeps it alive."""
        if self.partitioned:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_zero3 = HfDeepSpeedConfig(self.ds_config)

    # ------------------------------------------------------------ process group

    def setup_distributed(self) -> None:
        import deepspeed
        import torch

        for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, default)  # plain `python -m toolkit.train`: a world of one
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        timeout = set_collective_timeout(self.cfg.collective_timeout_min)
        deepspeed.init_distributed(timeout=timeout)  # nccl on GPU; gloo (+ the shm_comm op) on CPU
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            self._unlink_shm_buffer()
        set_seed(self.cfg.seed)

    def _unlink_shm_buffer(self) -> None:
        """DeepSpeed's CPU all-reduce maps one /dev/shm buffer per rank and never unlinks it: every
        launch would leave ~70 MB per rank in memory until reboot (a killed one too). Once every rank
        has mapped its peers' buffers (init_distributed, then a barrier) the names are not needed."""
        import torch.distributed as dist

        dist.barrier()
        env = os.environ
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{self.rank}"
        try:
            os.unlink(Path("/dev/shm") / name)
        except FileNotFoundError:  # no shm_comm op on this build, or not Linux
            pass

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_reduce_sum(self, value):
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def peak_memory(self) -> dict:
        """Every rank's peak memory since the last call (all ranks call it): CUDA's max allocated
        bytes, reset for the next phase; on CPU the process's peak RSS (never reset)."""
        import resource

        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            mine, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            mine, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
        every: list = [None] * self.world_size
        dist.all_gather_object(every, mine)
        return {"kind": kind, "bytes_per_rank": every}

    def destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ model, optimizer, schedule

    def _param_groups(self, model) -> list[dict]:
        """No weight decay on biases and norm weights (1-D tensors)."""
        decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
        rest = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
        return [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def build_optimizer(self, groups):
        cfg = self.cfg
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        if cfg.optimizer == "adamw":
            import torch

            # fused: one kernel over all tensors (CPU too, since torch 2.4); the default on CPU is a
            # Python loop over every parameter, which made ZeRO-0 spend ~40% of its step in Adam
            return torch.optim.AdamW(groups, **kwargs, fused=True)
        if cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        return None  # deepspeed_adam: DeepSpeed builds FusedAdam / CPUAdam (offload) from the ds_config

    def prepare(self, model, total_steps: int, warmup_steps: int):
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        groups = self._param_groups(model)
        optimizer = self.build_optimizer(groups)
        factor = lr_lambda(total_steps, warmup_steps, self.cfg.lr_scheduler)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=lambda opt: LambdaLR(opt, factor), config=self.ds_config, dist_init_required=False)
        return self.engine

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Every micro-step; DeepSpeed steps optimizer and schedule at the accumulation boundary."""
        if self.ds_config["zero_optimization"]["stage"] == 0 and self.engine.is_gradient_accumulation_boundary():
            import torch

            # the gradients are already all-reduced here (engine.backward does it at the boundary)
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._own_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        """The pre-clipping global norm of the last optimizer step."""
        norm = self.engine.get_global_grad_norm()
        return self._own_grad_norm if norm is None else float(norm)

    # ------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict:
        import numpy as np
        import torch

        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}

    def _set_rng_state(self, rng: dict) -> None:
        import numpy as np
        import torch

        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client_state: dict, trainer_state: dict) -> None:
        """All ranks: DeepSpeed's checkpoint, with every rank's RNG state gathered into the client
        state; rank 0 also writes trainer_state.json, which a resume reads before init.

        'latest' moves to the new tag only after every rank's files and trainer_state.json are on
        disk (DeepSpeed would move it before our file exists), so a kill at any moment leaves it
        naming a complete checkpoint."""
        import torch.distributed as dist

        rngs: list = [None] * self.world_size
        dist.all_gather_object(rngs, self._rng_state())
        # ends with a barrier: every rank's files are written when it returns
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, "rng": rngs},
                                    save_latest=False)
        if self.is_rank_0:
            write_json(Path(ckpt_dir) / tag / STATE_FILE, trainer_state)
            write_text(Path(ckpt_dir) / "latest", tag)
        self.barrier()

    def load_best(self, ckpt_dir: Path, tag: str) -> None:
        """The weights of an earlier checkpoint, for the export. ZeRO-1/2 read the module states only;
        ZeRO-3 keeps its weights only as the optimizer's fp32 partitions (its module states hold empty
        placeholders, and DeepSpeed's module-only load would rebuild the full fp32 model on every rank),
        so the whole checkpoint is loaded: the run is over, its optimizer and RNG no longer matter."""
        self.load_checkpoint(ckpt_dir, tag, module_only=not self.partitioned)

    def load_checkpoint(self, ckpt_dir: Path, tag: str | None = None, module_only: bool = False) -> dict:
        path, client_state = self.engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_module_only=module_only, load_optimizer_states=not module_only,
            load_lr_scheduler_states=not module_only)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt_dir} (tag {tag})")
        client_state = client_state or {}
        if not module_only and client_state.get("rng"):
            self._set_rng_state(client_state["rng"][self.rank])
        return client_state

    def rotate_checkpoints(self, ckpt_dir: Path, keep_last_n: int, keep: set[str]) -> dict[str, list[str]]:
        """Rank 0, after 'latest' names the newest complete checkpoint: delete all but the newest
        `keep_last_n` tags (a resume needs only the newest) and those in `keep` (the best), and reduce
        a kept tag outside the newest to its weights (the best is only ever loaded module-only, for
        the export): its optimizer states, ~12 bytes per parameter, go."""
        removed, pruned = [], []
        if self.is_rank_0:
            tags = sorted((p.name for p in Path(ckpt_dir).iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                          key=lambda t: int(TAG_RE.match(t)[1]))
            for tag in tags[:-keep_last_n]:
                if tag not in keep:
                    shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
                    removed.append(tag)
                elif not self.partitioned and prune_to_weights(Path(ckpt_dir) / tag):  # ZeRO-3: see load_best
                    pruned.append(tag)
        self.barrier()
        return {"removed": removed, "pruned": pruned}

    # ------------------------------------------------------------ export

    def save_hf_model(self, tokenizer, out_dir: Path) -> None:
        """Rank 0 writes weights + config + tokenizer. ZeRO-1/2 keep full weights on every rank: rank 0
        saves a CPU copy of them, made tensor by tensor, so the export needs no device memory
        (save_pretrained on the engine's module would clone ZeRO's flat-buffer views on the GPU, +2 bytes
        per parameter). ZeRO-3: every rank takes part in gathering one weight at a time; rank 0 writes
        them in safetensors shards of at most `export_shard_mib`, so no process ever holds the whole
        model. Written beside the target and renamed, so a reader never sees half a model."""
        model = self.engine.module
        model.config.use_cache = True  # gradient checkpointing turned it off for training
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        if self.is_rank_0:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.partitioned:
            from .export import save_partitioned

            save_partitioned(model, tmp, self.is_rank_0, int(self.cfg.export_shard_mib * 2**20))
            if self.is_rank_0:
                model.config.save_pretrained(tmp)
                if model.generation_config is not None:
                    model.generation_config.save_pretrained(tmp)
        elif self.is_rank_0:
            state = cpu_state_dict(model)
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            del state
        if self.is_rank_0:
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        self.barrier()


OPTIMIZER_STATE_GLOB = "*optim_states.pt"  # ZeRO-1/2 (zero_pp_rank_*), bf16 optimizer (bf16_zero_pp_rank_*)


def prune_to_weights(tag_dir: Path) -> bool:
    """Delete a checkpoint's optimizer-state files, keeping the model states (weights + client state).
    Such a checkpoint can still be loaded module-only, never resumed from. True if anything went."""
    files = list(Path(tag_dir).glob(OPTIMIZER_STATE_GLOB))
    for f in files:
        f.unlink(missing_ok=True)
    return bool(files)


def cpu_state_dict(model) -> dict:
    """The model's state dict copied into fresh CPU tensors one at a time (never views of the engine's
    buffers); tensors that share storage (tied embeddings) stay shared, so the saved files are the same."""
    import torch

    out, copies = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype, tensor.device)
        if key not in copies:
            copies[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor.detach())
        out[name] = copies[key]
    return out
