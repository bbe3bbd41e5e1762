"""Training regimes (standard, LoRA-FA, LoRA+) in `train`, the bench and the grid, and `train --init` specs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model
from test_bench import _grid_module

from lora_da.bench import BenchConfig, cell_key, run_bench
from lora_da.cli import build_parser, main
from lora_da.cli.common import init_config
from lora_da.data import encode_examples, read_jsonl
from lora_da.methods import create_adapted_model
from lora_da.train import LORAPLUS_LR_RATIO, TrainConfig, build_optimizer, train


@pytest.fixture
def lora_model():
    """A fresh tiny model with a plain LoRA adapter (A random, B zero)."""
    model, _ = create_adapted_model(build_tiny_model(), "lora", rank=4)
    return model


@pytest.fixture
def features(tiny_jsonl, tiny_tokenizer):
    return encode_examples(read_jsonl(tiny_jsonl), tiny_tokenizer, 64)


def _lora(model, part: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if part in n}


def test_lora_fa_trains_b_and_leaves_every_a_bitwise_unchanged(lora_model, features, tiny_tokenizer):
    a_before, b_before = _lora(lora_model, "lora_A"), _lora(lora_model, "lora_B")
    config = TrainConfig(steps=3, lr=1e-2, batch_size=4, regime="lora_fa", show_progress=False)
    train(lora_model, features, config, tiny_tokenizer.pad_token_id)
    a_after, b_after = _lora(lora_model, "lora_A"), _lora(lora_model, "lora_B")
    assert a_before and all(torch.equal(a_before[n], a_after[n]) for n in a_before)
    assert all(not torch.equal(b_before[n], b_after[n]) for n in b_before)


def test_lora_plus_gives_b_a_larger_learning_rate_than_a(lora_model):
    optimizer = build_optimizer(lora_model, TrainConfig(lr=1e-3, regime="lora_plus"))
    names = {id(p): n for n, p in lora_model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    a_rates = {lr for n, lr in rates.items() if "lora_A" in n}
    b_rates = {lr for n, lr in rates.items() if "lora_B" in n}
    assert a_rates == {1e-3} and b_rates == {1e-3 * LORAPLUS_LR_RATIO}
    assert LORAPLUS_LR_RATIO > 1


def test_a_regime_needs_a_lora_adapter(features, tiny_tokenizer):
    model, _ = create_adapted_model(build_tiny_model(), "full", rank=4)
    with pytest.raises(ValueError, match="regime 'lora_fa' trains a LoRA adapter"):
        train(model, features, TrainConfig(steps=1, regime="lora_fa", show_progress=False), tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="unknown regime"):
        TrainConfig(regime="lora_xx")


def _train_args(*more):
    return build_parser().parse_args(["train", "--data", "d.jsonl", "--output", "o", *more])


def test_train_init_takes_bench_specs_and_lora_one_honours_gamma():
    spec = init_config(_train_args("--init", "lora_da@gamma=16,factor_balance=kaiming,calibration=8"))
    options = spec.method_options(population_size=24)
    assert spec.method == "lora_da" and spec.num_calibration == 8
    assert options.gamma == 16 and options.factor_balance == "kaiming"
    assert init_config(_train_args("--init", "lora_one", "--gamma", "4")).method_options(24).gamma == 4
    with pytest.raises(ValueError, match="gamma is set twice"):
        init_config(_train_args("--init", "lora_da@gamma=16", "--gamma", "4"))
    with pytest.raises(ValueError, match="unknown: no_such_option"):
        init_config(_train_args("--init", "lora_da@no_such_option=1"))


def test_train_command_records_the_regime_and_init_options(capsys, tmp_path, tiny_model_dir, tiny_jsonl):
    out = tmp_path / "run"
    status = main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "4", "--max-length",
                   "64", "--data", str(tiny_jsonl), "--init", "lora_da@gamma=16,calibration=8", "--rank", "4",
                   "--steps", "2", "--regime", "lora_plus", "--output", str(out)])
    assert status == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["regime"] == "lora_plus" and results["train_config"]["regime"] == "lora_plus"
    assert results["method"] == "lora_da" and results["init_options"] == {"gamma": 16}
    report = json.loads((out / "init_report.json").read_text())["report"]
    assert report["config"]["gamma"] == 16 and report["num_examples"] == 8


def test_bench_keys_records_and_protocol_carry_the_regime(tmp_path, tiny_model_dir, tiny_qa_jsonl):
    config = BenchConfig(model=str(tiny_model_dir), data=str(tiny_qa_jsonl), methods=["lora"], ranks=[4], seeds=[0],
                         learning_rates=[1e-2], steps=2, batch_size=4, max_length=64, num_train=4, num_val=2,
                         num_test=2, num_accuracy=0, eval_every=0, regime="lora_fa")
    records = run_bench(tmp_path, config, show_progress=False, plots=False)
    assert [r["regime"] for r in records] == ["lora_fa"] and records[0]["status"] == "ok"
    assert records[0]["key"] == cell_key("lora", 4, 1e-2, 0, "lora_fa") == "lora|r4|lr0.01|s0|lora_fa"
    assert cell_key("lora", 4, 1e-2, 0) == "lora|r4|lr0.01|s0"  # standard runs keep their old keys
    with pytest.raises(ValueError, match="different settings.*regime"):
        run_bench(tmp_path, BenchConfig(**{**config.to_dict(), "regime": "standard"}), show_progress=False)


def test_grid_shards_of_another_regime_have_folders_of_their_own():
    grid = _grid_module()
    assert grid.Shard("arith", "lora", (8,)).folder == "arith/lora-r8"
    assert grid.Shard("arith", "lora", (8,), "lora_plus").folder == "arith/lora-r8-lora_plus"
    assert {s.regime for s in grid.jobs("lora_fa")} == {"lora_fa"}
    assert grid.bench_config("arith", ["lora"], [8], regime="lora_fa").regime == "lora_fa"


def test_grid_reports_list_only_the_invocations_of_their_regime():
    grid = _grid_module()
    env = [dict(python="3.11.7", command=f"grid.py run --out g --only arith/lora-r8{extra}")
           for extra in ("", " --regime lora_fa")]
    assert grid.invocations_of(env, "arith", ["lora-r8"]) == env[:1]
    assert grid.invocations_of(env, "arith", ["lora-r8-lora_fa"], "lora_fa") == env[1:]


def test_grid_regimes_and_the_short_budget_run_their_own_comparison():
    grid = _grid_module()
    assert [s.variant for s in grid.jobs("lora_fa") if s.task == "arith"] == grid.REGIME_METHODS["lora_fa"]
    plus = grid.jobs("lora_plus")
    assert {s.variant for s in plus} == {"lora", "lora_da", *grid.RANK_ALLOCATION}
    assert {s.ranks for s in plus} == {(8,), (32,)}  # the rank allocations' larger budget, with its references
    short = grid.jobs(budget="short")
    assert {s.variant for s in short} == set(grid.SHORT_METHODS) and short[0].folder == "arith/lora-r8-short"
    assert grid.bench_config("arith", ["lora"], [8], budget="short").steps == 25
    assert grid.bench_config("arith", ["lora"], [8]).steps == 100
    env = [dict(python="3.11.7", command=f"grid.py run --out g --only arith/{extra}")
           for extra in ("lora-r8", "lora-r8 --budget short")]
    assert grid.invocations_of(env, "arith", ["lora-r8-short"], budget="short") == env[1:]


def test_grid_merge_reports_each_regime_and_budget_apart(tmp_path, tiny_model_dir):
    """Shards of the standard grid, of LoRA-FA and of the short budget merge into a folder each."""
    grid = _grid_module()
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{a}+1?", "answer": f"#### {a + 1}"}) for a in range(30)))
    common = dict(model=str(tiny_model_dir), data=str(data), methods=["lora"], ranks=[4], seeds=[0],
                  learning_rates=[1e-2], batch_size=4, max_length=64, num_train=16, num_val=4, num_test=4,
                  num_accuracy=0, eval_every=0, calibration_examples=4)
    raw = tmp_path / "raw" / "arith"
    for folder, regime, steps in [("lora-r4", "standard", 2), ("lora-r4-lora_fa", "lora_fa", 2),
                                  ("lora-r4-short", "standard", grid.SHORT_BUDGET["steps"])]:
        run_bench(raw / folder, BenchConfig(**common, regime=regime, steps=steps), show_progress=False, plots=False)
    grid.merge(grid.build_parser().parse_args(["merge", str(tmp_path / "raw"), str(tmp_path / "out")]))
    merged = {p.name: json.loads((p / "results.json").read_text()) for p in (tmp_path / "out").iterdir()}
    assert set(merged) == {"arith-standard", "arith-lora-fa", "arith-short"}  # no LoRA-DA option ran
    assert merged["arith-lora-fa"]["config"]["regime"] == "lora_fa"
    assert merged["arith-short"]["config"]["steps"] == grid.SHORT_BUDGET["steps"]
    assert [r["regime"] for r in merged["arith-standard"]["records"]] == ["standard"]
