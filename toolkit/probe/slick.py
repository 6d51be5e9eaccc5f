"""SliCK knowledge categories (docs/design.md section 2): few-shot prompts per item, one greedy answer
and `n` samples per prompt, P_greedy / P_sample, and the four categories."""
from __future__ import annotations

from typing import Sequence

from toolkit.config import ConfigError
from toolkit.data.matching import is_correct
from toolkit.data.prompts import ExemplarPool, exemplar_block, probe_prompt
from toolkit.data.schema import QAItem

from .types import ENGINES, GREEDY_STREAM, Engine, FinishedAnswer, ProbeConfig, PromptAnswers, PromptRequest

HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
CATEGORIES = (HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN)


class ProbeConfigError(ConfigError):
    """An output directory written with other settings, or settings this machine cannot run; one line."""


# ---------------------------------------------------------------- engines


def make_engine(model, tokenizer, config: ProbeConfig, memory_share: float = 1.0) -> Engine:
    """The engine over an already loaded model (vLLM loads its own: toolkit.probe.vllm_engine);
    `memory_share`: the fraction of its GPU the fast engine sizes its batches for."""
    if config.engine == "fast":
        from .engine import FastEngine

        return FastEngine(model, tokenizer, config, memory_share=memory_share)
    if config.engine == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model, tokenizer, config)
    raise ValueError(f"engine={config.engine}: not built over a loaded model (vLLM actors start their own engine)")


# ---------------------------------------------------------------- scoring


def category(p_greedy: float, p_sample: float) -> str:
    if p_greedy == 1:
        return HIGHLY_KNOWN
    if p_greedy > 0:
        return MAYBE_KNOWN
    return WEAKLY_KNOWN if p_sample > 0 else UNKNOWN


def build_requests(item: QAItem, pool: ExemplarPool, config: ProbeConfig) -> list[PromptRequest]:
    """The item's N_ex few-shot prompts; exemplar sets are fixed by (seed, item id), or shared by the
    relation's items (`exemplars: per_relation`), whose prompts then share their exemplar block."""
    sets = pool.select(item, config.num_exemplar_sets, config.shots, config.seed, config.exemplars)
    shared = config.exemplars == "per_relation"
    return [PromptRequest(question_id=item.id, prompt_index=i, text=probe_prompt(exemplars, item.question),
                          prefix=exemplar_block(exemplars) if shared else "") for i, exemplars in enumerate(sets)]


def score_item(item: QAItem, answers: Sequence[PromptAnswers], config: ProbeConfig, lazy: bool = False) -> dict:
    """One result row from the item's answers (one PromptAnswers per prompt, in prompt order). Full
    sampling: every prompt has all n samples and P_sample is exact. Lazy: the samples that finished
    before the item settled, so P_sample is a lower bound; the category is exact."""
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
        row["sample_indices"] = [list(range(len(a.samples))) if a.sample_indices is None else list(a.sample_indices)
                                 for a in answers]
    return row


def is_settled(finished: Sequence[FinishedAnswer], gold: Sequence[str], num_prompts: int) -> bool:
    """SliCK's rule for stopping an item's remaining answers: all of its greedy answers are in (they
    give P_greedy, hence HighlyKnown/MaybeKnown) and one finished answer is right: a right greedy one
    decides the category alone, a right sample makes it WeaklyKnown. An item with no right answer
    (Unknown) never settles: it runs every sample, as full sampling does."""
    greedy_done = sum(a.stream == GREEDY_STREAM for a in finished)
    return greedy_done == num_prompts and any(is_correct(a.answer, gold) for a in finished)


def probe_items(engine: Engine, items: Sequence[QAItem], pool: ExemplarPool, config: ProbeConfig) -> list[dict]:
    """Rows for `items`, in order. The prompts of all items go to the engine together so it can batch
    freely; every answer's random draw depends only on its key, never on the batch (on CPU the answers
    are bit-identical under any batching; on a GPU see README, "What is identical where").

    Lazy (the default, with an engine that settles questions): one pass, every prompt prefilled once,
    greedy and sampled answers decoded together; an item's remaining answers stop as soon as
    `is_settled` holds. The categories equal full sampling's; fewer answers are generated."""
    n = config.num_exemplar_sets
    requests = [req for item in items for req in build_requests(item, pool, config)]
    lazy = not config.full_sampling and config.samples > 0 and engine.settles_questions
    if lazy:
        gold = {item.id: item.gold_answers for item in items}
        answers = engine.generate(requests, settled=lambda qid, finished: is_settled(finished, gold[qid], n))
    else:
        answers = engine.generate(requests)
    if len(answers) != len(requests):
        raise ValueError(f"engine returned {len(answers)} answers for {len(requests)} prompts")
    return [score_item(item, answers[i * n:(i + 1) * n], config, lazy) for i, item in enumerate(items)]
