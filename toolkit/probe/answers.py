"""The one answer path of every engine (fast, reference, vLLM): which answers a call asks for, where
an answer stops, and how its generated token ids become the answer text."""
from __future__ import annotations

from typing import Iterable, Sequence

from toolkit.data.matching import extract_answer
from toolkit.models import stop_token_ids, tokens_until_stop

from .types import GREEDY_STREAM, ProbeConfig


def requested_samples(config: ProbeConfig, sample_indices: Sequence[int] | None) -> list[int]:
    """The sample indices a generate() call asks for: all `config.samples` by default."""
    return list(range(config.samples)) if sample_indices is None else list(sample_indices)


def answer_streams(greedy: bool, samples: Sequence[int]) -> list[int]:
    """A prompt's answers in the order every engine lays them out: the greedy one first (if asked),
    then the samples in the order asked."""
    return ([GREEDY_STREAM] if greedy else []) + list(samples)


class AnswerDecoder:
    """Token ids -> (answer, tokens used): cut after the first stop token (it counts as used),
    decode without special tokens, keep the text up to its first newline, stripped (extract_answer).

    `stop_ids` is public so a benchmark can force full-length answers (an id no model emits)."""

    def __init__(self, tokenizer, stop_ids: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
        self._stop_set = set(self.stop_ids)

    def __call__(self, rows: Iterable[Sequence[int]]) -> list[tuple[str, int]]:
        rows = [list(ids) for ids in rows]
        if not rows:
            return []
        used = [tokens_until_stop(ids, self._stop_set) for ids in rows]
        # decode() of a list of sequences decodes each on its own (transformers 5.19; batch_decode forwards to it)
        texts = self.tokenizer.decode([ids[:u] for ids, u in zip(rows, used)], skip_special_tokens=True)
        return [(extract_answer(text), u) for text, u in zip(texts, used)]
