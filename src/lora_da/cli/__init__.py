"""The `lora-da` command: `parser` (flags, defaults from the settings dataclasses), `commands` (init, stats,
train, eval, bench, methods), `demo`, `common` (settings built once from the flags), `main` (entry point)."""

from lora_da.cli.main import main
from lora_da.cli.parser import build_parser

__all__ = ["build_parser", "main"]
