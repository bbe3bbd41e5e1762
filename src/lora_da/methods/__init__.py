"""Registry of LoRA initialization methods: `create_adapted_model(base, "lora_da", rank=8, ...)`."""

from lora_da.methods.base import InitInfo, resolve_target_modules
from lora_da.methods.registry import METHODS, MethodSpec, create_adapted_model, normalize_method, save_adapter

__all__ = [
    "METHODS",
    "InitInfo",
    "MethodSpec",
    "create_adapted_model",
    "normalize_method",
    "resolve_target_modules",
    "save_adapter",
]
