"""Output folders of `init` and `train`: never a mix of two runs, never a half-written run that looks finished.

A command refuses a non-empty output folder unless `--overwrite`, writes its files into `<output>.incomplete/`
(with a file `INCOMPLETE` saying why it is not done), and renames that folder to `<output>` only when every
file is written. A run that fails or is interrupted leaves `<output>` as it was and its partial files in
`<output>.incomplete/`, which the next run into `<output>` clears.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_da.cli.common import status

INCOMPLETE_SUFFIX = ".incomplete"
INCOMPLETE_MARKER = "INCOMPLETE"


def check_output_folder(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path` as a Path; ValueError when it is a file, or a non-empty folder and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path} is a file, not a folder")
    if path.is_dir() and not overwrite:
        held = sorted(entry.name for entry in path.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise ValueError(f"output folder {path} is not empty ({shown}); pass --overwrite to replace it, "
                             "or choose another folder")
    return path


def incomplete_folder(path: Path) -> Path:
    """Where a run into `path` writes until it is complete."""
    return path.with_name(path.name + INCOMPLETE_SUFFIX)


def _replace_folder(staging: Path, path: Path) -> None:
    """Move the finished `staging` folder to `path`; an older `path` is moved aside first, then deleted."""
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.replaced-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield the folder to write a run's files into; on success it becomes `path` (see the module doc)."""
    path = check_output_folder(path, overwrite)
    staging = incomplete_folder(path)
    if staging.exists():  # the leftovers of an earlier run that did not finish
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    marker = staging / INCOMPLETE_MARKER
    marker.write_text("this run has not finished yet\n", encoding="utf-8")
    try:
        yield staging
    except BaseException as err:
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
        marker.write_text(f"this run stopped before it finished: {reason}\n", encoding="utf-8")
        status(f"{path} left unchanged; the unfinished run's files are in {staging}")
        raise
    marker.unlink()
    _replace_folder(staging, path)
