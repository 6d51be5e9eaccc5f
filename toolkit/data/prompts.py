"""Few-shot exemplar selection and the two prompt formats (probe: design.md s2; SFT: s3)."""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Sequence

from .matching import normalize_answer
from .schema import DataError, QAItem

SFT_INSTRUCTION = "Answer the following question. "


def probe_prompt(exemplars: Sequence[QAItem], question: str) -> str:
    shots = "".join(f"Q: {ex.question}\nA: {ex.answer}\n\n" for ex in exemplars)
    return f"{shots}Q: {question}\nA:"


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
        question = normalize_answer(item.question)
        return [ex for ex in self.by_relation.get(item.relation, ())
                if ex.id != item.id and normalize_answer(ex.question) != question]

    def select(self, item: QAItem, num_sets: int, shots: int, seed: int) -> list[list[QAItem]]:
        """`num_sets` lists of `shots` exemplars for `item`, fixed by (seed, item id)."""
        candidates = self._candidates(item)
        if len(candidates) < shots:
            self.check_covers([item], shots)
        rng = random.Random(stable_seed("exemplars", seed, item.id))
        return [rng.sample(candidates, shots) for _ in range(num_sets)]


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """The tokenizer's real token counts (no special tokens added), for batching and budgeting."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]
