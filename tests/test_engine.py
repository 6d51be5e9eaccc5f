"""FastEngine (toolkit/probe/engine.py): same greedy answers as the HF-generate reference, samples from
the right distribution, independent of batching and of every feature flag; batches sized for its GPU
share and retried smaller after an out-of-memory error."""
import collections
import contextlib
import dataclasses
import gc
import logging
import random
import time
import warnings
import weakref

import pytest
import torch

from tests import tiny
from toolkit.data.matching import extract_answer
from toolkit.models import ModelSpec, load_model, load_tokenizer, newline_token_ids
from toolkit.probe.answers import AnswerDecoder
from toolkit.probe.engine import FastEngine, graph_rows
from toolkit.probe.gumbel import gumbel_noise, mix64, to_int64
from toolkit.probe.reference import ReferenceEngine
from toolkit.probe.types import PromptRequest, ProbeConfig


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    """The tiny Llama re-initialised with larger weights: at the default init scale a random model
    answers every prompt with the same token, which would make the identity checks weak."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model, load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def stoppy_lm(tiny_lm):
    """The tiny model with its stop tokens (newlines, EOS) pushed up, so rows stop at varied steps."""
    model, tokenizer = tiny_lm
    bias = torch.zeros(len(tokenizer))
    bias[newline_token_ids(tokenizer) + [tokenizer.eos_token_id]] = 2.0
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    yield model, tokenizer
    handle.remove()


def tiny_requests(count: int, start: int = 0) -> list[PromptRequest]:
    """Few-shot prompts with 0-3 exemplars: lengths vary, so batches are left padded."""
    items = tiny.synthetic_items()
    out = []
    for i in range(start, start + count):
        shots = items[i + 1:i + 1 + i % 4]
        text = "".join(f"Q: {s.question}\nA: {s.answer}\n\n" for s in shots) + f"Q: {items[i].question}\nA:"
        out.append(PromptRequest(question_id=items[i].id, prompt_index=i % 3, text=text))
    return out


def chi_square_p_value(observed: dict, expected_probs: dict, n: int) -> float:
    """Pearson goodness of fit; cells with small expectations are pooled."""
    cells = sorted(expected_probs, key=expected_probs.get, reverse=True)
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, 0
    for c in cells:
        if expected_probs[c] * n >= 5:
            stat += (observed.get(c, 0) - expected_probs[c] * n) ** 2 / (expected_probs[c] * n)
            df += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + observed.get(c, 0), pooled_exp + expected_probs[c] * n
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert set(observed) <= set(expected_probs), "an answer the model cannot produce was sampled"
    return float(torch.special.gammaincc(torch.tensor((df - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# ------------------------------------------------------------------ the counter-based RNG


def test_mix64_matches_uint64_splitmix():
    mask = (1 << 64) - 1

    def reference(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    rng = random.Random(0)
    values = [0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1] + [rng.getrandbits(64) for _ in range(200)]
    got = mix64(torch.tensor([to_int64(v) for v in values])).tolist()
    assert got == [to_int64(reference(v)) for v in values]


def test_gumbel_noise_is_keyed_by_token_id_and_has_gumbel_moments():
    keys = torch.tensor([to_int64(2 ** 64 - 5), 7])
    ids = torch.tensor([[3, 10, 99], [3, 10, 99]])
    noise = gumbel_noise(keys, torch.tensor(4), ids)
    # Candidate order does not matter: the noise belongs to (key, step, token id).
    assert torch.equal(gumbel_noise(keys, torch.tensor(4), ids.flip(-1)), noise.flip(-1))
    assert not torch.equal(gumbel_noise(keys, torch.tensor(5), ids), noise)
    assert not torch.equal(noise[0], noise[1])
    big = gumbel_noise(torch.arange(200), torch.tensor(0), torch.arange(1000).expand(200, 1000))
    assert abs(big.mean().item() - 0.5772) < 0.01 and abs(big.var().item() - 1.6449) < 0.05


# ------------------------------------------------------------------ token ids -> answers (every engine's one path)


def test_an_answer_ends_after_its_first_newline_or_eos_token_which_counts_as_used(tiny_lm):
    _, tokenizer = tiny_lm
    words = tokenizer(" Paris is", add_special_tokens=False)["input_ids"]
    later = tokenizer(" far", add_special_tokens=False)["input_ids"]
    newline, eos = newline_token_ids(tokenizer)[0], tokenizer.eos_token_id
    rows = [words + [newline] + later, words + [eos] + later, words, [newline] + words]
    used = len(words) + 1
    assert AnswerDecoder(tokenizer)(rows) == [("Paris is", used), ("Paris is", used), ("Paris is", len(words)),
                                              ("", 1)]
    # no stop token (a benchmark's forced full length): every token counts; the text still ends at its newline
    assert AnswerDecoder(tokenizer, stop_ids=[])(rows[:2]) == [("Paris is", len(rows[0])),
                                                               ("Paris is far", len(rows[1]))]
    assert AnswerDecoder(tokenizer)([]) == []


# ------------------------------------------------------------------ greedy = the reference


def test_greedy_matches_reference_on_tiny_model(tiny_lm):
    model, tokenizer = tiny_lm
    requests = tiny_requests(20)
    cfg = ProbeConfig(samples=3, max_new_tokens=8)
    fast = FastEngine(model, tokenizer, cfg, max_batch_prompts=6).generate(requests)
    ref = ReferenceEngine(model, tokenizer, cfg, batch_size=7).generate(requests)
    assert [(a.greedy, a.greedy_tokens) for a in fast] == [(a.greedy, a.greedy_tokens) for a in ref]
    assert len({a.greedy for a in fast}) > 5  # arbitrary tokens, but varied ones


def test_samples_asked_for_a_few_at_a_time_are_the_same_samples(tiny_lm):
    """Lazy probing asks for greedy answers first and samples in rounds: sample j of a prompt must not
    depend on which other answers the call produced (the key is (seed, question, prompt, j))."""
    model, tokenizer = tiny_lm
    requests = tiny_requests(9)
    cfg = ProbeConfig(samples=6, max_new_tokens=6, temperature=1.0)
    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=4)
    full = engine.generate(requests)
    greedy_only = engine.generate(requests, sample_indices=[])
    some = engine.generate(requests[::-1], sample_indices=[4, 1], greedy=False)[::-1]
    assert [a.greedy for a in greedy_only] == [a.greedy for a in full] and all(not a.samples for a in greedy_only)
    assert [a.samples for a in some] == [[a.samples[4], a.samples[1]] for a in full]
    assert all(a.greedy is None and a.greedy_tokens == 0 for a in some)
    assert len({s for a in full for s in a.samples}) > 3  # varied samples, so the equality means something
    with pytest.raises(ValueError, match="asked for no answer"):
        engine.generate(requests, sample_indices=[], greedy=False)


def test_stops_match_reference_and_finished_rows_are_compacted(stoppy_lm):
    model, tokenizer = stoppy_lm
    requests = tiny_requests(12)
    cfg = ProbeConfig(samples=8, max_new_tokens=8)
    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=12, compact_below=1.0)
    fast = engine.generate(requests)
    ref = ReferenceEngine(model, tokenizer, cfg, batch_size=12).generate(requests)
    assert [(a.greedy, a.greedy_tokens) for a in fast] == [(a.greedy, a.greedy_tokens) for a in ref]
    counts = [c for a in fast for c in [a.greedy_tokens, *a.sample_tokens]]
    assert all(1 <= c <= cfg.max_new_tokens for c in counts)
    assert min(counts) < cfg.max_new_tokens and max(counts) == cfg.max_new_tokens
    assert all("\n" not in s for a in fast for s in [a.greedy, *a.samples])
    stats = engine.last_stats
    assert stats["compactions"] > 0
    assert stats["decode_rows"] < stats["decode_steps"] * len(counts)  # dead rows cost nothing
    assert stats["generated_tokens"] == sum(counts)


@pytest.mark.timeout(120)
def test_smollm2_capitals_match_reference(smollm2):
    model, tokenizer = smollm2
    shots = "".join(f"Q: What is the capital of {c}?\nA: {a}\n\n"
                    for c, a in [("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Egypt", "Cairo")])
    questions = {"France": "Paris", "Japan": "Tokyo", "Russia": "Moscow", "the United Kingdom": "London"}
    requests = [PromptRequest(c, 0, shots + f"Q: What is the capital of {c}?\nA:") for c in questions]
    cfg = ProbeConfig(samples=4, max_new_tokens=8)
    fast = FastEngine(model, tokenizer, cfg).generate(requests)
    ref = ReferenceEngine(model, tokenizer, ProbeConfig(samples=0, max_new_tokens=8)).generate(requests)
    assert [a.greedy for a in fast] == [a.greedy for a in ref] == list(questions.values())
    assert [a.greedy_tokens for a in fast] == [a.greedy_tokens for a in ref]
    assert all(len(a.samples) == 4 and all("\n" not in s for s in a.samples) for a in fast)


# ------------------------------------------------------------------ sampling distribution


def exact_answer_distribution(model, tokenizer, prompt: str, cfg: ProbeConfig) -> dict[str, float]:
    """P(answer) by enumerating every top-k continuation up to max_new_tokens (small k only)."""
    stop = set(newline_token_ids(tokenizer)) | {tokenizer.eos_token_id}
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    probs: dict[str, float] = collections.defaultdict(float)
    frontier = [([], 1.0)]
    for step in range(cfg.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + seq for seq, _ in frontier])).logits[:, -1].float()
        values, ids = logits.topk(cfg.top_k, dim=-1)
        step_probs = torch.softmax(values / cfg.temperature, dim=-1)
        nxt = []
        for (seq, p), row_ids, row_p in zip(frontier, ids.tolist(), step_probs.tolist()):
            for t, q in zip(row_ids, row_p):
                if t in stop or step == cfg.max_new_tokens - 1:
                    probs[extract_answer(tokenizer.decode(seq + [t], skip_special_tokens=True))] += p * q
                else:
                    nxt.append((seq + [t], p * q))
        frontier = nxt
    return dict(probs)


def test_sampled_answers_follow_the_exact_distribution(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = ProbeConfig(samples=3000, temperature=0.7, top_k=3, max_new_tokens=3, seed=11)
    request = tiny_requests(1, start=5)[0]
    expected = exact_answer_distribution(model, tokenizer, request.text, cfg)
    assert len(expected) > 10
    answers = FastEngine(model, tokenizer, cfg).generate([request])[0]
    p_fast = chi_square_p_value(collections.Counter(answers.samples), expected, cfg.samples)
    assert p_fast > 1e-3, p_fast
    # The oracle agrees with the same enumeration: both engines draw from one distribution.
    torch.manual_seed(0)
    ref = ReferenceEngine(model, tokenizer, cfg).generate([request])[0]
    assert chi_square_p_value(collections.Counter(ref.samples), expected, cfg.samples) > 1e-3


def test_top_k_1_sampling_equals_greedy(tiny_lm):
    model, tokenizer = tiny_lm
    for answers in FastEngine(model, tokenizer, ProbeConfig(samples=4, top_k=1, max_new_tokens=6)
                              ).generate(tiny_requests(6)):
        assert answers.samples == [answers.greedy] * 4
        assert answers.sample_tokens == [answers.greedy_tokens] * 4


def test_no_samples(tiny_lm):
    model, tokenizer = tiny_lm
    requests = tiny_requests(5)
    greedy_only = FastEngine(model, tokenizer, ProbeConfig(samples=0, temperature=0.0, max_new_tokens=5)
                             ).generate(requests)
    with_samples = FastEngine(model, tokenizer, ProbeConfig(samples=2, max_new_tokens=5)).generate(requests)
    assert all(a.samples == [] and a.sample_tokens == [] for a in greedy_only)
    assert [a.greedy for a in greedy_only] == [a.greedy for a in with_samples]
    assert FastEngine(model, tokenizer, ProbeConfig()).generate([]) == []


# ------------------------------------------------------------------ determinism and batch invariance


def test_samples_do_not_depend_on_batching_or_flags(stoppy_lm):
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=6, max_new_tokens=6, seed=3)
    target = tiny_requests(1, start=7)[0]
    others = tiny_requests(9, start=20)
    alone = FastEngine(model, tokenizer, cfg).generate([target])[0]
    assert len(set(alone.samples)) > 1
    variants = [
        (dict(max_batch_prompts=4), others[:5] + [target] + others[5:]),
        (dict(max_batch_prompts=10, bucket_by_length=False), [target] + others),
        (dict(max_batch_prompts=3, fan_out_kv=False), others[::-1] + [target]),
        (dict(max_batch_prompts=10, compact_below=1.0), others + [target]),
        (dict(max_batch_prompts=10, compact_below=1.0, pad_rows=True), others[3:] + [target]),  # graphs' rows
    ]
    for flags, requests in variants:
        answers = FastEngine(model, tokenizer, cfg, **flags).generate(requests)
        assert answers[requests.index(target)] == alone, flags
    # Another seed, or another prompt index, gives other samples.
    moved = FastEngine(model, tokenizer, ProbeConfig(samples=6, max_new_tokens=6, seed=4)).generate([target])
    assert moved[0].samples != alone.samples


def test_all_flag_combinations_give_identical_answers(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = ProbeConfig(samples=4, max_new_tokens=5)
    requests = tiny_requests(10)
    base = FastEngine(model, tokenizer, cfg, max_batch_prompts=4).generate(requests)
    for fan_out in (True, False):
        for bucket in (True, False):
            engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=4, fan_out_kv=fan_out,
                                bucket_by_length=bucket)
            assert engine.generate(requests) == base, (fan_out, bucket)


def test_compile_flag_is_off_on_cpu(tiny_lm):
    model, tokenizer = tiny_lm
    engine = FastEngine(model, tokenizer, ProbeConfig(), compile_decode=True)
    assert not engine.compile_decode and not engine.pad_rows  # rows are padded for graphs only


def test_rows_are_padded_to_powers_of_two_for_cuda_graphs():
    """After compaction a graph-captured decode step runs the live rows padded to a power of two (at
    most the rows it ran before): 5 live of 40 run as 8, 9 as 16, 33 of 40 as 40."""
    assert [graph_rows(live, 40) for live in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 40)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 32, 40, 40]
    assert [graph_rows(live, 6) for live in (1, 3, 5, 6)] == [1, 4, 6, 6]


def decode_row_counts(model) -> tuple[list[int], object]:
    """The row count of every one-token forward (a decode step) of `model`, and the hook's handle."""
    counts: list[int] = []

    def record(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            counts.append(kwargs["input_ids"].shape[0])

    return counts, model.register_forward_pre_hook(record, with_kwargs=True)


def test_padded_rows_give_the_answers_of_unpadded_ones(stoppy_lm):
    """The row padding CUDA graphs use, run on CPU without compiling: finished rows ride along in the
    decode steps (their extra tokens land after their stop token), the answers are those of the
    unpadded engine, and every compacted step has a power-of-two row count."""
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=6, max_new_tokens=8)  # 7 rows per prompt: batch rows are no power of two
    requests = tiny_requests(9)
    runs = {}
    for pad in (False, True):
        counts, handle = decode_row_counts(model)
        engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=3, compact_below=1.0, pad_rows=pad)
        try:
            answers = engine.generate(requests)
        finally:
            handle.remove()
        runs[pad] = answers, counts, engine.last_stats
    (plain, plain_counts, plain_stats), (padded, padded_counts, padded_stats) = runs[False], runs[True]
    assert padded == plain
    batch_rows = 3 * 7
    assert {c for c in padded_counts if c != batch_rows} <= {1, 2, 4, 8, 16}
    assert any(c & (c - 1) for c in plain_counts if c != batch_rows)  # unpadded: counts such as 3, 5, 11
    # step by step: unpadded, every step compacts to its live rows; padded, to the next power of two
    # at most (graph_rows): never a row more than that
    assert len(padded_counts) == len(plain_counts)
    assert all(live <= rows < 2 * live for live, rows in zip(plain_counts, padded_counts)), (plain_counts, padded_counts)
    assert padded_stats["compactions"] > 0 and padded_stats["decode_rows"] > plain_stats["decode_rows"]


