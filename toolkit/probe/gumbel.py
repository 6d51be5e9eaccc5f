"""Counter-based Gumbel noise: the random draw of a sampled answer as a pure function of its key.

The noise for (row key, step, token id) is a pure integer hash (splitmix64 in int64 arithmetic), with
row key = stable_seed(seed, question_id, prompt_index, sample_index), so a sampled answer depends only
on its key and the model's logits, never on batch composition, compaction, phases or processes.
"""
from __future__ import annotations

import torch

# splitmix64 constants as signed int64: torch int64 arithmetic wraps around, i.e. it is uint64
# arithmetic bit for bit, as long as right shifts are made logical (torch's >> is arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MUL2 = 0x94D049BB133111EB - (1 << 64)


def to_int64(u: int) -> int:
    """A uint64 Python int as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (same bits as the uint64 reference)."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def gumbel_noise(row_keys: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (float64) for each row's candidate tokens, a pure function of
    (row key, step, token id): the step-th output of the row's splitmix64 stream seeds a second
    stream indexed by token id. Keying by token id (not by top-k rank) keeps it order-free."""
    stream = mix64(row_keys + (step + 1) * _GOLDEN)
    bits = mix64(stream[:, None] + (token_ids + 1) * _GOLDEN)
    uniform = (_shr(bits, 11).double() + 0.5) * 2.0 ** -53  # 53 bits -> (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))
