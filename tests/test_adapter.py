"""initialize_lora_da on PEFT models: the update it writes, save/load, determinism, bad input."""

import pytest
import torch
from _tiny import all_weights, batches, examples, lora_state, tiny_gpt2, tiny_llama, wrap
from peft import LoraConfig, PeftModel
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lora_da import (
    LoraDAConfig,
    LoraDAError,
    collect_statistics,
    find_lora_layers,
    initialize_lora_da,
    solve_factors,
)

CFG = LoraDAConfig(population_size=1000, show_progress=False)


def init(model, items=None, cfg=CFG, **kwargs):
    return initialize_lora_da(model, batches(items or examples(6), 3), cfg, **kwargs)


class TestInitializeLoraDA:
    @pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
    def test_layer_output_is_base_plus_scaled_update(self, make):
        model = wrap(make())
        report = init(model)
        layers, _ = find_lora_layers(model)
        assert set(report.layers) == set(layers)
        for layer in layers.values():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            scaling = layer.scaling["default"]
            assert scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
            assert torch.count_nonzero(b) > 0
            x_in = torch.randn(3, 5, a.shape[1])
            expected = layer.get_base_layer()(x_in) + scaling * x_in @ a.T @ b.T
            torch.testing.assert_close(layer(x_in), expected, rtol=1e-5, atol=1e-6)

    def test_factors_equal_solver_on_base_statistics(self):
        base = tiny_llama()
        names = [n.removeprefix("base_model.model.") for n in find_lora_layers(wrap(tiny_llama()))[0]]
        stats = collect_statistics(base, batches(examples(6), 3), names, CFG)
        expected = solve_factors(stats, 4, CFG)
        model = wrap(base)
        with torch.no_grad():  # a non-zero adapter must not change the statistics: they are the base's
            for layer in find_lora_layers(model)[0].values():
                layer.lora_B["default"].weight.normal_()
        init(model)
        for name, layer in find_lora_layers(model)[0].items():
            a, b = expected[name.removeprefix("base_model.model.")]
            torch.testing.assert_close(layer.lora_A["default"].weight, a)
            torch.testing.assert_close(layer.lora_B["default"].weight, b)

    def test_base_weights_unchanged_and_output_moves(self):
        model = wrap(tiny_llama())
        base_weights = {k: v for k, v in all_weights(model).items() if "lora_" not in k}
        batch = batches(examples(2), 2)[0]
        before = model(input_ids=batch["input_ids"]).logits
        init(model)
        after_weights = all_weights(model)
        assert all(torch.equal(after_weights[k], v) for k, v in base_weights.items())
        assert not torch.allclose(model(input_ids=batch["input_ids"]).logits, before)

    def test_save_and_load_with_stock_peft(self, tmp_path):
        model = wrap(tiny_llama())
        init(model)
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        ids = batches(examples(2), 2)[0]["input_ids"]
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    def test_deterministic(self):
        cfg = LoraDAConfig(population_size=1000, eigensolver="lobpcg", show_progress=False)
        first, second = wrap(tiny_llama()), wrap(tiny_llama(seed=0))
        torch.manual_seed(123)
        init(first, cfg=cfg)
        torch.manual_seed(456)  # the global RNG must not matter
        init(second, cfg=cfg)
        one, two = lora_state(first), lora_state(second)
        assert all(torch.equal(one[k], two[k]) for k in one)

    def test_other_adapter_untouched(self):
        model = wrap(tiny_llama())
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        other_before = {k: v for k, v in lora_state(model).items() if ".other." in k}
        report = init(model, adapter_name="other")
        assert len(report.layers) == 4
        after = lora_state(model)
        assert all(not torch.equal(after[k], v) for k, v in other_before.items() if "lora_B" in k)
        default = {k: v for k, v in after.items() if ".default." in k and "lora_B" in k}
        assert all(torch.count_nonzero(v) == 0 for v in default.values())
        assert model.active_adapter == "default"

    def test_report_contents(self):
        report = init(wrap(tiny_llama()))
        layer = next(iter(report.layers.values()))
        for key in ("sigma", "eigenvalues", "eigengap", "residual", "median_y_over_damping",
                    "variance_bias_ratio", "seconds", "scaling"):
            assert key in layer
        assert len(layer["eigenvalues"]) == 4
        assert report.num_examples == 6 and report.statistics_seconds > 0
        assert report.to_dict()["layers"].keys() == report.layers.keys()

    def test_embedding_targets_are_skipped_with_a_warning(self):
        model = wrap(tiny_llama(), target_modules=["q_proj", "embed_tokens"])
        with pytest.warns(UserWarning, match="embed_tokens"):
            report = init(model)
        assert report.skipped == ["base_model.model.model.embed_tokens"]


