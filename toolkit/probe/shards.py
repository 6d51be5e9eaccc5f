"""The deterministic shard plan: fixed by the data, the seed and the shard size, never by the number
of actors or the order they finish in, so a re-run (with any actor count) finds the same shards."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from toolkit.data.prompts import stable_seed
from toolkit.data.schema import QAItem


def data_hash(items: Sequence[QAItem]) -> str:
    """sha256 of the items' canonical JSON (sorted by id, sorted keys): independent of load order."""
    rows = [it.to_dict() for it in sorted(items, key=lambda it: it.id)]
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Shard:
    index: int
    item_ids: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def path(self, out_dir: Path) -> Path:
        return Path(out_dir) / "shards" / f"{self.name}.jsonl"


@dataclass(frozen=True)
class ShardPlan:
    shards: tuple[Shard, ...]
    data_hash: str
    seed: int
    shard_size: int

    @property
    def num_items(self) -> int:
        return sum(len(s.item_ids) for s in self.shards)

    @property
    def item_ids(self) -> list[str]:
        return [i for s in self.shards for i in s.item_ids]


def plan_order(items: Sequence[QAItem], seed: int) -> list[QAItem]:
    """Items in plan order: a seeded shuffle keyed on ids, so shards (and --limit) mix relations
    instead of taking one relation at a time; the order of the other items never depends on
    which items are present."""
    return sorted(items, key=lambda it: (stable_seed("shard-plan", seed, it.id), it.id))


def make_plan(items: Sequence[QAItem], shard_size: int, seed: int, limit: int | None = None) -> ShardPlan:
    """Fixed-size chunks of the plan order; `limit` keeps the first `limit` items of that order.
    Within a shard, items are grouped by relation (then id) so an engine sees related prompts together."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    ordered = plan_order(items, seed)
    if limit is not None:
        ordered = ordered[:limit]
    shards = []
    for index, start in enumerate(range(0, len(ordered), shard_size)):
        chunk = sorted(ordered[start:start + shard_size], key=lambda it: (it.relation, it.id))
        shards.append(Shard(index=index, item_ids=tuple(it.id for it in chunk)))
    return ShardPlan(shards=tuple(shards), data_hash=data_hash(items), seed=seed, shard_size=shard_size)
