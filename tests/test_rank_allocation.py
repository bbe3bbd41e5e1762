"""Data-aware ranks through `initialize_lora_da`: the budget, the factors at each chosen rank against an
independent solve at that rank, determinism, stock PEFT reload, and the refusals."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from _tiny import batches, examples, relative_error, tiny_gpt2, tiny_llama, wrap
from peft import PeftModel

from lora_da import LoraDAConfig, LoraDAError, collect_statistics, initialize_lora_da, solve_layer
from lora_da.cli import main
from lora_da.integrations import LoraDACallback
from lora_da.layers import canonical_layer_name, find_lora_layers, layer_shape

CONFIG = dict(population_size=500, show_progress=False)


def trainable_lora_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def data():
    return batches(examples(12, seed=1), 4)


class TestBudget:
    @pytest.mark.parametrize("allocation", ["lora_da", "gradient"])
    def test_the_trainable_parameters_stay_those_of_the_uniform_rank(self, allocation):
        model = wrap(tiny_llama(), rank=4)
        before = trainable_lora_parameters(model)
        report = initialize_lora_da(model, data(), LoraDAConfig(rank_allocation=allocation, max_rank=8, **CONFIG))
        assert trainable_lora_parameters(model) == before == report.rank_allocation.budget
        ranks = report.rank_allocation.ranks
        assert len(set(ranks.values())) > 1  # the data moved rank between weights
        layers, _ = find_lora_layers(model)
        for name, module in layers.items():
            m, n = layer_shape(module)
            assert module.r["default"] == ranks[name] <= min(8, m, n)
            assert module.lora_A["default"].weight.shape == (ranks[name], n)
            assert report.layers[name]["rank"] == ranks[name]

    def test_uniform_is_the_default_and_changes_no_rank(self):
        model = wrap(tiny_llama(), rank=4)
        report = initialize_lora_da(model, data(), LoraDAConfig(**CONFIG))
        assert report.rank_allocation is None
        assert {module.r["default"] for module in find_lora_layers(model)[0].values()} == {4}


class TestFactors:
    def test_each_weight_gets_the_solve_at_its_rank(self):
        """Solved once at the largest rank and cut: the same factors as an independent solve at each rank."""
        model = wrap(tiny_llama(), rank=4)
        config = LoraDAConfig(rank_allocation="lora_da", max_rank=8, factor_balance="svd", eigensolver="eigh",
                              **CONFIG)
        layers = find_lora_layers(model)[0]
        stats = collect_statistics(model, data(), list(layers), config)
        report = initialize_lora_da(model, [], config, statistics=stats)
        for name, module in layers.items():
            rank = report.rank_allocation.ranks[name]
            expected = solve_layer(stats.gradient(name), stats.input_factor(name), stats.output_factor(name), rank,
                                   config)
            got = module.lora_B["default"].weight @ module.lora_A["default"].weight
            assert relative_error(got, expected.B @ expected.A) < 1e-5, name
            assert relative_error(module.lora_A["default"].weight, expected.A) < 1e-4, name

    def test_gains_are_the_solve_eigenvalues_scaled_back(self):
        model = wrap(tiny_llama(), rank=4)
        report = initialize_lora_da(model, data(), LoraDAConfig(rank_allocation="lora_da", max_rank=8, **CONFIG))
        for name, gains in report.rank_allocation.gains.items():
            info = report.layers[name]
            assert gains == pytest.approx([-info["sigma"] ** 2 * v for v in info["eigenvalues"]])
            assert all(a >= b for a, b in itertools.pairwise(gains))

    def test_deterministic(self):
        config = LoraDAConfig(rank_allocation="lora_da", max_rank=8, **CONFIG)
        first, second = wrap(tiny_llama(), rank=4), wrap(tiny_llama(), rank=4)
        initialize_lora_da(first, data(), config)
        initialize_lora_da(second, data(), config)
        for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
            assert torch.equal(a, b), name


class TestSavedAdapter:
    def test_reloads_in_stock_peft_with_the_chosen_ranks(self, tmp_path):
        model = wrap(tiny_gpt2(), rank=4)
        report = initialize_lora_da(model, data(), LoraDAConfig(rank_allocation="gradient", max_rank=8, **CONFIG))
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
        for name, module in find_lora_layers(reloaded)[0].items():
            assert module.r["default"] == report.rank_allocation.ranks[name], canonical_layer_name(name)
        original = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        for key, value in reloaded.state_dict().items():
            if "lora_" in key:
                assert torch.equal(value, original[key]), key


class TestRefusals:
    def test_a_model_wrapped_for_training_is_refused(self):
        model = wrap(tiny_llama(), rank=4)
        layer = next(iter(find_lora_layers(model)[0].values()))
        layer.lora_A["default"].weight.ds_id = 0  # as a DeepSpeed-partitioned parameter is marked
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(LoraDAError, match="before wrapping"):
            initialize_lora_da(model, data(), LoraDAConfig(rank_allocation="lora_da", **CONFIG))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def test_the_trainer_callback_refuses_it(self):
        with pytest.raises(LoraDAError, match="rank allocation"):
            LoraDACallback(num_samples=8, config=LoraDAConfig(rank_allocation="lora_da", **CONFIG))

    @pytest.mark.parametrize("bad", [dict(rank_allocation="by_magic"), dict(min_rank=0),
                                     dict(min_rank=4, max_rank=2), dict(max_rank=2.5)])
    def test_bad_settings_are_one_line(self, bad):
        with pytest.raises(LoraDAError):
            LoraDAConfig(**bad, **CONFIG)


class TestCommandLine:
    def test_init_writes_the_ranks_as_a_rank_pattern(self, capsys, tmp_path, tiny_model_dir, tiny_jsonl):
        out = tmp_path / "adapter"
        status = main(["init", "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "4",
                       "--max-length", "64", "--data", str(tiny_jsonl), "--rank", "4", "--num-calibration", "8",
                       "--rank-allocation", "lora_da", "--max-rank", "8", "--output", str(out)])
        assert status == 0, capsys.readouterr().err
        allocation = json.loads((out / "init_report.json").read_text())["report"]["rank_allocation"]
        assert allocation["used"] == allocation["budget"] and len(set(allocation["ranks"].values())) > 1
        pattern = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
        assert sorted(pattern.values()) == sorted(allocation["ranks"].values())


class TestGradientRanksWithPeftInit:
    def test_same_ranks_as_lora_da_with_gradient_allocation_and_peft_factors(self):
        from lora_da.methods import create_adapted_model

        peft_init, info = create_adapted_model(tiny_llama(), "lora_gradient_ranks", rank=4, calibration_batches=data(),
                                               options=LoraDAConfig(variance_weight=0, max_rank=8, **CONFIG))
        ranked = wrap(tiny_llama(), rank=4)
        report = initialize_lora_da(ranked, data(), LoraDAConfig(rank_allocation="gradient", max_rank=8, **CONFIG))
        assert info.report["rank_allocation"]["ranks"] == {canonical_layer_name(name): rank for name, rank
                                                           in report.rank_allocation.ranks.items()}
        assert trainable_lora_parameters(peft_init) == report.rank_allocation.budget
        assert all(not module.lora_B["default"].weight.any() for module in find_lora_layers(peft_init)[0].values())


class TestAdaLoRA:
    def test_ends_at_the_budget_of_the_rank(self):
        from lora_da.methods import create_adapted_model
        from lora_da.train import TrainConfig, adalora_model, adalora_penalty, train

        model, _ = create_adapted_model(tiny_llama(), "adalora", rank=4)
        adalora = adalora_model(model)
        penalty = adalora_penalty(adalora)
        assert penalty > 0 and penalty.requires_grad  # PEFT's random start is not orthogonal
        features = [{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()} for e in examples(16)]
        train(model, features, TrainConfig(steps=20, batch_size=4, lr=1e-3, show_progress=False), pad_token_id=0)
        config = model.peft_config["default"]
        assert (config.total_step, config.tinit, config.tfinal) == (20, 2, 4)
        kept = {name: sum(mask) for name, mask in config.rank_pattern.items()}
        assert sum(kept.values()) == 4 * len(kept) and len(set(kept.values())) > 1

    def test_train_fine_tunes_the_allocated_adapter(self, capsys, tmp_path, tiny_model_dir, tiny_jsonl):
        out = tmp_path / "run"
        status = main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "4",
                       "--max-length", "64", "--data", str(tiny_jsonl), "--eval-data", str(tiny_jsonl),
                       "--num-eval", "4", "--rank", "4", "--num-calibration", "8", "--steps", "2",
                       "--rank-allocation", "gradient", "--max-rank", "8", "--output", str(out)])
        assert status == 0, capsys.readouterr().err
        ranks = json.loads((out / "init_report.json").read_text())["report"]["rank_allocation"]["ranks"]
        assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
        assert len(set(ranks.values())) > 1
