"""Tiny, real models and data for tests: a byte-level BPE tokenizer with a small vocabulary, a
randomly initialised 2-layer Llama, and synthetic QA facts. Everything is built locally in seconds."""
from __future__ import annotations

import random
from pathlib import Path

from toolkit.data.schema import QAItem

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
          "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
RELATIONS = {
    "color": ("What color is the {s}?", ["red", "green", "blue", "amber", "violet", "white"]),
    "home": ("Where does the {s} live?", ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Tokyo"]),
    "code": ("What is the code of the {s}?", ["K7", "M2", "Z9", "Q4", "T1", "B8"]),
}


def synthetic_items(per_relation: int = 40, seed: int = 0) -> list[QAItem]:
    """Made-up facts ("What color is the bravo kilo?" -> "amber") no model knows in advance.
    Splits: 50% train, 25% dev, 25% test per relation."""
    rng = random.Random(seed)
    items = []
    for rel, (template, answers) in RELATIONS.items():
        subjects = set()
        while len(subjects) < per_relation:
            subjects.add(f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}")
        for i, subject in enumerate(sorted(subjects)):
            split = "train" if i % 4 < 2 else ("dev" if i % 4 == 2 else "test")
            items.append(QAItem(id=f"{rel}-{i:03d}", question=template.format(s=subject),
                                answer=rng.choice(answers), relation=rel, split=split, subject=subject))
    return items


def tokenizer_corpus() -> list[str]:
    texts = []
    for rel, (template, answers) in RELATIONS.items():
        for a in answers:
            for w in _WORDS:
                texts.append(f"Q: {template.format(s=w + ' ' + w)}\nA: {a}\n\n")
    texts.append("Answer the following question. ")
    return texts


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the synthetic corpus: every string is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<eos>", padding_side="left")
    fast.save_pretrained(out_dir)
    return fast


def build_model_dir(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2) -> Path:
    """A randomly initialised tiny Llama saved with its tokenizer as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def train_memoriser(model_dir: Path, facts: list[QAItem], pool, config,
                    steps: int = 120, lr: float = 1e-2) -> None:
    """Fine-tune the tiny Llama in `model_dir` (in place) on the exact probe prompts of `facts`,
    loss on the answer only (" answer\\n"). A plain AdamW loop: ~10 s on one CPU thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only add contention on 2 cores
    try:
        _train(model_dir, facts, pool, config, steps, lr)
    finally:
        torch.set_num_threads(threads)


def _train(model_dir, facts, pool, config, steps, lr) -> None:
    import torch

    from toolkit.models import ModelSpec, load_model
    from toolkit.probe.slick import build_requests

    model, tok = load_model(ModelSpec(source=str(model_dir)))
    prompts = [(r.text, f" {it.answer}\n") for it in facts for r in build_requests(it, pool, config)]
    ids = [tok(p + a, add_special_tokens=False).input_ids for p, a in prompts]
    answer_lens = [len(i) - len(tok(p, add_special_tokens=False).input_ids) for i, (p, _) in zip(ids, prompts)]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (seq, n_answer) in enumerate(zip(ids, answer_lens)):  # left padding, like generation
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
        labels[row, width - n_answer:] = torch.tensor(seq[-n_answer:])
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1, f"memoriser did not converge (loss {loss.item():.3f})"
    model.save_pretrained(model_dir)
