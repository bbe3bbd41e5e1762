"""What the library and the command do with bad inputs: one clear line, the right exit status, and nothing on
disk that looks like a finished run. Every case stays in this matrix.

The command cases are one table (`CLI_CASES`): each names its input, the one-line message, the exit status and
what must be left on disk. Python API cases follow it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny import all_weights, batches, examples, tiny_llama, wrap
from conftest import build_tiny_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lora_da import LoraDAConfig, LoraDAError, initialize_lora_da, models
from lora_da.cli import commands, main
from lora_da.data import Example, encode, encode_example, encode_examples, encode_prompt, read_jsonl
from lora_da.train import TrainConfig, TrainingDiverged, train

CFG = LoraDAConfig(population_size=100, show_progress=False)
TWO_PASSES = 7  # layers per pass: the tiny Llama's 14 target layers in two passes over the data


class OneIterator:
    """An iterable that hands out the same iterator each time: spent after the first pass."""

    def __init__(self, items):
        self._iterator = iter(items)

    def __iter__(self):
        return self._iterator


class OtherDataEachTime:
    """An iterable that gives other examples each time it is iterated."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(batches(examples(4, seed=self.passes), 2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: OneIterator(batches(examples(4), 2)), "Pass 2 of 2: iterating `batches` again yielded nothing"),
        (OtherDataEachTime, "Pass 2 of 2 over `batches` saw other examples than pass 1"),
    ],
    ids=["same-spent-iterator", "other-data-per-pass"],
)
def test_passes_over_data_that_is_not_the_same_are_refused(data, message):
    model = wrap(tiny_llama())
    before = all_weights(model)
    with pytest.raises(LoraDAError, match=message):
        initialize_lora_da(model, data(), CFG, layers_per_pass=TWO_PASSES)
    after = all_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------
# The command: one table of cases. `left` is what must be on disk afterwards:
#   "nothing"    no output folder and no `<output>.incomplete`
#   "unchanged"  the finished run already in the output folder, byte for byte, and no `<output>.incomplete`
#   "incomplete" no output folder; `<output>.incomplete/` holds an INCOMPLETE marker and no adapter
#   "replaced"   the output folder holds only the new run's files (nothing of the run it replaced)
# ---------------------------------------------------------------------------------------------------------

BAD_LINES = {
    "deep.jsonl": b'{"text": "fine"}\n' + b"[" * 200_000 + b"\n",
    "surrogate.jsonl": b'{"prompt": "\\ud800 alone", "completion": "x"}\n',
    "garbage.jsonl": b'{"text": "fine"}\n\xff\xfe\x00\x9c garbage\n',
    "bigint.jsonl": b'{"text": "a", "n": ' + b"7" * 5000 + b"}\n",
}


@dataclass(frozen=True)
class Case:
    """One run of the command: its arguments, the one error line it must print, its exit status, what stays."""

    name: str
    argv: Callable[[SimpleNamespace], list]
    message: str | None  # a part of the single `lora-da: error:` line; None: the run succeeds
    status: int
    left: str
    needs_no_cuda: bool = False


def _model(env, *more) -> list:
    return ["--model", env.model, "--device", "cpu", "--batch-size", "4", "--max-length", "64", *more]


def _init(env, *more, output=None, data=None) -> list:
    return ["init", *_model(env), "--data", data or env.data, "--method", "lora_da", "--rank", "4",
            "--num-calibration", "8", "--output", output or env.out, *more]


def _train(env, *more, output=None, data=None) -> list:
    return ["train", *_model(env), "--data", data or env.data, "--eval-data", env.data, "--init", "lora", "--rank",
            "4", "--steps", "2", "--output", output or env.out, *more]


def _eval(env, adapter, *more) -> list:
    return ["eval", *_model(env), "--data", env.qa, "--num-generate", "0", "--adapter", adapter, *more]


