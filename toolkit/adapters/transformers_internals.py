"""transformers internals the toolkit uses (transformers 5.19), each because no public API does the job.

* Which attention a model runs: `model.set_attn_implementation` switches it (public), but 5.19 has
  no public getter; the config keeps it as `_attn_implementation`.
* Running a StaticCache on fewer rows than it was allocated with: the fast engine points each
  layer's `keys`/`values` at the first n rows of its buffers (views, the same memory). The public
  row selection (`Cache.reorder_cache`, for beam search) allocates new tensors, i.e. new addresses,
  which would defeat the preallocation and the CUDA graphs of the decode step. The layers' update()
  writes into whatever `keys`/`values` hold, so the views are what the model reads and writes.
"""
from __future__ import annotations

from typing import Sequence

from . import AdapterCheck, installed_version

LIBRARY = "transformers"


def attention_implementation(model) -> str | None:
    """The attention `model` runs now ("sdpa", "eager", a registered name, ...)."""
    return model.config._attn_implementation


def cache_tensors(cache) -> list[tuple]:
    """(keys, values) of each layer of a KV cache, as the layers hold them now."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def use_cache_rows(cache, buffers: Sequence[tuple], rows: int) -> list:
    """Point the cache's layers at the first `rows` rows of `buffers` (one (keys, values) per layer,
    from cache_tensors when the cache was allocated); returns the views now in use."""
    views = []
    for layer, (keys, values) in zip(cache.layers, buffers):
        layer.keys, layer.values = keys[:rows], values[:rows]
        views += [layer.keys, layer.values]
    return views


def _attention_moved() -> str | None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    try:
        model.set_attn_implementation("eager")
        if attention_implementation(model) == "eager":
            return None
    except AttributeError:
        pass
    return "config._attn_implementation (the attention set_attn_implementation chose)"


def _cache_rows_moved() -> str | None:
    import torch
    from transformers import LlamaConfig, StaticCache

    config = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cache = StaticCache(config=config, max_cache_len=4)
    try:
        cache.update(torch.zeros(3, 1, 2, 4), torch.zeros(3, 1, 2, 4), 0)  # allocates 3 rows
        buffers = cache_tensors(cache)
        use_cache_rows(cache, buffers, 1)
        cache.reset()
        written = torch.ones(1, 1, 2, 4)
        keys, _ = cache.update(written, written, 0)  # must land in row 0 of the buffers, in place
        if keys.shape[0] == 1 and torch.equal(buffers[0][0][:1, :, :2], written):
            return None
    except (AttributeError, RuntimeError):
        pass
    return "StaticCache layers' keys/values (running the cache on fewer rows in place)"


def check() -> AdapterCheck:
    version = installed_version(LIBRARY)
    if version is None:
        return AdapterCheck(LIBRARY, None)
    moved = [m for m in (_attention_moved(), _cache_rows_moved()) if m]
    return AdapterCheck(LIBRARY, version, tuple(moved))
