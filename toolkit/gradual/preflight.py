"""`gradual run`'s checks before anything is written (a real run and --dry-run alike): every input
and setting that needs no step to have run, each refused in one line naming its key."""
from __future__ import annotations

from toolkit.config import ConfigError
from toolkit.data.loading import load_qa
from toolkit.models import EMBEDDED_MODEL

from .config import PipelineConfig

# the probe's settings as the pipeline config names them (a refusal names the setting at fault)
PROBE_KEYS = {"engine": "probe.engine", "gpus_per_actor": "probe.placement.gpus_per_actor",
              "num_actors": "probe.placement.num_actors", "model": "model"}


def preflight(cfg: PipelineConfig, check_devices: bool = True, describe_probe: bool = False) -> dict:
    """Every check that needs no step to have run, before anything is written: the data, the model,
    the exemplars, the training launch (hostfile, ds_config, batch arithmetic), the probe's placement
    (auto counts resolved as each probe step resolves them) and, for a real run (`check_devices`), the
    GPUs the probe actors ask for. Raises one-line errors naming the key. `describe_probe`: the probe
    plan's lines (toolkit.probe.placement.describe_probe_plan) under "probe_plan"."""
    from toolkit.models import load_tokenizer, resolve_source
    from toolkit.probe.runner import checked_plan

    splits = _check_data(cfg)
    load_tokenizer(cfg.model)  # ModelError for a missing path; converts the embedded GGUF once (cache)
    training = _check_training(cfg, check_devices)
    source = resolve_source(cfg.model)
    plan, _ = checked_plan(cfg.probe.placement, cfg.probe.engine, cfg.model, source, cfg.probe.dtype,
                           check_devices, key=PROBE_KEYS.get)
    from toolkit.train.dsconfig import disk_estimate, human_bytes
    from toolkit.train.plan import count_parameters

    options = training["config"]
    stages = len(cfg.seeds) * (2 + len(cfg.baselines)) + len(cfg.first_seed_baselines)
    disk = disk_estimate(count_parameters(cfg.model or EMBEDDED_MODEL), training["bf16"], options.optimizer,
                         options.keep_last_n, stages, cfg.train.keep_checkpoints,
                         stage=training["ds_config"]["zero_optimization"]["stage"])
    return {"train_world_size": training["world_size"], "train_batch": training["batch"], "train_disk": disk,
            "train_devices": training["devices"], "train_memory": training["memory"],
            "probe_plan": _probe_plan_lines(cfg, plan, source, splits) if describe_probe else [],
            "train_disk_line": f"up to {human_bytes(disk['total_peak'])} for {stages} training stage(s): "
                               f"{human_bytes(disk['stage_peak'])} while a stage trains (one checkpoint "
                               f"{human_bytes(disk['checkpoint_full'])}), "
                               f"{human_bytes(disk['finished_stage'])} left by each finished one ("
                               + ("its checkpoints kept: train.keep_checkpoints" if cfg.train.keep_checkpoints
                                  else "its exported model; its checkpoints deleted") + ")"}


def _check_data(cfg: PipelineConfig) -> dict:
    """The user's data (none empty), its relations and exemplars; its splits (none: the built-in benchmark)."""
    from toolkit.data.prompts import ExemplarPool

    splits = {}
    if cfg.data.path:
        splits = {split: load_qa(cfg.data.path, splits=(split,)) for split in ("train", "dev", "test")}  # none empty
    if cfg.data.relations:
        from toolkit.data.facts import TEMPLATES

        known = {it.relation for items in splits.values() for it in items} if cfg.data.path else set(TEMPLATES)
        if unknown := sorted(set(cfg.data.relations) - known):
            raise ConfigError(f"data.relations: no relation {', '.join(unknown)} in "
                              f"{cfg.data.path or 'the built-in benchmark'} (known: {', '.join(sorted(known))})")
    if cfg.data.path and cfg.probe.shots:
        pool = ExemplarPool(splits["dev"], source=f"{cfg.data.path} (split dev)")
        pool.check_covers([it for split in cfg.probe.splits for it in splits[split]], cfg.probe.shots)
    return splits


def _check_training(cfg: PipelineConfig, launching: bool) -> dict:
    """toolkit.train.launch.check_training on the run's training settings (it refuses model states
    that cannot fit), its errors under the key `train.options`."""
    from toolkit.train.config import TrainConfigError
    from toolkit.train.launch import check_training

    try:
        return check_training(cfg.train.options, cfg.train, launching=launching, model=cfg.model or EMBEDDED_MODEL)
    except TrainConfigError as err:
        raise TrainConfigError(f"train.options: {err}") from None


def _probe_plan_lines(cfg: PipelineConfig, plan, source: str, splits: dict) -> list[str]:
    """The plan of the run's first probe (the base model on the train subset, exemplars from the full
    dev split), as `gradual probe --dry-run` words it; the later probes differ only in their model."""
    from toolkit.data.facts import load_builtin_items
    from toolkit.data.subset import balanced_subset
    from toolkit.probe.runner import plan_lines
    from toolkit.probe.shards import make_plan

    items = [it for split in splits.values() for it in split] if cfg.data.path else load_builtin_items(seed=0)
    relations = set(cfg.data.relations or {it.relation for it in items})
    train = balanced_subset([it for it in items if it.split == "train" and it.relation in relations],
                            cfg.data.train_items, cfg.data.subset_seed)
    dev = [it for it in items if it.split == "dev"]
    probe = cfg.probe.probe_config(cfg.seeds[0])
    shards = make_plan(train, cfg.probe.shard_size, probe.seed)
    return plan_lines(plan, probe, source, cfg.model, train, dev if probe.shots else [], shards)
