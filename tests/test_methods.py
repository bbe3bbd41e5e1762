"""Registry of initialization methods: init, two training steps, save/reload on the unmodified base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny import VOCAB, tiny_llama
from peft import PeftModel
from transformers import LlamaForCausalLM

import lora_da
from lora_da.methods import METHODS, InitInfo, create_adapted_model, save_adapter
from lora_da.methods.svd_inits import lora_layers, lora_one_factors

RANK = 4


def make_batches(n_batches: int = 2, batch_size: int = 4, seq: int = 16, seed: int = 1) -> list[dict]:
    """Random token batches with right padding in one row and prompt tokens masked out of the labels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch_size, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, seq - 4 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :6] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _options(method: str):
    """LoRA-DA's options (with a population size); the other methods take none."""
    return lora_da.LoraDAConfig(population_size=1000) if method == "lora_da" else None


@pytest.mark.parametrize("method", list(METHODS))
def test_method_inits_trains_saves_and_reloads(method, tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    # EVA cycles its data until the SVD converges: one batch keeps that quick on a random model
    calib = make_batches(1) if method == "eva" else make_batches(2)
    model, info = create_adapted_model(base, method, rank=RANK, calibration_batches=calib, options=_options(method))
    assert isinstance(info, InitInfo) and info.method == method
    assert info.modifies_base == METHODS[method].modifies_base
    json.dumps(info.to_dict())  # the summary and its report must be JSON-able

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for batch in make_batches(2, seed=5):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable, strict=True))

    model.eval()
    # logits only: a loaded (inference-mode) AdaLoRA cannot add its training penalty to a loss
    probe = {k: v for k, v in make_batches(1, seed=9)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**probe).logits
    save_adapter(model, info, tmp_path / "out")
    if method == "full":
        loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    else:
        loaded = PeftModel.from_pretrained(pristine, tmp_path / "out")
        saved_rank = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"]
        assert saved_rank == (2 * RANK if info.modifies_base else RANK)  # converted adapters carry [B, -B0]
    loaded.eval()
    with torch.no_grad():
        got = loaded(**probe).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "gaussian", "eva", "lora_one", "lora_da"])
def test_base_weights_untouched_when_method_says_so(method):
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model, info = create_adapted_model(base, method, rank=RANK, calibration_batches=make_batches(1),
                                       options=_options(method))
    assert not info.modifies_base
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.get_base_layer().weight, original[name + ".weight"], atol=0, rtol=0)


def test_pissa_rewrites_base_and_says_so():
    base = tiny_llama()
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model, info = create_adapted_model(base, "pissa", rank=RANK)
    assert info.modifies_base
    assert not torch.allclose(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, w0)


