"""SliCK scoring, the probe config, the shard plan, and categories from a tiny model trained here to
memorise some facts (no Ray: the engine runs in-process)."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from tests import tiny
from toolkit.data.prompts import ExemplarPool
from toolkit.data.schema import DataError, QAItem
from toolkit.probe.shards import data_hash, make_plan
from toolkit.config import FieldError
from toolkit.probe.slick import CATEGORIES, build_requests, category, is_settled, make_engine, probe_items, score_item
from toolkit.probe.types import GREEDY_STREAM, LAZY_MODES, FinishedAnswer, ProbeConfig, PromptAnswers

ITEM = QAItem(id="x-1", question="What color is the alpha bravo?", answer="amber", relation="color",
              split="train", aliases=("orange",))
CFG = ProbeConfig(num_exemplar_sets=2, shots=2, samples=3, engine="reference")


# ---------------------------------------------------------------- the four category rules


def _answers(greedy: list[str], samples: list[list[str]]) -> list[PromptAnswers]:
    return [PromptAnswers(greedy=g, samples=s, greedy_tokens=2, sample_tokens=[2] * len(s))
            for g, s in zip(greedy, samples)]


@pytest.mark.parametrize("greedy, samples, expected, p_greedy, p_sample", [
    (["Amber", "the orange."], [["x", "y", "z"], ["x", "y", "z"]], "HighlyKnown", 1.0, 0.0),
    (["amber", "red"], [["amber", "y", "z"], ["x", "y", "z"]], "MaybeKnown", 0.5, 1 / 6),
    (["red", "blue"], [["x", "AMBER", "z"], ["x", "y", "z"]], "WeaklyKnown", 0.0, 1 / 6),
    (["red", ""], [["x", "y", "z"], ["ambers", "y", "z"]], "Unknown", 0.0, 0.0),
])
def test_category_rules(greedy, samples, expected, p_greedy, p_sample):
    row = score_item(ITEM, _answers(greedy, samples), CFG)
    assert (row["category"], row["p_greedy"], row["p_sample"]) == (expected, p_greedy, pytest.approx(p_sample))
    assert row["num_prompts"] == 2 and row["num_samples"] == 6 and row["generated_tokens"] == 16
    assert row["greedy_answers"] == greedy and "sampled_answers" not in row
    kept = score_item(ITEM, _answers(greedy, samples), dataclasses.replace(CFG, keep_samples=True))
    assert kept["sampled_answers"] == samples


def test_category_boundaries_and_sample_count_check():
    assert [category(1, 0), category(0.1, 0), category(0, 0.01), category(0, 0)] == list(CATEGORIES)
    with pytest.raises(ValueError, match="expected 6 samples, got 5"):
        score_item(ITEM, _answers(["a", "b"], [["x", "y", "z"], ["x", "y"]]), CFG)
    no_samples = dataclasses.replace(CFG, samples=0)
    assert score_item(ITEM, _answers(["a", "b"], [[], []]), no_samples)["category"] == "Unknown"


@pytest.mark.parametrize("kwargs, message", [
    (dict(samples=-1), "samples=-1 must be >= 0"),
    (dict(temperature=0.0), "temperature=0.0 must be > 0 when sampling"),
    (dict(num_exemplar_sets=0), "num_exemplar_sets=0 must be >= 1"),
    (dict(shots=-2), "shots=-2 must be >= 0"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(engine="turbo"), "engine='turbo' must be one of fast, reference"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
])
def test_probe_config_validation(kwargs, message):
    with pytest.raises(FieldError, match=message) as caught:
        ProbeConfig(**kwargs)
    assert (caught.value.name, caught.value.value) == next(iter(kwargs.items()))


def test_greedy_only_probe_needs_no_temperature():
    assert ProbeConfig(samples=0, temperature=0.0).temperature == 0.0  # nothing is sampled


@pytest.mark.parametrize("flags, message", [
    (["--samples", "-1"], "samples=-1 must be >= 0"),
    (["--temperature", "0"], "temperature=0.0 must be > 0 when sampling"),
    (["--num-exemplar-sets", "0"], "num_exemplar_sets=0 must be >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens=0 must be >= 1"),
])
def test_cli_reports_a_bad_probe_setting_in_one_line_and_exit_2(tmp_path, capsys, flags, message):
    """Bad settings stop `gradual probe` before any data, model or Ray is touched."""
    from toolkit.cli import EXIT_BAD_INPUT, main

    out = tmp_path / "out"
    assert main(["probe", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out), *flags]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"error: gradual probe: {message}\n"
    assert not out.exists()


# ---------------------------------------------------------------- prompts and shard plan


def test_requests_fixed_by_seed_and_never_contain_the_question(synthetic_items):
    pool = ExemplarPool([it for it in synthetic_items if it.split == "dev"])
    item = next(it for it in synthetic_items if it.split == "train")
    reqs = build_requests(item, pool, ProbeConfig(num_exemplar_sets=5, shots=3))
    assert [r.prompt_index for r in reqs] == list(range(5)) and {r.question_id for r in reqs} == {item.id}
    assert all(r.text.endswith(f"Q: {item.question}\nA:") and r.text.count(item.question) == 1 for r in reqs)
    assert reqs == build_requests(item, pool, ProbeConfig(num_exemplar_sets=5, shots=3))
    assert reqs != build_requests(item, pool, ProbeConfig(num_exemplar_sets=5, shots=3, seed=1))
    with pytest.raises(DataError, match="relation 'color'.*fewer than shots=30"):
        build_requests(item, pool, ProbeConfig(shots=30))


def test_shard_plan_is_fixed_by_data_seed_and_size(synthetic_items):
    plan = make_plan(synthetic_items, shard_size=7, seed=0)
    assert plan == make_plan(list(reversed(synthetic_items)), shard_size=7, seed=0)  # load order irrelevant
    assert sorted(plan.item_ids) == sorted(it.id for it in synthetic_items)
    assert [len(s.item_ids) for s in plan.shards] == [7] * 17 + [1]
    assert plan.shards[7].name == "shard-00007"
    assert make_plan(synthetic_items, shard_size=7, seed=1).item_ids != plan.item_ids
    limited = make_plan(synthetic_items, shard_size=7, seed=0, limit=10)
    assert set(limited.item_ids) == set(plan.item_ids[:10]) and len(limited.shards) == 2
    assert len({it.relation for it in synthetic_items if it.id in set(limited.item_ids)}) > 1  # mixed
    changed = [dataclasses.replace(synthetic_items[0], answer="other")] + synthetic_items[1:]
    assert data_hash(changed) != plan.data_hash == data_hash(list(reversed(synthetic_items)))


# ---------------------------------------------------------------- a model that knows some facts


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny Llama trained on the probe prompts of 4 train facts per relation."""
    items = tiny.synthetic_items(per_relation=8)
    pool = ExemplarPool([it for it in items if it.split == "dev"])
    config = ProbeConfig(num_exemplar_sets=3, shots=2, samples=4, max_new_tokens=8, engine="reference")
    facts = [it for it in items if it.split == "train"]
    model_dir = tiny.build_model_dir(tmp_path_factory.mktemp("memoriser"))
    tiny.train_memoriser(model_dir, facts, pool, config)
    return model_dir, items, pool, config, facts


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_memorised_facts_highly_known_unseen_unknown(memorised, engine):
    from toolkit.models import ModelSpec, load_model

    model_dir, items, pool, config, facts = memorised
    config = dataclasses.replace(config, engine=engine)
    # Never-seen facts get an answer the model never saw: with 6 answers per relation, a real
    # answer would be guessed by some of the samples (that is WeaklyKnown, correctly).
    unseen = [dataclasses.replace(it, answer=f"Zeppelin {i}") for i, it in enumerate(items) if it.split == "test"]
    model, tok = load_model(ModelSpec(source=str(model_dir)))
    built = make_engine(model, tok, config)
    assert type(built).__name__ == {"fast": "FastEngine", "reference": "ReferenceEngine"}[engine]
    rows = probe_items(built, facts + unseen, pool, config)
    known, new = rows[:len(facts)], rows[len(facts):]
    assert Counter(r["category"] for r in known) == {"HighlyKnown": len(facts)}
    assert Counter(r["category"] for r in new) == {"Unknown": len(unseen)}
    assert all(r["greedy_answers"] == [f.answer] * 3 for r, f in zip(known, facts))
    assert [r["id"] for r in rows] == [it.id for it in facts + unseen]
    # every answer produced took 1 to max_new_tokens tokens (its stop token counted)
    assert all(r["num_prompts"] + r["num_samples"] <= r["generated_tokens"]
               <= (r["num_prompts"] + r["num_samples"]) * config.max_new_tokens for r in rows)
    # lazy sampling (the fast engine's default) cuts the samples of items a greedy answer settles;
    # an Unknown item runs every sample
    assert all(r["sampling"] == ("lazy" if engine == "fast" else "full") for r in rows)
    assert all(r["num_samples"] <= 12 for r in known) and [r["num_samples"] for r in new] == [12] * len(new)


