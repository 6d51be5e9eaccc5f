"""Which training items each stage and each baseline uses (docs/design.md section 4).

Inputs are category tables: item id -> SliCK category, from a probe (C0: base model, C1: after
stage 1). Every function returns a sorted list of ids, so a selection never depends on dict order.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Mapping

from toolkit.config import knob
from toolkit.data.prompts import stable_seed
from toolkit.probe.slick import CATEGORIES, HIGHLY_KNOWN, MAYBE_KNOWN, UNKNOWN, WEAKLY_KNOWN
from toolkit.report.metrics import upgraded

Categories = Mapping[str, str]

STAGE2_STRATEGIES = {
    "gradual": "upgraded items + replay (the paper's stage 2)",
    "no_replay": "upgraded items + items still MaybeKnown, no replay",
    "upgraded_only": "upgraded items alone",
    "remained_maybe": "items MaybeKnown before and after stage 1 + replay",
}
BASELINES = {
    "one_stage": "stage 1 only (the model after stage 1)",
    "natural": "all training items, one stage",
    "known_only": "SliCK's filter: all training items except the Unknown ones, one stage",
}


# Controls for the two-stage schedule: each answers "was it the data or the extra training?"
CONTROLS = {
    "one_stage_longer": "M1 trained further on the stage-1 items with the stage-2 lr, for exactly as many optimizer "
                        "steps as stage 2 took (compute-matched one stage)",
    "random_stage2": "stage 2 with as many items as the stage-2 set before replay, drawn at random from the items "
                     "not HighlyKnown under C0, plus the same replay (data-matched)",
    "random_same_pool": "stage 2 from M1 with as many items as the upgraded set, drawn at random from the upgraded "
                        "items' source pool (Weakly/Unknown under C0, not in stage 1), the same replay, lr and "
                        "optimizer steps (data-matched: was it the upgrade, or any item of that pool?)",
    "one_stage_union": "one stage from M0 on the stage-1 items + the upgraded items + the replay, for the summed "
                       "optimizer steps of stages 1 and 2 (order control: was it the staging?)",
}


class SelectionError(ValueError):
    """A selection setting that names no category, or an impossible replay request."""


@dataclass(frozen=True)
class SelectionConfig:
    """Which training items each stage and baseline uses, by the categories of the probes."""

    stage1_categories: tuple[str, ...] = knob((MAYBE_KNOWN,), "stage 1 trains on the items of these base-model categories")
    upgraded_from: tuple[str, ...] = knob((WEAKLY_KNOWN, UNKNOWN), "an upgraded item was in one of these "
                                                                   "categories under the base model ...")
    upgraded_to: tuple[str, ...] = knob((HIGHLY_KNOWN, MAYBE_KNOWN), "... and is in one of these after stage 1 "
                                                                     "(MaybeKnown or better)")
    replay_ratio: float = knob(0.2, "stage 2's replay items: round(ratio x its items before replay)")
    replay_categories: tuple[str, ...] = knob((HIGHLY_KNOWN,), "replay items are drawn from these categories")
    replay_source: str = knob("c0", "whose categories pick replay items: the base model's (c0) or M1's (c1)")
    stage2_strategy: str = knob("gradual", "stage 2's set: gradual (upgraded + replay) or an ablation: "
                                           + ", ".join(s for s in STAGE2_STRATEGIES if s != "gradual"))
    # the random draws (replay, the data-matched control): set per entry of the pipeline's `seeds`
    seed: int = knob(0, internal=True)

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "seed": "the selection's random draws follow each entry of the top-level `seeds`"}

    def __post_init__(self):
        for name in ("stage1_categories", "upgraded_from", "upgraded_to", "replay_categories"):
            values = getattr(self, name)
            if not values:
                raise SelectionError(f"selection: '{name}' is empty")
            for value in values:
                if value not in CATEGORIES:
                    raise SelectionError(f"selection: {name} has unknown category '{value}' "
                                         f"(expected {', '.join(CATEGORIES)})")
        if not 0 <= self.replay_ratio <= 10:
            raise SelectionError(f"selection: replay_ratio={self.replay_ratio} must be in [0, 10]")
        if self.replay_source not in ("c0", "c1"):
            raise SelectionError(f"selection: replay_source='{self.replay_source}' must be c0 or c1")
        if self.stage2_strategy not in STAGE2_STRATEGIES:
            raise SelectionError(f"selection: unknown stage2_strategy '{self.stage2_strategy}' "
                                 f"(expected {', '.join(STAGE2_STRATEGIES)})")


def _ids_where(categories: Categories, wanted) -> list[str]:
    return sorted(i for i, c in categories.items() if c in wanted)


def stage1_items(c0: Categories, cfg: SelectionConfig) -> list[str]:
    return _ids_where(c0, cfg.stage1_categories)


def upgraded_items(c0: Categories, c1: Categories, cfg: SelectionConfig) -> list[str]:
    """Unknown or WeaklyKnown before stage 1 (by default) and MaybeKnown or better after it."""
    return upgraded(c0, c1, cfg.upgraded_from, cfg.upgraded_to)  # the report counts by the same rule


def remained_maybe_items(c0: Categories, c1: Categories) -> list[str]:
    return sorted(i for i in c0 if c0[i] == MAYBE_KNOWN and c1.get(i) == MAYBE_KNOWN)


def replay_items(c0: Categories, c1: Categories, count: int, exclude, cfg: SelectionConfig) -> list[str]:
    """`count` items of the replay categories, drawn with a seeded shuffle (all of them if fewer)."""
    source = c0 if cfg.replay_source == "c0" else c1
    pool = [i for i in _ids_where(source, cfg.replay_categories) if i not in exclude]
    random.Random(stable_seed("replay", cfg.seed)).shuffle(pool)
    return sorted(pool[:count])


def union(parts: Mapping[str, list[str]]) -> list[str]:
    """The items of a set given by its parts, once each, sorted."""
    return sorted({i for ids in parts.values() for i in ids})


def stage2_items(c0: Categories, c1: Categories, cfg: SelectionConfig) -> dict[str, list[str]]:
    """The stage-2 set of the configured strategy, split into its parts for the report."""
    strategy = cfg.stage2_strategy
    parts: dict[str, list[str]] = {}
    if strategy in ("gradual", "no_replay", "upgraded_only"):
        parts["upgraded"] = upgraded_items(c0, c1, cfg)
    if strategy in ("no_replay", "remained_maybe"):
        upgraded = set(parts.get("upgraded", ()))
        parts["remained_maybe"] = [i for i in remained_maybe_items(c0, c1) if i not in upgraded]
    if strategy in ("gradual", "remained_maybe"):
        core = {i for ids in parts.values() for i in ids}
        parts["replay"] = replay_items(c0, c1, round(cfg.replay_ratio * len(core)), core, cfg)
    return parts


def baseline_items(name: str, c0: Categories, cfg: SelectionConfig) -> list[str]:
    """Training items of a one-stage baseline."""
    if name == "one_stage":
        return stage1_items(c0, cfg)
    if name == "natural":
        return sorted(c0)
    if name == "known_only":
        return sorted(i for i, c in c0.items() if c != UNKNOWN)
    raise SelectionError(f"unknown baseline '{name}' (expected {', '.join(BASELINES)})")


def _seeded_draw(name: str, seed: int, pool: list[str], size: int) -> list[str]:
    """`size` items of `pool` (all of them if fewer), drawn by a generator fixed by (name, seed)."""
    return random.Random(stable_seed(name, seed)).sample(pool, min(size, len(pool)))


def random_stage2_items(c0: Categories, stage2_parts: Mapping[str, list[str]], cfg: SelectionConfig) -> dict[str, list[str]]:
    """The data-matched control of a stage-2 set: as many random items (seeded, from those not
    HighlyKnown under C0) as the set holds before replay, plus its replay items unchanged."""
    replay = list(stage2_parts.get("replay", ()))
    size = sum(len(ids) for part, ids in stage2_parts.items() if part != "replay")
    pool = sorted(i for i, c in c0.items() if c != HIGHLY_KNOWN and i not in set(replay))
    drawn = _seeded_draw("random_stage2", cfg.seed, pool, size)
    return {"random": sorted(drawn), "replay": replay}


def random_same_pool_items(c0: Categories, stage2_parts: Mapping[str, list[str]], stage1: list[str],
                           cfg: SelectionConfig) -> dict[str, list[str]]:
    """The same-pool control of a stage-2 set: as many random items (seeded) as it upgraded, from the
    pool the upgraded items come from (the `upgraded_from` categories under C0, not in stage 1 and
    not replayed), plus its replay items unchanged."""
    replay = list(stage2_parts.get("replay", ()))
    excluded = set(stage1) | set(replay)
    pool = sorted(i for i in _ids_where(c0, cfg.upgraded_from) if i not in excluded)
    size = len(stage2_parts.get("upgraded", ()))
    drawn = _seeded_draw("random_same_pool", cfg.seed, pool, size)
    return {"random (same pool)": sorted(drawn), "replay": replay}


def one_stage_union_items(stage1: list[str], stage2_parts: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The order control's one set: the stage-1 items and every part of the stage-2 set together."""
    return {"stage1": list(stage1), **{f"stage2 {part}": list(ids) for part, ids in stage2_parts.items()}}
