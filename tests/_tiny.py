"""Tiny randomly initialized models and batches for the core tests."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-block Llama with hidden size 32 (shared inputs: q/k/v and gate/up)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-block GPT-2 (Conv1D layers, transposed weights)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def wrap(model, rank: int = 4, **kwargs):
    """PEFT LoRA on every linear layer of the blocks."""
    options = dict(r=rank, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, use_rslora=True)
    options.update(kwargs)
    return get_peft_model(model, LoraConfig(**options))


def examples(count: int = 6, seed: int = 0, prompt_len: int = 4) -> list[dict]:
    """Unpadded examples of varied length; the first `prompt_len` tokens are unsupervised prompt."""
    gen = torch.Generator().manual_seed(seed)
    result = []
    for i in range(count):
        length = 7 + (i * 5) % 9
        ids = torch.randint(1, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[:prompt_len] = -100
        result.append({"input_ids": ids, "labels": labels})
    return result


def collate(items: list[dict]) -> dict:
    """Right-pad a list of examples into one batch."""
    width = max(len(e["input_ids"]) for e in items)
    batch = {
        "input_ids": torch.zeros(len(items), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), width, dtype=torch.long),
        "labels": torch.full((len(items), width), -100, dtype=torch.long),
    }
    for row, e in enumerate(items):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = e["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = e["labels"]
    return batch


def batches(items: list[dict], batch_size: int) -> list[dict]:
    """Split examples into padded batches of `batch_size`."""
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def lora_state(model) -> dict:
    """Copies of every LoRA weight."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def all_weights(model) -> dict:
    """Copies of every weight."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def factor_tolerance(key: str) -> float:
    """The statistics of any split agree to float32 rounding (see test_cache_written_once_with_all_shards); the
    rank-deficient input factor of the GQA o_proj amplifies that ~1e3-fold, as it amplifies the float32 rounding
    of the per-batch products (tests/test_statistics.py: TestPrecision)."""
    return 5e-3 if "o_proj" in key else 1e-5


def assert_factors_match(per_rank: list[dict], reference: dict) -> None:
    """The LoRA weights of two ranks are identical and equal one process's `reference` to `factor_tolerance`."""
    assert per_rank[0].keys() == reference.keys()
    for key, expected in reference.items():
        assert torch.equal(per_rank[0][key], per_rank[1][key]), f"ranks differ at {key}"
        assert relative_error(per_rank[0][key], expected) <= factor_tolerance(key), key


def bytes_a_pass_adds(model, batch: dict, names: list[str], config) -> int:
    """The most tensor bytes a statistics pass's forward+backward of `batch` adds beside every layer's statistics
    (its second pass through one collector), traced allocation by allocation."""
    from lora_da.bench.memory import peak_tensor_bytes
    from lora_da.collect import _run_pass
    from lora_da.hooks import Collector
    from lora_da.layers import resolve_layers

    collector = Collector(resolve_layers(model, names), config)
    _run_pass(model, [batch], collector, config, None)
    return peak_tensor_bytes(lambda: _run_pass(model, [batch], collector, config, None))
