"""Dropping the rows of settled questions while a batch decodes (lazy probing).

In one pass the engine decodes every stream of a question together; in two phases (the own engine's
`probe.lazy: two_phase`, vLLM's lazy probing) the greedy rows first, then the sample rows of only the
questions they left unsettled. Each time some of a question's rows finish, the caller's `settled`
callback sees all of that question's finished answers so far; once it says True, the question's
still-running rows are dropped and their answers are never produced. Which rule settles a question is the caller's (SliCK's lives in slick.py); this module only keeps the books:
which prompts share a batch, which rows still run, and the answers of the rows that were produced.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from .types import GREEDY_STREAM, FinishedAnswer, PromptAnswers, PromptRequest, Settled


def question_groups(requests: Sequence[PromptRequest]) -> list[list[int]]:
    """Request indices grouped by question, in order of each question's first request."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.question_id, []).append(i)
    return list(groups.values())


def pack_groups(groups: list[list[int]], per_batch: int) -> list[list[int]]:
    """Batches of at most `per_batch` indices holding whole groups where they fit: a question split
    across two batches cannot settle in the first one (its other greedy answers are not there)."""
    batches, current = [], []
    for group in groups:
        if current and len(current) + len(group) > per_batch:
            batches.append(current)
            current = []
        current = current + group
        while len(current) >= per_batch:  # a group larger than a batch: split it
            batches.append(current[:per_batch])
            current = current[per_batch:]
    return batches + ([current] if current else [])


def plan_batches(requests: Sequence[PromptRequest], lengths: Sequence[int], per_batch: int, *,
                 by_length: bool, prefixes: Sequence[str] | None = None) -> list[list[int]]:
    """Request indices per batch, the largest batch first (the engine sizes its cache by it). A
    question's prompts share a batch where they fit, so that it can settle while they decode (the
    price: some padding, a question's prompts differ in length); `by_length`: questions of similar
    prompt lengths share a batch, and before that questions whose prompts share prefixes (`prefixes`,
    per request: "" for none; a relation's questions with per-relation exemplar sets), so that a
    batch computes each prefix's KV for many prompts."""
    groups = question_groups(requests)
    if by_length:
        shared = prefixes or [""] * len(requests)
        groups.sort(key=lambda group: (min(shared[i] for i in group), max(lengths[i] for i in group)))
    return sorted(pack_groups(groups, per_batch), key=len, reverse=True)


class SettleBook:
    """The answers finished so far per question (over every batch of one generate call), the
    questions settled, and, for the batch being decoded, which of its rows still run."""

    def __init__(self, settled: Settled):
        self.settled = settled
        self.finished: dict[str, list[FinishedAnswer]] = defaultdict(list)
        self.closed: set[str] = set()
        self.row_keys: list[tuple[str, int, int]] = []
        self.running: set[int] = set()
        self.decoded: dict[int, tuple[str, int]] = {}
        self._newly_closed: set[str] = set()

    def start_batch(self, requests: Sequence[PromptRequest], stream_keys: Sequence[int]) -> None:
        """Rows are prompt-major: row = prompt * len(stream_keys) + stream position (as the engine)."""
        self.row_keys = [(r.question_id, r.prompt_index, j) for r in requests for j in stream_keys]
        self.running = set(range(len(self.row_keys)))
        self.decoded = {}
        self._newly_closed = {question for question, _, _ in self.row_keys} & self.closed  # in an earlier batch

    def save(self) -> tuple[dict[str, list[FinishedAnswer]], set[str]]:
        """What a batch changes for the batches after it: the answers finished per question and the
        questions settled (a batch retried after an out-of-memory error starts from them again)."""
        return {question: list(answers) for question, answers in self.finished.items()}, set(self.closed)

    def restore(self, saved: tuple[dict[str, list[FinishedAnswer]], set[str]]) -> None:
        finished, closed = saved
        self.finished = defaultdict(list, {question: list(answers) for question, answers in finished.items()})
        self.closed = set(closed)

    def record(self, rows: Sequence[int], decoded: Sequence[tuple[str, int]]) -> None:
        """Rows that just finished, with their (answer, tokens used)."""
        for row, (answer, used) in zip(rows, decoded):
            question, prompt_index, stream = self.row_keys[row]
            self.finished[question].append(FinishedAnswer(prompt_index, stream, answer))
            self.decoded[row] = (answer, used)
            self.running.discard(row)

    def rows_to_drop(self, finished_rows: Sequence[int]) -> list[int]:
        """Ask about the questions of the rows that just finished; the still-running rows of every
        settled question (one settled in an earlier batch too) leave the batch."""
        newly, self._newly_closed = self._newly_closed, set()
        for question in {self.row_keys[row][0] for row in finished_rows} - self.closed:
            if self.settled(question, self.finished[question]):
                newly.add(question)
        if not newly:
            return []
        self.closed |= newly
        drop = sorted(row for row in self.running if self.row_keys[row][0] in newly)
        self.running.difference_update(drop)
        return drop


def prompt_answers(decoded: dict[int, tuple[str, int]], n_prompts: int,
                   stream_keys: Sequence[int]) -> list[PromptAnswers]:
    """PromptAnswers from a batch's decoded rows, row -> (answer, tokens used), prompt-major; rows
    dropped as settled are absent, and sample_indices says which samples remain."""
    answers = []
    for p in range(n_prompts):
        got = [(j, decoded[row]) for row, j in enumerate(stream_keys, p * len(stream_keys)) if row in decoded]
        greedy = next((d for j, d in got if j == GREEDY_STREAM), (None, 0))
        samples = [(j, d) for j, d in got if j != GREEDY_STREAM]
        answers.append(PromptAnswers(greedy=greedy[0], greedy_tokens=greedy[1],
                                     samples=[answer for _, (answer, _) in samples],
                                     sample_tokens=[used for _, (_, used) in samples],
                                     sample_indices=[j for j, _ in samples]))
    return answers


# ---------------------------------------------------------------- two phases (the own engine's and vLLM's)


def unsettled_prompts(requests: Sequence[PromptRequest], book: SettleBook) -> list[int]:
    """After the greedy phase, whose rows (one per request, as started in `book`) are all recorded: the
    requests whose question is not settled, whose samples are still needed. The rule is asked about
    every question once more: a greedy row that ran to max_new_tokens finished without asking."""
    book.rows_to_drop(range(len(requests)))
    return [i for i, request in enumerate(requests) if request.question_id not in book.closed]


def add_samples(answers: list[PromptAnswers], pending: Sequence[int], more: Sequence[PromptAnswers]) -> None:
    """The sample phase's answers (`more`, one per index of `pending`) into the greedy phase's, in place."""
    for i, sampled in zip(pending, more):
        answers[i].samples, answers[i].sample_tokens, answers[i].sample_indices = (
            sampled.samples, sampled.sample_tokens, sampled.sample_indices)
