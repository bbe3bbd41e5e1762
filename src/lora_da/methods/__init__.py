"""Registry of LoRA initialization methods: `create_adapted_model(base, "lora_da", rank=8, ...)`."""

from lora_da.methods.adapt import adapt_model
from lora_da.methods.base import InitInfo
from lora_da.methods.config import InitConfig, check_method_options
from lora_da.methods.registry import (
    METHODS,
    MethodSpec,
    check_adapter_fits,
    create_adapted_model,
    normalize_method,
    save_adapter,
)

__all__ = [
    "METHODS",
    "InitConfig",
    "InitInfo",
    "MethodSpec",
    "adapt_model",
    "check_adapter_fits",
    "check_method_options",
    "create_adapted_model",
    "normalize_method",
    "save_adapter",
]
