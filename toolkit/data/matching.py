"""Answer normalisation and exact-match scoring (docs/design.md section 2, SQuAD-style)."""
from __future__ import annotations

import re
import string
import unicodedata
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WHITESPACE = re.compile(r"\s+")


def _punctuation_replacement(ch: str) -> str | None:
    """None keeps the character. Dashes and slashes join words ("Guinea-Bissau"), so they become a
    space; other punctuation (Unicode-aware: "¿", "«", "’") is dropped, as in SQuAD's EM."""
    if ch in "-/" or unicodedata.category(ch) == "Pd":
        return " "
    if ch in string.punctuation or unicodedata.category(ch).startswith("P"):
        return ""
    return None


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, drop articles (a/an/the), collapse white space."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch if (rep := _punctuation_replacement(ch)) is None else rep for ch in text)
    text = _ARTICLES.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip()


def is_correct(prediction: str, gold_answers: Iterable[str]) -> bool:
    """Exact match after normalisation against the answer or any alias. An empty prediction never matches."""
    pred = normalize_answer(prediction)
    if not pred:
        return False
    return any(pred == normalize_answer(g) for g in gold_answers)


def extract_answer(generated: str) -> str:
    """An answer is the generated text up to the first newline, stripped."""
    return generated.split("\n", 1)[0].strip()
