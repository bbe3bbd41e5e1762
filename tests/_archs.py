"""Tiny randomly initialized models of each supported architecture, with matching calibration batches."""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

VOCAB = 97
NUM_LABELS = 3
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
)
_ENCODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=72,
)


def _llama() -> nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER))


def _qwen2() -> nn.Module:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DECODER))


def _mistral() -> nn.Module:
    return tf.MistralForCausalLM(tf.MistralConfig(**_DECODER))


def _gpt2() -> nn.Module:
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=1, eos_token_id=1)
    return tf.GPT2LMHeadModel(config)


def _bert_mlm() -> nn.Module:
    return tf.BertForMaskedLM(tf.BertConfig(**_ENCODER, pad_token_id=0))


def _bert_cls() -> nn.Module:
    return tf.BertForSequenceClassification(tf.BertConfig(**_ENCODER, pad_token_id=0, num_labels=NUM_LABELS))


def _roberta_cls() -> nn.Module:
    config = tf.RobertaConfig(**_ENCODER, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=NUM_LABELS)
    return tf.RobertaForSequenceClassification(config)


def _t5() -> nn.Module:
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, decoder_start_token_id=0, eos_token_id=1,
    )
    return tf.T5ForConditionalGeneration(config)


# name -> (builder, batch kind, extra LoraConfig options)
ARCHITECTURES = {
    "llama": (_llama, "causal", {}),
    "qwen2": (_qwen2, "causal", {}),
    "mistral": (_mistral, "causal", {}),
    "gpt2-conv1d": (_gpt2, "causal", {}),
    "bert-mlm": (_bert_mlm, "masked", {}),
    "bert-cls": (_bert_cls, "sequence", {"modules_to_save": ["classifier"]}),
    "roberta-cls": (_roberta_cls, "sequence", {"modules_to_save": ["classifier"]}),
    "t5": (_t5, "seq2seq", {}),
}


def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh tiny model of `arch` in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return ARCHITECTURES[arch][0]().to(dtype).eval()


def make_batch(kind: str, seed: int, batch_size: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    """A padded calibration batch for a model of `kind` (first row right-padded by 3)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=gen)
    attention = torch.ones(batch_size, length, dtype=torch.long)
    attention[0, -3:] = 0
    if kind == "causal":
        labels = ids.clone()
        labels[attention == 0] = -100
        labels[:, :3] = -100  # an unsupervised prompt
    elif kind == "masked":
        chosen = torch.rand(batch_size, length, generator=gen) < 0.3
        chosen[:, 1] = True  # at least one masked position per row
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        ids = torch.where(chosen, torch.full_like(ids, 2), ids)  # 2 plays [MASK]
    elif kind == "sequence":
        labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=gen)
    elif kind == "seq2seq":
        labels = torch.randint(3, VOCAB, (batch_size, length // 2), generator=gen)
        labels[1, -2:] = -100
    else:
        raise ValueError(f"unknown batch kind {kind!r}")
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def calibration(arch: str, count: int = 2, **kwargs) -> list[dict[str, torch.Tensor]]:
    """`count` calibration batches for `arch`."""
    return [make_batch(ARCHITECTURES[arch][1], seed=s, **kwargs) for s in range(count)]


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """PEFT LoRA layers that hold `adapter_name`."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and adapter_name in m.lora_A}


def update(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Per layer, the float32 product `B @ A` [out, in] of `adapter_name`."""
    return {
        name: m.lora_B[adapter_name].weight.detach().float() @ m.lora_A[adapter_name].weight.detach().float()
        for name, m in lora_modules(model, adapter_name).items()
    }


class Int8Linear(nn.Module):
    """A frozen int8 linear layer: weight stored as int8 with a per-row scale, dequantized in forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.weight = nn.Parameter(torch.round(weight / scale[:, None]).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        """The float weight [out, in] the layer computes with."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized().to(x.dtype), self.bias)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every `nn.Linear` except `skip` by an `Int8Linear`, in place."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                setattr(parent, child_name, Int8Linear(child))
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every `Int8Linear` by the float `nn.Linear` it computes, in place."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.dequantized())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)
    return model
