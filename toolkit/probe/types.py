"""The contract between the sampling engines, SliCK scoring and the Ray driver."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Protocol, Sequence

from toolkit.config import knob, require


ENGINES = ("fast", "reference", "vllm")
LAZY_MODES = ("one_pass", "two_phase")
EXEMPLAR_MODES = ("per_item", "per_relation")


@dataclass(frozen=True)
class ProbeConfig:
    """What a probe computes (docs/design.md section 2), one config for the probe and its engines: per
    item N_ex few-shot prompts of k exemplars; per prompt one greedy answer and n samples."""

    num_exemplar_sets: int = knob(10, "N_ex: few-shot prompts per item")
    shots: int = knob(4, "k: exemplars per prompt (same relation, from the exemplar split)")
    samples: int = knob(16, "n: sampled answers per prompt (plus one greedy)")
    temperature: float = knob(0.5, "sampling temperature")
    top_k: int = knob(40, "sample among the k most likely tokens (0: all)")
    max_new_tokens: int = knob(16, "answer length limit in tokens (answers also stop at a newline)")
    seed: int = knob(0, "fixes the exemplar sets and every sampled answer")
    keep_samples: bool = knob(False, "store every sampled answer in the result rows")
    full_sampling: bool = knob(False, "all n samples of every prompt (exact P_sample); default: lazy, the same "
                                      "categories from far fewer answers, P_sample a lower bound")
    lazy: Literal["one_pass", "two_phase"] = knob(
        "two_phase", "how the fast engine probes lazily (not with full_sampling): two_phase decodes the greedy "
        "answers first from the prompts' kept KV, then samples only the questions they did not settle (no "
        "second prefill; measured faster on CPU: benchmarks/README.md); one_pass decodes a prompt's greedy and "
        "sampled answers together, a question's rows stopping once it is settled. Same categories either way; "
        "vLLM always runs two phases")
    exemplars: Literal["per_item", "per_relation"] = knob(
        "per_item", "per_item: each question draws its own N_ex exemplar sets (SliCK); per_relation: N_ex sets "
        "drawn once per relation and shared by its questions (a question that is one of a set's exemplars "
        "gets it swapped for a fixed spare), so prompts share prefixes whose KV is computed once. A different "
        "estimator of P_correct, not the same categories")
    engine: Literal["fast", "reference", "vllm"] = knob(
        "fast", "fast: the toolkit's engine; reference: HF generate; vllm: vLLM (the vllm extra on CPU, "
        "`pip install vllm` on CUDA)")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = knob(
        "auto", "attention kernels; the fast engine always runs SDPA with a copy-free GQA decode step")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob(
        "auto", "model precision; auto: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")

    def __post_init__(self):
        require(self.num_exemplar_sets >= 1, "num_exemplar_sets", self.num_exemplar_sets, "must be >= 1")
        require(self.shots >= 0, "shots", self.shots, "must be >= 0")
        require(self.samples >= 0, "samples", self.samples, "must be >= 0")
        require(self.samples == 0 or self.temperature > 0, "temperature", self.temperature,
                "must be > 0 when sampling")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = no top-k)")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.engine in ENGINES, "engine", self.engine, f"must be one of {', '.join(ENGINES)}")
        require(self.lazy in LAZY_MODES, "lazy", self.lazy, f"must be one of {', '.join(LAZY_MODES)}")
        require(self.exemplars in EXEMPLAR_MODES, "exemplars", self.exemplars,
                f"must be one of {', '.join(EXEMPLAR_MODES)}")

    def load_attention(self) -> str | None:
        """The attention a replica is loaded with (None: the loader's choice for the device). The fast
        engine switches any model to its own SDPA function (toolkit.probe.attention), so it loads
        with SDPA: a request for FlashAttention-2 still probes, where flash_attn is not even installed."""
        if self.engine == "fast":
            return "sdpa"
        return None if self.attention == "auto" else self.attention


@dataclass(frozen=True)
class PromptRequest:
    """One few-shot prompt. The random draw of each sampled answer depends only on (seed, question_id,
    prompt_index, sample index), never on the batch it lands in or the actor that runs it; the answer
    itself is then identical wherever the logits are (bit for bit on CPU; on a GPU kernels chosen per
    batch shape can flip near-tied tokens: README, "What is identical where")."""

    question_id: str
    prompt_index: int
    text: str
    # the start of `text` that other prompts may share (its exemplar block): the fast engine computes
    # the KV of a prefix that prompts of a batch share once; "" or a prefix no other prompt has: none
    prefix: str = ""


GREEDY_STREAM = -1  # the stream key of a prompt's greedy answer; sample j has stream key j


class FinishedAnswer(NamedTuple):
    """An answer the engine has finished, as `settled` callbacks see it."""

    prompt_index: int
    stream: int  # GREEDY_STREAM or the sample index
    answer: str


# settled(question_id, that question's answers finished so far) -> True: drop its still-running rows
Settled = Callable[[str, Sequence[FinishedAnswer]], bool]


@dataclass
class PromptAnswers:
    greedy: str | None  # None: not asked for (or dropped as settled)
    samples: list[str] = field(default_factory=list)
    greedy_tokens: int = 0  # generated tokens, stop token included when one was produced
    sample_tokens: list[int] = field(default_factory=list)
    # the sample index of each of `samples` (they are fewer than asked when rows were dropped as
    # settled); every engine records them; None (answers built by hand): samples 0, 1, ... in order
    sample_indices: list[int] | None = None

    @property
    def total_tokens(self) -> int:
        return self.greedy_tokens + sum(self.sample_tokens)


class Engine(Protocol):
    """What the probe's driver (slick.probe_items, the Ray workers, the benchmarks) uses of an engine."""

    config: ProbeConfig
    # generate() takes `settled` (lazy probing): sample j depends only on its key, never on which
    # other answers a call produces, so a question's remaining answers can be dropped exactly
    settles_questions: bool
    last_stats: dict  # the work of the last generate() call (counts; engines report what they measure)

    def generate(self, requests: Sequence[PromptRequest], sample_indices: Sequence[int] | None = None,
                 greedy: bool = True, settled: Settled | None = None) -> list[PromptAnswers]:
        """Answers for each request, in request order: the greedy one (if `greedy`) and the samples
        of `sample_indices` (default: all of `config.samples`). `settled` (only where
        `settles_questions`): answers of questions it declares settled stop; those not produced are
        absent (PromptAnswers.sample_indices says which samples remain)."""
        ...

    def close(self) -> None:
        """Let go of what the engine holds beyond the model (caches; vLLM: its processes)."""
        ...
