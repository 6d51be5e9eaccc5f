"""The fast engine's prefill: a batch of prompts through the model once, their KV kept (one row per
prompt) with their last-position logits, for the decode rows to be fanned out from, once (one-pass
lazy probing, full sampling) or twice (two-phase lazy probing: the greedy rows, then the sample rows
of the unsettled questions).

Prompts that share a prefix (per-relation exemplar sets: PromptRequest.prefix) have its KV computed
once per batch, and only their own suffixes prefilled on top of it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from toolkit.adapters.transformers_internals import cache_tensors


@dataclass
class Prefilled:
    """A batch's prompts after their prefill, left-padded to a common width."""

    logits: torch.Tensor  # (prompts, vocab): each prompt's last position
    cache: DynamicCache  # each prompt's K and V, `width` slots
    mask: torch.Tensor  # (prompts, width) bool: the slots that hold a prompt token
    lengths: torch.Tensor  # (prompts,) tokens per prompt: the position decoding continues at
    computed_tokens: int  # prompt tokens the forwards ran (a shared prefix's once)
    computed_padded_tokens: int  # the same with the padding the forwards ran

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def kv_bytes(self) -> int:
        """Device bytes of the kept KV (what a batch holds besides its decode rows)."""
        return sum(t.numel() * t.element_size() for layer in cache_tensors(self.cache) for t in layer)


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (1: a token) of the prompts, left-padded to the longest."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, mask


def prefill(model, cache_arg: str, prompts: list[list[int]], pad_id: int) -> Prefilled:
    """Left-padded forward of the prompts into a dynamic cache."""
    device = next(model.parameters()).device
    input_ids, mask = left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() does
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **{cache_arg: cache},
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return Prefilled(logits, cache, mask.bool(), mask.sum(-1), int(mask.sum()), mask.numel())


def shared_prefix_lengths(prompts: list[list[int]], prefixes: list[list[int] | None]) -> list[int]:
    """Per prompt, how many of its first tokens it may take from a prefix KV computed once: the tokens
    it has in common with its prefix's (a tokenizer may merge across the boundary), all but its last
    (whose logits come from its own forward); 0 where no other prompt has that prefix (or it has none)."""
    lengths = [min(common_length(p, q), len(p) - 1) if q else 0 for p, q in zip(prompts, prefixes)]
    uses = Counter(tuple(p[:n]) for p, n in zip(prompts, lengths) if n)
    return [n if n and uses[tuple(p[:n])] > 1 else 0 for p, n in zip(prompts, lengths)]


def common_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prefill_on_prefixes(model, cache_arg: str, prompts: list[list[int]], shared: list[int], pad_id: int) -> Prefilled:
    """The prefill of `prompts` with the KV of each distinct shared prefix (prompt[:shared], shared > 0)
    computed once: a forward of the distinct prefixes, then one of the suffixes over each prompt's
    prefix KV. A prompt's row is [pad, prefix, pad, suffix], its positions counting its tokens only:
    every token sees what it sees in a plain prefill (fp32 on CPU: the same answers)."""
    device = next(model.parameters()).device
    heads = [tuple(p[:n]) for p, n in zip(prompts, shared)]
    distinct = list(dict.fromkeys(head for head in heads if head))
    if not distinct:
        return prefill(model, cache_arg, prompts, pad_id)
    first = prefill(model, cache_arg, [list(head) for head in distinct], pad_id)
    row = torch.tensor([distinct.index(head) if head else 0 for head in heads], device=device)
    has_head = torch.tensor([bool(head) for head in heads], device=device)
    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(cache_tensors(first.cache)):
        cache.update(keys.index_select(0, row), values.index_select(0, row), layer)
    input_ids, tail_mask = left_padded([p[n:] for p, n in zip(prompts, shared)], pad_id, device)
    mask = torch.cat([(first.mask[row] & has_head[:, None]).long(), tail_mask], dim=1)
    positions = (mask.cumsum(-1) - 1)[:, first.width:].masked_fill(tail_mask == 0, 1)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **{cache_arg: cache},
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return Prefilled(logits, cache, mask.bool(), mask.sum(-1), first.computed_tokens + int(tail_mask.sum()),
                     first.computed_padded_tokens + tail_mask.numel())
