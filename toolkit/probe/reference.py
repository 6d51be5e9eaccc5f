"""The reference engine: Hugging Face `generate` used the straightforward way.

A greedy pass over a batch of prompts, then a sampled pass with `num_return_sequences=n`, which
prefills every prompt n times over. It is the correctness oracle for the fast engine and the
baseline in the sampling benchmark.
"""
from __future__ import annotations

from typing import Sequence

import torch

from toolkit.data.prompts import stable_seed
from toolkit.models import encode_prompts

from .answers import AnswerDecoder
from .attention import use_stock_attention
from .settling import prompt_answers
from .types import GREEDY_STREAM, PromptAnswers, PromptRequest, ProbeConfig, Settled


class ReferenceEngine:
    """`generate` seeds one torch generator per batch, so a sample depends on its batch: lazy probing
    cannot ask for a few samples at a time and stay exact (the probe samples in full with it)."""

    settles_questions = False

    def __init__(self, model, tokenizer, config: ProbeConfig, batch_size: int = 16):
        use_stock_attention(model)  # the baseline users would run, not the fast engine's attention
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.batch_size = batch_size
        self.answers = AnswerDecoder(tokenizer)
        self.last_stats: dict = {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def close(self) -> None:
        """Nothing to let go of: generate() holds no cache between calls."""

    @torch.inference_mode()
    def _generate(self, texts: list[str], **kwargs) -> list[list[int]]:
        ids = encode_prompts(self.tokenizer, texts)
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        out = self.model.generate(**enc, max_new_tokens=self.config.max_new_tokens,
                                  eos_token_id=self.answers.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  **kwargs)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    def generate(self, requests: Sequence[PromptRequest], sample_indices: Sequence[int] | None = None,
                 greedy: bool = True, settled: Settled | None = None) -> list[PromptAnswers]:
        cfg = self.config
        if sample_indices is not None or not greedy or settled is not None:
            raise ValueError("the reference engine answers whole requests only (greedy + every sample)")
        streams = [GREEDY_STREAM, *range(cfg.samples)]
        results: list[PromptAnswers] = []
        for start in range(0, len(requests), self.batch_size):
            batch = list(requests[start:start + self.batch_size])
            texts = [r.text for r in batch]
            greedy_rows = self._generate(texts, do_sample=False, top_k=None, top_p=None, temperature=None)
            rows = {p * len(streams): decoded for p, decoded in enumerate(self.answers(greedy_rows))}
            if cfg.samples > 0:
                torch.manual_seed(stable_seed("reference", cfg.seed, batch[0].question_id, batch[0].prompt_index))
                sampled = self._generate(texts, do_sample=True, temperature=cfg.temperature,
                                         top_k=cfg.top_k or None, top_p=None, num_return_sequences=cfg.samples)
                # generate's rows: prompt i's samples at i * samples + j; here sample j of prompt i
                # sits at stream 1 + j, as every engine lays a prompt's answers out
                for row, decoded in enumerate(self.answers(sampled)):
                    rows[row // cfg.samples * len(streams) + 1 + row % cfg.samples] = decoded
            results.extend(prompt_answers(rows, len(batch), streams))
        return results