@pytest.mark.gpu
def test_cuda_graph_decode_gives_the_eager_answers(tiny_lm):
    """compile_decode on a GPU: the captured decode steps (padded rows, static cache addresses) give
    the eager engine's answers. fp32 on both; compiled kernels may round differently, so a tie in
    the logits may go the other way: at least 99% of the answers agree (as benchmarks/gpu_check)."""
    model, tokenizer = tiny_lm
    model = model.to("cuda")
    try:
        cfg = ProbeConfig(samples=6, max_new_tokens=8)
        requests = tiny_requests(24)
        eager = FastEngine(model, tokenizer, cfg, max_batch_prompts=8, compile_decode=False).generate(requests)
        engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=8, compile_decode=True)
        assert engine.compile_decode and engine.pad_rows
        graphs = engine.generate(requests)
        pairs = [(a, b) for x, y in zip(eager, graphs) for a, b in zip([x.greedy, *x.samples], [y.greedy, *y.samples])]
        assert len(pairs) == 24 * 7 and sum(a == b for a, b in pairs) >= 0.99 * len(pairs)
    finally:
        model.to("cpu")


# ------------------------------------------------------------------ settled questions (lazy probing in one pass)


def grouped_requests(sizes: list[int]) -> list[PromptRequest]:
    """Questions q0, q1, ... with `sizes[k]` prompts each (varied texts, so varied answers)."""
    texts = [r.text for r in tiny_requests(sum(sizes))]
    return [PromptRequest(f"q{k}", p, texts.pop(0)) for k, size in enumerate(sizes) for p in range(size)]


