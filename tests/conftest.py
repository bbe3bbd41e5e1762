"""Shared fixtures: a tiny random Llama and a tiny character-level tokenizer with a chat template.

Everything is built locally (no hub downloads) and is small enough for a fwd+bwd in milliseconds.
Session-scoped fixtures are read-only: tests that modify a model must load their own copy with
`load_tiny(tiny_model_dir)` or the `tiny_model_and_tokenizer` fixture (fresh per test).

- `tiny_model_dir`: folder with a saved LlamaForCausalLM (hidden 32, 2 layers, vocab 128) + tokenizer.
- `tiny_tokenizer`: the tokenizer (chat template in ChatML style, pad = eos).
- `tiny_model_and_tokenizer`: a fresh (model, tokenizer) pair loaded from `tiny_model_dir`.
- `tiny_jsonl`: a JSONL file of 24 short prompt/completion examples.
- `tiny_qa_jsonl`: a JSONL file of 12 question/answer examples whose answers end in `#### <number>`.
"""

from __future__ import annotations

import json
import string

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and thread hand-offs get very slow when the CPUs are
# shared with other jobs: one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII plus ChatML specials (vocab < 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(vocab_size: int = 128, seed: int = 0):
    """A randomly initialized 2-layer Llama with hidden size 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tiny(model_dir):
    """Load a fresh (model, tokenizer) pair from a folder made by `tiny_model_dir`."""
    from lora_da.models import load_model_and_tokenizer

    return load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny character-level tokenizer (do not mutate)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Folder holding the saved tiny model and tokenizer (loadable by `load_model_and_tokenizer`)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(vocab_size=128).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model_and_tokenizer(tiny_model_dir):
    """A fresh (model, tokenizer) pair for tests that modify the model."""
    return load_tiny(tiny_model_dir)


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory):
    """24 prompt/completion examples with a learnable pattern (the completion repeats a letter)."""
    letters = "abcdefghijkl"
    records = [{"prompt": f"say {c}{i % 2}", "completion": f"{c * 3} ok"} for i, c in enumerate(letters * 2)]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", records)


@pytest.fixture(scope="session")
def tiny_qa_jsonl(tmp_path_factory):
    """12 question/answer examples whose answers end in `#### <number>`."""
    records = [{"question": f"{a}+{a}?", "answer": f"#### {2 * a}"} for a in range(1, 13)]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", records)
