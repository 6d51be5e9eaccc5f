"""The fast engine's attention: PyTorch SDPA (whose flash, cuDNN and memory-efficient kernels are
fused) for every forward, with a single-token decode step that never copies the KV cache.

Why not the model's own choice:
* FlashAttention-2 takes no explicit mask, and the decode step masks each row's padding and unused
  cache slots with a 4D bool mask, so a model loaded with FA2 is switched to this function.
* For grouped-query models (Llama-3: 8 KV heads for 32 query heads) transformers' SDPA path repeats
  K and V to every query head whenever a mask is given (in 5.19; later releases only outside
  torch.compile): a copy of the whole static cache per layer per step. Here the query heads of a
  group stand in the query-length axis instead, so K and V are read in place, eager or compiled.

Registered through transformers' public AttentionInterface / AttentionMaskInterface, whose
instances also give the stock "sdpa" functions this one falls back to and reuses.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from toolkit.adapters.transformers_internals import attention_implementation

ATTENTION = "gradual_sdpa"
STOCK_SDPA = AttentionInterface()["sdpa"]  # transformers' own SDPA attention and mask functions
STOCK_SDPA_MASK = AttentionMaskInterface()["sdpa"]


def sdpa_single_query_gqa(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers' attention-function contract: query (batch, heads, q_len, dim), key/value
    (batch, kv_heads, kv_len, dim); returns ((batch, q_len, heads, dim), None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or groups == 1 or per_head_mask:
        return STOCK_SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    # query head j * groups + g uses KV head j (transformers' repeat_kv order): group g becomes a
    # "query position" of KV head j; the (batch, 1, 1, kv_len) mask broadcasts over both.
    grouped = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None


def use_stock_attention(model) -> None:
    """Undo `use_engine_attention` for a model the fast engine used before (the sampling benchmark
    runs every engine on one model): the reference engine is plain transformers, with plain SDPA."""
    if attention_implementation(model) == ATTENTION:
        model.set_attn_implementation("sdpa")


def use_engine_attention(model) -> None:
    """Switch `model` to the engine's attention (whatever it was loaded with: sdpa, eager, FA2)."""
    AttentionInterface.register(ATTENTION, sdpa_single_query_gqa)
    AttentionMaskInterface.register(ATTENTION, STOCK_SDPA_MASK)  # the prefill's masks are SDPA's
    model.set_attn_implementation(ATTENTION)
