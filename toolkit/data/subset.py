"""Capped, relation-balanced subsets of a QA dataset (the pipeline's `data.*_items`, `gradual data subset`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from toolkit.io import write_jsonl

from .loading import load_qa
from .prompts import stable_seed
from .schema import SPLITS, QAItem


def balanced_subset(items: list[QAItem], cap: int | None, seed: int) -> list[QAItem]:
    """Up to `cap` items, a seeded shuffle interleaved across relations so every relation is present."""
    if cap is None or cap >= len(items):
        return sorted(items, key=lambda it: it.id)
    by_relation: dict[str, list[QAItem]] = {}
    for it in sorted(items, key=lambda it: stable_seed("subset", seed, it.id)):
        by_relation.setdefault(it.relation, []).append(it)
    queues = [by_relation[r] for r in sorted(by_relation)]
    picked: list[QAItem] = []
    while len(picked) < cap:
        for queue in queues:
            if queue and len(picked) < cap:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda it: it.id)


def write_subset(source: str | Path, out: str | Path, caps: dict[str, int | None], seed: int = 0,
                 relations: Iterable[str] | None = None) -> dict[str, int]:
    """`out/<split>.jsonl` for every split, each capped by `caps[split]` (None or absent: all items),
    from the items of `relations` only (None: all)."""
    items = load_qa(source)
    if relations is not None:
        wanted = set(relations)
        if missing := sorted(wanted - {it.relation for it in items}):
            raise ValueError(f"{source}: no items of relation(s) {', '.join(missing)}")
        items = [it for it in items if it.relation in wanted]
    counts = {}
    for split in SPLITS:
        chosen = balanced_subset([it for it in items if it.split == split], caps.get(split), seed)
        write_jsonl(Path(out) / f"{split}.jsonl", [it.to_dict() for it in chosen])
        counts[split] = len(chosen)
    return counts
