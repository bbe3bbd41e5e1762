"""Atomic file writes: a killed or failed write never leaves a half-written file under the final name.

Temporary files are named `.tmp-<host>-<pid>-...` beside their target, so a later write into the same folder
can remove those of writers that died (killed by a signal, out of memory) without touching a live one's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def _host_tag() -> str:
    """This machine's name as it appears in temporary file names (only letters, digits and '_')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _temp_prefix(pid: int | None = None) -> str:
    return f"{TEMP_PREFIX}{_host_tag()}-{os.getpid() if pid is None else pid}-"


def _is_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (or may: we lack permission to ask)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files in `folder` left by dead writers of this machine; return their paths.

    A temporary file of another machine (shared filesystem) or of a live process is never touched.
    """
    own_host = f"{TEMP_PREFIX}{_host_tag()}-"
    removed = []
    with suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(folder):
            if not name.startswith(own_host):
                continue
            pid_text = name[len(own_host):].partition("-")[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _is_alive(int(pid_text)):
                continue
            path = os.path.join(folder, name)
            with suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Call `write(temp_path)` on a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(), suffix=suffix)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> None:
    """Write strict JSON (NaN and infinity are refused) atomically."""
    text = json.dumps(payload, indent=indent, allow_nan=False, default=str) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")
