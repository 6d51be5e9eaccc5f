"""The fast engine's prefill: a batch of prompts through the model once, their KV kept (one row per
prompt) with their last-position logits, for the decode rows to be fanned out from, once (one-pass
lazy probing, full sampling) or twice (two-phase lazy probing: the greedy rows, then the sample rows
of the unsettled questions)."""
from __future__ import annotations

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
    return Prefilled(logits, cache, mask.bool(), mask.sum(-1))
