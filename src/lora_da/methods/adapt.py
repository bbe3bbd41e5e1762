"""The initialization step of the pipeline: encoded training data + `InitConfig` -> adapted model."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from lora_da.data import calibration_batches
from lora_da.methods.base import InitInfo
from lora_da.methods.config import InitConfig
from lora_da.methods.registry import create_adapted_model


def adapt_model(
    base_model: nn.Module,
    features: Sequence[dict],
    config: InitConfig,
    pad_token_id: int,
    population_size: int | None = None,
    statistics_cache: str | os.PathLike | None = None,
) -> tuple[nn.Module, InitInfo]:
    """Initialize an adapter on `base_model` (in place) per `config`, calibrating on `features` when needed.

    `population_size` (default: the number of features) is the fine-tuning set size of LoRA-DA's variance term.
    `features` may be a `lora_da.data.LazyFeatures`: then only the calibration examples drawn are encoded.
    `statistics_cache`: see `create_adapted_model`.
    """
    batches = None
    if config.needs_calibration:
        batches = calibration_batches(features, config.num_calibration, config.calibration_batch_size,
                                      pad_token_id, config.seed)
    options = config.method_options(len(features) if population_size is None else population_size)
    return create_adapted_model(
        base_model, config.method, rank=config.rank, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
        target_modules=config.target_modules, calibration_batches=batches, options=options, seed=config.seed,
        statistics_cache=statistics_cache,
    )
