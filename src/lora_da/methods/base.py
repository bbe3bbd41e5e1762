"""Shared pieces of the initialization registry: the result record and calibration-batch handling."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class InitInfo:
    """What an initialization did: name, wall time, whether it rewrote base weights, a JSON-able report."""

    method: str
    init_seconds: float
    modifies_base: bool
    report: dict | None = None
    # Adapter weights right after initialization (PEFT state-dict keys); kept for the conversion of
    # base-modifying methods to a plain LoRA of the unmodified base at save time.
    initial_adapter: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the adapter snapshot)."""
        return {"method": self.method, "init_seconds": self.init_seconds, "modifies_base": self.modifies_base,
                "report": self.report}


def prepare_batches(batches: Iterable[dict[str, Any]] | None, device: torch.device) -> list[dict[str, Any]]:
    """Materialize calibration batches as a list of dicts of tensors on `device`; ValueError when malformed."""
    if batches is None:
        return []
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(
                f"calibration batch {i} must be a dict with at least 'input_ids', got {type(batch)}"
            )
        moved = {}
        for key, value in batch.items():
            if key not in ("input_ids", "attention_mask", "labels"):
                continue  # extra fields (e.g. answers) are not model inputs
            moved[key] = (
                value.to(device) if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=device)
            )
        if "attention_mask" not in moved:
            moved["attention_mask"] = torch.ones_like(moved["input_ids"])
        out.append(moved)
    return out


def add_labels(batches: list[dict[str, torch.Tensor]]) -> None:
    """Give label-less batches causal-LM labels (every attended token, padding ignored)."""
    for batch in batches:
        if "labels" not in batch:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def single_examples(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Split batches into batch-size-1 dicts without padding (CorDA's covariance hook needs batch size 1)."""
    out = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][i].bool()
            row = {k: v[i][keep].unsqueeze(0) for k, v in batch.items()}
            if row["input_ids"].numel() > 0:
                out.append(row)
    return out
