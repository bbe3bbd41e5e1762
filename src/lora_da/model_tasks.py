"""How a model family (causal LM, seq2seq, token or sequence classification) turns a calibration batch into
model inputs, per-example losses and the token masks of the statistics."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraDAError


@dataclass
class ModelTask:
    """How a model family turns a batch into inputs, per-example losses and token masks."""

    kind: str  # "causal", "seq2seq", "token" (masked LM, token labels) or "sequence" (classification)

    @classmethod
    def of(cls, model: nn.Module) -> ModelTask:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        name = type(base).__name__
        if getattr(config, "is_encoder_decoder", False):
            return cls("seq2seq")
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return cls("causal")
        if name.endswith(("ForSequenceClassification", "ForMultipleChoice")):
            return cls("sequence")
        return cls("token")

    def labels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is not None:
            if self.kind == "seq2seq" and "decoder_input_ids" not in batch and labels.shape == batch["input_ids"].shape:
                # Masks are found by the hooked input's shape (cross-attention k/v read encoder positions), so
                # give the causal decoder one more, ignored position; the earlier positions do not change.
                labels = nn.functional.pad(labels, (0, 1), value=-100)
            return labels
        if self.kind != "causal":
            raise LoraDAError(f"Calibration batches for a {self.kind} model need `labels`.")
        labels = batch["input_ids"].clone()
        attention = batch.get("attention_mask")
        if attention is not None:
            labels[attention == 0] = -100
        return labels

    def supervised_counts(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Supervised targets per example, [B]."""
        if self.kind == "sequence":
            return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)
        targets = labels[:, 1:] if self.kind == "causal" else labels
        return (targets != -100).sum(dim=1)

    def model_inputs(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.kind == "seq2seq" and "decoder_input_ids" not in inputs:
            inputs["labels"] = labels  # lets the model build decoder inputs; its own loss is ignored
        return inputs

    def token_masks(
        self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, counts: torch.Tensor, token_mask: str
    ) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
        """(positions of supervised examples, positions that feed Z and y), keyed by their shape."""
        input_ids = batch["input_ids"]
        attention = batch.get("attention_mask")
        attention = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.bool()
        valid = (counts > 0)[:, None]
        example_mask = attention & valid
        factor_mask = example_mask
        if token_mask == "labels" and self.kind == "causal":
            factor_mask = torch.zeros_like(example_mask)
            factor_mask[:, :-1] = labels[:, 1:] != -100  # position t predicts the supervised token t + 1
        elif token_mask == "labels" and self.kind == "token":
            factor_mask = labels != -100
        masks = {tuple(example_mask.shape): (example_mask, factor_mask), (valid.shape[0],): (valid[:, 0],) * 2}
        if self.kind == "seq2seq":
            decoder = batch.get("decoder_attention_mask")
            decoder = (labels != -100) if decoder is None else decoder.bool() & valid
            masks.setdefault(tuple(decoder.shape), (decoder, decoder))  # `labels` made the widths differ
        return masks

    def losses(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example mean loss over its supervised targets, and the target counts; [B] each."""
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        logits = logits.float()
        if self.kind == "sequence":
            if logits.shape[-1] == 1:
                losses = (logits.squeeze(-1) - labels.float()) ** 2
            else:
                losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            return losses, torch.ones_like(losses, dtype=torch.long)
        if self.kind == "causal":  # shift the labels, not the logits: slicing them would copy the whole logits
            labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        token_losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).reshape(labels.shape)
        counts = (labels != -100).sum(dim=1)
        return token_losses.sum(dim=1) / counts.clamp(min=1), counts

    def head_rows(self, labels: torch.Tensor) -> PredictingRows | None:
        """The positions whose logits the loss reads, for causal LMs; None for the other model families, whose heads
        see other shapes."""
        return PredictingRows.of(labels) if self.kind == "causal" else None

    def selected_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: PredictingRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`losses` from the logits [1, t, V] of the `rows` only (see `output_head_rows`)."""
        token_losses = nn.functional.cross_entropy(logits[0].float(), rows.targets(labels), reduction="none")
        sums = torch.zeros(labels.shape[0], dtype=token_losses.dtype, device=token_losses.device)
        examples = rows.examples()
        counts = torch.bincount(examples, minlength=labels.shape[0])
        return sums.index_add(0, examples, token_losses) / counts.clamp(min=1), counts


@dataclass(frozen=True)
class PredictingRows:
    """The positions of a causal LM batch [B, L] that predict a supervised token, as indices into its B * L
    positions: found with one host sync per batch, where boolean indexing would wait for the device at each use."""

    positions: torch.Tensor  # [t] int64
    shape: tuple[int, int]  # (B, L)

    @classmethod
    def of(cls, labels: torch.Tensor) -> PredictingRows:
        """From labels [B, L] (-100: ignored): position p predicts the token at p + 1."""
        mask = nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
        return cls(mask.reshape(-1).nonzero().squeeze(1), tuple(labels.shape))

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The next-token targets [t] of these positions."""
        return nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1).index_select(0, self.positions)

    def examples(self) -> torch.Tensor:
        """The example [t] of each position."""
        return self.positions // self.shape[1]


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that projects hidden states onto the vocabulary (transformers' output embeddings), if any."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except AttributeError:  # e.g. a wrapper whose forwarding finds no such method
        return None


@contextmanager
def output_head_rows(model: nn.Module, rows: PredictingRows | None) -> Iterator[list[bool]]:
    """Within: the output head sees only the positions `rows` of its input [B, L, hidden], as one sequence
    [1, t, hidden], so the vocabulary projection and the softmax after it skip positions whose logits no loss reads
    (with completion-only labels about half of a padded batch; 15% of a SmolLM2 training step). Yields a list that
    holds True once that happened; it stays empty (every position projected) without an output head, without
    `rows`, or when the head's input has another shape."""
    selected: list[bool] = []
    head = output_head(model) if rows is not None else None
    if head is None:
        yield selected
        return

    def select_rows(module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != rows.shape:
            return None
        selected.append(True)
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.positions).unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select_rows)
    try:
        yield selected
    finally:
        handle.remove()