def finish_step(tokens_used: int) -> int:
    return tokens_used - 1  # a row's stop token (or its last token) is picked at this decode step


def rows_of(requests, answers, part: list[int]) -> list[tuple[int, int, int]]:
    """(request index, stream, finish step) of every answer of the requests in `part`; stream -1: greedy."""
    return [(i, j, finish_step(used)) for i in part
            for j, used in [(-1, answers[i].greedy_tokens), *enumerate(answers[i].sample_tokens)]]


def expected_after_settling(rows, settle_after: int) -> set[tuple[int, int]]:
    """The rows a batch produces when its question settles once `settle_after` answers finished:
    every row that finished at or before the step the count was reached."""
    steps = sorted(step for _, _, step in rows)
    settle_step = steps[settle_after - 1]
    return {(i, j) for i, j, step in rows if step <= settle_step}


def produced(answers, part: list[int]) -> set[tuple[int, int]]:
    return {(i, j) for i in part for j in ([-1] if answers[i].greedy is not None else []) + answers[i].sample_indices}


def test_settled_questions_stop_early_and_every_answer_produced_is_the_full_answer(stoppy_lm):
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=5, max_new_tokens=8, seed=2, lazy="one_pass")  # rows dropped mid-decode
    requests = grouped_requests([3, 3, 3, 3])
    make = lambda: FastEngine(model, tokenizer, cfg, max_batch_prompts=6, compact_below=1.0)  # noqa: E731
    full_engine, lazy_engine = make(), make()
    full = full_engine.generate(requests)
    calls = []

    def settled(question_id, finished):  # q0 and q2 settle once 2 of their answers are in
        calls.append((question_id, list(finished)))
        return question_id in ("q0", "q2") and len(finished) >= 2

    lazy = lazy_engine.generate(requests, settled=settled)
    assert all(a.sample_indices == list(range(5)) for a in full) and full_engine.last_stats["settled_rows"] == 0
    # Every answer produced is the full run's answer of the same key, bit for bit.
    for f, z in zip(full, lazy):
        assert z.greedy in (None, f.greedy) and z.greedy_tokens in (0, f.greedy_tokens)
        assert z.samples == [f.samples[j] for j in z.sample_indices]
        assert z.sample_tokens == [f.sample_tokens[j] for j in z.sample_indices]
    # Questions that never settle: everything. Settled ones: exactly the rows finished by then.
    assert lazy[3:6] == full[3:6] and lazy[9:] == full[9:]
    for part in ([0, 1, 2], [6, 7, 8]):
        expected = expected_after_settling(rows_of(requests, full, part), settle_after=2)
        assert produced(lazy, part) == expected
        assert len(expected) < 3 * 6  # the test means something: rows were dropped
    # The callback saw each question's finished answers, as the full run has them.
    for question_id, finished in calls:
        for prompt_index, stream, answer in finished:
            f = full[int(question_id[1:]) * 3 + prompt_index]
            assert answer == (f.greedy if stream == -1 else f.samples[stream])
    stats, full_stats = lazy_engine.last_stats, full_engine.last_stats
    dropped = sum(1 + 5 for _ in requests) - stats["answers"]
    assert stats["settled_rows"] == dropped > 0 and full_stats["answers"] == 12 * 6
    assert stats["decode_rows"] < full_stats["decode_rows"]  # the dropped rows were compacted away
    for key in ("batches", "prefill_tokens", "prefill_padded_tokens"):  # the same batches, one prefill per prompt
        assert stats[key] == full_stats[key], key