CLI_CASES = [
    # 1. a diverged run is an error, and leaves no adapter
    Case("train-lr-inf", lambda e: _train(e, "--lr", "inf"), "lr must be a finite number > 0, got inf", 1,
         "nothing"),
    Case("train-diverges", lambda e: _train(e, "--lr", "1e4", "--steps", "6"), "training diverged at step", 1,
         "incomplete"),
    # 3. output folders are never reused silently
    Case("train-into-a-finished-run", lambda e: _train(e, output=e.finished), "is not empty", 1, "unchanged"),
    Case("init-into-a-finished-run", lambda e: _init(e, output=e.finished), "is not empty", 1, "unchanged"),
    Case("init-overwrites-a-finished-run", lambda e: _init(e, "--overwrite", output=e.finished), None, 0,
         "replaced"),
    Case("train-diverges-over-a-finished-run", lambda e: _train(e, "--lr", "1e4", "--steps", "6", "--overwrite",
                                                                output=e.finished),
         "training diverged at step", 1, "unchanged"),
    # 4. statistics of another model are refused
    Case("init-stats-of-another-model", lambda e: ["init", *_model(e), "--stats", e.stats, "--rank", "4",
                                                   "--population-size", "24", "--output", e.out, "--model",
                                                   e.reseeded],
         "come from another model", 1, "nothing"),
    # 5. one line, with file:line for data, and arguments checked before anything is loaded
    Case("device-cuda-without-cuda", lambda e: _init(e, "--device", "cuda"), "device 'cuda' is not available", 1,
         "nothing", needs_no_cuda=True),
    Case("eval-adapter-of-another-model", lambda e: _eval(e, e.wide_adapter), "made for another model", 1,
         "nothing"),
    Case("eval-corrupt-adapter", lambda e: _eval(e, e.corrupt_adapter), "is corrupt or was made for", 1,
         "nothing"),
    Case("eval-config-only-adapter", lambda e: _eval(e, e.config_only_adapter), "has adapter_config.json but no "
         "adapter weights", 1, "nothing"),
    Case("eval-nan-adapter", lambda e: _eval(e, e.nan_adapter), "holds NaN or infinite weights", 1, "nothing"),
    Case("deeply-nested-json", lambda e: _init(e, data=e.files["deep.jsonl"]),
         "deep.jsonl:2: invalid JSON (nested too deeply)", 1, "nothing"),
    Case("lone-surrogate", lambda e: _init(e, data=e.files["surrogate.jsonl"]),
         "surrogate.jsonl:1: field 'prompt' holds an invalid character", 1, "nothing"),
    Case("garbage-bytes", lambda e: _init(e, data=e.files["garbage.jsonl"]), "garbage.jsonl:2: not UTF-8 text",
         1, "nothing"),
    Case("5000-digit-integer", lambda e: _init(e, data=e.files["bigint.jsonl"]), "bigint.jsonl:1: invalid JSON",
         1, "nothing"),
    Case("bad-gamma-before-reading-data", lambda e: _init(e, "--gamma", "-1", data=e.missing),
         "`gamma` must be a finite number > 0", 1, "nothing"),
    Case("bad-max-length-before-reading-data", lambda e: _init(e, "--max-length", "1", data=e.missing),
         "--max-length must be >= 2", 1, "nothing"),
    Case("rank-too-large-before-encoding", lambda e: _init(e, "--rank", "99", "--max-length", "2"),
         "rank 99 is larger than min(out, in)", 1, "nothing"),
    # 7. small ones
    Case("population-size-0", lambda e: _init(e, "--population-size", "0", data=e.missing),
         "`population_size` must be a positive integer, got 0", 1, "nothing"),
    Case("num-train-0", lambda e: _train(e, "--num-train", "0"), "number of examples must be >= 1, got 0", 1,
         "nothing"),
    Case("eval-num-generate-negative", lambda e: _eval(e, e.finished, "--num-generate", "-1"),
         "num_generate must be >= 0, got -1", 1, "nothing"),
]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, tiny_jsonl, tiny_qa_jsonl, tiny_tokenizer):
    """Models, data, a finished run, statistics and adapters, made once for the module (read-only)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    reseeded, wide = root / "reseeded-model", root / "wide-model"
    build_tiny_model(seed=1).save_pretrained(reseeded)
    tiny_tokenizer.save_pretrained(reseeded)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    tiny_tokenizer.save_pretrained(wide)
    files = {}
    for name, content in BAD_LINES.items():
        files[name] = root / name
        files[name].write_bytes(content)
    common = ["--device", "cpu", "--batch-size", "4", "--max-length", "64", "--rank", "4"]
    finished, stats = root / "finished", root / "stats.safetensors"
    assert main(["train", "--model", str(tiny_model_dir), *common, "--data", str(tiny_jsonl), "--init", "lora",
                 "--steps", "1", "--output", str(finished)]) == 0
    assert main(["stats", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(tiny_jsonl),
                 "--num-calibration", "8", "--output", str(stats)]) == 0
    wide_adapter = root / "wide-adapter"
    assert main(["init", "--model", str(wide), *common, "--data", str(tiny_jsonl), "--method", "lora",
                 "--output", str(wide_adapter)]) == 0
    corrupt, config_only, nan_adapter = root / "corrupt", root / "config-only", root / "nan"
    for folder in (corrupt, config_only, nan_adapter):
        shutil.copytree(finished, folder)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (config_only / "adapter_model.safetensors").unlink()
    tensors = load_file(nan_adapter / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
              nan_adapter / "adapter_model.safetensors")
    return SimpleNamespace(model=tiny_model_dir, reseeded=reseeded, data=tiny_jsonl, qa=tiny_qa_jsonl,
                           missing=root / "missing.jsonl", files=files, finished=finished, stats=stats,
                           wide_adapter=wide_adapter, corrupt_adapter=corrupt, config_only_adapter=config_only,
                           nan_adapter=nan_adapter)


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.name for case in CLI_CASES])
def test_command_case(case, env, tmp_path, capsys):
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = SimpleNamespace(**vars(env), out=tmp_path / "out")
    if case.left in ("unchanged", "replaced"):  # the case works on its own copy of a finished run
        run.finished = tmp_path / "finished"
        shutil.copytree(env.finished, run.finished)
    argv = case.argv(run)
    output = Path(argv[argv.index("--output") + 1]) if "--output" in argv else run.out
    before = _snapshot(output) if output.is_dir() else None
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == case.status, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lora-da: error:")]
    if case.message is None:
        assert not errors, err
    else:
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert case.message in errors[0], errors[0]
    staging = output.with_name(output.name + ".incomplete")
    if case.left == "nothing":
        assert not output.exists() and not staging.exists()
    elif case.left == "unchanged":
        assert _snapshot(output) == before
    elif case.left == "incomplete":
        assert not output.exists() or _snapshot(output) == before
        assert (staging / "INCOMPLETE").is_file() and not (staging / "adapter_model.safetensors").exists()
    elif case.left == "replaced":
        assert not staging.exists()
        assert {p.name for p in output.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                      "init_report.json", "README.md"}
    else:
        raise AssertionError(f"unknown expectation {case.left!r}")


def test_an_interrupted_run_leaves_the_finished_one_and_marks_its_own_files(env, tmp_path, capsys, monkeypatch):
    finished = tmp_path / "finished"
    shutil.copytree(env.finished, finished)
    before = _snapshot(finished)

    def interrupted(model, features, config, *args, **kwargs):
        Path(config.log_path).write_text('{"step": 1, "loss": 1.0}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "train", interrupted)
    run = SimpleNamespace(**vars(env), out=finished)
    assert main([str(a) for a in _train(run, "--overwrite")]) == 130
    assert _snapshot(finished) == before  # the old run is whole, not mixed with the new one's log
    staging = tmp_path / "finished.incomplete"
    assert "interrupted" in (staging / "INCOMPLETE").read_text()
    assert (staging / "train_log.jsonl").is_file()
    # the next run into the same folder clears the leftovers and, with --overwrite, replaces the old run
    monkeypatch.undo()
    assert main([str(a) for a in _train(run, "--overwrite")]) == 0
    assert not staging.exists() and json.loads((finished / "results.json").read_text())["method"] == "lora"
    capsys.readouterr()


def test_training_stops_at_the_step_that_diverges(tiny_model_and_tokenizer, tiny_jsonl):
    """The library's loop: non-finite loss, gradient norm or (last step) parameters raise TrainingDiverged."""
    model, tokenizer = tiny_model_and_tokenizer
    features = encode_examples(read_jsonl(tiny_jsonl), tokenizer, 64)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("inf"))
    config = TrainConfig(steps=1, batch_size=4, show_progress=False)
    config.lr = float("inf")  # past the check: a one-step run whose only update is infinite
    for param in model.parameters():
        param.requires_grad_(param.ndim == 1)  # a few trainable tensors keep the test fast
    with pytest.raises(TrainingDiverged, match="step 1: parameter .* is not finite"):
        train(model, features, config, tokenizer.pad_token_id)