def test_milora_matches_direct_svd():
    base = tiny_llama()
    originals = {
        name: mod.weight.detach().double().clone()
        for name, mod in base.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    model, info = create_adapted_model(base, "milora", rank=RANK, lora_alpha=16, use_rslora=True)
    scaling = 16 / RANK**0.5
    layers = lora_layers(model)
    assert len(layers) == 14  # 7 linear layers per block x 2 blocks, lm_head excluded
    for name, layer in layers:
        W = originals[name]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        minor = U[:, -RANK:] @ torch.diag(S[-RANK:]) @ Vh[-RANK:]
        A = layer.lora_A["default"].weight.double()
        B = layer.lora_B["default"].weight.double()
        torch.testing.assert_close(scaling * B @ A, minor, atol=1e-5, rtol=1e-4)
        # A's rows are the minor right singular vectors scaled by sqrt(S / scaling)
        torch.testing.assert_close(A @ A.T, torch.diag(S[-RANK:] / scaling), atol=1e-5, rtol=1e-4)
        residual = layer.get_base_layer().weight.double()
        torch.testing.assert_close(residual + scaling * B @ A, W, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(residual, W - minor, atol=1e-5, rtol=1e-4)


def _direct_mean_gradient(model: LlamaForCausalLM, batches: list[dict]) -> dict[str, torch.Tensor]:
    """G = mean over examples of dL_i/dW, by plain autograd one example at a time."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    sums = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in linears.items()}
    count = 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            model.zero_grad()
            model(**row).loss.backward()
            for n, m in linears.items():
                sums[n] += m.weight.grad.double()
            count += 1
    model.zero_grad()
    return {n: s / count for n, s in sums.items()}


def test_lora_one_matches_direct_svd_of_gradient():
    base = tiny_llama()
    batches = make_batches(2)
    gradients = _direct_mean_gradient(copy.deepcopy(base), batches)
    gamma = 64.0
    config = lora_da.LoraDAConfig(variance_weight=0.0, gamma=gamma, show_progress=False)
    model, info = create_adapted_model(base, "lora_one", rank=RANK, calibration_batches=batches, options=config)
    for name, layer in lora_layers(model):
        U, S, Vh = torch.linalg.svd(-gradients[name], full_matrices=False)
        expected = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK] / (S[0] * gamma)
        A = layer.lora_A["default"].weight.double()
        B = layer.lora_B["default"].weight.double()
        torch.testing.assert_close(B @ A, expected, atol=1e-6, rtol=1e-3)
        torch.testing.assert_close(A @ A.T, torch.diag(S[:RANK] / (S[0] * gamma)), atol=1e-7, rtol=1e-3)
        torch.testing.assert_close(B.T @ B, torch.diag(S[:RANK] / (S[0] * gamma)), atol=1e-7, rtol=1e-3)
        assert info.report["layers"][name]["top_singular_value"] == pytest.approx(float(S[0]), rel=1e-4)
    assert info.report["gamma"] == gamma


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_lora_one_factors_of_a_rank_deficient_gradient(shape):
    """Rank 2 < r: finite factors whose product is the rank-2 SVD step, on either side of the smaller Gram."""
    gen = torch.Generator().manual_seed(0)
    gradient = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)
    A, B, top = lora_one_factors(gradient, 4, 16.0)
    U, S, Vh = torch.linalg.svd(-gradient.double(), full_matrices=False)
    assert torch.isfinite(A).all() and torch.isfinite(B).all() and top == pytest.approx(float(S[0]), rel=1e-6)
    expected = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2] / (S[0] * 16.0)
    torch.testing.assert_close((B @ A).double(), expected, atol=1e-7, rtol=1e-4)


def test_seed_makes_default_init_deterministic():
    a, _ = create_adapted_model(tiny_llama(), "lora", rank=RANK, seed=3)
    b, _ = create_adapted_model(tiny_llama(), "lora", rank=RANK, seed=3)
    c, _ = create_adapted_model(tiny_llama(), "lora", rank=RANK, seed=4)
    wa, wb, wc = (dict(lora_layers(m))["model.layers.0.mlp.up_proj"].lora_A["default"].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nope", "rank": 4}, "unknown init method"),
        ({"method": "lora", "rank": 17}, r"rank 17 .*min\(out, in\) = 16; choose a smaller rank"),
        ({"method": "lora", "rank": 0}, r"rank.* 0\b"),
        ({"method": "lora", "rank": 4, "options": lora_da.LoraDAConfig(population_size=9)}, "takes no options"),
        ({"method": "lora_da", "rank": 4, "calibration_batches": make_batches(1)}, "needs `population_size`"),
        ({"method": "eva", "rank": 4}, "needs calibration data"),
        ({"method": "lora", "rank": 4, "target_modules": ["nonexistent"]}, "matches no linear layer"),
    ],
)
def test_bad_input_raises_actionable_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_adapted_model(tiny_llama(), **kwargs)


def test_lora_da_config_seed_and_population_travel_only_in_the_options():
    """The same options give bitwise the same factors; the options' own seed/population are the ones used."""
    batches = make_batches(1)
    options = lora_da.LoraDAConfig(population_size=500, seed=3, show_progress=False)
    first, _ = create_adapted_model(tiny_llama(), "lora_da", rank=RANK, calibration_batches=batches, options=options)
    second, _ = create_adapted_model(tiny_llama(), "lora_da", rank=RANK, calibration_batches=batches,
                                     options=options, seed=7)  # the registry seed does not touch LoRA-DA
    for (_, a), (_, b) in zip(lora_layers(first), lora_layers(second), strict=True):
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight)


def test_method_names_are_normalized():
    _, info = create_adapted_model(tiny_llama(), "LoRA", rank=RANK)
    assert info.method == "lora"


class TestStatisticsCache:
    """`statistics_cache`: lora_da and lora_one gather the statistics of one model and batch set once."""

    @staticmethod
    def _factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
                for name, layer in lora_layers(model)}

    @staticmethod
    def _init(base, method, batches, cache, **options):
        config = lora_da.LoraDAConfig(population_size=1000, show_progress=False, **options)
        if method == "lora_one":
            config = lora_da.LoraDAConfig(variance_weight=0.0, show_progress=False)
        return create_adapted_model(copy.deepcopy(base), method, rank=RANK, calibration_batches=batches,
                                    options=config, statistics_cache=cache)

    def test_reused_statistics_give_the_factors_of_a_fresh_pass(self, tmp_path, monkeypatch):
        base, batches = tiny_llama(), make_batches(2)
        fresh = {method: self._factors(self._init(base, method, batches, None)[0])
                 for method in ("lora_da", "lora_one")}
        model, info = self._init(base, "lora_da", batches, tmp_path)
        assert info.report["statistics_cache"]["reused"] is False
        assert len(list(tmp_path.glob("statistics-*.safetensors"))) == 1
        for name, (A, B) in self._factors(model).items():
            torch.testing.assert_close(A, fresh["lora_da"][name][0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(B, fresh["lora_da"][name][1], rtol=1e-5, atol=1e-7)

        def no_pass(*args, **kwargs):
            raise AssertionError("the cached statistics were gathered again")

        monkeypatch.setattr(lora_da.cache, "collect_statistics", no_pass)
        for method, options in [("lora_da", {}), ("lora_da", {"factor_balance": "kaiming"}), ("lora_one", {})]:
            model, info = self._init(base, method, batches, tmp_path, **options)
            cached = info.report["statistics_cache"]
            assert cached["reused"] is True and cached["gathered_seconds"] > 0
            assert info.init_seconds >= cached["gathered_seconds"]  # counts the pass it skipped
            if not options:
                for name, (A, B) in self._factors(model).items():
                    torch.testing.assert_close(A, fresh[method][name][0], rtol=1e-5, atol=1e-7)
                    torch.testing.assert_close(B, fresh[method][name][1], rtol=1e-5, atol=1e-7)

    def test_other_batches_weights_or_statistics_settings_gather_again(self, tmp_path):
        base, batches = tiny_llama(), make_batches(2)
        self._init(base, "lora_da", batches, tmp_path)
        changed = copy.deepcopy(base)
        with torch.no_grad():
            changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
        runs = [(base, make_batches(2, seed=2), {}), (changed, batches, {}),
                (base, batches, {"token_mask": "labels"}), (base, batches, {"output_scaling": "token"})]
        for model, other_batches, options in runs:
            _, info = self._init(model, "lora_da", other_batches, tmp_path, **options)
            assert info.report["statistics_cache"]["reused"] is False
        assert len(list(tmp_path.glob("statistics-*.safetensors"))) == 1 + len(runs)

    def test_refused_under_a_process_group_of_several_ranks(self, tmp_path, monkeypatch):
        # each rank holds its own batches, so ranks would look up different files and wait on each other
        monkeypatch.setattr(lora_da.cache, "get_world_size", lambda: 2)
        with pytest.raises(lora_da.LoraDAError, match="statistics cache works in one process"):
            self._init(tiny_llama(), "lora_da", make_batches(1), tmp_path)
        assert not list(tmp_path.iterdir())