class TestBadInput:
    def check_unchanged(self, model, before):
        after = all_weights(model)
        assert all(torch.equal(after[k], v) for k, v in before.items())

    @pytest.mark.parametrize(
        "case, message",
        [
            ("empty", "supervised token"),
            ("no_valid_token", "supervised token"),
            ("rank", "larger than min"),
            ("nan", "not finite"),
            ("adapter", "no adapter named"),
            ("no_linear", "no LoRA layer over a linear map"),
        ],
    )
    def test_error_changes_nothing(self, case, message):
        model = wrap(tiny_llama(), rank=40 if case == "rank" else 4)
        if case == "no_linear":
            model = wrap(tiny_llama(), target_modules=["embed_tokens"])
        items = examples(4)
        data = batches(items, 2)
        adapter = "default"
        if case == "empty":
            data = []
        elif case == "no_valid_token":
            for batch in data:
                batch["labels"][:] = -100
        elif case == "nan":
            with torch.no_grad():
                model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight[0, 0] = float("inf")
        elif case == "adapter":
            adapter = "missing"
        before = all_weights(model)
        with pytest.raises(LoraDAError, match=message):
            initialize_lora_da(model, data, CFG, adapter_name=adapter)
        self.check_unchanged(model, before)

    def test_not_a_peft_model(self):
        with pytest.raises(LoraDAError, match="peft.PeftModel"):
            initialize_lora_da(tiny_llama(), batches(examples(2), 2), CFG)

    def test_unsupported_sharding_is_refused(self):
        # FSDP1 cannot be built without an accelerator here, so a bare instance stands in for its wrapper.
        flat = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
        nn.Module.__init__(flat)
        model = wrap(tiny_llama())
        model.base_model.model.add_module("fsdp1_unit", flat)
        before = all_weights(model)
        with pytest.raises(LoraDAError, match="FSDP1"):
            init(model)
        self.check_unchanged(model, before)


class PlantedLinear(nn.Module):
    """One linear layer y = W x, trained to a target (W + delta) x with squared error."""

    def __init__(self, n, m):
        super().__init__()
        self.proj = nn.Linear(n, m, bias=False)


def test_planted_low_rank_update_is_recovered_better_than_by_the_gradient():
    """Anisotropic inputs + a low-rank true update: the Fisher-aware subspace finds it, the gradient's does not."""
    n, m, rank, count = 24, 20, 3, 2000
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    cov_root = q @ torch.diag(torch.logspace(-1.5, 1.5, n)) @ q.T  # input scales over three decades
    delta = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    model = PlantedLinear(n, m)
    x = torch.randn(count, 1, n, generator=gen) @ cov_root
    target = model.proj(x).detach() + x @ delta.T + 0.01 * torch.randn(count, 1, m, generator=gen)

    def loss_fn(outputs, batch):
        return 0.5 * ((outputs - batch["target"]) ** 2).sum(dim=(1, 2)), torch.ones(outputs.shape[0])

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, target=None):
            return self.inner.proj(input_ids)

    data = [
        {"input_ids": x[i : i + 100], "attention_mask": torch.ones(100, 1), "target": target[i : i + 100],
         "labels": torch.zeros(100, 1, dtype=torch.long)}
        for i in range(0, count, 100)
    ]
    cfg = LoraDAConfig(variance_weight=0.0, show_progress=False)
    stats = collect_statistics(Wrapper(), data, ["inner.proj"], cfg, loss_fn=loss_fn)
    a, _ = solve_factors(stats, rank, cfg)["inner.proj"]
    lora_da_basis = torch.linalg.qr(a.T)[0]
    _, _, vh = torch.linalg.svd(stats.gradient("inner.proj"))
    gradient_basis = vh[:rank].T

    def missed(basis):  # share of the true update outside the chosen input subspace
        return float((delta - delta @ basis @ basis.T).norm() / delta.norm())

    assert missed(lora_da_basis) < 0.05
    assert missed(gradient_basis) > 5 * missed(lora_da_basis)
