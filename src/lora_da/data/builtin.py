"""Resolve a data spec: a built-in task name (`arith`, `arith:test`, ...) or a JSONL file path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .arith import generate_arith
from .jsonl import Example, read_jsonl, record_to_example
from .stdlib_code import generate_stdlib_code

#: Default number of generated examples per split of a built-in task.
DEFAULT_SIZES = {"train": 1000, "test": 200}


def _arith(split: str, num_examples: int, seed: int) -> list[Example]:
    """The arith task as question/answer Examples."""
    return [record_to_example(r, "arith") for r in generate_arith(split, num_examples, seed)]


def _stdlib_code(split: str, num_examples: int, seed: int) -> list[Example]:
    """Standard-library source chunks as plain-text Examples (every token supervised)."""
    return [record_to_example(r, "stdlib-code") for r in generate_stdlib_code(split, num_examples, seed)]


#: Built-in tasks: name -> function(split, num_examples, seed) returning Examples.
BUILTIN_TASKS: dict[str, Callable[[str, int, int], list[Example]]] = {
    "arith": _arith,
    "stdlib-code": _stdlib_code,
}


def register_task(name: str, loader: Callable[[str, int, int], list[Example]]) -> None:
    """Register a built-in task under `name` (loader(split, num_examples, seed) -> Examples)."""
    BUILTIN_TASKS[name] = loader


def parse_spec(spec: str, default_split: str = "train") -> tuple[str, str | None]:
    """Split 'name:split' into (name, split) for built-in tasks; (path, None) for files."""
    name, _, split = str(spec).partition(":")
    if name in BUILTIN_TASKS:
        return name, split or default_split
    return str(spec), None


def is_builtin(spec: str) -> bool:
    """True when `spec` names a built-in task (with or without a split)."""
    return str(spec).partition(":")[0] in BUILTIN_TASKS


def load_examples(
    spec: str, default_split: str = "train", num_examples: int | None = None, seed: int = 0
) -> list[Example]:
    """Load Examples from a built-in task ('arith', 'arith:test') or a JSONL file (first num_examples)."""
    name, split = parse_spec(spec, default_split)
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"number of examples must be >= 1, got {num_examples}")
    if split is not None:
        size = num_examples or DEFAULT_SIZES.get(split, DEFAULT_SIZES["test"])
        examples = BUILTIN_TASKS[name](split, size, seed)
    else:
        path = Path(name)
        if not path.exists() and path.suffix.lower() not in (".jsonl", ".json") and "/" not in name:
            known = ", ".join(sorted(BUILTIN_TASKS))
            raise FileNotFoundError(f"data not found: {name!r} is neither a file nor a built-in task ({known})")
        examples = read_jsonl(path, limit=num_examples)
    if not examples:
        raise ValueError(f"data {spec!r} has no examples")
    return examples
