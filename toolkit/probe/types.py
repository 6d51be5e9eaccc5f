"""The contract between the sampling engines, SliCK scoring and the Ray driver."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class SamplingConfig:
    """Per prompt: one greedy answer and `num_samples` sampled answers (design.md section 2)."""

    num_samples: int = 16
    temperature: float = 0.5
    top_k: int = 40
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.num_samples}")
        if self.num_samples > 0 and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class PromptRequest:
    """One few-shot prompt. Its sampled answers depend only on (seed, question_id, prompt_index,
    sample index): never on the batch it lands in or the actor that runs it."""

    question_id: str
    prompt_index: int
    text: str


@dataclass
class PromptAnswers:
    greedy: str
    samples: list[str] = field(default_factory=list)
    greedy_tokens: int = 0  # generated tokens, stop token included when one was produced
    sample_tokens: list[int] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.greedy_tokens + sum(self.sample_tokens)


class Engine(Protocol):
    config: SamplingConfig

    def generate(self, requests: Sequence[PromptRequest]) -> list[PromptAnswers]:
        """Answers for each request, in request order."""
        ...
