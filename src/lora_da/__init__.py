"""LoRA-DA: data-aware initialization for LoRA, native to Hugging Face PEFT."""

from .adapter import LoraDAReport, find_lora_layers, initialize_lora_da
from .config import LoraDAConfig, LoraDAError
from .solver import LayerSolution, solve_all, solve_factors, solve_layer
from .statistics import LoraDAStatistics, collect_statistics

__version__ = "0.1.0"

__all__ = [
    "LayerSolution",
    "LoraDAConfig",
    "LoraDAError",
    "LoraDAReport",
    "LoraDAStatistics",
    "collect_statistics",
    "find_lora_layers",
    "initialize_lora_da",
    "solve_all",
    "solve_factors",
    "solve_layer",
]