def test_a_question_split_across_batches_stays_settled_in_the_later_batch(stoppy_lm):
    """Whole questions per batch where they fit; a larger one is split, and once it settles in its
    first batch, its rows in the next batch are dropped after their first token."""
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=3, max_new_tokens=8, seed=5, lazy="one_pass")
    requests = grouped_requests([6, 2])  # batches of 4 prompts: q0's 0-3, then q0's 4-5 with q1
    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=4, bucket_by_length=False)
    full = FastEngine(model, tokenizer, cfg, max_batch_prompts=4).generate(requests)
    lazy = engine.generate(requests, settled=lambda question_id, finished: len(finished) >= 1)
    assert engine.last_stats["batches"] == 2
    assert produced(lazy, [0, 1, 2, 3]) == expected_after_settling(rows_of(requests, full, [0, 1, 2, 3]), 1)
    assert produced(lazy, [4, 5]) == {(i, j) for i, j, step in rows_of(requests, full, [4, 5]) if step == 0}
    assert produced(lazy, [6, 7]) == expected_after_settling(rows_of(requests, full, [6, 7]), 1)
    for f, z in zip(full, lazy):
        assert z.samples == [f.samples[j] for j in z.sample_indices]


# ------------------------------------------------------------------ two phases: greedy rows, then samples of the unsettled