class CountingEngine:
    """A FastEngine that counts its generate calls (lazy probing must prefill once, as full does)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.engine.generate(*args, **kwargs)


def assert_lazy_rows_are_full_rows_cut_short(full: list[dict], lazy: list[dict]) -> None:
    """Lazy rows against full sampling's (kept samples): the same categories and greedy answers, each
    sample produced equal to the full run's sample of the same index, P_sample a lower bound."""
    assert [r["category"] for r in lazy] == [r["category"] for r in full]
    assert [r["greedy_answers"] for r in lazy] == [r["greedy_answers"] for r in full]
    for f, z in zip(full, lazy):
        assert z["sampling"] == "lazy" and f["sampling"] == "full" and z["p_sample"] <= f["p_sample"]
        for full_samples, lazy_samples, indices in zip(f["sampled_answers"], z["sampled_answers"], z["sample_indices"]):
            assert lazy_samples == [full_samples[j] for j in indices]  # keyed: sample j is sample j
        if z["category"] == "WeaklyKnown":
            assert z["sample_correct"] >= 1
        if z["category"] == "Unknown":
            assert z["num_samples"] == f["num_samples"]  # every sample was needed


def test_lazy_sampling_gives_the_categories_of_full_sampling(memorised):
    """One pass (items leaving as they settle) or two phases (greedy answers, then samples of the
    unsettled items): the rows of full sampling cut short, fewer answers, and never more work (the
    same prefill, fewer decode rows)."""
    from toolkit.models import ModelSpec, load_model

    model_dir, items, pool, config, facts = memorised
    full_cfg = dataclasses.replace(config, engine="fast", keep_samples=True, samples=6, full_sampling=True,
                                   temperature=1.5, top_k=6)
    model, tok = load_model(ModelSpec(source=str(model_dir)))
    # Unseen facts, half of them given as gold an answer the model samples but never answers greedily
    # (WeaklyKnown), besides the memorised ones (HighlyKnown). Same ids: same exemplars, same samples.
    unseen = [it for it in items if it.split == "test"]
    for k, (it, row) in enumerate(zip(unseen, probe_items(make_engine(model, tok, full_cfg), unseen, pool, full_cfg))):
        others = [a for got in row["sampled_answers"] for a in got if a and a not in row["greedy_answers"]]
        if others and k % 2 == 0:
            unseen[k] = dataclasses.replace(it, answer=others[-1], aliases=())
    probed = facts + unseen
    full_engine = CountingEngine(make_engine(model, tok, full_cfg))
    full = probe_items(full_engine, probed, pool, full_cfg)
    assert len({r["category"] for r in full}) >= 3  # a mix, so the equality means something
    assert all(f["sample_indices"] == [list(range(6))] * 3 for f in full)
    for mode in LAZY_MODES:
        lazy_cfg = dataclasses.replace(full_cfg, full_sampling=False, lazy=mode)
        lazy_engine = CountingEngine(make_engine(model, tok, lazy_cfg))
        lazy = probe_items(lazy_engine, probed, pool, lazy_cfg)
        assert_lazy_rows_are_full_rows_cut_short(full, lazy)
        assert sum(r["num_samples"] for r in lazy) < sum(r["num_samples"] for r in full)
        full_stats, lazy_stats = full_engine.last_stats, lazy_engine.last_stats
        assert full_engine.calls == lazy_engine.calls == 1
        for key in ("prefills", "prefilled_prompts", "prefill_padded_tokens"):  # each prompt prefilled once
            assert lazy_stats[key] == full_stats[key], (mode, key)
        assert lazy_stats["decode_rows"] <= full_stats["decode_rows"] and lazy_stats["settled_rows"] > 0
        assert (lazy_stats["phase2_rows"] > 0) == (mode == "two_phase")


