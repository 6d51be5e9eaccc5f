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


def score_item(item: QAItem, answers: Sequence[PromptAnswers], config: ProbeConfig, lazy: bool = False) -> dict:
    """One result row from the item's answers (one PromptAnswers per prompt, in prompt order). Full
    sampling: every prompt has all n samples and P_sample is exact. Lazy: the samples asked for so
    far (none when a greedy answer was right), so P_sample is a lower bound; the category is exact."""
    if len(answers) != config.num_exemplar_sets:
        raise ValueError(f"item '{item.id}': expected {config.num_exemplar_sets} prompts' answers, "
                         f"got {len(answers)}")
    gold = item.gold_answers
    greedy_correct = sum(is_correct(a.greedy, gold) for a in answers)
    num_samples = sum(len(a.samples) for a in answers)
    sample_correct = sum(is_correct(s, gold) for a in answers for s in a.samples)
    p_greedy = greedy_correct / len(answers)
    # Over the full count, not the returned one: an engine returning too few samples must not
    # inflate P_sample (and a lazy row's P_sample stays a lower bound of the full one).
    expected_samples = len(answers) * config.samples
    if num_samples > expected_samples or (not lazy and num_samples != expected_samples):
        raise ValueError(f"item '{item.id}': expected {expected_samples} samples, got {num_samples}")
    p_sample = sample_correct / expected_samples if expected_samples else 0.0
    row = dict(id=item.id, relation=item.relation, question=item.question, answer=item.answer,
               category=category(p_greedy, p_sample), p_greedy=p_greedy, p_sample=p_sample,
               greedy_correct=greedy_correct, sample_correct=sample_correct, num_prompts=len(answers),
               num_samples=num_samples, sampling="lazy" if lazy else "full",
               greedy_answers=[a.greedy for a in answers], generated_tokens=sum(a.total_tokens for a in answers))
    if config.keep_samples:
        row["sampled_answers"] = [list(a.samples) for a in answers]
    return row


def sample_rounds(samples: int, round_size: int) -> list[range]:
    """The sample indices of each lazy round: round_size per prompt, the last round what is left."""
    return [range(start, min(start + round_size, samples)) for start in range(0, samples, round_size)]


def probe_items(engine: Engine, items: Sequence[QAItem], pool: ExemplarPool, config: ProbeConfig) -> list[dict]:
    """Rows for `items`, in order. The prompts of all items go to the engine together so it can batch
    freely; every answer depends only on its key, never on the batch.

    Lazy (the default, with an engine whose samples are keyed): the greedy answers of every prompt
    first; then, only for items none of whose greedy answers is right, samples in rounds, an item
    leaving at the round where a sample is right. HighlyKnown and MaybeKnown rest on the greedy
    answers alone and WeaklyKnown on one right sample, so the categories equal full sampling's."""
    n = config.num_exemplar_sets
    per_item = [build_requests(item, pool, config) for item in items]
    requests = [req for reqs in per_item for req in reqs]
    lazy = not config.full_sampling and config.samples > 0 and getattr(engine, "keyed_samples", False)
    answers = engine.generate(requests, sample_indices=[] if lazy else None)
    if len(answers) != len(requests):
        raise ValueError(f"engine returned {len(answers)} answers for {len(requests)} prompts")
    by_item = [answers[i * n:(i + 1) * n] for i in range(len(items))]
    if lazy:
        gold = [item.gold_answers for item in items]
        pending = [i for i, got in enumerate(by_item) if not any(is_correct(a.greedy, gold[i]) for a in got)]
        for indices in sample_rounds(config.samples, config.sample_round):
            if not pending:
                break
            batch = [req for i in pending for req in per_item[i]]
            sampled = engine.generate(batch, sample_indices=indices, greedy=False)
            still = []
            for k, i in enumerate(pending):
                for prompt, extra in zip(by_item[i], sampled[k * n:(k + 1) * n]):
                    prompt.samples.extend(extra.samples)
                    prompt.sample_tokens.extend(extra.sample_tokens)
                if not any(is_correct(s, gold[i]) for a in by_item[i] for s in a.samples):
                    still.append(i)
            pending = still
    return [score_item(item, got, config, lazy) for item, got in zip(items, by_item)]