def settle_after_greedy(settled_by_greedy: set, settled_by_a_sample: set, prompts: int = 3):
    """A `settled` rule: questions in `settled_by_greedy` settle once their greedy answers are all in,
    those in `settled_by_a_sample` once a sample has finished too (SliCK's rule has both shapes)."""
    def settled(question_id, finished):
        greedy_in = sum(a.stream == -1 for a in finished) == prompts
        sampled = any(a.stream != -1 for a in finished)
        return greedy_in and (question_id in settled_by_greedy or (question_id in settled_by_a_sample and sampled))
    return settled


def test_two_phases_sample_only_the_unsettled_questions_from_the_kept_prompt_kv(stoppy_lm):
    """Phase 1: greedy rows only; q0 and q2 are settled by them and get no sample row. Phase 2: the
    kept KV of q1's and q3's prompts fanned out to their sample rows; q1's stop at its first finished
    sample. Every answer is the full run's answer of its key, and no prompt is prefilled twice."""
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=5, max_new_tokens=8, seed=2, lazy="two_phase")
    requests = grouped_requests([3, 3, 3, 3])
    full_engine = FastEngine(model, tokenizer, dataclasses.replace(cfg, lazy="one_pass"), max_batch_prompts=6)
    full = full_engine.generate(requests)
    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=6, compact_below=1.0)
    lazy = engine.generate(requests, settled=settle_after_greedy({"q0", "q2"}, {"q1"}))
    for f, z in zip(full, lazy):
        assert z.greedy == f.greedy and z.greedy_tokens == f.greedy_tokens
        assert z.samples == [f.samples[j] for j in z.sample_indices]
        assert z.sample_tokens == [f.sample_tokens[j] for j in z.sample_indices]
    assert all(z.sample_indices == [] for z in lazy[0:3] + lazy[6:9])  # settled by their greedy answers
    assert lazy[9:] == full[9:]  # never settled: every sample
    first_sample_rows = [(i, j, step) for i, j, step in rows_of(requests, full, [3, 4, 5]) if j >= 0]
    assert produced(lazy, [3, 4, 5]) == {(i, -1) for i in (3, 4, 5)} | expected_after_settling(first_sample_rows, 1)
    stats = engine.last_stats
    assert stats["phase2_rows"] == 6 * 5 and stats["kept_kv_bytes"] > 0
    assert stats["answers"] + stats["settled_rows"] == stats["answers_full"] == 12 * 6
    assert stats["answers_saved"] == pytest.approx(1 - stats["answers"] / 72) and stats["answers_saved"] > 6 * 5 / 72
    # one prefill per batch, each prompt once: the same prefill as full sampling's
    assert stats["prefills"] == stats["batches"] == full_engine.last_stats["prefills"] == 2
    for key in ("prefilled_prompts", "prefill_tokens", "prefill_padded_tokens"):
        assert stats[key] == full_engine.last_stats[key], key
    assert stats["prefilled_prompts"] == 12


def test_two_phases_let_go_of_the_kept_prompt_kv_after_each_batch(stoppy_lm, monkeypatch):
    """The prompts' KV is held through both phases of its batch, and by nothing afterwards: when the
    next batch prefills, and after the call, no earlier batch's cache is alive (no growth across calls)."""
    model, tokenizer = stoppy_lm
    engine = FastEngine(model, tokenizer, ProbeConfig(samples=3, max_new_tokens=6, lazy="two_phase"),
                        max_batch_prompts=3)
    kept, prefill = [], engine._prefill

    def watched(*args):
        gc.collect()
        assert [ref for ref in kept if ref() is not None] == [], "an earlier batch's prompt KV is still held"
        prefilled = prefill(*args)
        kept.append(weakref.ref(prefilled.cache))
        return prefilled

    monkeypatch.setattr(engine, "_prefill", watched)
    for _ in range(2):
        engine.generate(grouped_requests([3, 3, 3]), settled=settle_after_greedy({"q0"}, set()))
        gc.collect()
        assert len(kept) > 0 and all(ref() is None for ref in kept)
    assert engine.last_stats["phase2_rows"] == 6 * 3 and len(kept) == 6


def test_two_phases_start_the_sample_phase_at_a_graph_shape_with_padded_rows(stoppy_lm):
    """With CUDA graphs (pad_rows; run on CPU without compiling) phase 2 starts at a power of two rows:
    3 unsettled prompts x 5 samples = 15 rows run as 16, the extra row finished from the start. The
    answers and what settles are those of the unpadded engine."""
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=5, max_new_tokens=8, seed=2, lazy="two_phase")
    requests = grouped_requests([3, 3])
    settled = settle_after_greedy({"q0"}, set())
    runs = {}
    for pad in (False, True):
        counts, handle = decode_row_counts(model)
        engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=6, compact_below=0.0, pad_rows=pad)
        try:
            runs[pad] = engine.generate(requests, settled=settled), counts, engine.last_stats
        finally:
            handle.remove()
    (plain, plain_counts, plain_stats), (padded, padded_counts, padded_stats) = runs[False], runs[True]
    assert padded == plain
    assert 15 in plain_counts and 15 not in padded_counts and 16 in padded_counts  # compact_below=0: no compaction
    assert set(padded_counts) <= {6, 16}  # phase 1: the 6 greedy rows; phase 2: 16
    for stat in ("settled_rows", "phase2_rows", "answers", "answers_saved"):
        assert padded_stats[stat] == plain_stats[stat], stat


