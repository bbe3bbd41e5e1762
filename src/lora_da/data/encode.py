"""Turn Examples into token ids with completion-only labels, and collate them into padded batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from .jsonl import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer defines a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_messages(example: Example) -> list[dict]:
    """Chat messages that precede the completion."""
    if example.kind == "messages":
        return [dict(turn) for turn in example.prompt]
    return [{"role": "user", "content": example.prompt}]


def _plain_prompt(example: Example) -> str:
    """Prompt text for tokenizers without a chat template."""
    if example.kind == "text":
        return ""
    if example.kind == "messages":
        text = "\n".join(f"{t['role']}: {t['content']}" for t in example.prompt) + "\nassistant: "
        return text
    return example.prompt + "\n"


def render(example: Example, tokenizer) -> tuple[str, str]:
    """Return (prompt text, completion text); uses the chat template when the tokenizer has one."""
    eos = tokenizer.eos_token or ""
    if example.kind == "text":
        return "", example.completion + eos
    if not has_chat_template(tokenizer):
        return _plain_prompt(example), example.completion + eos
    messages = _prompt_messages(example)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": example.completion}], tokenize=False
    )
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # Templates that rewrite earlier turns: fall back to appending the completion.
    return prompt, example.completion + eos


def encode_prompt(example: Example, tokenizer, max_length: int | None = None) -> list[int]:
    """Token ids of the prompt alone (for generation), keeping its end when longer than max_length."""
    prompt, _ = render(example, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return ids[-max_length:] if max_length else ids


def encode_example(
    example: Example, tokenizer, max_length: int = 512, completion_only: bool = True
) -> dict[str, list[int]]:
    """Return {'input_ids', 'labels'} (lists), right-truncated to max_length; prompt labels are -100."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompt, completion = render(example, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = (prompt_labels + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_examples(
    examples: Sequence[Example], tokenizer, max_length: int = 512, completion_only: bool = True
) -> list[dict[str, list[int]]]:
    """Encode many examples; drop (with a warning) those left without any supervised token."""
    features = [encode_example(ex, tokenizer, max_length, completion_only) for ex in examples]
    kept = [f for f in features if sum(label != IGNORE_INDEX for label in f["labels"][1:]) > 0]
    if len(kept) < len(features):
        logger.warning("dropped %d examples with no supervised token after truncation to %d tokens",
                       len(features) - len(kept), max_length)
    if not kept:
        raise ValueError(
            f"no example keeps a supervised token after truncation to max_length={max_length}; "
            "raise max_length"
        )
    return kept


def collate(
    features: Sequence[dict], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad features into {'input_ids', 'attention_mask', 'labels'} tensors of shape [batch, longest]."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("cannot collate an empty list of features")
    longest = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for feature in features:
        ids = list(feature["input_ids"])
        labels = list(feature.get("labels", ids))
        pad = longest - len(ids)
        parts = {
            "input_ids": (ids, [pad_token_id] * pad),
            "attention_mask": ([1] * len(ids), [0] * pad),
            "labels": (labels, [IGNORE_INDEX] * pad),
        }
        for key, (values, padding) in parts.items():
            batch[key].append(padding + values if padding_side == "left" else values + padding)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def iter_batches(
    features: Sequence[dict],
    batch_size: int,
    pad_token_id: int,
    order: Sequence[int] | None = None,
    padding_side: str = "right",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield collated batches of `batch_size` features in `order` (default: file order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(features))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start:start + batch_size]]
        yield collate(chunk, pad_token_id, padding_side)


def calibration_batches(
    features: Sequence[dict], num_examples: int, batch_size: int, pad_token_id: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Batches of `min(num_examples, len(features))` features drawn without replacement by `seed`."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(features), generator=generator)[:num_examples].tolist()
    return list(iter_batches(features, batch_size, pad_token_id, order))
