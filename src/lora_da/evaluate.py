"""Evaluation: token-weighted mean loss and perplexity, and exact-match accuracy by greedy generation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, Example, collate, encode_prompt, is_correct, iter_batches
from .layers import model_device
from .model_tasks import PredictingRows, output_head_rows
from .models import resolve_dtype


@dataclass
class EvalConfig:
    """How to evaluate: batch sizes, precision, and how many examples exact match scores by generation."""

    batch_size: int = 8
    dtype: str = "float32"
    num_generate: int = 64  # QA examples scored by exact match; 0 = skip
    generate_batch_size: int = 16
    max_new_tokens: int = 96
    max_length: int = 256  # prompt tokens kept for generation
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "generate_batch_size", "max_new_tokens", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_generate < 0:
            raise ValueError(f"num_generate must be >= 0, got {self.num_generate}")
        resolve_dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-ready settings."""
        return asdict(self)


def autocast_context(device: torch.device, dtype: str | torch.dtype = "float32"):
    """Autocast to bf16/fp16 when asked; a no-op context for float32."""
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


def supervised_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [1, t, V], next-token targets [1, t]) at the t positions that predict a supervised token; the
    vocabulary projection sees only those (see `output_head_rows`). A model whose output head cannot be given
    them yields (logits [b, L-1, V], targets [b, L-1]) of every position instead."""
    rows = PredictingRows.of(batch["labels"])
    with output_head_rows(model, rows) as selected:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if selected:
        return logits, rows.targets(batch["labels"]).unsqueeze(0)
    return logits[:, :-1], batch["labels"][:, 1:]


def supervised_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over supervised targets and their count; logits [b, k, V], targets [b, k]."""
    flat_targets = targets.reshape(-1)
    count = int((flat_targets != IGNORE_INDEX).sum())
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, count


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    features: Sequence[dict],
    pad_token_id: int,
    batch_size: int = 8,
    dtype: str | torch.dtype = "float32",
    show_progress: bool = True,
) -> dict[str, float]:
    """Mean loss over all supervised tokens (token-weighted) and its perplexity: {loss, perplexity, tokens}."""
    if not features:
        raise ValueError("cannot evaluate on an empty set of examples")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    batches = iter_batches(features, batch_size, pad_token_id)
    steps = math.ceil(len(features) / batch_size)
    for batch in tqdm(batches, total=steps, desc="eval loss", disable=not show_progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, dtype):
            logits, targets = supervised_logits(model, batch)
        batch_total, batch_count = supervised_loss_sum(logits, targets)
        total += float(batch_total)
        count += batch_count
    model.train(was_training)
    if count == 0:
        raise ValueError("no supervised tokens to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def score(prediction: str, reference: str) -> bool:
    """Exact match: of the final `#### <number>` when the reference has one, else of the stripped text."""
    if "####" in reference:
        return is_correct(prediction, reference)
    return prediction.strip() == reference.strip()


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_new_tokens: int = 96,
    max_length: int = 512,
    show_progress: bool = True,
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) for each example's prompt, batched with left padding."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    prompts = [{"input_ids": encode_prompt(ex, tokenizer, max_length)} for ex in examples]
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not show_progress, leave=False):
        batch = collate(prompts[start:start + batch_size], pad_id, padding_side="left")
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def exact_match(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_new_tokens: int = 96,
    max_length: int = 512,
    show_progress: bool = True,
) -> dict:
    """Exact-match accuracy of greedy answers: {accuracy, correct, total, predictions}."""
    qa = [ex for ex in examples if ex.is_qa]
    if not qa:
        raise ValueError("exact-match accuracy needs QA examples (prompt/completion, question/answer or messages)")
    predictions = generate_answers(model, tokenizer, qa, batch_size, max_new_tokens, max_length, show_progress)
    correct = sum(score(pred, ex.completion) for pred, ex in zip(predictions, qa, strict=True))
    return {"accuracy": correct / len(qa), "correct": correct, "total": len(qa), "predictions": predictions}


def evaluate_model(
    model: nn.Module,
    tokenizer,
    features: Sequence[dict],
    examples: Sequence[Example],
    config: EvalConfig,
    known_loss: float | None = None,
) -> dict:
    """{'eval_loss', 'perplexity'[, 'accuracy', 'correct', 'total']} on encoded and raw evaluation examples.

    `known_loss` (e.g. the training loop's last eval loss on the same features) skips recomputing it; exact
    match scores the first `config.num_generate` QA examples.
    """
    if known_loss is None:
        known_loss = evaluate_loss(model, features, tokenizer.pad_token_id, config.batch_size, config.dtype,
                                   config.show_progress)["loss"]
    metrics = {"eval_loss": known_loss, "perplexity": math.exp(min(known_loss, 700.0))}
    qa = [ex for ex in examples if ex.is_qa][: config.num_generate]
    if qa:
        scored = exact_match(model, tokenizer, qa, config.generate_batch_size, config.max_new_tokens,
                             config.max_length, config.show_progress)
        metrics.update(accuracy=scored["accuracy"], correct=scored["correct"], total=scored["total"])
    return metrics
