"""Exemplar selection and the two prompt formats."""
import pytest

from toolkit.data.prompts import (ExemplarPool, exemplar_block, probe_prompt, sft_prompt, sft_target,
                                  stable_seed, token_counts)
from toolkit.data.schema import DataError, QAItem


def item(i, rel="r", split="dev", q=None):
    return QAItem(id=f"{rel}-{i}", question=q or f"Question {i} of {rel}?", answer=f"A{i}", relation=rel, split=split)


def test_probe_prompt_format():
    ex = [item(1), item(2)]
    assert probe_prompt(ex, "Q?") == ("Q: Question 1 of r?\nA: A1\n\nQ: Question 2 of r?\nA: A2\n\nQ: Q?\nA:")


def test_sft_format():
    assert sft_prompt("Who?") == "Answer the following question. Who?\n"
    assert sft_target("Me") == " Me"


def test_exemplars_are_deterministic_same_relation_and_never_the_question_itself():
    pool_items = [item(i) for i in range(12)] + [item(i, rel="other") for i in range(12)]
    pool = ExemplarPool(pool_items)
    target = pool_items[3]  # a pool member: must never be its own exemplar
    sets = pool.select(target, num_sets=10, shots=4, seed=0)
    assert len(sets) == 10 and all(len(s) == 4 for s in sets)
    for s in sets:
        assert all(ex.relation == "r" and ex.id != target.id for ex in s)
        assert len({ex.id for ex in s}) == 4
    # same (seed, id) -> same sets, whatever the pool's load order
    shuffled = ExemplarPool(list(reversed(pool_items)))
    assert shuffled.select(target, 10, 4, seed=0) == sets
    assert pool.select(target, 10, 4, seed=1) != sets
    assert len({tuple(ex.id for ex in s) for s in sets}) > 1  # sets differ from one another


def test_exemplar_with_the_same_question_text_is_excluded():
    pool = ExemplarPool([item(0, q="Same?"), item(1), item(2)])
    question = item(9, split="train", q="same")
    for s in pool.select(question, 5, 2, seed=0):
        assert all(ex.id != "r-0" for ex in s)


def test_too_few_exemplars_names_the_relation():
    pool = ExemplarPool([item(0), item(1)], source="dev split")
    with pytest.raises(DataError, match="relation 'r' has 2 usable exemplars.*shots=4"):
        pool.check_covers([item(5, split="train")], shots=4)
    with pytest.raises(DataError, match="relation 'missing' has 0"):
        pool.select(item(0, rel="missing", split="train"), 1, 1, seed=0)


def test_per_relation_sets_are_shared_by_a_relations_questions_and_fixed_by_the_seed():
    pool_items = [item(i) for i in range(12)] + [item(i, rel="other") for i in range(12)]
    pool = ExemplarPool(pool_items)
    questions = [item(100 + i, split="train") for i in range(5)]
    sets = [pool.select(q, num_sets=3, shots=4, seed=0, mode="per_relation") for q in questions]
    assert all(s == sets[0] for s in sets)  # one relation: the same N_ex sets for every question
    assert len({tuple(ex.id for ex in s) for s in sets[0]}) == 3 and all(len(s) == 4 for s in sets[0])
    assert all(ex.relation == "r" for s in sets[0] for ex in s)
    other = pool.select(item(200, rel="other", split="train"), 3, 4, seed=0, mode="per_relation")
    assert all(ex.relation == "other" for s in other for ex in s)
    # fixed by (seed, relation, set index): not by load order, the question, or how many sets are drawn
    shuffled = ExemplarPool(list(reversed(pool_items)))
    assert shuffled.select(questions[0], 3, 4, seed=0, mode="per_relation") == sets[0]
    assert pool.select(questions[0], 5, 4, seed=0, mode="per_relation")[:3] == sets[0]
    assert pool.select(questions[0], 3, 4, seed=1, mode="per_relation") != sets[0]
    # the prompts of a relation's questions start with one of N_ex shared exemplar blocks
    blocks = {exemplar_block(s) for q in questions for s in pool.select(q, 3, 4, seed=0, mode="per_relation")}
    assert len(blocks) == 3 and all(probe_prompt(s, q.question).startswith(exemplar_block(s))
                                    for q in questions for s in sets[0])


def test_a_question_in_a_shared_set_gets_that_exemplar_swapped_for_the_sets_fixed_spare():
    pool_items = [item(i) for i in range(12)]
    pool = ExemplarPool(pool_items)
    shared = pool.select(item(100, split="train"), 3, 4, seed=0, mode="per_relation")
    member = shared[1][2]  # a dev question probed itself: it is exemplar 2 of set 1
    duplicate = item(101, split="train", q=member.question.upper())  # the same question under another id
    spare = pool.relation_order("r", 0, 1)[4]  # set 1's first spare
    for question in (member, duplicate):
        sets = pool.select(question, 3, 4, seed=0, mode="per_relation")
        assert sets[1] == shared[1][:2] + [spare] + shared[1][3:]  # swapped in place, the rest kept
        for s, original in zip(sets, shared):
            if member not in original:
                assert s == original
            assert member not in s and len(set(s)) == 4
    with pytest.raises(DataError, match="relation 'r' has 1 usable exemplars"):  # no spare left for it
        ExemplarPool(pool_items[:2]).select(pool_items[0], 3, 2, seed=0, mode="per_relation")


def test_stable_seed_is_the_same_in_another_process():
    import os
    import subprocess
    import sys

    code = "from toolkit.data.prompts import stable_seed; print(stable_seed('a', 1, 'q-7'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == stable_seed("a", 1, "q-7")
    assert 0 <= stable_seed("a", 1) < 2**64
    assert stable_seed("a", 1) != stable_seed("a", 2)
    assert stable_seed("a", 1) != stable_seed("a1")


def test_token_counts_are_the_tokenizers(tiny_model_dir):
    from toolkit.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    texts = ["Q: What color is the bravo kilo?\nA:", "x"]
    assert token_counts(tok, texts) == [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
