"""The fast sampling engine: the SliCK probe's hot loop (docs/design.md section 2).

Per batch of prompts: one left-padded prefill per prompt (prefill.py), its KV cache fanned out to the
prompt's 1 + n decode streams (greedy row + n sampled rows), then ONE batched decode step for all
streams of all prompts, repeated until every row has stopped (newline / EOS) or max_new_tokens is
reached. Finished rows are compacted away so that late steps only pay for live rows.

Sampling is Gumbel-max with counter-based noise (gumbel.py): the noise for (row key, step, token id)
is a pure integer hash, with row key = stable_seed(seed, question_id, prompt_index, sample_index). A
sampled answer therefore depends only on its key and the model's logits, never on batch composition,
bucketing, compaction, phases or the process that ran it (up to floating-point ties in the logits).

Lazy probing (a `settled` callback), `probe.lazy`:
* one_pass: greedy and sampled rows decode together; the rows of a question the caller declares
  settled stop early (settling.py).
* two_phase: the batch's greedy rows decode first while the prompts' KV is kept; then the kept KV is
  fanned out to the sample rows of only the prompts whose questions are not settled (which still stop
  at their question's first right answer), and let go. Either way each prompt is prefilled once.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from typing import Sequence

import torch

from toolkit.data.prompts import stable_seed
from toolkit.models import encode_prompts

from .answers import AnswerDecoder, answer_streams, requested_samples
from .attention import use_engine_attention
from .decode_cache import DecodeCache
from .memory import (CPU_BATCH_PROMPTS, MAX_BATCH_PROMPTS, batch_memory_budget, cache_length, kv_bytes,
                     kv_bytes_per_row, prompt_batch_size)
from .gumbel import gumbel_noise, to_int64
from .prefill import Prefilled, prefill, prefill_on_prefixes, shared_prefix_lengths
from .settling import (SettleBook, add_samples, pack_groups, plan_batches, prompt_answers, question_groups,
                       unsettled_prompts)
from .types import GREEDY_STREAM, PromptAnswers, PromptRequest, ProbeConfig, Settled

log = logging.getLogger("toolkit.probe.engine")


def cache_argument(model) -> str:
    """The name under which the model's forward takes its KV cache: `cache` in current transformers,
    `past_key_values` before (transformers 5.2x renamed it; the old name warns and goes away in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def graph_rows(live: int, batch_rows: int) -> int:
    """The rows a decode step runs after compaction when CUDA graphs capture it: the `live` rows padded
    with finished ones up to a power of two, at most the `batch_rows` the step ran with before. A graph
    is captured per distinct row count, so a batch meets log2(rows) shapes, not one per count."""
    return min(batch_rows, 1 << (live - 1).bit_length())


class FastEngine:
    """Engine protocol implementation; the feature flags exist so the benchmark can switch the
    optimisations off one at a time. Answers are identical under every flag combination."""

    settles_questions = True  # generate() takes `settled`: lazy probing (one pass or two phases)

    def __init__(self, model, tokenizer, config: ProbeConfig, max_batch_prompts: int | None = None, *,
                 memory_share: float = 1.0, fan_out_kv: bool = True, bucket_by_length: bool = True,
                 compile_decode: bool = True, compact_below: float = 0.5, pad_rows: bool | None = None,
                 reuse_prefix_kv: bool = True):
        """max_batch_prompts None: 16 on CPU; on a GPU as many as this engine's budget holds (per call;
        toolkit.probe.memory), on `memory_share` of the GPU (its Ray actor's fraction of it).
        compile_decode: CUDA graphs for the decode step, on CUDA only (on CPU there is nothing to gain).
        pad_rows: compacted batches padded to power-of-two rows (graph_rows), as the graphs need; None:
        with compile_decode. True on CPU runs the graphs' row shapes without compiling (tests).
        reuse_prefix_kv: a prefix that prompts of a batch share (PromptRequest.prefix) prefilled once."""
        if max_batch_prompts is not None and max_batch_prompts < 1:
            raise ValueError(f"max_batch_prompts must be >= 1, got {max_batch_prompts}")
        if not 0 < memory_share <= 1:
            raise ValueError(f"memory_share must be in (0, 1], got {memory_share}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        use_engine_attention(model)  # SDPA with a copy-free GQA decode step, whatever the model was loaded with
        self.max_batch_prompts = max_batch_prompts
        self.memory_share = memory_share
        self.prompt_cap: int | None = None  # lowered by each out-of-memory retry, for every later batch
        self.fan_out_kv, self.bucket_by_length = fan_out_kv, bucket_by_length
        self.reuse_prefix_kv = reuse_prefix_kv and fan_out_kv  # without fan-out every row is prefilled alone
        self.compact_below = compact_below  # compact when live rows <= this fraction of the batch
        self.device = next(model.parameters()).device
        self._cache_arg = cache_argument(model)
        self.answers = AnswerDecoder(tokenizer)
        self.compile_decode = compile_decode and self.device.type == "cuda"
        self.pad_rows = self.compile_decode if pad_rows is None else pad_rows
        self._step = (torch.compile(self._decode_step, mode="reduce-overhead")
                      if self.compile_decode else self._decode_step)
        self.kv = DecodeCache(model.config, static_addresses=self.compile_decode)  # reused across batches, calls
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def generate(self, requests: Sequence[PromptRequest], sample_indices: Sequence[int] | None = None,
                 greedy: bool = True, settled: Settled | None = None) -> list[PromptAnswers]:
        """Per request: the greedy answer (if `greedy`) and the sampled answers of `sample_indices`
        (default: all `config.samples`), each a pure function of its key.

        settled(question_id, finished): asked whenever rows of a question finish, with that
        question's FinishedAnswers so far; once True, its still-running rows are dropped and their
        answers are absent from the result (PromptAnswers.sample_indices says which samples remain)."""
        start = time.perf_counter()
        stream_keys = answer_streams(greedy, requested_samples(self.config, sample_indices))
        if not stream_keys:
            raise ValueError("generate() asked for no answer (greedy=False and no sample index)")
        streams = len(stream_keys)
        self.last_stats = dict(prompts=len(requests), answers=0, batches=0, prefills=0, prefilled_prompts=0,
                               prefill_tokens=0, prefill_padded_tokens=0, generated_tokens=0, decode_steps=0,
                               decode_rows=0, compactions=0, settled_rows=0, phase2_rows=0, kept_kv_bytes=0, prefix_tokens_reused=0,
                               oom_retries=0, answers_full=len(requests) * streams, answers_saved=0.0)
        if not requests:
            return []
        # read per call: a benchmark replaces `answers` to force full-length answers
        self._stop_tensor = torch.tensor(self.answers.stop_ids, dtype=torch.long, device=self.device)
        ids = encode_prompts(self.tokenizer, [r.text for r in requests])
        shared = self._shared_prefixes(requests, ids)
        # a row is [prefix, suffix], each left-padded (prefill.py); [prompt] left-padded without shared prefixes
        length = max(shared) + max(len(x) - n for x, n in zip(ids, shared)) + self.config.max_new_tokens
        # The same batches with `settled` or without: lazy probing prefills exactly what full sampling does.
        # The static cache is sized for the largest batch (the first) and the longest prompt: later
        # batches reuse it.
        batches = deque(plan_batches(requests, [len(x) for x in ids], self._batch_prompts(streams, length),
                                     by_length=self.bucket_by_length,
                                     prefixes=[r.prefix if n else "" for r, n in zip(requests, shared)]))
        book = SettleBook(settled) if settled is not None else None
        results: list[PromptAnswers | None] = [None] * len(requests)
        while batches:
            chunk = batches.popleft()
            if self.prompt_cap is not None and len(chunk) > self.prompt_cap:
                batches.extendleft(reversed(self._split(requests, chunk, self.prompt_cap)))
                continue
            batch = self._try_batch([requests[i] for i in chunk], [ids[i] for i in chunk],
                                    [shared[i] for i in chunk], length, stream_keys, book)
            if batch is None:  # out of memory: split by the lowered cap, and again
                batches.appendleft(chunk)
                continue
            for i, answers in zip(chunk, batch):
                results[i] = answers
        self.last_stats["answers"] = answers = sum((a.greedy is not None) + len(a.samples) for a in results)
        self.last_stats["answers_saved"] = 1 - answers / self.last_stats["answers_full"]
        self.last_stats["generated_tokens"] = sum(a.total_tokens for a in results)
        self.last_stats["seconds"] = time.perf_counter() - start
        return results

    def close(self) -> None:
        """Let go of the static cache (a later call allocates it again)."""
        self._release_cache()

    def _batch_prompts(self, streams: int, length: int) -> int:
        if self.max_batch_prompts is not None:
            return min(self.max_batch_prompts, self.prompt_cap or self.max_batch_prompts)
        cap = min(MAX_BATCH_PROMPTS, self.prompt_cap or MAX_BATCH_PROMPTS)
        if self.device.type != "cuda":
            return min(CPU_BATCH_PROMPTS, cap)
        # this actor's share of the device's total memory, not the free memory every actor sees at once
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = batch_memory_budget(self.memory_share, total, torch.cuda.memory_allocated(self.device),
                                     self.kv.nbytes())
        dtype_bytes = next(self.model.parameters()).element_size()
        row = kv_bytes_per_row(self.model.config, cache_length(length), dtype_bytes)
        kept = kv_bytes(self.model.config, length - self.config.max_new_tokens, dtype_bytes)  # the prompt's own KV
        return prompt_batch_size(budget, row, streams, cap=cap, kept_bytes=kept)

    # ------------------------------------------------------------------ out of memory

    def _try_batch(self, reqs: list[PromptRequest], ids: list[list[int]], shared: list[int], length: int,
                   stream_keys: list[int],
                   book: SettleBook | None) -> list[PromptAnswers] | None:
        """The batch's answers; None after torch's out-of-memory error, with the prompt cap halved for
        this and every later batch and the memory the engine held let go. A single prompt that does
        not fit re-raises. Every answer is a function of its key, so retried halves give the answers
        the whole batch would have given; last_stats counts the work of the batches that succeeded."""
        saved, stats = (book.save() if book is not None else None), dict(self.last_stats)
        try:
            return self._run_batch(reqs, ids, shared, (len(reqs) * len(stream_keys), length), stream_keys, book)
        except torch.OutOfMemoryError:
            if len(reqs) == 1:
                raise
        # Past the except block: the error's traceback, and the tensors its frames held, are gone.
        self._release_cache()
        if book is not None:
            book.restore(saved)  # the failed attempt's finished answers and settled questions never were
        self.last_stats.update(stats)
        self.prompt_cap = -(-len(reqs) // 2)
        self.last_stats["oom_retries"] += 1
        log.warning("out of memory on a batch of %d prompts (%d rows); retrying it as batches of at most %d "
                    "prompts, and capping later batches there", len(reqs), len(reqs) * len(stream_keys),
                    self.prompt_cap)
        return None

    @staticmethod
    def _split(requests: Sequence[PromptRequest], chunk: list[int], cap: int) -> list[list[int]]:
        """`chunk` as batches of at most `cap` prompts, a question's prompts together where they fit."""
        groups = question_groups([requests[i] for i in chunk])
        return [[chunk[i] for i in batch] for batch in pack_groups(groups, cap)]

    def _release_cache(self) -> None:
        """Drop the static cache (the next batch allocates one of its own size) and, on CUDA, hand the
        allocator's cached blocks back, so the smaller retry starts from what the weights leave."""
        self.kv.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ one batch

    def _run_batch(self, reqs: list[PromptRequest], ids: list[list[int]], shared: list[int], capacity: tuple[int, int],
                   stream_keys: list[int], book: SettleBook | None) -> list[PromptAnswers]:
        """Prefill each prompt once, then decode its streams from the kept KV: all together (one pass),
        or the greedy rows first and the samples of the unsettled questions after (two phases)."""
        self.last_stats["batches"] += 1
        streams = len(stream_keys)
        if not self.fan_out_kv:  # every stream prefilled on its own, as generate(num_return_sequences) does
            prompts = self._prefill([x for x in ids for _ in stream_keys])
            return self._decode(reqs, prompts, torch.arange(len(reqs) * streams, device=self.device), stream_keys,
                                capacity, book)
        prompts = self._prefill(ids, shared)
        everyone = torch.arange(len(reqs), device=self.device)
        if self._two_phases(stream_keys, book):
            return self._greedy_then_samples(reqs, prompts, stream_keys, capacity, book)
        return self._decode(reqs, prompts, everyone.repeat_interleave(streams), stream_keys, capacity, book)

    def _two_phases(self, stream_keys: list[int], book: SettleBook | None) -> bool:
        """Whether this call probes lazily in two phases (greedy rows, then samples; `probe.lazy`)."""
        has_samples = any(j != GREEDY_STREAM for j in stream_keys)
        return (self.config.lazy == "two_phase" and book is not None and GREEDY_STREAM in stream_keys
                and has_samples)

    def _greedy_then_samples(self, reqs: list[PromptRequest], prompts: Prefilled, stream_keys: list[int],
                             capacity: tuple[int, int], book: SettleBook) -> list[PromptAnswers]:
        """Phase 1 decodes the greedy rows; the questions they settle are done. Phase 2 fans the kept
        prompt KV out to the sample rows of the other questions' prompts, which still stop at their
        question's first right answer. No prompt is prefilled again; every answer is its key's."""
        stats = self.last_stats
        answers = self._decode(reqs, prompts, torch.arange(len(reqs), device=self.device), [GREEDY_STREAM],
                               capacity, book)
        samples = [j for j in stream_keys if j != GREEDY_STREAM]
        pending = unsettled_prompts(reqs, book)
        stats["settled_rows"] += (len(reqs) - len(pending)) * len(samples)  # sample rows never started
        stats["phase2_rows"] += len(pending) * len(samples)
        stats["kept_kv_bytes"] = max(stats["kept_kv_bytes"], prompts.kv_bytes())
        if pending:
            src = torch.tensor(pending, device=self.device).repeat_interleave(len(samples))
            # with CUDA graphs phase 2 starts at a power of two rows (as compaction does): few shapes to capture
            pad_to = graph_rows(len(src), len(reqs) * len(samples)) if self.pad_rows else len(src)
            more = self._decode([reqs[i] for i in pending], prompts, src, samples, capacity, book, pad_to)
            add_samples(answers, pending, more)
        return answers

    def _decode(self, reqs: list[PromptRequest], prompts: Prefilled, src: torch.Tensor, stream_keys: list[int],
                capacity: tuple[int, int], book: SettleBook | None, pad_to: int = 0) -> list[PromptAnswers]:
        """Decode the streams `stream_keys` of each of `reqs` (rows prompt-major); decode row r starts from
        prefilled row src[r]. With a book, rows of the questions it settles stop early. pad_to: rows added
        after those, finished from the start, up to this count (a captured graph's shape)."""
        cfg, dev, stats = self.config, self.device, self.last_stats
        streams, n_prompts = len(stream_keys), len(reqs)
        rows = n_prompts * streams
        extra = max(0, pad_to - rows)
        greedy = torch.tensor([j == GREEDY_STREAM for j in stream_keys] * n_prompts + [False] * extra, device=dev)
        sampling = any(j >= 0 for j in stream_keys)
        keys = torch.tensor([to_int64(stable_seed(cfg.seed, r.question_id, r.prompt_index, j))
                             for r in reqs for j in stream_keys] + [0] * extra, device=dev)
        src = torch.cat([src, src[:1].expand(extra)])
        lengths, plen = prompts.lengths[src], prompts.width
        self.kv.load(prompts.cache, src, capacity)
        kv_mask = torch.zeros(rows + extra, self.kv.max_length, dtype=torch.bool, device=dev)
        kv_mask[:, :plen] = prompts.mask[src]

        out = torch.full((rows + extra, cfg.max_new_tokens), self.tokenizer.pad_token_id, device=dev)
        row_ids = torch.arange(rows + extra, device=dev)  # original row of each live batch row
        zero = torch.zeros((), dtype=torch.long, device=dev)
        tokens = self._pick(prompts.logits[src], keys, greedy, zero, sampling)
        out[:, 0] = tokens
        started = row_ids < rows  # the padding rows never run
        alive = ~torch.isin(tokens, self._stop_tensor) & started
        if book is not None:
            book.start_batch(reqs, stream_keys)
            alive = self._settle(book, out, row_ids, started, alive)
        for step in range(1, cfg.max_new_tokens):
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if n_alive <= self.compact_below * len(row_ids):
                keep = self._rows_to_keep(alive)
                if len(keep) < len(row_ids):
                    row_ids, tokens, keys, greedy, lengths, kv_mask, alive = (
                        t[keep] for t in (row_ids, tokens, keys, greedy, lengths, kv_mask, alive))
                    self.kv.keep_rows(keep)
                    stats["compactions"] += 1
            kv_mask[:, plen + step - 1] = True  # the slot the fed token is written to
            if self.compile_decode:
                torch.compiler.cudagraph_mark_step_begin()
            tokens = self._step(tokens, lengths + step - 1, kv_mask, keys, greedy,
                                torch.tensor(step, device=dev), sampling).clone()
            out[row_ids, step] = tokens
            was_alive, alive = alive, alive & ~torch.isin(tokens, self._stop_tensor)
            if book is not None:
                alive = self._settle(book, out, row_ids, was_alive, alive)
            stats["decode_steps"] += 1
            stats["decode_rows"] += len(row_ids)
        if book is None:
            return prompt_answers(dict(enumerate(self.answers(out[:rows].tolist()))), n_prompts, stream_keys)
        rest = sorted(book.running)  # rows that ran to max_new_tokens
        book.record(rest, self.answers(out[rest].tolist()))
        return prompt_answers(book.decoded, n_prompts, stream_keys)

    def _settle(self, book: SettleBook, out, row_ids, was_alive, alive) -> torch.Tensor:
        """Decode the rows that finished this step (once: the book keeps the text), ask whether their
        questions are settled, and take the still-running rows of settled questions out of `alive`
        (compaction then frees them). Other rows are untouched: their answers stay the same."""
        done = row_ids[was_alive & ~alive].tolist()
        if done:
            book.record(done, self.answers(out[done].tolist()))
        drop = book.rows_to_drop(done)
        if drop:
            alive = alive & ~torch.isin(row_ids, torch.tensor(drop, device=row_ids.device))
            self.last_stats["settled_rows"] += len(drop)
        return alive

    def _decode_step(self, tokens, positions, kv_mask, keys, greedy, step, sampling: bool) -> torch.Tensor:
        """The one decode step: feed each row's last token, pick each row's next token."""
        logits = self.model(input_ids=tokens[:, None], position_ids=positions[:, None],
                            attention_mask=kv_mask[:, None, None, :],  # 4D bool: used as is, no mask building
                            **{self._cache_arg: self.kv.cache}, use_cache=True).logits[:, -1]
        return self._pick(logits, keys, greedy, step, sampling)

    def _pick(self, logits, keys, greedy, step, sampling: bool) -> torch.Tensor:
        """Greedy rows: argmax. Sampled rows: argmax(logits/T + Gumbel) over the top-k logits, which
        is an exact draw from softmax(top-k logits / T)."""
        logits = logits.float()
        best = logits.argmax(-1)
        cfg = self.config
        if not sampling:  # greedy rows only
            return best
        if cfg.top_k:
            values, candidates = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1)
        else:
            values = logits
            candidates = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
        scores = values.double() / cfg.temperature + gumbel_noise(keys, step, candidates)
        sampled = candidates.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)
        return torch.where(greedy, best, sampled)

    # ------------------------------------------------------------------ prefill and KV cache

    def _prefill(self, prompts: list[list[int]], shared: list[int] | None = None) -> Prefilled:
        """The prompts' KV and last logits (`shared`: tokens of each taken from a prefix KV computed once),
        counted: a prompt is prefilled once per batch it is in."""
        stats, pad = self.last_stats, self.tokenizer.pad_token_id
        prefilled = (prefill_on_prefixes(self.model, self._cache_arg, prompts, shared, pad) if shared and any(shared)
                     else prefill(self.model, self._cache_arg, prompts, pad))
        stats["prefills"] += 1
        stats["prefilled_prompts"] += len(prompts)
        stats["prefill_tokens"] += prefilled.computed_tokens
        stats["prefill_padded_tokens"] += prefilled.computed_padded_tokens
        stats["prefix_tokens_reused"] += sum(map(len, prompts)) - prefilled.computed_tokens
        return prefilled

    def _shared_prefixes(self, requests: Sequence[PromptRequest], ids: list[list[int]]) -> list[int]:
        """Per prompt, the tokens it may take from a prefix KV shared with other prompts (0: none)."""
        if not self.reuse_prefix_kv or not any(r.prefix for r in requests):
            return [0] * len(ids)
        texts = list(dict.fromkeys(r.prefix for r in requests if r.prefix))
        encoded = dict(zip(texts, encode_prompts(self.tokenizer, texts)))
        return shared_prefix_lengths(ids, [encoded.get(r.prefix) for r in requests])

    def _rows_to_keep(self, alive: torch.Tensor) -> torch.Tensor:
        keep = alive.nonzero().squeeze(1)
        if self.pad_rows:  # finished rows fill the step up to graph_rows: few shapes, few CUDA graphs
            size = graph_rows(len(keep), len(alive))
            keep = torch.cat([keep, (~alive).nonzero().squeeze(1)[:size - len(keep)]])
        return keep