def test_out_of_memory_retry_of_a_two_phase_batch_gives_the_answers_of_smaller_batches(stoppy_lm):
    """The sample phase (more rows than the greedy one) runs out of memory: the batch is retried in
    halves, its books and counters as if the failed attempt never ran."""
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=3, max_new_tokens=8, seed=3, lazy="two_phase")
    requests = grouped_requests([2, 2, 2, 2])
    settled = settle_after_greedy({"q1"}, {"q3"}, prompts=2)
    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=8)
    with out_of_memory_above(model, rows=12):  # phase 1: 8 rows; phase 2: 6 prompts x 3 samples
        lazy = engine.generate(requests, settled=settled)
    assert engine.last_stats["oom_retries"] == 1 and engine.prompt_cap == 4
    halves = FastEngine(model, tokenizer, cfg, max_batch_prompts=4)
    assert lazy == halves.generate(requests, settled=settled)
    for stat in ("settled_rows", "phase2_rows", "batches", "prefills", "decode_rows", "prefill_tokens"):
        assert engine.last_stats[stat] == halves.last_stats[stat], stat


# ------------------------------------------------------------------ shared prefixes (per-relation exemplar sets)


def test_a_shared_prefix_prefilled_once_gives_the_answers_of_whole_prompt_prefills(tiny_lm):
    """Per-relation exemplar sets: a relation's prompts start with one of N_ex exemplar blocks. Its KV
    computed once per batch, each prompt's suffix prefilled on top, gives (fp32, CPU) the answers of
    prefilling every prompt whole: full sampling and two-phase lazy probing, a prompt whose set had an
    exemplar swapped (a dev question probed itself: no shared prefix) and prompts without one alike."""
    from toolkit.data.prompts import ExemplarPool
    from toolkit.probe.slick import build_requests

    model, tokenizer = tiny_lm
    items = tiny.synthetic_items(per_relation=12)
    pool = ExemplarPool([it for it in items if it.split == "dev"])
    cfg = ProbeConfig(num_exemplar_sets=2, shots=2, samples=4, max_new_tokens=6, exemplars="per_relation",
                      lazy="two_phase")
    probed = [it for it in items if it.split in ("train", "dev")]
    requests = [r for it in probed for r in build_requests(it, pool, cfg)] + tiny_requests(3)
    assert len({r.prefix for r in requests if r.prefix}) > 6  # 3 relations x 2 sets, and swapped sets
    whole, reused = (FastEngine(model, tokenizer, cfg, max_batch_prompts=8, reuse_prefix_kv=flag)
                     for flag in (False, True))
    assert reused.generate(requests) == whole.generate(requests)
    stats, plain = reused.last_stats, whole.last_stats
    assert plain["prefix_tokens_reused"] == 0 and stats["prefix_tokens_reused"] > 0
    assert stats["prefill_tokens"] + stats["prefix_tokens_reused"] == plain["prefill_tokens"]
    assert stats["prefilled_prompts"] == plain["prefilled_prompts"] == len(requests)
    settled = settle_after_greedy({r.question_id for r in requests[::4]}, set(), prompts=2)
    assert reused.generate(requests[:-3], settled=settled) == whole.generate(requests[:-3], settled=settled)
    assert reused.last_stats["phase2_rows"] > 0 and reused.last_stats["prefix_tokens_reused"] > 0


def test_shared_prefix_lengths_stop_where_the_tokens_differ_and_need_a_second_user():
    from toolkit.probe.prefill import shared_prefix_lengths

    prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9, 9], [7, 8], [1, 2, 3]]
    prefixes = [[1, 2, 3], [1, 2, 3], [1, 2, 3], None, [1, 2, 3]]
    # the third prompt's tokens part from its prefix's at 9 (a merge across the boundary): [1, 2]; the
    # last prompt IS its prefix: all but its last token, [1, 2] too: the two share that shorter prefix
    assert shared_prefix_lengths(prompts, prefixes) == [3, 3, 2, 0, 2]
    assert shared_prefix_lengths(prompts[:4], prefixes[:4]) == [3, 3, 0, 0]  # [1, 2]: no other user
    assert shared_prefix_lengths(prompts[:1] + prompts[4:], [[1, 2, 3], [1, 2, 3]]) == [0, 0]  # 3 vs 2 tokens


# ------------------------------------------------------------------ the work done


