"""SFT data: closed-book tokenisation with the loss on the answer only, and the batch plan.

The plan is a pure function of (number of items, seed, epoch, world size, batch sizes), so every rank
computes the same global batches without talking to the others, a resumed run sees exactly the
batches it would have seen, and the loss can be normalised by the global batch's answer tokens:
the gradient is then the same whether a global batch is split across ranks or accumulation steps.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from toolkit.data.prompts import sft_prompt, sft_target, stable_seed
from toolkit.data.schema import DataError, QAItem
from toolkit.models import encode_prompts

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTExample:
    item_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on the prompt; the answer tokens and EOS otherwise
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The SFT prompt's tokens, exactly as training saw them (shared with evaluation; the probe uses
    the same rule, toolkit.models.encode_prompts)."""
    return encode_prompts(tokenizer, [sft_prompt(question)])[0]


def encode_sft(tokenizer, item: QAItem, max_len: int) -> SFTExample:
    """`prompt + ' {answer}' + EOS`; labels mask the prompt. Too long: the prompt loses its start."""
    prompt = encode_prompt(tokenizer, item.question)
    target = list(tokenizer(sft_target(item.answer), add_special_tokens=False)["input_ids"])
    target.append(tokenizer.eos_token_id)
    if len(target) >= max_len:
        raise DataError("training data", f"item '{item.id}': the answer alone has {len(target)} tokens, "
                        f"more than max_len={max_len}")
    truncated = len(prompt) + len(target) > max_len
    if truncated:
        prompt = prompt[len(prompt) + len(target) - max_len:]
    return SFTExample(item.id, tuple(prompt + target), tuple([IGNORE_INDEX] * len(prompt) + target), truncated)


def collate(examples: Sequence[SFTExample], pad_id: int):
    """Right-padded tensors for training: input_ids, attention_mask, labels."""
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchPlan:
    """Global batch `s` of epoch `e` = items [s*G, (s+1)*G) of a seeded permutation, padded by
    wrapping around so every epoch has the same number of full global batches (no rank ever runs
    out early). Micro-batch j = accum_step * world + rank, so a world of 2 with no accumulation and
    a world of 1 with 2 accumulation steps see the same micro-batches in the same roles."""

    def __init__(self, num_items: int, micro: int, accum: int, world: int, seed: int):
        if num_items < 1:
            raise DataError("training data", "no training items")
        self.n, self.micro, self.accum, self.world, self.seed = num_items, micro, accum, world, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = -(-num_items // self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(stable_seed("sft-shuffle", self.seed, epoch)).shuffle(order)
        padded = order * (-(-self.steps_per_epoch * self.global_batch // self.n))
        return padded[: self.steps_per_epoch * self.global_batch]

    def global_indices(self, epoch: int, step: int, order: list[int] | None = None) -> list[int]:
        order = order if order is not None else self.epoch_order(epoch)
        return order[step * self.global_batch:(step + 1) * self.global_batch]

    def micro_indices(self, global_indices: list[int], accum_step: int, rank: int) -> list[int]:
        j = accum_step * self.world + rank
        return global_indices[j * self.micro:(j + 1) * self.micro]


def load_categories(path: str | Path | None, data_path: str | Path) -> dict[str, str]:
    """item id -> SliCK category: from `path` (JSON object, JSON list or JSONL of {id, category}), or
    else from 'category' fields in the dataset's own JSON/JSONL rows. Empty when there are none."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "categories file not found")
        return _categories_from(path, strict=True)
    data_path = Path(data_path)
    files = [data_path] if data_path.is_file() else sorted(
        f for f in data_path.glob("*") if f.suffix in (".jsonl", ".json"))
    out: dict[str, str] = {}
    for f in files:
        out.update(_categories_from(f, strict=False))
    return out


def _categories_from(path: Path, strict: bool) -> dict[str, str]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as err:
        if strict:
            raise DataError(path, f"malformed JSON: {err.msg}") from None
        return {}
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if isinstance(rows, dict):  # {id: category}
        return {str(k): str(v) for k, v in rows.items() if isinstance(v, str)}
    out = {}
    for row in rows if isinstance(rows, list) else ():
        if isinstance(row, dict) and row.get("id") is not None and isinstance(row.get("category"), str):
            out[str(row["id"])] = row["category"]
    if strict and not out:
        raise DataError(path, "no {id, category} records found")
    return out
