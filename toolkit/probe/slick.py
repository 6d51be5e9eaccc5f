"""SliCK knowledge categories (design.md section 2): few-shot prompts per item, one greedy answer and
`n` samples per prompt, P_greedy / P_sample, and the four categories."""
from __future__ import annotations

from typing import Sequence

from toolkit.config import ConfigError
from toolkit.data.matching import is_correct
from toolkit.data.prompts import ExemplarPool, probe_prompt
from toolkit.data.schema import QAItem

from .types import ENGINES, Engine, ProbeConfig, PromptAnswers, PromptRequest

HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
CATEGORIES = (HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN)


class ProbeConfigError(ConfigError):
    """An output directory written with other settings, or settings this machine cannot run; one line."""


# ---------------------------------------------------------------- engines


def make_engine(model, tokenizer, config: ProbeConfig) -> Engine:
    if config.engine == "fast":
        from .engine import FastEngine

        return FastEngine(model, tokenizer, config)
    from .reference import ReferenceEngine

    return ReferenceEngine(model, tokenizer, config)


# ---------------------------------------------------------------- scoring


def category(p_greedy: float, p_sample: float) -> str:
    if p_greedy == 1:
        return HIGHLY_KNOWN
    if p_greedy > 0:
        return MAYBE_KNOWN
    return WEAKLY_KNOWN if p_sample > 0 else UNKNOWN


def build_requests(item: QAItem, pool: ExemplarPool, config: ProbeConfig) -> list[PromptRequest]:
    """The item's N_ex few-shot prompts; exemplar sets are fixed by (seed, item id)."""
    sets = pool.select(item, config.num_exemplar_sets, config.shots, config.seed)
    return [PromptRequest(question_id=item.id, prompt_index=i, text=probe_prompt(exemplars, item.question))
            for i, exemplars in enumerate(sets)]


def score_item(item: QAItem, answers: Sequence[PromptAnswers], config: ProbeConfig) -> dict:
    """One result row from the item's answers (one PromptAnswers per prompt, in prompt order)."""
    if len(answers) != config.num_exemplar_sets:
        raise ValueError(f"item '{item.id}': expected {config.num_exemplar_sets} prompts' answers, "
                         f"got {len(answers)}")
    gold = item.gold_answers
    greedy_correct = sum(is_correct(a.greedy, gold) for a in answers)
    num_samples = sum(len(a.samples) for a in answers)
    sample_correct = sum(is_correct(s, gold) for a in answers for s in a.samples)
    p_greedy = greedy_correct / len(answers)
    # Expected count, not the returned one: an engine returning too few samples must not inflate P_sample.
    expected_samples = len(answers) * config.samples
    if num_samples != expected_samples:
        raise ValueError(f"item '{item.id}': expected {expected_samples} samples, got {num_samples}")
    p_sample = sample_correct / expected_samples if expected_samples else 0.0
    row = dict(id=item.id, relation=item.relation, question=item.question, answer=item.answer,
               category=category(p_greedy, p_sample), p_greedy=p_greedy, p_sample=p_sample,
               greedy_correct=greedy_correct, sample_correct=sample_correct, num_prompts=len(answers),
               num_samples=num_samples, greedy_answers=[a.greedy for a in answers],
               generated_tokens=sum(a.total_tokens for a in answers))
    if config.keep_samples:
        row["sampled_answers"] = [list(a.samples) for a in answers]
    return row


def probe_items(engine: Engine, items: Sequence[QAItem], pool: ExemplarPool, config: ProbeConfig) -> list[dict]:
    """Rows for `items`, in order. All prompts go to the engine in one call so it can batch freely;
    the result depends only on the items and the config, never on batching across calls."""
    requests = [req for item in items for req in build_requests(item, pool, config)]
    answers = engine.generate(requests)
    if len(answers) != len(requests):
        raise ValueError(f"engine returned {len(answers)} answers for {len(requests)} prompts")
    n = config.num_exemplar_sets
    return [score_item(item, answers[i * n:(i + 1) * n], config) for i, item in enumerate(items)]