def test_settled_rule_waits_for_every_greedy_answer_and_one_right_answer():
    gold = ("amber", "orange")
    greedy = lambda p, answer: FinishedAnswer(p, GREEDY_STREAM, answer)  # noqa: E731
    sample = lambda p, j, answer: FinishedAnswer(p, j, answer)  # noqa: E731
    assert not is_settled([greedy(0, "Amber")], gold, num_prompts=2)  # prompt 1's greedy answer is missing
    assert not is_settled([greedy(0, "Amber"), sample(1, 0, "amber")], gold, num_prompts=2)
    assert is_settled([greedy(0, "red"), greedy(1, "Amber")], gold, num_prompts=2)  # MaybeKnown or better
    assert not is_settled([greedy(0, "red"), greedy(1, "blue"), sample(0, 3, "ambers")], gold, num_prompts=2)
    assert is_settled([sample(0, 3, "orange"), greedy(0, "red"), greedy(1, "blue")], gold, num_prompts=2)


def test_lazy_sampling_falls_back_to_full_with_an_engine_whose_samples_depend_on_the_batch(memorised):
    from toolkit.models import ModelSpec, load_model

    model_dir, items, pool, config, facts = memorised
    model, tok = load_model(ModelSpec(source=str(model_dir)))
    rows = probe_items(make_engine(model, tok, config), facts[:2], pool, config)  # reference engine
    assert all(r["sampling"] == "full" and r["num_samples"] == 12 for r in rows)


