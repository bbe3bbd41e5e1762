"""Shared pieces of the initialization registry: the result record, target resolution, batch handling."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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


def _is_linear(module: nn.Module) -> bool:
    """True for the layer types PEFT's LoRA and our solvers support (nn.Linear, GPT-2 Conv1D)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return isinstance(module, nn.Linear)
    return isinstance(module, (nn.Linear, Conv1D))


def resolve_target_modules(model: nn.Module, target_modules: str | list[str] | set[str]) -> list[str]:
    """Full names of the linear layers to adapt; "all-linear" = every linear layer but the output head."""
    linear_names = [name for name, module in model.named_modules() if _is_linear(module)]
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        excluded = set()
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        if head is not None:
            excluded = {name for name, module in model.named_modules() if module is head}
        names = [n for n in linear_names if n not in excluded]
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = [n for n in linear_names if any(n == t or n.endswith("." + t) for t in wanted)]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear layer of the model; "
            "pass 'all-linear' or names such as ['q_proj', 'v_proj']"
        )
    return names


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    # Conv1D stores its weight as [in, out]
    n_in, n_out = module.weight.shape
    return n_out, n_in


def check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    """Raise ValueError unless 1 <= rank <= min(out, in) for every target layer."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    smallest = min((min(layer_shape(model.get_submodule(n))), n) for n in names)
    if rank > smallest[0]:
        raise ValueError(
            f"rank {rank} is too large: layer '{smallest[1]}' has min(out, in) = {smallest[0]}; "
            f"use --rank <= {smallest[0]}"
        )


def prepare_batches(batches: Iterable[dict[str, Any]] | None, device: torch.device) -> list[dict[str, Any]]:
    """Materialize calibration batches as a list of dicts of tensors on `device`; ValueError when empty."""
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
