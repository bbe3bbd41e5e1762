"""Data: JSONL loading with format detection, chat formatting, completion-only labels, built-in tasks."""

from .arith import extract_answer, generate_arith, is_correct
from .builtin import BUILTIN_TASKS, is_builtin, load_examples, parse_spec, register_task
from .encode import (
    IGNORE_INDEX,
    LazyFeatures,
    calibration_batches,
    check_max_length,
    collate,
    encode_example,
    encode_examples,
    encode_prompt,
    has_chat_template,
    iter_batches,
    render,
)
from .jsonl import FORMATS, Example, read_jsonl, record_to_example

__all__ = [
    "BUILTIN_TASKS",
    "FORMATS",
    "IGNORE_INDEX",
    "Example",
    "LazyFeatures",
    "calibration_batches",
    "check_max_length",
    "collate",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "extract_answer",
    "generate_arith",
    "has_chat_template",
    "is_builtin",
    "is_correct",
    "iter_batches",
    "load_examples",
    "parse_spec",
    "read_jsonl",
    "record_to_example",
    "register_task",
    "render",
]
