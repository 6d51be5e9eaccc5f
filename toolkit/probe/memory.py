"""How many prompts one FastEngine batch may hold on its share of a GPU: plain functions of numbers, so
the engine (per call, from torch's figures) and the dry run (from a described GPU and the model's
shape) compute the same budget.

Budget = (share x the device's total memory - what the process holds now + the KV cache this engine
already holds, which the next batch reuses) x SAFETY_FRACTION. The rest of the share is for the
prefill's own cache and activations, the decode step's logits, CUDA graph pools and fragmentation.
Actors sharing a GPU each count their share of the total, never the device-wide free memory: free
memory is what every actor sees at the same moment, so two actors at 0.5 would both claim it.
"""
from __future__ import annotations

CACHE_ROUNDING = 64  # the static KV cache's length is rounded up to this (see cache_length)
SAFETY_FRACTION = 0.5
MAX_BATCH_PROMPTS = 256
CPU_BATCH_PROMPTS = 16  # on CPU the cache is small and a bigger batch gains nothing


def memory_share(assigned_gpus: float) -> float:
    """The fraction of its GPU's memory a process may use, from the GPUs Ray assigned it: a share of
    one GPU (0.5: two actors on it), else all of it (a whole GPU, or none: the CPU)."""
    return assigned_gpus if 0 < assigned_gpus < 1 else 1.0


def cache_length(length: int) -> int:
    """The length the engine allocates its StaticCache with for sequences of up to `length` tokens:
    rounded up to a multiple of CACHE_ROUNDING, so later calls with slightly longer prompts reuse it
    (a decode step over fixed buffers is what CUDA graphs capture)."""
    return -(-length // CACHE_ROUNDING) * CACHE_ROUNDING


def kv_bytes(model_config, length: int, dtype_bytes: int) -> int:
    """Device bytes of one sequence's K and V for `length` positions in every layer."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2 * model_config.num_hidden_layers * kv_heads * head_dim * length * dtype_bytes


def kv_bytes_per_row(model_config, length: int, dtype_bytes: int) -> int:
    """Device bytes one decode row needs: its K and V for `length` positions in every layer, plus the
    fp32 logits of a step and their top-k work (a vocabulary-sized row, twice). Pass the cache's
    allocated length (cache_length), not the sequence length."""
    return kv_bytes(model_config, length, dtype_bytes) + 2 * 4 * model_config.vocab_size


def batch_memory_budget(share: float, total_bytes: int, held_bytes: int, own_cache_bytes: int = 0,
                        safety: float = SAFETY_FRACTION) -> int:
    """Bytes a batch's decode rows may take on this process's `share` of a device of `total_bytes`:
    what the share leaves after what the process holds (`held_bytes`: weights, the cache...), plus
    the cache it already holds (`own_cache_bytes`, counted in `held_bytes` and reused), times `safety`."""
    return max(0, int((share * total_bytes - held_bytes + own_cache_bytes) * safety))


def prompt_batch_size(budget_bytes: int, row_bytes: int, streams: int, cap: int = MAX_BATCH_PROMPTS,
                      kept_bytes: int = 0) -> int:
    """Prompts per batch whose rows (`streams` per prompt, `row_bytes` each) and kept prompt KV
    (`kept_bytes` per prompt: kv_bytes of its prefill, which the engine holds while the rows decode:
    through the fan-out, and through both phases of two-phase lazy probing) fit `budget_bytes`: at
    least 1 (a prompt that does not fit fails as an out-of-memory error, which the engine reports),
    at most `cap`."""
    per_prompt = max(1, streams * row_bytes + kept_bytes)
    return max(1, min(cap, budget_bytes // per_prompt))
