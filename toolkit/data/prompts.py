"""Few-shot exemplar selection and the two prompt formats (the probe's: docs/design.md section 2;
the SFT format: section 3)."""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Sequence

from .matching import normalize_answer
from .schema import DataError, QAItem

SFT_INSTRUCTION = "Answer the following question. "


def exemplar_block(exemplars: Sequence[QAItem]) -> str:
    """The few-shot part of a probe prompt: the text every prompt with these exemplars starts with."""
    return "".join(f"Q: {ex.question}\nA: {ex.answer}\n\n" for ex in exemplars)


def probe_prompt(exemplars: Sequence[QAItem], question: str) -> str:
    return f"{exemplar_block(exemplars)}Q: {question}\nA:"


def sft_prompt(question: str) -> str:
    return f"{SFT_INSTRUCTION}{question}\n"


def sft_target(answer: str) -> str:
    """The target text; the trainer appends the tokenizer's EOS token."""
    return f" {answer}"


def stable_seed(*parts) -> int:
    """A 64-bit seed from any parts, identical across processes and machines (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ExemplarPool:
    """Exemplars grouped by relation, in a fixed order so selection never depends on load order."""

    def __init__(self, items: Sequence[QAItem], source: str = "exemplar pool"):
        self.source = source
        by_relation: dict[str, list[QAItem]] = defaultdict(list)
        for it in items:
            by_relation[it.relation].append(it)
        self.by_relation = {rel: sorted(its, key=lambda it: it.id) for rel, its in by_relation.items()}
        self._orders: dict[tuple[str, int, int], list[QAItem]] = {}  # per_relation sets (relation_order)

    def check_covers(self, items: Sequence[QAItem], shots: int) -> None:
        """Fail early, naming the relation, if some question cannot get `shots` exemplars."""
        for item in items:
            available = len(self._candidates(item))
            if available < shots:
                raise DataError(
                    self.source,
                    f"relation '{item.relation}' has {available} usable exemplars for item '{item.id}', "
                    f"fewer than shots={shots}", field_name="relation")

    def _candidates(self, item: QAItem) -> list[QAItem]:
        return list(filter(usable_with(item), self.by_relation.get(item.relation, ())))

    def select(self, item: QAItem, num_sets: int, shots: int, seed: int,
               mode: str = "per_item") -> list[list[QAItem]]:
        """`num_sets` lists of `shots` exemplars for `item`. per_item: fixed by (seed, item id);
        per_relation: the relation's shared sets (relation_order), fixed by (seed, relation)."""
        candidates = self._candidates(item)
        if len(candidates) < shots:
            self.check_covers([item], shots)
        if mode == "per_relation":
            return [swap_out(self.relation_order(item.relation, seed, s), item, shots) for s in range(num_sets)]
        rng = random.Random(stable_seed("exemplars", seed, item.id))
        return [rng.sample(candidates, shots) for _ in range(num_sets)]

    def relation_order(self, relation: str, seed: int, set_index: int) -> list[QAItem]:
        """Exemplar set `set_index` of a relation and its spares: the relation's exemplars in an order
        fixed by (seed, relation, set index); the set is its first `shots`, the rest its spares in turn.
        Computed once per set (a relation's pool is shuffled once, not once per question)."""
        key = (relation, seed, set_index)
        if key not in self._orders:
            rng = random.Random(stable_seed("relation exemplars", seed, relation, set_index))
            pool = self.by_relation.get(relation, [])
            self._orders[key] = rng.sample(pool, len(pool))
        return self._orders[key]


def usable_with(item: QAItem):
    """The test of an exemplar that may be shown with `item`'s question: never the item itself, nor
    its question."""
    question = normalize_answer(item.question)
    return lambda exemplar: exemplar.id != item.id and normalize_answer(exemplar.question) != question


def swap_out(order: Sequence[QAItem], item: QAItem, shots: int) -> list[QAItem]:
    """The first `shots` exemplars of `order`, each one that `item` may not be shown with swapped, in
    place, for the next usable spare after them: a question of the set keeps the set's other exemplars."""
    usable = usable_with(item)
    spares = filter(usable, order[shots:])
    return [ex if usable(ex) else next(spares) for ex in order[:shots]]


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """The tokenizer's real token counts (no special tokens added), for batching and budgeting."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]
