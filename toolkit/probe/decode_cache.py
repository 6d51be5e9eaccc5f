"""The fast engine's decode KV cache: one StaticCache, allocated once (rounded up: cache_length) and
reused by later batches and calls, its rows loaded from a batch's prefill KV (the fan-out) and
compacted in place as rows finish. A decode step over fixed buffers is what CUDA graphs can capture."""
from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache

from toolkit.adapters.torch_internals import keep_address_static
from toolkit.adapters.transformers_internals import cache_tensors, use_cache_rows

from .memory import cache_length


class DecodeCache:
    def __init__(self, model_config, static_addresses: bool = False):
        """static_addresses: the views in use keep their addresses (CUDA graphs replay on them)."""
        self.model_config, self.static_addresses = model_config, static_addresses
        self.cache: StaticCache | None = None
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # each layer's full K and V buffers

    @property
    def max_length(self) -> int:
        return self.cache.get_max_length()

    def nbytes(self) -> int:
        """Device bytes of the buffers held (K and V of every layer)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.buffers)

    def release(self) -> None:
        """Drop the cache (the next load allocates one of its own size)."""
        self.cache, self.buffers = None, []

    def load(self, prompt_cache: DynamicCache, src: torch.Tensor, capacity: tuple[int, int]) -> None:
        """Fan the prompt KV out to the decode rows (row r gets prompt row src[r]), through the cache's
        own update(): it writes the prompt's slots and leaves the write position after them, where
        decoding continues. `capacity`: the (rows, sequence length) the cache must hold for the call."""
        rows, length = capacity
        fill = src
        if self.cache is None or self.buffers[0][0].shape[0] < rows or self.max_length < length:
            # The buffers are allocated lazily by the first update() below, for the batch's `rows` (the
            # first batch of a call is its largest; its first phase may run fewer rows: the spare ones
            # are filled with copies, then left out of use).
            fill = src.repeat(-(-rows // len(src)))[:rows]
            self.cache = StaticCache(config=self.model_config, max_cache_len=cache_length(length))
            if any(self.cache.is_sliding):  # the row/slot bookkeeping assumes full attention layers
                raise ValueError("FastEngine needs a full-attention model (no sliding-window layers)")
            self.buffers = []
        else:
            self.use_rows(len(src))
            self.cache.reset()  # write position back to 0 (and the rows in use zeroed)
        for index, (keys, values) in enumerate(cache_tensors(prompt_cache)):
            self.cache.update(keys.index_select(0, fill), values.index_select(0, fill), index)
        if not self.buffers:
            self.buffers = cache_tensors(self.cache)
            if len(src) < rows:
                self.use_rows(len(src))

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Compaction: move the kept rows' KV to the front of the buffers, in place."""
        for (keys, values), (k, v) in zip(cache_tensors(self.cache), self.buffers):
            k[:len(keep)] = keys.index_select(0, keep)
            v[:len(keep)] = values.index_select(0, keep)
        self.use_rows(len(keep))

    def use_rows(self, n: int) -> None:
        """Run the cache on the first n rows of its buffers, in place (no public transformers API
        does: toolkit.adapters.transformers_internals)."""
        for view in use_cache_rows(self.cache, self.buffers, n):
            if self.static_addresses:
                keep_address_static(view)
