"""Exemplar selection and the two prompt formats."""
import pytest

from toolkit.data.prompts import (ExemplarPool, probe_prompt, sft_prompt, sft_target, stable_seed,
                                  token_counts)
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