def test_prefill_once_per_prompt_with_fan_out(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = ProbeConfig(samples=5, max_new_tokens=3)
    requests = tiny_requests(7)
    prompt_tokens = sum(len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in requests)
    fan_out = FastEngine(model, tokenizer, cfg, max_batch_prompts=3)
    before = time.perf_counter()
    fan_out.generate(requests)
    elapsed = time.perf_counter() - before
    per_stream = FastEngine(model, tokenizer, cfg, max_batch_prompts=3, fan_out_kv=False)
    per_stream.generate(requests)
    assert fan_out.last_stats["prefill_tokens"] == prompt_tokens
    assert per_stream.last_stats["prefill_tokens"] == (1 + cfg.samples) * prompt_tokens
    stats = fan_out.last_stats
    assert stats["prompts"] == 7 and stats["answers"] == 42 and stats["batches"] == 3
    assert stats["decode_steps"] <= 3 * (cfg.max_new_tokens - 1)
    assert 0 < stats["seconds"] <= elapsed  # the call's own wall time, in seconds


# ------------------------------------------------------------------ the transformers API it uses


def test_generate_uses_no_deprecated_transformers_api(stoppy_lm):
    """No FutureWarning/DeprecationWarning (nor a transformers log line saying 'deprecated') from a
    generate call covering every cache path: allocation, reuse by later batches, compaction."""
    model, tokenizer = stoppy_lm
    engine = FastEngine(model, tokenizer, ProbeConfig(samples=3, max_new_tokens=6),
                        max_batch_prompts=3, compact_below=1.0)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.generate(tiny_requests(7))  # 3 batches, the last one smaller
            compactions, cache = engine.last_stats["compactions"], engine.kv.cache
            engine.generate(tiny_requests(2))  # a later call reusing the cache with fewer rows
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert compactions > 0 and engine.kv.cache is cache
    deprecated = [f"{w.category.__name__}: {w.message}" for w in caught
                  if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    deprecated += [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecated, deprecated


# ------------------------------------------------------------------ attention


def test_single_query_gqa_attention_equals_sdpa_over_repeated_heads():
    from types import SimpleNamespace

    from toolkit.probe.attention import sdpa_single_query_gqa

    torch.manual_seed(0)
    batch, heads, kv_heads, kv_len, dim = 3, 8, 2, 11, 16
    query, key, value = (torch.randn(batch, heads, 1, dim), torch.randn(batch, kv_heads, kv_len, dim),
                         torch.randn(batch, kv_heads, kv_len, dim))
    mask = torch.rand(batch, 1, 1, kv_len) > 0.3
    mask[:, :, :, 0] = True
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    out, _ = sdpa_single_query_gqa(module, query, key, value, mask, scaling=dim ** -0.5)
    repeat = lambda t: t.repeat_interleave(heads // kv_heads, dim=1)  # noqa: E731 (repeat_kv's order)
    expected = torch.nn.functional.scaled_dot_product_attention(query, repeat(key), repeat(value), attn_mask=mask)
    assert out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    wrong = torch.nn.functional.scaled_dot_product_attention(query, key.repeat(1, heads // kv_heads, 1, 1),
                                                              value.repeat(1, heads // kv_heads, 1, 1), attn_mask=mask)
    assert not torch.allclose(out, wrong.transpose(1, 2))  # the head order matters, and is the right one


def test_fast_engine_probes_whatever_attention_was_asked_for(tiny_model_dir):
    """FlashAttention-2 takes no explicit mask: the fast engine loads with SDPA and switches any model
    to its own SDPA function, so a config asking for FA2 (or eager) probes, with the same answers."""
    from toolkit.adapters.transformers_internals import attention_implementation
    from toolkit.probe.attention import ATTENTION

    requests = tiny_requests(6)
    cfg = ProbeConfig(samples=2, max_new_tokens=5)
    assert ProbeConfig(attention="flash_attention_2").load_attention() == "sdpa"
    assert ProbeConfig(attention="flash_attention_2", engine="reference").load_attention() == "flash_attention_2"
    answers = []
    for attention in ("eager", "sdpa"):
        model, tokenizer = load_model(ModelSpec(source=str(tiny_model_dir), attention=attention))
        engine = FastEngine(model, tokenizer, cfg)
        assert attention_implementation(model) == ATTENTION
        answers.append([(a.greedy, a.samples) for a in engine.generate(requests)])
    assert answers[0] == answers[1]
    ReferenceEngine(model, tokenizer, cfg)  # the baseline on the same model: stock SDPA again
    assert attention_implementation(model) == "sdpa"


def test_actors_sharing_a_gpu_budget_their_share_of_its_total_memory():
    """Every FastEngine used to take half of the device-wide free memory: two 8B actors at 0.5 both
    claimed it, four 1B actors at 0.25 needed ~84 GiB of an 80 GiB GPU. Each now budgets its share."""
    from transformers import LlamaConfig

    from toolkit.models import RANDOM_SHAPES
    from toolkit.probe.memory import (batch_memory_budget, cache_length, kv_bytes_per_row, memory_share,
                                      prompt_batch_size)

    gib, total = 2**30, 80 * 2**30
    assert [cache_length(n) for n in (1, 64, 65, 112, 128, 129)] == [64, 64, 128, 128, 128, 192]
    assert [memory_share(g) for g in (0, 0.25, 0.5, 1, 4)] == [1.0, 0.25, 0.5, 1.0, 1.0]
    for shape, weights, share in (("llama-3-8b", 8_030_261_248 * 2, 0.5), ("llama-3.2-1b", 1_235_814_400 * 2, 0.25)):
        config = LlamaConfig(**RANDOM_SHAPES[shape])
        # a ~96-token prompt + 16 new tokens: the cache holds 128 positions, as DecodeCache.load allocates it
        row = kv_bytes_per_row(config, length=cache_length(112), dtype_bytes=2)
        kv_heads, layers, head_dim = config.num_key_value_heads, config.num_hidden_layers, config.head_dim
        assert row == 2 * layers * kv_heads * head_dim * 128 * 2 + 8 * config.vocab_size  # K and V + fp32 logits
        budget = batch_memory_budget(share, total, held_bytes=weights)
        assert budget == int((share * total - weights) * 0.5)
        prompts = prompt_batch_size(budget, row, streams=17)
        assert 16 <= prompts < 256  # room for a real batch, below the cap
        actors = round(1 / share)
        per_actor = weights + prompts * 17 * row  # weights + its batch's decode rows
        assert per_actor <= share * total * 0.75  # the rest of the share: prefill, activations, graphs
        assert actors * per_actor <= total, (shape, actors * per_actor / gib)
        # counted with the unrounded length, the batch would overrun its budget
        unrounded = prompt_batch_size(budget, kv_bytes_per_row(config, 112, 2), 17)
        assert unrounded > prompts and unrounded * 17 * row > budget
    # the static cache an engine holds is reused by its next batch: not memory lost
    cache = 6 * gib
    assert batch_memory_budget(0.5, total, 16 * gib + cache, own_cache_bytes=cache) == batch_memory_budget(
        0.5, total, 16 * gib)
    assert batch_memory_budget(0.25, total, 30 * gib) == 0 and prompt_batch_size(0, row, 17) == 1  # never 0
    assert prompt_batch_size(2**50, row, 17) == 256


def test_the_prompts_kept_kv_counts_in_the_batch_budget():
    """A batch holds its prompts' prefill KV (one row each, the prompt's positions) while their decode
    rows run: through the fan-out, and through both phases of two-phase lazy probing."""
    from transformers import LlamaConfig

    from toolkit.models import RANDOM_SHAPES
    from toolkit.probe.memory import cache_length, kv_bytes, kv_bytes_per_row, prompt_batch_size

    config = LlamaConfig(**RANDOM_SHAPES["llama-3-8b"])
    kept = kv_bytes(config, 96, 2)  # a 96-token prompt in bf16
    assert kept == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 96 * 2
    row = kv_bytes_per_row(config, cache_length(112), 2)
    budget = 100 * (17 * row + kept) + 1
    assert prompt_batch_size(budget, row, 17, kept_bytes=kept) == 100
    assert prompt_batch_size(budget, row, 17) > 100  # without the kept KV the batch would overrun


# ------------------------------------------------------------------ out of memory: retried in halves


@contextlib.contextmanager
def out_of_memory_above(model, rows: int):
    """The real model, raising torch's out-of-memory error (as a full GPU would) from every forward
    of more than `rows` rows; yields the row counts of the forwards that ran."""
    ran = []

    def check(module, args, kwargs):
        n = kwargs["input_ids"].shape[0]
        if n > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: a forward of {n} rows > {rows})")
        ran.append(n)

    handle = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield ran
    finally:
        handle.remove()


def test_out_of_memory_batches_are_retried_in_halves_with_the_same_answers(stoppy_lm, caplog):
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=2, max_new_tokens=6)  # 3 rows per prompt
    requests = tiny_requests(10)
    unconstrained = FastEngine(model, tokenizer, cfg, max_batch_prompts=8)
    expected = unconstrained.generate(requests)
    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=8)
    with out_of_memory_above(model, rows=6) as ran, caplog.at_level(logging.WARNING, "toolkit.probe.engine"):
        got = engine.generate(requests)  # 8 prompts: their prefill fails; 4: their first decode step
    key = lambda answers: [(a.greedy, a.greedy_tokens, a.samples, a.sample_tokens) for a in answers]  # noqa: E731
    assert key(got) == key(expected)  # bit for bit
    assert engine.prompt_cap == 2 and engine.last_stats["oom_retries"] == 2 and max(ran) <= 6
    assert [r.getMessage() for r in caplog.records] == [
        "out of memory on a batch of 8 prompts (24 rows); retrying it as batches of at most 4 prompts, and "
        "capping later batches there",
        "out of memory on a batch of 4 prompts (12 rows); retrying it as batches of at most 2 prompts, and "
        "capping later batches there"]
    with out_of_memory_above(model, rows=6):  # the engine remembers: later calls start at the cap
        again = engine.generate(requests)
    assert key(again) == key(expected) and engine.last_stats["oom_retries"] == 0
    assert engine.last_stats["batches"] == 5 and unconstrained.last_stats["batches"] == 2


def test_out_of_memory_retry_of_a_lazy_batch_starts_its_books_again(stoppy_lm):
    """Rows finish (and questions settle) before a batch's first decode step fails: the retry must not
    see them twice, so its answers are those of a run that used the smaller batches from the start."""
    model, tokenizer = stoppy_lm
    cfg = ProbeConfig(samples=3, max_new_tokens=8, seed=3, lazy="one_pass")  # two phases: tested apart
    requests = grouped_requests([2, 2, 2, 2])

    def settled(question_id, finished):  # q1 settles at step 0, q3 at step 3 (it has 1 answer at step 0)
        return len(finished) >= 2

    engine = FastEngine(model, tokenizer, cfg, max_batch_prompts=8, compact_below=1.0)
    with out_of_memory_above(model, rows=16):  # 8 prompts x 4 rows fail at the first decode step
        lazy = engine.generate(requests, settled=settled)
    assert engine.last_stats["oom_retries"] == 1 and engine.prompt_cap == 4
    halves = FastEngine(model, tokenizer, cfg, max_batch_prompts=4, compact_below=1.0)
    assert lazy == halves.generate(requests, settled=settled)  # q0 and q1, then q2 and q3
    for stat in ("settled_rows", "batches", "decode_rows", "prefill_tokens"):  # the failed attempt not counted
        assert engine.last_stats[stat] == halves.last_stats[stat], stat
    assert engine.last_stats["settled_rows"] > 0


def test_a_single_prompt_out_of_memory_is_raised(tiny_lm):
    model, tokenizer = tiny_lm
    engine = FastEngine(model, tokenizer, ProbeConfig(samples=3, max_new_tokens=4), max_batch_prompts=4)
    with out_of_memory_above(model, rows=2), pytest.raises(torch.OutOfMemoryError, match="4 rows > 2"):
        engine.generate(tiny_requests(3))
    assert engine.prompt_cap == 1
