"""Greedy exact-match evaluation in the SFT format (docs/design.md section 3), batched and sharded.

Each rank answers items[rank::world], left-padded, stopping at a newline or EOS; the per-item results
are gathered so that every rank computes the same accuracy (and so takes the same early-stopping
decision). Works without a process group too (tests, the export check).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from toolkit.data.matching import extract_answer, is_correct
from toolkit.data.schema import QAItem
from toolkit.models import stop_token_ids, tokens_until_stop

from .data import encode_prompt


@dataclass
class EvalResult:
    accuracy: float
    count: int
    by_category: dict[str, float] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)  # item id -> exact match
    answers: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "count": self.count, "by_category": self.by_category}


def greedy_answers(model, tokenizer, questions: Sequence[str], batch_size: int, max_new_tokens: int,
                   stop_ids: Sequence[int] | None = None, batches: int | None = None) -> list[str]:
    """One greedy answer per question, in order. Batches are formed from length-sorted prompts.
    `batches`: run exactly this many generate calls, each decoding until every rank's rows are done,
    repeating the last batch where this rank has fewer (its answers dropped): ZeRO-3, where every
    forward pass is a collective over all ranks (evaluate gives a rank with no questions one to repeat)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id  # load_tokenizer falls back to EOS
    stops = sorted(stop_ids if stop_ids is not None else stop_token_ids(tokenizer))
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    starts = list(range(0, len(order), batch_size))
    if batches is not None:
        starts += [starts[-1]] * (batches - len(starts))
    was_training = model.training
    model.eval()
    try:
        for start in starts:
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=stops, pad_token_id=pad, use_cache=True,
                                     temperature=None, top_p=None, top_k=None, synced_gpus=batches is not None)
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                text = tokenizer.decode(new[:tokens_until_stop(new, stops)], skip_special_tokens=True)
                answers[i] = extract_answer(text)
    finally:
        model.train(was_training)
    return answers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def evaluate(model, tokenizer, items: Sequence[QAItem], batch_size: int, max_new_tokens: int,
             categories: dict[str, str] | None = None, stop_ids: Sequence[int] | None = None,
             in_step: bool = False) -> EvalResult:
    """Exact-match accuracy over `items` (all ranks call this; each answers its shard). `in_step`:
    the ranks run their forward passes in lockstep (ZeRO-3's partitioned weights): the same number of
    batches on every rank, each decoded until all ranks' rows are done."""
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    shard = list(items)[rank::world]
    questions = [it.question for it in shard]
    batches = None
    if in_step:
        batches = math.ceil(math.ceil(len(items) / world) / batch_size)  # the first rank's shard is the largest
        questions = questions or [items[0].question]  # something to repeat (its answer is dropped)
    answers = greedy_answers(model, tokenizer, questions, batch_size, max_new_tokens, stop_ids, batches)
    local = [(it.id, ans, is_correct(ans, it.gold_answers)) for it, ans in zip(shard, answers)]
    if dist:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, local)
        local = [row for part in gathered for row in part]
    correct = {item_id: ok for item_id, _, ok in local}
    result = EvalResult(accuracy=sum(correct.values()) / max(len(correct), 1), count=len(correct),
                        correct=correct, answers={item_id: ans for item_id, ans, _ in local})
    if categories:
        groups = defaultdict(list)
        for item_id, ok in correct.items():
            groups[categories.get(item_id, "uncategorised")].append(ok)
        result.by_category = {cat: sum(v) / len(v) for cat, v in sorted(groups.items())}
    return result
