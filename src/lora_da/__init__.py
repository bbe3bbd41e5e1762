"""LoRA-DA: data-aware initialization for LoRA, native to Hugging Face PEFT."""

from .adapter import LoraDAReport, initialize_lora_da
from .cache import compute_and_save_statistics, load_statistics
from .collect import collect_statistics
from .config import LoraDAConfig, LoraDAError
from .distributed import init_distributed_from_env, shard_batches
from .layers import find_lora_layers
from .solver import LayerSolution, solve_all, solve_factors, solve_layer
from .statistics import LoraDAStatistics

__version__ = "0.2.0"

__all__ = [
    "LayerSolution",
    "LoraDAConfig",
    "LoraDAError",
    "LoraDAReport",
    "LoraDAStatistics",
    "collect_statistics",
    "compute_and_save_statistics",
    "find_lora_layers",
    "init_distributed_from_env",
    "initialize_lora_da",
    "load_statistics",
    "shard_batches",
    "solve_all",
    "solve_factors",
    "solve_layer",
]
