"""Every LoraConfig option either starts the model at LoRA-DA's formula, W + s * B @ A, layer by layer, or is
refused with one `LoraDAError` line before any weight changes; layers LoRA-DA cannot initialize are warned about
and counted."""

import warnings

import pytest
import torch
from _tiny import batches, examples, tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.nn import functional as F

from lora_da import LoraDAConfig, LoraDAError, initialize_lora_da
from lora_da.adapter import check_lora_options
from lora_da.layers import find_adapted_weights

CFG = LoraDAConfig(population_size=1000, show_progress=False)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def adapt(model: nn.Module, **options) -> nn.Module:
    config = dict(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.0)
    config.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(**config))


def initialize(model: nn.Module):
    return initialize_lora_da(model, batches(examples(6), 3), CFG)


def assert_starts_at_formula(model: nn.Module, report) -> int:
    """Each initialized layer's forward (PEFT's, with every option it has) equals its base layer's output plus
    `s * x A^T B^T` on random inputs; returns how many layers were checked."""
    model.eval()
    checked = 0
    generator = torch.Generator().manual_seed(0)
    for name in report.layers:
        module = model.get_submodule(name.split("[")[0].rsplit(".", 1)[0] if name.endswith(".weight") else name)
        if isinstance(module, ParamWrapper):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            expected = module.get_param() + module.scaling["default"] * B @ A
            assert torch.allclose(module.get_delta_weight("default") + module.get_param(), expected, atol=1e-6)
            checked += 1
            continue
        base = module.get_base_layer()
        width = base.weight.shape[0] if type(base).__name__ == "Conv1D" else base.in_features
        x = torch.randn(3, width, generator=generator)
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        with torch.no_grad():
            expected = base(x) + module.scaling["default"] * F.linear(F.linear(x, A), B)
            got = module(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), name
        assert B.abs().sum() > 0, name  # factors were written
        checked += 1
    assert checked == report.initialized_weights
    return checked


SUPPORTED = {
    "plain": dict(),
    "rslora_on": dict(use_rslora=True),
    "rslora_off": dict(use_rslora=False),
    "dora": dict(use_dora=True),
    "dora_rslora_dropout": dict(use_dora=True, use_rslora=True, lora_dropout=0.1),
    "rank_and_alpha_patterns": dict(rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}),
    "layers_to_transform": dict(layers_to_transform=[1]),
    "bias_all": dict(bias="all"),
    "lora_bias": dict(lora_bias=True),
    "dropout": dict(lora_dropout=0.1),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "all_linear": dict(target_modules="all-linear"),
    "gaussian_init": dict(init_lora_weights="gaussian"),
    "no_init": dict(init_lora_weights=False),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 2]]),
    "trainable_token_indices": dict(trainable_token_indices=[3, 5]),
    "target_parameters_2d": dict(target_modules=["v_proj"], target_parameters=["q_proj.weight"]),
}


class TestSupportedOptionsStartAtTheFormula:
    @pytest.mark.parametrize("options", SUPPORTED.values(), ids=SUPPORTED.keys())
    def test_every_adapted_weight_starts_at_w_plus_s_b_a(self, options):
        model = adapt(tiny_llama(), **options)
        report = initialize(model)
        assert report.initialized_weights == report.adapted_weights > 0
        assert_starts_at_formula(model, report)

    def test_patterns_give_each_layer_its_rank_and_scaling(self):
        model = adapt(tiny_llama(), rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32})
        report = initialize(model)
        q = report.layers["base_model.model.model.layers.0.self_attn.q_proj"]
        v = report.layers["base_model.model.model.layers.0.self_attn.v_proj"]
        assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
        assert (q["scaling"], v["scaling"]) == (4.0, 8.0)

    def test_dora_magnitude_is_the_norm_of_the_start_weight(self):
        model = adapt(tiny_llama(), use_dora=True)
        initialize(model)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        start = layer.get_base_layer().weight + layer.scaling["default"] * B @ A
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert torch.allclose(magnitude, start.norm(dim=1), rtol=1e-6)
        x = torch.randn(5, 32)
        with torch.no_grad():
            assert torch.allclose(layer(x), F.linear(x, start), rtol=1e-5, atol=1e-6)

    def test_dora_on_gpt2_conv1d(self):
        model = adapt(tiny_gpt2(), target_modules=["c_attn", "c_proj"], use_dora=True, fan_in_fan_out=True)
        report = initialize(model)
        assert report.initialized_weights == report.adapted_weights == 6  # c_attn, attn.c_proj, mlp.c_proj
        assert_starts_at_formula(model, report)

    def test_lora_bias_is_zero_at_the_start(self):
        model = adapt(tiny_llama(), lora_bias=True, init_lora_weights=False)  # random factors and bias
        initialize(model)
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B and module.lora_B["default"].bias is not None:
                assert module.lora_B["default"].bias.abs().sum() == 0

    def test_only_the_chosen_layers_are_adapted(self):
        model = adapt(tiny_llama(), layers_to_transform=[1])
        report = initialize(model)
        assert report.adapted_weights == 4 and all(".layers.1." in name for name in report.layers)


class TestSkippedLayersAreCounted:
    def test_embeddings_are_skipped_with_a_warning_and_counted(self):
        model = adapt(tiny_llama(), target_modules=["embed_tokens", "q_proj"])
        with pytest.warns(UserWarning, match="cannot handle"):
            report = initialize(model)
        assert report.skipped == ["base_model.model.model.embed_tokens"]
        assert (report.initialized_weights, report.adapted_weights) == (2, 3)
        assert report.coverage().startswith("LoRA-DA factors for 2 of 3 adapted weights; at PEFT's default init")
        assert_starts_at_formula(model, report)


    def test_conv_layers_are_skipped_and_counted(self):
        class ConvAndLinear(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.fc = nn.Linear(4, 2)

        model = get_peft_model(ConvAndLinear(), LoraConfig(r=2, target_modules=["conv", "fc"]))
        targets, skipped = find_adapted_weights(model)
        assert list(targets) == ["base_model.model.fc"] and skipped == ["base_model.model.conv"]


REFUSED = {
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "mica": dict(init_lora_weights="mica"),
    "alora": dict(alora_invocation_tokens=[5]),
    "qalora": dict(use_qalora=True),
}


class TestRefusedOptions:
    @pytest.mark.parametrize(("options", "field"), [(v, next(iter(v))) for v in REFUSED.values()], ids=REFUSED.keys())
    def test_refused_in_one_line_before_any_work(self, options, field):
        model = adapt(tiny_llama(), **options)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(LoraDAError, match=f"LoraConfig\\({field}=") as caught:
            initialize(model)
        assert "\n" not in str(caught.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    @pytest.mark.parametrize("field", ["velora_config", "monteclora_config", "arrow_config", "kasa_config"])
    def test_every_other_lora_variant_is_refused(self, field):
        config = LoraConfig(r=4, target_modules=ATTENTION)
        object.__setattr__(config, field, {"enabled": True})  # any truthy value asks PEFT for the variant
        with pytest.raises(LoraDAError, match=f"LoraConfig\\({field}="):
            check_lora_options(config, "default")

    def test_dora_is_not_refused(self):
        check_lora_options(LoraConfig(r=4, target_modules=ATTENTION, use_dora=True), "default")
