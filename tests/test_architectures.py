"""LoRA-DA on each supported architecture, dtype, memory feature and quantized base (tiny random models)."""

import warnings

import pytest
import torch
from _archs import (
    ARCHITECTURES,
    Int8Linear,
    build,
    calibration,
    dequantize,
    lora_modules,
    quantize_int8,
    update,
)
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from lora_da import LoraDAConfig, collect_statistics, initialize_lora_da

CFG = LoraDAConfig(population_size=1000, show_progress=False)
ARCH_PARAMS = list(ARCHITECTURES)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wrap(model, arch="llama", **options):
    """PEFT LoRA (rank 4, all linear layers) with the architecture's extra options."""
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    settings.update(ARCHITECTURES[arch][2])
    settings.update(options)
    return get_peft_model(model, LoraConfig(**settings))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def assert_initialized(model, adapter_name="default"):
    """Every LoRA layer of the adapter holds finite factors with a non-zero B."""
    layers = lora_modules(model, adapter_name)
    assert layers
    for name, layer in layers.items():
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        assert torch.count_nonzero(b) > 0, name


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_architecture_init_and_reload(arch, tmp_path):
    model = wrap(build(arch), arch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = initialize_lora_da(model, calibration(arch), CFG)

    assert set(report.layers) == set(lora_modules(model)) and not report.skipped
    assert_initialized(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # a new head stays trainable
    model.save_pretrained(tmp_path)

    fresh = build(arch)
    head = getattr(fresh, "classifier", None)
    if ARCHITECTURES[arch][2].get("modules_to_save"):
        with torch.no_grad():  # the saved head, not the fresh random one, must come back
            for parameter in head.parameters():
                parameter.normal_()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    batch = calibration(arch, count=3)[2]
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)
    assert not torch.allclose(logits(build(arch), batch), logits(model, batch))


@pytest.mark.parametrize("arch", ["bert-cls", "roberta-cls"])
def test_classification_head_is_trainable_and_not_a_lora_target(arch):
    model = wrap(build(arch), arch)
    initialize_lora_da(model, calibration(arch), CFG)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head and all("classifier.modules_to_save.default" in n for n in head)
    assert not any("classifier" in n for n in lora_modules(model))
    loss = model(**calibration(arch)[0]).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in head)


def test_seq2seq_padding_does_not_change_statistics():
    """Padding the encoder and decoder of a T5 batch to the same width must not change its statistics."""
    model = build("t5")
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 97, (e,), generator=gen), torch.randint(3, 97, (d,), generator=gen))
             for e, d in [(8, 8), (5, 3), (8, 6)]]

    def collate(items):
        width, dec_width = max(len(e) for e, _ in items), max(len(d) for _, d in items)
        batch = {"input_ids": torch.zeros(len(items), width, dtype=torch.long),
                 "attention_mask": torch.zeros(len(items), width, dtype=torch.long),
                 "labels": torch.full((len(items), dec_width), -100)}
        for row, (enc, dec) in enumerate(items):
            batch["input_ids"][row, : len(enc)] = enc
            batch["attention_mask"][row, : len(enc)] = 1
            batch["labels"][row, : len(dec)] = dec
        return batch

    names = ["decoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.2.DenseReluDense.wi",
             "decoder.block.0.layer.1.EncDecAttention.k", "encoder.block.0.layer.0.SelfAttention.q"]
    alone = collect_statistics(model, [collate([p]) for p in pairs], names, CFG)
    padded = collect_statistics(model, [collate(pairs)], names, CFG)
    for name in names:
        assert alone.output_token_counts[name] == padded.output_token_counts[name], name
        torch.testing.assert_close(padded.input_factor(name), alone.input_factor(name), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded.gradient(name), alone.gradient(name), rtol=1e-4, atol=1e-6)


