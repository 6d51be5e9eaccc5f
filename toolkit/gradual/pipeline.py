"""The Gradual Learning schedule as resumable steps (docs/design.md section 4).

RUN_DIR/
  config.json                 the resolved config; a re-run must match it
  state/<step>.json           written when a step completes (wall time, summary): re-runs skip it
  data/full/, data/subset/    the QA data (built-in benchmark unless data.path is set), the capped subset
  seed-<s>/probe/<model>-<split>/   probe outputs (Ray actors; finished shards survive an interrupt)
  seed-<s>/<stage>/data/      the stage's training set (+ dev for early stopping, + base categories)
  seed-<s>/<stage>/train/     trainer output (DeepSpeed checkpoints resume an interrupted stage; model/)
  seed-<s>/eval/<model>.jsonl test answers and exact match per item
  seed-<s>/items.jsonl.gz, seed-<s>/stages.json   the seed's per-item provenance (toolkit/report/
                              provenance.py): metrics.json is computed from these two files alone
  metrics.json, report/       written last

Pipeline.run is the schedule, top to bottom; beside it: the checks before anything is written
(preflight.py), the config lock (lock.py), and what the steps need of other processes (processes.py:
the probe's Ray actors gone before a training launch, the launcher's output logged).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from toolkit import config as cfglib
from toolkit.data.loading import load_qa
from toolkit.data.subset import write_subset
from toolkit.io import read_jsonl, write_json, write_jsonl
from toolkit.models import EMBEDDED_MODEL
from toolkit.report.provenance import write_seed
from toolkit.train.config import TrainConfig

from .config import PipelineConfig
from .lock import lock_config
from .preflight import preflight
from .processes import PipelineError, free_device_memory, release_ray, run_logged
from .selection import (BASELINES, SelectionConfig, baseline_items, one_stage_union_items, random_same_pool_items,
                        random_stage2_items, stage1_items, stage2_items, union)

__all__ = ["Pipeline", "PipelineError", "preflight", "read_categories"]

log = logging.getLogger("toolkit.gradual")


def read_categories(probe_dir: Path) -> dict[str, str]:
    return {row["id"]: row["category"] for row in read_jsonl(probe_dir / "categories.jsonl")}


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: str | Path, echo: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.echo = cfg, Path(run_dir), echo
        self.full_data = Path(cfg.data.path) if cfg.data.path else self.run_dir / "data" / "full"
        self.subset = self.run_dir / "data" / "subset"

    # ------------------------------------------------------------ the schedule

    def run(self) -> dict:
        from toolkit.report.collect import collect_metrics
        from toolkit.report.render import render_report

        preflight(self.cfg)  # nothing is written before the config and the inputs are known to be good
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_config()  # a finished run's seeds join the requested ones
        if self.cfg.notes:
            self.echo(f"[preset {self.cfg.preset}] {self.cfg.notes}")
        self.step("data", self.prepare_data)
        for seed in self.cfg.seeds:
            self.run_seed(seed)
        release_ray()
        metrics = collect_metrics(self.run_dir, self.cfg.seeds, run_info=self._run_info())
        write_json(self.run_dir / "metrics.json", metrics, strict=True)
        render_report(self.run_dir)
        return metrics

    def run_seed(self, seed: int) -> None:
        cfg = self.cfg.for_seed(seed)
        sel: SelectionConfig = cfg.selection
        sd = self.run_dir / f"seed-{seed}"
        base = cfg.model or EMBEDDED_MODEL
        s = f"seed{seed}"
        for split in cfg.probe.splits:
            self.step(f"{s}.probe_m0_{split}", lambda split=split: self.probe(sd, "m0", cfg.model, split, seed))
        if cfg.noise_floor:  # the same model, another probe seed: what re-probing alone moves
            self.step(f"{s}.probe_m0_reprobe_train", lambda: self.probe(
                sd, "m0_reprobe", cfg.model, "train", cfg.reprobe_seed(seed)))
        c0 = read_categories(sd / "probe" / "m0-train")

        stage1 = stage1_items(c0, sel)
        self.step(f"{s}.select_stage1", lambda: self.select(sd / "stage1", c0, {"stage1": stage1}))
        trained1 = self.train_step(f"{s}.train_stage1", sd / "stage1",
                                   lambda: self.train(sd / "stage1", base, stage1, seed))
        m1 = trained1["model_dir"]
        self.step(f"{s}.probe_m1_train", lambda: self.probe(sd, "m1", m1, "train", seed))
        c1 = read_categories(sd / "probe" / "m1-train")

        parts = stage2_items(c0, c1, sel)
        stage2 = union(parts)
        self.step(f"{s}.select_stage2", lambda: self.select(sd / "stage2", c0, parts))
        trained2 = self.train_step(f"{s}.train_stage2", sd / "stage2", lambda: self.train(
            sd / "stage2", m1, stage2, seed, cfg.train.stage2_lr_factor))
        m2 = trained2["model_dir"]
        self.step(f"{s}.probe_m2_train", lambda: self.probe(sd, "m2", m2, "train", seed))

        models = {"M0": cfg.model, "M1": m1, "M2": m2}
        stage2_run = _Stage2Run(parts=parts, steps=trained2.get("global_step", 0), m1=m1, stage1=stage1,
                                stage1_steps=trained1.get("global_step", 0))
        for name in cfg.seed_baselines(seed):
            models[name] = self.train_step(f"{s}.baseline_{name}", sd / f"baseline-{name}", lambda name=name: self._baseline(
                sd, name, c0, c1, base, stage2_run, seed, sel))["model_dir"]
            # probed like M1 and M2: knowledge acquired and forgetting of each baseline
            self.step(f"{s}.probe_{name}_train", lambda name=name: self.probe(sd, name, models[name], "train", seed))
        for name, model in models.items():
            self.step(f"{s}.evaluate_{name}", lambda name=name, model=model: self.evaluate(sd, name, model))
        rule = {"from": list(sel.upgraded_from), "to": list(sel.upgraded_to)}
        self.step(f"{s}.provenance", lambda: write_seed(self.run_dir, seed, cfg.seed_baselines(seed), rule))

    def _baseline(self, sd: Path, name: str, c0, c1, base: str, stage2: "_Stage2Run", seed: int,
                  sel: SelectionConfig) -> dict:
        stage_dir = sd / f"baseline-{name}"
        lr_factor = self.cfg.train.stage2_lr_factor
        if name in BASELINES:  # one stage from the base model
            ids = baseline_items(name, c0, sel)
            self.select(stage_dir, c0, {name: ids})
            return self.train(stage_dir, base, ids, seed)
        if name == "one_stage_longer":  # stage 1's items again, from M1, for stage 2's steps at its lr
            parts = {"stage1 (compute-matched)": stage2.stage1}
            return self._fixed_steps(stage_dir, c0, parts, stage2.m1, stage2.steps, seed, lr_factor)
        if name == "random_same_pool":  # stage 2's start, lr and steps; its own draw from the upgraded pool
            parts = random_same_pool_items(c0, stage2.parts, stage2.stage1, sel)
            return self._fixed_steps(stage_dir, c0, parts, stage2.m1, stage2.steps, seed, lr_factor)
        if name == "one_stage_union":  # from M0 at stage 1's lr, both stages' steps in one
            parts = one_stage_union_items(stage2.stage1, stage2.parts)
            return self._fixed_steps(stage_dir, c0, parts, base, stage2.stage1_steps + stage2.steps, seed)
        if name == "random_stage2":
            parts = random_stage2_items(c0, stage2.parts, sel)
        else:  # a stage-2 ablation, from M1
            parts = stage2_items(c0, c1, dataclasses.replace(sel, stage2_strategy=name))
        self.select(stage_dir, c0, parts)
        ids = union(parts)
        return self.train(stage_dir, stage2.m1, ids, seed, lr_factor)

    def _fixed_steps(self, stage_dir: Path, c0, parts: dict[str, list[str]], model: str, steps: int, seed: int,
                     lr_factor: float = 1.0) -> dict:
        """A control trained for exactly `steps` optimizer steps (one epoch holds >= 1 step, so `steps`
        epochs always reach them; no early stop, so no step is left out); none: skipped like stage 2."""
        if not steps:
            parts = {part: [] for part in parts}
        self.select(stage_dir, c0, parts)
        ids = union(parts)
        return self.train(stage_dir, model, ids, seed, lr_factor, epochs=max(steps, 1), max_steps=steps, patience=0)

    # ------------------------------------------------------------ bookkeeping

    def _lock_config(self) -> None:
        seeds = lock_config(self.run_dir, self.cfg)
        if seeds != self.cfg.seeds:
            self.echo(f"[seeds] the run's seeds are {', '.join(map(str, seeds))} (locked ones first; "
                      f"those done are skipped)")
            self.cfg = dataclasses.replace(self.cfg, seeds=seeds)

    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` unless its completion marker exists; record wall time and its summary."""
        marker = self.run_dir / "state" / f"{name}.json"
        if marker.exists():
            self.echo(f"[skip] {name} (done)")
            return json.loads(marker.read_text(encoding="utf-8"))["summary"]
        self.echo(f"[step] {name}")
        start = time.perf_counter()
        summary = fn() or {}
        wall = time.perf_counter() - start
        write_json(marker, {"step": name, "wall_s": wall, "summary": summary})
        self.echo(f"[done] {name} in {wall:.1f}s")
        return summary

    # ------------------------------------------------------------ data

    def prepare_data(self) -> dict:
        if self.cfg.data.path is None and not (self.full_data / "stats.json").exists():
            from toolkit.data.facts import build_facts

            build_facts(self.full_data, seed=0)
        caps = {"train": self.cfg.data.train_items, "dev": self.cfg.data.dev_items, "test": self.cfg.data.test_items}
        counts = write_subset(self.full_data, self.subset, caps, self.cfg.data.subset_seed, self.cfg.data.relations)
        return {"items": counts, "source": str(self.full_data)}

    # ------------------------------------------------------------ probing

    def probe(self, seed_dir: Path, name: str, model: str | None, split: str, seed: int) -> dict:
        from toolkit.probe.runner import RunConfig as ProbeRun
        from toolkit.probe.runner import run_probe

        p = self.cfg.probe
        out = seed_dir / "probe" / f"{name}-{split}"
        run = ProbeRun(data=str(self.subset), out=str(out), model=model, split=split,
                       exemplar_data=str(self.full_data), exemplar_split="dev", shard_size=p.shard_size)
        summary = run_probe(run, p.probe_config(seed), p.placement)
        keys = ("counts", "questions_per_s", "answers_per_s", "generated_tokens_per_s", "wall_s", "dtype")
        return {"dir": str(out), **{k: summary[k] for k in keys}}

    # ------------------------------------------------------------ training

    def select(self, stage_dir: Path, c0: dict[str, str], parts: dict[str, list[str]]) -> dict[str, int]:
        """Write the stage's training set (the union of `parts`) with dev and base categories."""
        train_ids = union(parts)
        train = {it.id: it for it in load_qa(self.subset, splits=("train",))}
        dev = load_qa(self.subset, splits=("dev",))
        data_dir = stage_dir / "data"
        write_jsonl(data_dir / "train.jsonl", [train[i].to_dict() for i in train_ids])
        write_jsonl(data_dir / "dev.jsonl", [it.to_dict() for it in dev])
        write_json(data_dir / "categories.json", {i: c0[i] for i in train_ids})
        sizes = {k: len(v) for k, v in parts.items()}
        write_json(data_dir / "parts.json", {k: sorted(v) for k, v in parts.items()})
        write_json(data_dir / "selection.json", sizes)
        return sizes

    def stage_config(self, stage_dir: Path, model: str, seed: int, lr_factor: float = 1.0,
                     **stage_options) -> TrainConfig:
        """The trainer's config for one stage: the run's `train.options` plus what the stage sets."""
        options = self.cfg.train.options
        changes = dict(model=model, data=str(stage_dir / "data"), output_dir=str(stage_dir / "train"), seed=seed,
                       categories_file=str(stage_dir / "data" / "categories.json"), **stage_options)
        if lr_factor != 1.0:
            changes["lr"] = options.lr * lr_factor
        if (stage_dir / "train" / "checkpoints" / "latest").exists():
            changes["resume"] = True  # an interrupted stage continues from its last checkpoint
        return cfglib.with_values(options, **changes)

    def train_step(self, name: str, stage_dir: Path, fn: Callable[[], dict]) -> dict:
        """A training step, then (also when it was done before) its checkpoints cleaned up."""
        summary = self.step(name, fn)
        self.clean_checkpoints(stage_dir)
        return summary

    def clean_checkpoints(self, stage_dir: Path) -> bool:
        """Delete a finished stage's DeepSpeed checkpoints once its model is exported (unless
        train.keep_checkpoints). Only after the step's completion marker exists: a stage interrupted
        before it keeps them, and resumes from them. True if anything was deleted."""
        train = stage_dir / "train"
        ckpt = train / "checkpoints"
        if self.cfg.train.keep_checkpoints or not ckpt.exists():
            return False
        summary = train / "train_summary.json"
        if not summary.exists() or not (train / "model" / "config.json").exists():
            return False
        if json.loads(summary.read_text(encoding="utf-8")).get("model_dir") is None:
            return False  # an interrupted run: no export yet
        shutil.rmtree(ckpt)
        self.echo(f"  deleted {ckpt} (the stage's model is exported; train.keep_checkpoints keeps them)")
        return True

    def train(self, stage_dir: Path, model: str, train_ids: list[str], seed: int, lr_factor: float = 1.0,
              **stage_options) -> dict:
        """Launch the DeepSpeed trainer on the stage's data; returns its summary (with model_dir)."""
        from toolkit.train.launch import launch_env, plan_launch, write_resolved_config

        if not train_ids:
            self.echo(f"  no training items for {stage_dir.name}: the stage is skipped, its model is its input")
            return {"skipped": True, "model_dir": model}
        release_ray()  # probing and training take turns on the same devices
        train_cfg = self.stage_config(stage_dir, model, seed, lr_factor, **stage_options)
        cmd, plan = plan_launch(train_cfg, self.cfg.train)  # the same checks as `gradual train`
        write_resolved_config(train_cfg, plan.cfg.zero_stage)  # zero_stage=auto: the launch's decision
        run_logged(cmd, stage_dir / "train.log", self.echo, launch_env(self.cfg.train, train_cfg.out))
        return json.loads((train_cfg.out / "train_summary.json").read_text(encoding="utf-8"))

    # ------------------------------------------------------------ evaluation

    def evaluate(self, seed_dir: Path, name: str, model: str | None) -> dict:
        from toolkit.models import ModelSpec, load_model
        from toolkit.train.evaluate import evaluate

        release_ray()
        test = load_qa(self.subset, splits=("test",))
        options = self.cfg.train.options  # the trainer's dev evaluation: the same answer length and batches
        loaded, tokenizer = load_model(ModelSpec(source=model))  # in the trainer's dtype (toolkit.models)
        try:
            result = evaluate(loaded, tokenizer, test, batch_size=options.eval_batch_size,
                              max_new_tokens=options.max_new_tokens)
        finally:  # the next training launch needs the device this model is on
            del loaded
            free_device_memory()
        write_jsonl(seed_dir / "eval" / f"{name}.jsonl",
                    [{"id": it.id, "answer": result.answers[it.id], "correct": result.correct[it.id]} for it in test])
        return {"accuracy": result.accuracy, "count": result.count}

    def _run_info(self) -> dict:
        c = self.cfg
        return {"preset": c.preset, "model": c.model or EMBEDDED_MODEL, "data": str(self.full_data),
                "seeds": list(c.seeds), "probe": f"N_ex={c.probe.num_exemplar_sets} k={c.probe.shots} "
                f"n={c.probe.samples} T={c.probe.temperature} top-k={c.probe.top_k} "
                f"({'full' if c.probe.full_sampling else 'lazy'} sampling)",
                "stage-1 categories": ",".join(c.selection.stage1_categories),
                "stage-2 strategy": c.selection.stage2_strategy, "replay ratio": c.selection.replay_ratio,
                "stage-2 lr factor": c.train.stage2_lr_factor}


@dataclasses.dataclass(frozen=True)
class _Stage2Run:
    """What the controls copy from a seed's stages: stage 2's item sets, optimizer steps and start (M1);
    stage 1's items and optimizer steps."""
    parts: dict[str, list[str]]
    steps: int
    m1: str
    stage1: list[str]
    stage1_steps: int
