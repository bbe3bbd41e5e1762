"""Read JSONL files of examples and detect their format (prompt/completion, question/answer, messages, text)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("messages", "prompt_completion", "question_answer", "text")


@dataclass(frozen=True)
class Example:
    """One training example: a prompt (text or chat messages) and the completion to learn.

    `kind` is the detected format; for `text` the prompt is empty and every token is supervised.
    """

    prompt: str | tuple = ""
    completion: str = ""
    kind: str = "prompt_completion"
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.kind not in FORMATS:
            raise ValueError(f"unknown example kind {self.kind!r}; choose one of: {', '.join(FORMATS)}")

    @property
    def is_qa(self) -> bool:
        """True when the example has a prompt whose answer can be scored by generation."""
        return self.kind != "text"


def _check_text(value: str, where: str, what: str) -> str:
    """`value`, unless it cannot be written as UTF-8 (a lone surrogate from a `\\ud800` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: {what} holds an invalid character at position {err.start} (a lone UTF-16 surrogate)"
        ) from None
    return value


def _check_messages(messages, where: str) -> tuple:
    """Validate a chat message list whose last turn is the assistant's; return it as a tuple of dicts."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: 'messages' must be a list of at least 2 turns")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(
            turn.get("content"), str
        ):
            raise ValueError(f"{where}: every message needs string 'role' and 'content'")
    for turn in messages:
        _check_text(turn["content"], where, "a message's 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must have role 'assistant' (the completion)")
    return tuple({"role": t["role"], "content": t["content"]} for t in messages)


def record_to_example(record: dict, where: str = "record") -> Example:
    """Convert one JSON record into an Example, detecting its format from its fields."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")

    def text_field(key: str) -> str:
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        return _check_text(value, where, f"field {key!r}")

    meta = {k: v for k, v in record.items() if k not in ("messages", "prompt", "completion", "question",
                                                         "answer", "text")}
    if "messages" in record:
        messages = _check_messages(record["messages"], where)
        return Example(messages[:-1], messages[-1]["content"], "messages", meta)
    if "prompt" in record and "completion" in record:
        return Example(text_field("prompt"), text_field("completion"), "prompt_completion", meta)
    if "question" in record and "answer" in record:
        return Example(text_field("question"), text_field("answer"), "question_answer", meta)
    if "text" in record:
        return Example("", text_field("text"), "text", meta)
    raise ValueError(
        f"{where}: expected fields prompt/completion, question/answer, messages or text; "
        f"got {sorted(record)}"
    )


def parse_line(raw: bytes, where: str) -> object:
    """One JSONL line as a JSON value; every failure is a ValueError starting with `where` (file:line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text (byte {err.start} of the line)") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"{where}: invalid JSON ({' '.join(str(err).split())})") from None


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read a JSONL file into Examples (the first `limit`, if given; later lines are not read); a bad line
    raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples = []
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is reported with its number
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            examples.append(record_to_example(parse_line(raw, where), where))
    if not examples:
        raise ValueError(f"data file {path} contains no examples")
    return examples