class TestDtypes:
    # The default damping (1e-6) lets half-precision noise in the tiniest output-gradient directions of these
    # random models steer the solve; 1e-3 makes the comparison with float32 about the statistics.
    cfg = LoraDAConfig(population_size=1000, damping=1e-3, show_progress=False)

    @pytest.mark.parametrize(
        "arch, dtype, autocast",
        [
            ("llama", torch.bfloat16, True),
            ("llama", torch.bfloat16, False),
            ("llama", torch.float16, True),
            ("llama", torch.float16, False),
            ("gpt2-conv1d", torch.bfloat16, True),
            ("gpt2-conv1d", torch.float16, False),
            ("bert-mlm", torch.bfloat16, False),
            ("bert-mlm", torch.float16, True),
        ],
        ids=lambda v: {torch.bfloat16: "bf16", torch.float16: "fp16", True: "fp32-adapter", False: "same-adapter"}.get(
            v, v
        ),
    )
    def test_half_precision_matches_float32(self, arch, dtype, autocast):
        data = calibration(arch, count=3, batch_size=4, length=12)
        reference = wrap(build(arch), arch)
        initialize_lora_da(reference, data, self.cfg)
        model = get_peft_model(
            build(arch, dtype=dtype),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **ARCHITECTURES[arch][2]),
            autocast_adapter_dtype=autocast,
        )
        initialize_lora_da(model, data, self.cfg)

        assert_initialized(model)
        adapter_dtype = torch.float32 if autocast else dtype  # factors are cast to the adapter's dtype
        assert {m.lora_B["default"].weight.dtype for m in lora_modules(model).values()} == {adapter_dtype}
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {dtype}
        expected, got = update(reference), update(model)
        errors = sorted(float((got[k] - v).norm() / v.norm()) for k, v in expected.items())
        # Measured medians: bf16 0.012-0.074, fp16 0.0015-0.005 (about 8 and 11 mantissa bits).
        assert errors[len(errors) // 2] < (0.15 if dtype == torch.bfloat16 else 0.03)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_statistics_are_at_least_float32(self, dtype):
        names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
        stats = collect_statistics(build("llama", dtype=dtype), calibration("llama"), names, CFG)
        wide = (torch.float32, torch.float64)  # at least float32, whatever the model's dtype
        for name in names:
            assert stats.gradient(name).dtype in wide
            assert stats.input_factor(name).dtype in wide
            assert stats.output_factor(name).dtype in wide


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on(reentrant):
    reference = wrap(build("llama"))
    initialize_lora_da(reference, calibration("llama"), CFG)
    base = build("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = wrap(base).train()
    initialize_lora_da(model, calibration("llama"), CFG)

    assert base.is_gradient_checkpointing and model.training
    expected, got = update(reference), update(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    model(**calibration("llama")[0]).loss.backward()  # training still works, through checkpointed blocks
    assert all(m.lora_B["default"].weight.grad is not None for m in lora_modules(model).values())


@pytest.mark.parametrize("arch", ["llama", "bert-cls"])
def test_dropout_is_off_during_statistics_and_mode_restored(arch):
    """With dropout in the base and the adapter, the init is deterministic and equals the eval-mode init."""
    def dropout_model():
        base = build(arch)
        for module in base.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.3
        if hasattr(base.config, "attention_dropout"):
            base.config.attention_dropout = 0.3
        return wrap(base, arch, lora_dropout=0.3)

    reference = dropout_model().eval()
    initialize_lora_da(reference, calibration(arch), CFG)
    results = []
    for seed in (1, 2):
        model = dropout_model().train()
        modes = {n: m.training for n, m in model.named_modules()}
        torch.manual_seed(seed)
        initialize_lora_da(model, calibration(arch), CFG)
        assert {n: m.training for n, m in model.named_modules()} == modes
        results.append(update(model))
    for name, expected in update(reference).items():
        torch.testing.assert_close(results[0][name], expected, rtol=0, atol=0)
        torch.testing.assert_close(results[1][name], expected, rtol=0, atol=0)


class TestQuantizedBase:
    def quantized_peft_model(self, seed=0):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
        config._register_custom_module({Int8Linear: LoraLinear})  # PEFT's own LoRA layer around the int8 layer
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            return get_peft_model(quantize_int8(build("llama", seed=seed)), config), config

    def test_frozen_int8_weights(self, tmp_path):
        model, config = self.quantized_peft_model()
        int8 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.int8}
        assert len(int8) == 14 and not any(p.requires_grad for p in model.parameters() if p.dtype == torch.int8)
        report = initialize_lora_da(model, calibration("llama"), CFG)

        assert len(report.layers) == 14 and not report.skipped
        assert_initialized(model)
        after = dict(model.named_parameters())
        assert all(torch.equal(after[n], v) and not after[n].requires_grad for n, v in int8.items())

        # The same factors as on the float model that computes the same function.
        float_model = wrap(dequantize(quantize_int8(build("llama"))), target_modules=LLAMA_TARGETS)
        initialize_lora_da(float_model, calibration("llama"), CFG)
        expected = update(float_model)
        for name, got in update(model).items():
            torch.testing.assert_close(got, expected[name], rtol=1e-3, atol=1e-6)

        model.save_pretrained(tmp_path)
        reload_config = LoraConfig.from_pretrained(tmp_path)
        reload_config._register_custom_module({Int8Linear: LoraLinear})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            reloaded = PeftModel.from_pretrained(quantize_int8(build("llama")), tmp_path, config=reload_config)
        batch = calibration("llama", count=3)[2]
        torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)

    @pytest.mark.parametrize("bits", [4, 8])
    def test_bitsandbytes(self, tmp_path, bits):
        pytest.importorskip("bitsandbytes")
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        build("llama").save_pretrained(tmp_path)
        if bits == 4:
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        else:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        layer_type = type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
        assert layer_type == ("Linear4bit" if bits == 4 else "Linear8bitLt")
        report = initialize_lora_da(model, calibration("llama"), CFG)
        assert len(report.layers) == 14 and not report.skipped
        assert_initialized(model)


def test_unsupported_layer_types_keep_peft_init_with_one_warning():
    """Embeddings among the targets: one warning names them, they keep PEFT's init, the rest is initialized."""
    model = wrap(build("bert-mlm"), "bert-mlm", target_modules=["query", "value", "word_embeddings"])
    embedding = model.base_model.model.bert.embeddings.word_embeddings
    before = {k: v.detach().clone() for k, v in embedding.state_dict().items() if "lora_" in k}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = initialize_lora_da(model, calibration("bert-mlm"), CFG)
    messages = [str(w.message) for w in caught if "LoRA-DA leaves" in str(w.message)]
    assert len(messages) == 1 and "word_embeddings" in messages[0]
    assert report.skipped == ["base_model.model.bert.embeddings.word_embeddings"] and len(report.layers) == 4
    after = embedding.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert_initialized(model)
