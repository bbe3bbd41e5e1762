"""Every Python snippet and `lora-da` command in the README and the docs runs as written.

The snippets name the hub id of SmolLM2-135M-Instruct; here a folder of that name holds the tiny random model,
which transformers and `lora-da` load in place of the hub (a local folder wins over a hub id), so the text
is run unchanged. The Python blocks of one page run in order in one fresh interpreter, as a reader would
paste them; each `lora-da` line of a `bash` block runs as a command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Commands shown for what they do at full size; what each exercises runs in the tests named.
NOT_RUN = {
    "lora-da demo": "the real SmolLM2 for minutes; tests/test_demo.py runs it on the tiny model",
}


def blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text(encoding="utf-8")) if lang == language]


def commands(page: Path) -> list[str]:
    """The `lora-da ...` lines of the page's bash blocks (a trailing comment dropped)."""
    found = []
    for code in blocks(page, "bash"):
        for line in code.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("lora-da ") and line not in NOT_RUN:
                found.append(line)
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """A folder in which the hub id resolves to the tiny model."""
    folder = tmp_path_factory.mktemp("docs")
    shutil.copytree(tiny_model_dir, folder / HUB_ID)
    return folder


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_pages_have_snippets():
    assert blocks(ROOT / "README.md", "python") and commands(ROOT / "README.md")
    assert all(page.exists() for page in PAGES)


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run_as_written(page, workdir):
    script = "\n\n".join(blocks(page, "python"))
    result = _run([sys.executable, "-c", script], workdir)
    assert result.returncode == 0, f"{page.name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: p.name)
def test_commands_run_as_written(page, workdir):
    cli = [sys.executable, "-m", "lora_da.cli"]
    for line in commands(page):
        argv = shlex.split(line)
        result = _run(cli + argv[1:] + (["--overwrite"] if argv[1] in ("init", "train") else []), workdir)
        assert result.returncode == 0, f"{page.name}: {line}\n{result.stderr[-3000:]}"


def test_cli_reference_matches_the_parser():
    result = _run([sys.executable, str(ROOT / "docs" / "cli_reference.py"), "--check"], ROOT)
    assert result.returncode == 0, result.stderr