class SpyTokenizer:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("kind", ["prompt_completion", "text", "messages"])
def test_a_huge_field_is_tokenized_only_as_far_as_max_length_reaches(kind, tiny_tokenizer):
    """A 2-million-character field costs what a 600-character one does, and gives the same tokens as the whole
    field would (checked against its first / last 3000 characters: the tiny tokenizer makes a token of each)."""
    def example(text: str) -> Example:
        if kind == "text":
            return Example("", text, "text")
        if kind == "messages":
            return Example(({"role": "user", "content": text},), "ok", "messages")
        return Example(text, "ok", "prompt_completion")

    long = "".join(chr(97 + i % 26) for i in range(2_000_000))
    spy = SpyTokenizer(tiny_tokenizer)
    huge = encode_example(example(long), spy, max_length=64)
    assert spy.longest <= 8 * 64 + 64 + 200  # the clipped field plus the chat template's own text
    assert huge == encode_example(example(long[:3000]), tiny_tokenizer, max_length=64)
    spy.longest = 0
    tail = encode_prompt(example(long), spy, max_length=64)  # generation keeps the end of the prompt
    assert spy.longest <= 8 * 64 + 64 + 200
    assert tail == encode_prompt(example(long[-3000:]), tiny_tokenizer, max_length=64)


