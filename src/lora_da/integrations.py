"""Trainer integration: `LoraDACallback` runs LoRA-DA once, before the first optimizer step.

Works with `transformers.Trainer` and everything built on it (TRL's `SFTTrainer`, ...): the calibration batches
are the first `num_samples` examples of the trainer's training set, collated by the trainer's own data collator,
so they match what training will see (completion-only labels, chat templates, padding) with no second pipeline.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback

from .adapter import LoraDAReport, initialize_lora_da
from .collect import PerExampleLoss
from .config import LoraDAConfig, LoraDAError
from .layers import check_supported_sharding

logger = logging.getLogger("lora_da")

REPORT_FILE = "lora_da_report.json"


class LoraDACallback(TrainerCallback):
    """Initialize the trainer's LoRA adapter with LoRA-DA at `on_train_begin`, before any optimizer step.

    Args:
        num_samples: calibration examples, taken in order from the start of the training set (not shuffled, so
            every rank and every run uses the same ones).
        config: a `LoraDAConfig`, or a dict of its fields; with a dict (or None) `population_size` defaults
            to `len(train_dataset)`.
        batch_size: calibration batch size; defaults to `per_device_train_batch_size`.
        adapter_name: adapter to initialize; defaults to the model's active adapter.
        loss_fn: optional per-example loss, passed to `initialize_lora_da`.
        save_report: write `lora_da_report.json` into `output_dir` (main process only).

    After training starts, `report` holds the `LoraDAReport` (None if the callback did not run, e.g. when
    resuming from a checkpoint, whose adapter weights must not be overwritten).
    """

    def __init__(
        self,
        num_samples: int = 256,
        config: LoraDAConfig | Mapping[str, Any] | None = None,
        *,
        batch_size: int | None = None,
        adapter_name: str | None = None,
        loss_fn: PerExampleLoss | None = None,
        save_report: bool = True,
    ):
        if int(num_samples) != num_samples or num_samples < 1:
            raise LoraDAError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise LoraDAError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if config is not None and not isinstance(config, (LoraDAConfig, Mapping)):
            raise LoraDAError(f"`config` must be a LoraDAConfig or a dict of its fields, got {type(config).__name__}.")
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - set(LoraDAConfig.__dataclass_fields__))
            if unknown:
                raise LoraDAError(f"Unknown LoraDAConfig field(s) in `config`: {', '.join(unknown)}.")
            LoraDAConfig(**{"population_size": 1, **config})  # bad values fail now, not at train time
        settings = config if isinstance(config, Mapping) else vars(config) if config is not None else {}
        if settings.get("rank_allocation", "uniform") != "uniform":
            raise LoraDAError(
                "A rank allocation resizes the adapter, which the trainer's optimizer already holds: call "
                "initialize_lora_da with it before building the trainer, and this callback not at all."
            )
        self.num_samples = int(num_samples)
        self.config = config
        self.batch_size = batch_size
        self.adapter_name = adapter_name
        self.loss_fn = loss_fn
        self.save_report = save_report
        self.report: LoraDAReport | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """Run LoRA-DA once: after the optimizer exists (it holds the same tensors) and before step 1."""
        if self.report is not None:
            return  # a second `train()` call continues from the trained adapter
        if state.global_step > 0:
            if state.is_world_process_zero:
                logger.info("LoRA-DA: resuming at step %d, keeping the checkpoint's adapter.", state.global_step)
            return
        _check_supported_setup(args, model)
        if train_dataloader is None:
            raise LoraDAError("LoraDACallback needs the trainer's train dataloader (transformers >= 4.45).")
        dataset, collate = train_dataloader.dataset, train_dataloader.collate_fn
        config = self.resolve_config(dataset, show_progress=state.is_world_process_zero)
        batch_size = self.batch_size or args.per_device_train_batch_size
        batches = list(first_batches(dataset, collate, self.num_samples, batch_size))
        adapter_name = self.adapter_name or _active_adapter(model)
        # Every rank builds the same batches; `shard` gives each rank every world_size-th one and the
        # statistics are all-reduced, so all ranks end with the same factors.
        self.report = initialize_lora_da(model, batches, config, adapter_name, loss_fn=self.loss_fn, shard=True)
        if state.is_world_process_zero:
            self._log(args, adapter_name)

    def resolve_config(self, dataset, show_progress: bool = True) -> LoraDAConfig:
        """The `LoraDAConfig` to run with: `population_size` defaults to the training set's size."""
        if isinstance(self.config, LoraDAConfig):
            return self.config
        fields = dict(self.config or {})
        if "population_size" not in fields:
            try:
                fields["population_size"] = len(dataset)
            except TypeError:
                if fields.get("variance_weight", LoraDAConfig.variance_weight) != 0:
                    raise LoraDAError(
                        "The training set has no length (an iterable dataset): pass "
                        "config={'population_size': <examples in the whole training set>} to LoraDACallback."
                    ) from None
        fields.setdefault("show_progress", show_progress)
        return LoraDAConfig(**fields)

    def _log(self, args, adapter_name: str) -> None:
        report = self.report
        logger.info(
            "LoRA-DA initialized adapter %r: %d layers from %d examples (%d tokens) in %.1f s "
            "(statistics %.1f s, solve %.1f s).",
            adapter_name, len(report.layers), report.num_examples, report.num_tokens, report.total_seconds,
            report.statistics_seconds, report.solve_seconds,
        )
        if self.save_report and getattr(args, "output_dir", None):
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, REPORT_FILE), "w", encoding="utf-8") as handle:
                json.dump(report.to_dict(), handle, indent=1, default=float)


def first_batches(dataset, collate, num_samples: int, batch_size: int) -> Iterable[dict]:
    """The first `num_samples` examples of `dataset`, collated by `collate` in batches of `batch_size`."""
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        examples = [dataset[i] for i in range(min(num_samples, len(dataset)))]
    else:
        examples = list(itertools.islice(iter(dataset), num_samples))
    if not examples:
        raise LoraDAError("The training set is empty: LoRA-DA has no calibration example.")
    for start in range(0, len(examples), batch_size):
        yield dict(collate(examples[start : start + batch_size]))


def _active_adapter(model) -> str:
    active = getattr(model, "active_adapter", "default")
    return active[0] if isinstance(active, (list, tuple)) else active


def _check_supported_setup(args, model) -> None:
    """Refuse FSDP1, whose flat parameters an in-place init misses. FSDP2 (the Trainer's default FSDP; DTensor
    parameters) and DeepSpeed (partitioned parameters, optimizer master copies) are supported."""
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    if getattr(args, "fsdp", None) and int(fsdp_config.get("version", 2)) == 1:
        raise LoraDAError(
            "LoraDACallback does not support FSDP1 (flat parameters): use FSDP2 (fsdp_config={'version': 2}), or "
            "call lora_da.initialize_lora_da on the PeftModel before building the trainer."
        )
    if model is not None:
        check_supported_sharding(model)
