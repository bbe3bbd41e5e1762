"""Turn Examples into token ids with completion-only labels, and collate them into padded batches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import torch

from .jsonl import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# A text field is tokenized only as far as its first (or last) max_length tokens can reach: a first cut of
# this many characters per token (a token covers at least one character in common tokenizers), grown when a
# tokenizer drops characters, and checked to hold this many tokens more than needed, so that the tokens near
# the cut, which may merge differently, lie beyond max_length.
_CHARS_PER_TOKEN = 8
_SPARE_TOKENS = 16
_NOTHING_SUPERVISED = "no example keeps a supervised token after truncation to {}; raise max_length"


def check_max_length(max_length: int) -> None:
    """ValueError unless `max_length` leaves room for a prompt token and a supervised one."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def clip_text(text: str, tokenizer, max_length: int, keep_end: bool = False) -> str:
    """`text`, or just enough of its start (its end with `keep_end`) to give the same first (last)
    `max_length` tokens: a huge field is never tokenized whole."""
    chars = _CHARS_PER_TOKEN * max_length + 64
    while len(text) > chars:
        piece = text[-chars:] if keep_end else text[:chars]
        if len(tokenizer(piece, add_special_tokens=False)["input_ids"]) >= max_length + _SPARE_TOKENS:
            return piece
        chars *= 4  # few tokens per character here (e.g. whitespace a tokenizer drops): look further
    return text


def clip_example(example: Example, tokenizer, max_length: int, keep_end: bool = False) -> Example:
    """`example` with every text field clipped by `clip_text` (prompt turns and completion)."""

    def clip(text: str) -> str:
        return clip_text(text, tokenizer, max_length, keep_end)

    if example.kind == "messages":
        prompt = tuple({**turn, "content": clip(turn["content"])} for turn in example.prompt)
    else:
        prompt = clip(example.prompt)
    return dataclasses.replace(example, prompt=prompt, completion=clip(example.completion))


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
    if max_length:
        example = clip_example(example, tokenizer, max_length, keep_end=True)
    prompt, _ = render(example, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return ids[-max_length:] if max_length else ids


def encode_example(
    example: Example, tokenizer, max_length: int = 512, completion_only: bool = True
) -> dict[str, list[int]]:
    """Return {'input_ids', 'labels'} (lists), right-truncated to max_length; prompt labels are -100.

    Only as much of each field is tokenized as the first max_length tokens need (see `clip_text`)."""
    check_max_length(max_length)
    prompt, completion = render(clip_example(example, tokenizer, max_length), tokenizer)
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
    kept = [f for f in features if is_supervised(f)]
    if len(kept) < len(features):
        logger.warning("dropped %d examples with no supervised token after truncation to %d tokens",
                       len(features) - len(kept), max_length)
    if not kept:
        raise ValueError(_NOTHING_SUPERVISED.format(f"max_length={max_length}"))
    return kept


def is_supervised(feature: dict) -> bool:
    """True when the feature has a supervised (predicted) token: a label that is not the first position's
    (without labels every token is one, as in `collate`)."""
    return any(label != IGNORE_INDEX for label in feature.get("labels", feature["input_ids"])[1:])


class LazyFeatures(Sequence):
    """Examples encoded on first access (then kept): a data-aware init on a large file encodes only the
    examples it draws. Unlike `encode_examples`, examples without a supervised token are not dropped; the
    readers skip them (see `calibration_batches`)."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int = 512, completion_only: bool = True):
        check_max_length(max_length)
        self.examples, self.tokenizer = examples, tokenizer
        self.max_length, self.completion_only = max_length, completion_only
        self._encoded: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index not in self._encoded:
            self._encoded[index] = encode_example(self.examples[index], self.tokenizer, self.max_length,
                                                  self.completion_only)
        return self._encoded[index]


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
    """Batches of up to `num_examples` features drawn without replacement by `seed`.

    Features without a supervised token (possible in `LazyFeatures`) are passed over; only the features
    drawn are read.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    generator = torch.Generator().manual_seed(seed)
    order = []
    for index in torch.randperm(len(features), generator=generator).tolist():
        if len(order) == num_examples:
            break
        if is_supervised(features[index]):
            order.append(index)
    if not order:
        raise ValueError(_NOTHING_SUPERVISED.format("the maximum length"))
    return list(iter_batches(features, batch_size, pad_token_id, order))
