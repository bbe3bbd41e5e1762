"""The built-in `stdlib-code` task: Python standard library source text, split by module (train vs held out)."""

from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path

#: One module in NUM_BUCKETS (by a hash of its file name) is held out for the test split.
NUM_BUCKETS = 5
TEST_BUCKETS = (0,)
#: Characters per chunk (about 128-256 tokens of Python for common tokenizers).
CHUNK_CHARS = 600


def stdlib_dir() -> Path:
    """Folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_split(file_name: str) -> str:
    """'train' or 'test' for a stdlib module file, from a stable hash of its name."""
    bucket = int(hashlib.sha256(file_name.encode()).hexdigest(), 16) % NUM_BUCKETS
    return "test" if bucket in TEST_BUCKETS else "train"


def module_files(split: str, folder: Path | None = None) -> list[Path]:
    """Sorted top-level `*.py` modules of the standard library that belong to `split`."""
    folder = stdlib_dir() if folder is None else folder
    files = sorted(p for p in folder.glob("*.py") if not p.name.startswith(("_", "test")))
    return [p for p in files if module_split(p.name) == split]


def chunk_source(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut source text at line boundaries into chunks of about `chunk_chars` characters (blank ones dropped)."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return [c for c in chunks if len(c.strip()) >= 40]


def generate_stdlib_code(
    split: str = "train", num_examples: int = 1000, seed: int = 0, folder: Path | None = None
) -> list[dict]:
    """`num_examples` text records ({'text', 'module'}) of `split`, shuffled by `seed`; modules never mix splits."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for stdlib-code; choose one of: train, test")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    records = []
    for path in module_files(split, folder):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable module is skipped rather than failing the task
        records.extend({"text": chunk, "module": path.stem} for chunk in chunk_source(text))
    if not records:
        raise ValueError(f"no standard library source found for stdlib-code:{split} in {folder or stdlib_dir()}")
    random.Random(f"stdlib-code-{split}-{seed}").shuffle(records)
    return records[:num_examples]