def test_init_on_a_huge_line_and_many_lines_encodes_only_the_calibration_examples(env, tmp_path, capsys,
                                                                               monkeypatch):
    """`init` reads every line (a bad one still stops it) but encodes only the examples it draws."""
    lines = [json.dumps({"prompt": f"say {i}", "completion": "ok " * 3}) for i in range(3000)]
    lines[5] = json.dumps({"prompt": "x" * 3_000_000, "completion": "ok"})  # one 3 MB line
    data = tmp_path / "many.jsonl"
    data.write_text("\n".join(lines) + "\n")
    encoded = []
    real = encode.encode_example
    monkeypatch.setattr(encode, "encode_example", lambda ex, *a, **k: encoded.append(ex) or real(ex, *a, **k))
    run = SimpleNamespace(**vars(env), out=tmp_path / "out")
    assert main([str(a) for a in _init(run, data=data)]) == 0
    assert 8 <= len(encoded) <= 9  # the 8 calibration examples (one more if the 3 MB prompt was drawn)
    report = json.loads((tmp_path / "out" / "init_report.json").read_text())
    assert report["report"]["config"]["population_size"] == 3000
    capsys.readouterr()


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(OSError, match="only the local cache was searched"):
        models.load_model_and_tokenizer("nobody-here/no-such-model-xyz")
    assert time.perf_counter() - start < 20
