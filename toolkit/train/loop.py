"""The training loop: epochs of global batches, accumulation through engine.backward/step, evaluation
with early stopping, checkpoints that resume exactly, records, and the final Hugging Face export.

Loss normalisation: every micro-batch's summed token loss is divided by the number of answer tokens
in the whole global batch (known to every rank from the batch plan) and multiplied by world x
accumulation, which DeepSpeed divides out again. The gradient is then the token mean over the
global batch, however it is split across ranks and accumulation steps, and the logged loss is the
same number for 2 ranks, 1 rank with accumulation, or 2 nodes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

from toolkit.config import to_dict
from toolkit.io import atomic_path, read_jsonl, write_json, write_jsonl
from toolkit.models import ModelSpec, load_model, stop_token_ids

from .data import collate
from .evaluate import evaluate
from .plan import RunPlan
from .strategy import DeepSpeedStrategy, checkpoint_tag

log = logging.getLogger("toolkit.train")


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (== epochs completed at an epoch boundary)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    consumed_samples: int = 0  # wrap-around padding included
    best_metric: float | None = None
    best_tag: str | None = None
    best_dir: str | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    stopped_early: bool = False


class Records:
    """Rank 0's outputs: losses.jsonl (one row per optimizer step), evals.jsonl and TensorBoard.
    A resumed run first drops rows past its checkpoint, so the files read as one run."""

    def __init__(self, plan: RunPlan, enabled: bool, resumed_step: int | None):
        self.enabled, out = enabled, plan.cfg.out
        self.losses, self.evals, self.writer = out / "losses.jsonl", out / "evals.jsonl", None
        if not enabled:
            return
        for path in (self.losses, self.evals):
            rows = read_jsonl(path) if path.exists() and resumed_step is not None else []
            write_jsonl(path, [r for r in rows if r["step"] <= (resumed_step or 0)])
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a minimal install (the tensorboard package missing): the JSONL records suffice
            log.warning("tensorboard is not installed: no TensorBoard logs (losses.jsonl and evals.jsonl are written)")
            return
        self.writer = SummaryWriter(str(plan.cfg.tensorboard_dir),
                                    purge_step=None if resumed_step is None else resumed_step + 1)

    def _append(self, path, row: dict) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def step(self, row: dict) -> None:
        if self.enabled:
            self._append(self.losses, row)
            for key in ("loss", "lr", "grad_norm", "tokens_per_s") if self.writer else ():
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def eval(self, row: dict) -> None:
        if self.enabled:
            self._append(self.evals, row)
            if self.writer is None:
                return
            for split in ("dev", "train"):
                if row.get(split):
                    self.writer.add_scalar(f"eval/{split}_accuracy", row[split]["accuracy"], row["step"])
                    for cat, acc in row[split]["by_category"].items():
                        self.writer.add_scalar(f"{split}_accuracy_by_category/{cat}", acc, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(plan: RunPlan) -> dict:
    strategy = DeepSpeedStrategy(plan.cfg, plan.ds_config)
    strategy.setup_distributed()
    try:
        return _train(plan, strategy)
    finally:
        strategy.destroy()


def _train(plan: RunPlan, strategy: DeepSpeedStrategy) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg, b, rank0 = plan.cfg, plan.batches, strategy.is_rank_0
    started = time.perf_counter()
    _record_rank(cfg, strategy)
    dtype = "bfloat16" if plan.ds_config["bf16"]["enabled"] else "float32"
    # Straight onto this rank's own device (cuda:<local rank>): weights go to the GPU as they are read,
    # no full host copy per rank (models.plan_load). A random-init model drawn on each GPU is replaced
    # by rank 0's when DeepSpeed's engine broadcasts the parameters (stage 0-2). ZeRO-3: built and
    # loaded partitioned (strategy.partition_on_load).
    strategy.partition_on_load()
    model, tokenizer = load_model(ModelSpec(source=cfg.model, dtype=dtype, device=str(strategy.device),
                                            seed=cfg.seed, partitioned=strategy.partitioned))
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    engine = strategy.prepare(model, plan.total_steps, plan.warmup_steps)
    state, last_saved = TrainState(), None
    if plan.resume_tag:
        client = strategy.load_checkpoint(cfg.resume_dir, plan.resume_tag)
        state, last_saved = TrainState(**client["train_state"]), plan.resume_tag
        if rank0:
            log.info("resumed from %s/%s at epoch %d, step %d", cfg.resume_dir, plan.resume_tag, state.epoch,
                     state.global_step)
    if rank0:
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_json(cfg.out / "train_config.resolved.json", to_dict(cfg))
        write_json(cfg.out / "ds_config.resolved.json", plan.ds_config)
    records = Records(plan, rank0, state.global_step if plan.resume_tag else None)
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id  # load_tokenizer falls back to EOS
    scale = b.world * b.accum  # DeepSpeed divides the gradient by this much (accumulation, averaging)
    interrupted = False

    def run_eval() -> dict:
        kwargs = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                      categories=plan.categories, stop_ids=stop_ids, in_step=strategy.partitioned)
        dev = evaluate(engine.module, tokenizer, plan.dev_items, **kwargs) if plan.dev_items else None
        fit = evaluate(engine.module, tokenizer, plan.train_items, **kwargs) if cfg.eval_train else None
        tag = checkpoint_tag(state.global_step)
        metric = dev.accuracy if dev else None
        if state.best_tag is None or metric is None or metric > state.best_metric:
            state.best_metric, state.best_tag, state.best_step, state.bad_evals = metric, tag, state.global_step, 0
            state.best_dir = str(cfg.checkpoint_dir)
        else:
            state.bad_evals += 1
            state.stopped_early = cfg.patience > 0 and state.bad_evals >= cfg.patience
        row = {"step": state.global_step, "epoch": state.global_step / b.steps_per_epoch,
               "dev": dev.summary() if dev else None, "train": fit.summary() if fit else None,
               "best_step": state.best_step, "bad_evals": state.bad_evals, "stopped_early": state.stopped_early}
        records.eval(row)
        if rank0:
            log.info("step %d: dev accuracy %s, train accuracy %s%s", state.global_step,
                     f"{dev.accuracy:.4f}" if dev else "-", f"{fit.accuracy:.4f}" if fit else "-",
                     " (stopping early)" if state.stopped_early else "")
        return row

    def save() -> str:
        tag = checkpoint_tag(state.global_step)
        saved = {"train_state": dataclasses.asdict(state), "config": to_dict(cfg), "world_size": b.world}
        strategy.save_checkpoint(cfg.checkpoint_dir, tag, client_state=saved, trainer_state={**saved, "tag": tag})
        keep = {state.best_tag} if state.best_dir == str(cfg.checkpoint_dir) else set()
        strategy.rotate_checkpoints(cfg.checkpoint_dir, cfg.keep_last_n, keep)
        return tag

    while (state.epoch < cfg.epochs and not state.stopped_early and not interrupted
           and state.global_step < plan.total_steps):
        order = b.epoch_order(state.epoch)
        bar = tqdm(total=b.steps_per_epoch, initial=state.step_in_epoch, disable=not (rank0 and cfg.progress),
                   desc=f"epoch {state.epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        while state.step_in_epoch < b.steps_per_epoch:
            indices = b.global_indices(state.epoch, state.step_in_epoch, order)
            target_tokens = sum(plan.examples[i].target_tokens for i in indices)
            all_tokens = sum(len(plan.examples[i].input_ids) for i in indices)
            lr, tick = strategy.lr(), time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float32, device=strategy.device)
            for accum_step in range(b.accum):
                micro = [plan.examples[i] for i in b.micro_indices(indices, accum_step, strategy.rank)]
                batch = {k: v.to(strategy.device) for k, v in collate(micro, pad_id).items()}
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                             reduction="sum")
                strategy.backward(token_loss * (scale / target_tokens))
                strategy.step()
                loss_sum += token_loss.detach().float() / target_tokens
            loss = float(strategy.all_reduce_sum(loss_sum))
            seconds = time.perf_counter() - tick
            state.global_step += 1
            state.step_in_epoch += 1
            state.consumed_samples += b.global_batch
            records.step({"step": state.global_step, "epoch": state.epoch, "loss": loss, "lr": lr,
                          "grad_norm": strategy.grad_norm(), "tokens": all_tokens,
                          "tokens_per_s": all_tokens / max(seconds, 1e-9)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            end_of_epoch = state.step_in_epoch == b.steps_per_epoch
            if end_of_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            last_step = state.global_step == plan.total_steps  # max_steps may end the run inside an epoch
            n = cfg.eval_every_steps
            if last_step or (n and state.global_step % n == 0) or (not n and end_of_epoch):
                run_eval()
            if last_step or end_of_epoch or (n and state.global_step % n == 0):
                last_saved = save()
            if last_step:
                break
            if end_of_epoch:
                # a simulated pre-emption: checkpoint written, no export (resume finishes the run)
                interrupted = 0 < cfg.stop_after_epoch <= state.epoch < cfg.epochs
                break
            if state.stopped_early:
                break
        bar.close()
    records.close()
    peaks = {"train": strategy.peak_memory()}
    summary = {"global_step": state.global_step, "epochs_completed": state.epoch, "best_step": state.best_step,
               "best_tag": state.best_tag, "best_dev_accuracy": state.best_metric, "stopped_early": state.stopped_early,
               "interrupted": interrupted, "world_size": b.world, "zero_stage": cfg.zero_stage,
               "train_batch_size": b.global_batch, "seconds": time.perf_counter() - started, "model_dir": None}
    if not interrupted:
        if state.best_tag and state.best_tag != last_saved:
            strategy.load_best(state.best_dir, state.best_tag)
        strategy.save_hf_model(tokenizer, cfg.out / "model")
        peaks["export"] = strategy.peak_memory()
        summary["model_dir"] = str(cfg.out / "model")
        if rank0 or strategy.partitioned:  # ZeRO-3: every rank takes part in the forward pass
            _export_reference(engine.module, plan, cfg.out / "export_check.pt", write=rank0)
    summary["peak_memory"] = {"kind": peaks["train"]["kind"],
                              **{phase: p["bytes_per_rank"] for phase, p in peaks.items()}}
    if rank0:
        write_json(cfg.out / "train_summary.json", summary)
        log.info("done: %s", json.dumps(summary))
    return summary


def _record_rank(cfg, strategy: DeepSpeedStrategy) -> None:
    """<output_dir>/ranks/rank<R>.json: where each rank ran and the environment it got (what a
    multi-node launch forwarded: PATH, CUDA_HOME, NCCL_*, ...), for diagnosing a node that misbehaves."""
    import os
    import socket

    import torch

    from .envfile import relevant

    cuda = strategy.device.type == "cuda"
    write_json(cfg.out / "ranks" / f"rank{strategy.rank}.json", {
        "rank": strategy.rank, "local_rank": strategy.local_rank, "world_size": strategy.world_size,
        "host": socket.gethostname(), "pid": os.getpid(), "device": str(strategy.device),
        "device_name": torch.cuda.get_device_name(strategy.device) if cuda else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "environment": relevant(os.environ)})


def _export_reference(model, plan: RunPlan, path, write: bool = True) -> None:
    """Logits of the engine's (best) model on one SFT example, for checking the exported copy."""
    import torch

    ids = torch.tensor([plan.examples[0].input_ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    model.train(was_training)
    if not write:
        return
    with atomic_path(path) as tmp:
        torch.save({"input_ids": ids.cpu(), "logits": logits}, tmp)