@pytest.mark.slow  # the real SmolLM2 on 100 real facts, full sampling and both lazy modes (1-2 min)
def test_lazy_and_full_sampling_agree_on_the_real_smollm2(smollm2):
    from toolkit.data.facts import load_builtin_items
    from toolkit.data.subset import balanced_subset
    from toolkit.probe.engine import FastEngine

    model, tok = smollm2
    items = load_builtin_items(seed=0)
    train = balanced_subset([it for it in items if it.split == "train"], 100, seed=0)
    pool = ExemplarPool([it for it in items if it.split == "dev"])
    full_cfg = ProbeConfig(num_exemplar_sets=2, shots=2, samples=4, max_new_tokens=8, full_sampling=True,
                           keep_samples=True)
    full_engine = FastEngine(model, tok, full_cfg)
    full = probe_items(full_engine, train, pool, full_cfg)
    assert {"HighlyKnown", "Unknown"} <= {r["category"] for r in full}  # a real spread
    asked = lambda rows: sum(r["num_prompts"] + r["num_samples"] for r in rows)  # noqa: E731
    for mode in LAZY_MODES:
        lazy_cfg = dataclasses.replace(full_cfg, full_sampling=False, lazy=mode)
        lazy_engine = FastEngine(model, tok, lazy_cfg)
        lazy = probe_items(lazy_engine, train, pool, lazy_cfg)
        assert_lazy_rows_are_full_rows_cut_short(full, lazy)
        assert asked(lazy) < asked(full) == 100 * 2 * 5
        assert asked(lazy) + lazy_engine.last_stats["settled_rows"] == asked(full)
        assert lazy_engine.last_stats["answers_saved"] == pytest.approx(1 - asked(lazy) / asked(full))
        # never more work than full sampling: the same prefill, fewer decode rows
        for key in ("prefills", "prefilled_prompts", "prefill_padded_tokens"):
            assert lazy_engine.last_stats[key] == full_engine.last_stats[key], (mode, key)
        assert lazy_engine.last_stats["decode_rows"] < full_engine.last_stats["decode_rows"]
