"""The reference engine: Hugging Face `generate` used the straightforward way.

A greedy pass over a batch of prompts, then a sampled pass with `num_return_sequences=n`, which
prefills every prompt n times over. It is the correctness oracle for the fast engine and the
baseline in the sampling benchmark.
"""
from __future__ import annotations

from typing import Sequence

import torch

from toolkit.data.matching import extract_answer
from toolkit.data.prompts import stable_seed
from toolkit.models import encode_prompts, newline_token_ids, tokens_until_stop

from .attention import use_stock_attention
from .types import PromptAnswers, PromptRequest, ProbeConfig


class ReferenceEngine:
    """`generate` seeds one torch generator per batch, so a sample depends on its batch: lazy probing
    cannot ask for a few samples at a time and stay exact (the probe samples in full with it)."""

    keyed_samples = False

    def __init__(self, model, tokenizer, config: ProbeConfig, batch_size: int = 16):
        use_stock_attention(model)  # the baseline users would run, not the fast engine's attention
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.batch_size = batch_size
        self.stop_ids = sorted({*newline_token_ids(tokenizer), tokenizer.eos_token_id})
        self._stop_set = set(self.stop_ids)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _decode(self, row: torch.Tensor) -> tuple[str, int]:
        ids = row.tolist()
        used = tokens_until_stop(ids, self._stop_set)
        return extract_answer(self.tokenizer.decode(ids[:used], skip_special_tokens=True)), used

    @torch.inference_mode()
    def _generate(self, texts: list[str], **kwargs) -> torch.Tensor:
        ids = encode_prompts(self.tokenizer, texts)
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        out = self.model.generate(**enc, max_new_tokens=self.config.max_new_tokens,
                                  eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  **kwargs)
        return out[:, enc["input_ids"].shape[1]:]

    def generate(self, requests: Sequence[PromptRequest], sample_indices: Sequence[int] | None = None,
                 greedy: bool = True) -> list[PromptAnswers]:
        cfg = self.config
        if sample_indices is not None or not greedy:
            raise ValueError("the reference engine answers whole requests only (greedy + every sample)")
        results: list[PromptAnswers] = []
        for start in range(0, len(requests), self.batch_size):
            batch = list(requests[start:start + self.batch_size])
            texts = [r.text for r in batch]
            greedy = self._generate(texts, do_sample=False, top_k=None, top_p=None, temperature=None)
            answers = []
            for row in greedy:
                text, used = self._decode(row)
                answers.append(PromptAnswers(greedy=text, greedy_tokens=used))
            if cfg.samples > 0:
                torch.manual_seed(stable_seed("reference", cfg.seed, batch[0].question_id, batch[0].prompt_index))
                sampled = self._generate(texts, do_sample=True, temperature=cfg.temperature,
                                         top_k=cfg.top_k or None, top_p=None,
                                         num_return_sequences=cfg.samples)
                for i, row in enumerate(sampled):
                    text, used = self._decode(row)
                    answers[i // cfg.samples].samples.append(text)
                    answers[i // cfg.samples].sample_tokens.append(used)
            results.extend(answers)
        return results
