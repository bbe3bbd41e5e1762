"""LoRA-DA on mixture-of-experts weights adapted through `LoraConfig(target_parameters=...)`: per-expert
statistics against an independent per-expert loop, factors in PEFT's stacked layout, the start of the adapted
model, the router, experts no token reaches, the memory plan and two data-parallel ranks."""

import copy
import os
import warnings
from datetime import timedelta

import pytest
import torch
import transformers as tf
from _ranks import recording_failure, run_ranks, save_results_and_finish
from _tiny import VOCAB, batches, bytes_a_pass_adds, examples, lora_state, relative_error, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

from lora_da import LoraDAConfig, LoraDAError, LoraDAStatistics, collect_statistics, initialize_lora_da
from lora_da.cache import compute_and_save_statistics
from lora_da.collect import probe_batch
from lora_da.layers import target_layer_names
from lora_da.solver import solve_layer
from lora_da.statistics import statistics_bytes

CFG = LoraDAConfig(population_size=1000, show_progress=False)
RANK = 2
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# The statistics agree to float32 rounding (1e-5 and better); an expert's Z from few routed tokens (fewer than
# about 3 per input feature) is close to singular and amplifies that rounding in the factors up to 1e-2, so the
# factors are held against the reference's where the expert saw enough tokens.
FACTOR_TOLERANCE = 1e-3
WELL_CONDITIONED_TOKENS = 3
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def tiny_mixtral(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_local_experts=4,
                              num_experts_per_tok=2, num_hidden_layers=2, **_ATTENTION)
    return tf.MixtralForCausalLM(config).eval()


def tiny_qwen3_moe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                               num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, head_dim=8,
                               decoder_sparse_step=1, norm_topk_prob=True, **_ATTENTION)
    return tf.Qwen3MoeForCausalLM(config).eval()


def tiny_gpt_oss(seed: int = 0) -> nn.Module:
    """Experts stored [experts, in, out] (`is_transposed`), applied as `x @ w + bias`."""
    torch.manual_seed(seed)
    config = tf.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_local_experts=4,
                             num_experts_per_tok=2, num_hidden_layers=2, head_dim=8, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"], **_ATTENTION)
    model = tf.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so that the reference below sees them
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.1)
            layer.mlp.experts.down_proj_bias.normal_(0, 0.1)
    return model


FAMILIES = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, **_ATTENTION)
# Other families with transformers' fused experts (the same eager loop): (builder, experts module path).
OTHER_FAMILIES = {
    "olmoe": (lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(**_SMALL, intermediate_size=24, num_experts=4,
                                                         num_experts_per_tok=2)), "mlp.experts"),
    "qwen2_moe": (lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **_SMALL, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2)), "mlp.experts"),
    "granitemoe": (lambda: tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(
        **_SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)), "block_sparse_moe.experts"),
    "phimoe": (lambda: tf.PhimoeForCausalLM(tf.PhimoeConfig(**_SMALL, intermediate_size=24, num_local_experts=4,
                                                            num_experts_per_tok=2)), "mlp.experts"),
    "deepseek_v3": (lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        **{**_SMALL, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)), "mlp.experts"),
}


def data() -> list[dict]:
    """Padded batches of examples of varied length with unsupervised prompts."""
    return batches(examples(20), 4)


def adapt(model: nn.Module, target_modules=None, **kwargs) -> nn.Module:
    options = dict(r=RANK, lora_alpha=4, target_modules=target_modules, target_parameters=EXPERTS, lora_dropout=0.0)
    options.update(kwargs)
    return get_peft_model(model, LoraConfig(**options))


def expert_names(model: nn.Module, prefix: str = "") -> list[str]:
    """The name of every expert's weight of the experts' stacks in `EXPERTS`, per block."""
    names = []
    for index, layer in enumerate(model.model.layers):
        for parameter in ("gate_up_proj", "down_proj"):
            count = getattr(layer.mlp.experts, parameter).shape[0]
            names += [f"{prefix}model.layers.{index}.mlp.experts.{parameter}[{e}]" for e in range(count)]
    return names


def reference_statistics(model: nn.Module, batch_list: list[dict], token_mask: str = "attention") -> dict[str, tuple]:
    """(G, Z, y, tokens) of every expert's weight, from a loop that routes each token to its experts explicitly:
    each expert's projections computed apart, their outputs' gradients kept, Z and y over attended tokens (or,
    `token_mask="labels"`, the positions that predict a supervised token)."""
    model = copy.deepcopy(model)
    records = []
    for index, layer in enumerate(model.model.layers):
        layer.mlp.experts.forward = _explicit_experts(layer.mlp.experts, index, records)
    sums: dict[str, list] = {}
    examples_seen = 0
    for batch in batch_list:
        records.clear()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        token_losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        counts = (labels != -100).sum(1)
        valid = counts > 0
        (token_losses.sum(1)[valid] / counts[valid]).sum().backward()
        examples_seen += int(valid.sum())
        attended = (batch["attention_mask"].bool() if token_mask == "attention" else labels != -100).reshape(-1)
        for block, expert, tokens, pairs in records:
            keep = attended[tokens]
            for parameter, (x, out) in pairs.items():
                name = f"model.layers.{block}.mlp.experts.{parameter}[{expert}]"
                g = out.grad.double()
                x = x.detach().double()
                entry = sums.setdefault(name, [0, 0, 0, 0])
                entry[0] = entry[0] + g.T @ x
                entry[1] = entry[1] + x[keep].T @ x[keep]
                entry[2] = entry[2] + (g[keep] ** 2).sum(0)
                entry[3] += int(keep.sum())
    return {name: (G / examples_seen, Z / n, y / n, n) for name, (G, Z, y, n) in sums.items()}


def _explicit_experts(experts: nn.Module, block: int, records: list):
    """A forward for `experts` that runs each expert on the tokens routed to it, from `top_k_index`."""
    transposed = getattr(experts, "is_transposed", False)

    def project(x, parameter, expert):
        weight = getattr(experts, parameter)[expert]
        out = x @ weight if transposed else x @ weight.T
        bias = getattr(experts, f"{parameter}_bias", None)
        return out if bias is None else out + bias[expert]

    def forward(hidden_states, top_k_index, top_k_weights):
        result = torch.zeros_like(hidden_states)
        for expert in range(experts.num_experts):
            tokens, slot = (top_k_index == expert).nonzero(as_tuple=True)
            if tokens.numel() == 0:
                continue
            x = hidden_states[tokens]
            gate_up = project(x, "gate_up_proj", expert)
            gate_up.retain_grad()
            hidden = experts._apply_gate(gate_up)
            down = project(hidden, "down_proj", expert)
            down.retain_grad()
            result = result.index_add(0, tokens, down * top_k_weights[tokens, slot, None])
            records.append((block, expert, tokens, {"gate_up_proj": (x, gate_up), "down_proj": (hidden, down)}))
        return result

    return forward


def stacked_factors(module: nn.Module, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s (A [r, in], B [out, r]) in a ParamWrapper's stacked lora_A / lora_B (PEFT's layout)."""
    A = module.lora_A["default"].weight
    B = module.lora_B["default"].weight
    experts = module.num_experts
    return A.reshape(experts, RANK, -1)[expert], B.reshape(B.shape[0], RANK, experts)[:, :, expert]


def wrapper_of(model: nn.Module, block: int, parameter: str) -> nn.Module:
    """The ParamWrapper of `parameter` in block `block`."""
    module = model.base_model.model.model.layers[block].mlp.experts
    while module.parameter_name != parameter:
        module = module.base_layer
    return module


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(family name, base model, reference statistics, the PEFT model initialized with LoRA-DA, its report)."""
    base = FAMILIES[request.param]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_statistics(base, data())
        model = adapt(copy.deepcopy(base))
        report = initialize_lora_da(model, data(), CFG)
    return request.param, base, reference, model, report


class TestPerExpertStatistics:
    def test_statistics_equal_the_explicitly_routed_reference(self, family):
        _, base, reference, _, _ = family
        names = expert_names(base)
        stats = collect_statistics(copy.deepcopy(base), data(), names, CFG)
        assert sorted(stats.layer_names) == sorted(reference) == sorted(names)
        for name, (G, Z, y, _) in reference.items():
            assert relative_error(stats.gradient(name), G) < 1e-5, name
            assert relative_error(stats.input_factor(name), Z) < 1e-5, name
            assert relative_error(stats.output_factor(name), y) < 1e-5, name

    def test_labels_token_mask_selects_each_experts_predicting_tokens(self):
        base = tiny_mixtral()
        config = LoraDAConfig(population_size=1000, show_progress=False, token_mask="labels")
        reference = reference_statistics(base, data(), token_mask="labels")
        stats = collect_statistics(copy.deepcopy(base), data(), list(reference), config)
        for name, (G, Z, y, tokens) in reference.items():
            assert stats.output_token_counts[name] == tokens, name
            assert relative_error(stats.gradient(name), G) < 1e-5, name
            assert relative_error(stats.input_factor(name), Z) < 1e-5, name
            assert relative_error(stats.output_factor(name), y) < 1e-5, name

    def test_save_and_load_keep_the_expert_entries(self, family, tmp_path):
        _, base, _, _, _ = family
        names = expert_names(base)[:3]
        stats = collect_statistics(copy.deepcopy(base), data(), names, CFG)
        stats.save(tmp_path / "s.safetensors")
        loaded = LoraDAStatistics.load(tmp_path / "s.safetensors")
        assert loaded.layer_names == names
        assert torch.equal(loaded.gradient(names[0]), stats.gradient(names[0]))


class TestPerExpertFactors:
    def test_factors_equal_the_reference_solve_in_peft_layout(self, family):
        _, base, reference, model, report = family
        assert report.initialized_weights == report.adapted_weights == len(reference)
        stats = collect_statistics(copy.deepcopy(base), data(), list(reference), CFG)
        compared = 0
        for name, (G, Z, y, tokens) in reference.items():
            block, parameter, expert = int(name.split(".")[2]), name.split(".")[-1].split("[")[0], int(name[-2])
            A, B = (f.detach() for f in stacked_factors(wrapper_of(model, block, parameter), expert))
            own = solve_layer(stats.gradient(name), stats.input_factor(name), stats.output_factor(name), RANK, CFG)
            assert relative_error(A, own.A) < 1e-6 and relative_error(B, own.B) < 1e-6, name
            if tokens >= WELL_CONDITIONED_TOKENS * G.shape[1]:
                expected = solve_layer(G, Z, y, RANK, CFG, layer=name)
                assert relative_error(A, expected.A) < FACTOR_TOLERANCE, name
                assert relative_error(B, expected.B) < FACTOR_TOLERANCE, name
                compared += 1
        assert compared >= len(reference) // 2

    def test_start_is_base_plus_scaled_product_for_every_expert(self, family):
        _, base, _, model, _ = family
        merged = copy.deepcopy(base)
        transposed = getattr(merged.model.layers[0].mlp.experts, "is_transposed", False)
        with torch.no_grad():
            for block, layer in enumerate(merged.model.layers):
                for parameter in ("gate_up_proj", "down_proj"):
                    wrapper = wrapper_of(model, block, parameter)
                    stack = getattr(layer.mlp.experts, parameter)
                    for expert in range(stack.shape[0]):
                        A, B = stacked_factors(wrapper, expert)
                        delta = wrapper.scaling["default"] * B @ A  # [out, in]
                        stack[expert] += delta.T if transposed else delta
        batch = data()[0]
        with torch.no_grad():
            expected = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            untouched = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert relative_error(got - untouched, expected - untouched) < 1e-3
        assert (got - untouched).abs().max() > 1e-6  # the factors moved the start


class TestRouterAndCoverage:
    def test_router_gets_factors_of_its_linear_map(self):
        model = adapt(tiny_mixtral(), target_modules=["gate"], target_parameters=None)
        report = initialize_lora_da(model, data(), CFG)
        names = [name for name in report.layers if name.endswith("mlp.gate.weight")]
        assert len(names) == 2 and report.initialized_weights == report.adapted_weights == 2
        gate = model.base_model.model.model.layers[0].mlp.gate
        assert gate.lora_B["default"].weight.abs().sum() > 0

    @pytest.mark.parametrize("name", sorted(FAMILIES))
    def test_all_linear_initializes_every_adapted_weight(self, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(FAMILIES[name](), LoraConfig(r=RANK, lora_alpha=4, target_modules="all-linear"))
        report = initialize_lora_da(model, data(), CFG)
        # per block: q, k, v, o, the router and 4 experts x 2 stacks (PEFT's "all-linear" leaves GPT-OSS's
        # router and experts out: q, k, v, o only)
        weights = 2 * 4 if name == "gpt_oss" else 2 * (4 + 1 + 8)
        assert report.adapted_weights == report.initialized_weights == weights
        assert report.coverage() == f"LoRA-DA factors for {weights} of {weights} adapted weights"

    def test_experts_no_token_reaches_keep_the_default_init_and_are_listed(self):
        base = tiny_mixtral()
        for layer in base.model.layers:  # expert 3 is never chosen: its tokens go to the first pick's neighbour
            layer.mlp.gate.register_forward_hook(_avoid_expert_three)
        model = adapt(base)
        before = lora_state(model)
        report = initialize_lora_da(model, data(), CFG)
        unrouted = sorted(report.default_init)
        assert unrouted == sorted(f"base_model.model.model.layers.{b}.mlp.experts.{p}[3]"
                                  for b in (0, 1) for p in ("gate_up_proj", "down_proj"))
        assert report.initialized_weights == report.adapted_weights - 4
        assert "4 experts' weights no calibration token reached" in report.coverage()
        after = lora_state(model)
        wrapper = wrapper_of(model, 0, "down_proj")
        A, B = stacked_factors(wrapper, 3)
        key = next(k for k in before if k.endswith("layers.0.mlp.experts.lora_A.default.weight"))
        assert torch.equal(A, before[key].reshape(4, RANK, -1)[3])  # expert 3 keeps PEFT's init
        assert not torch.equal(after[key], before[key])  # the others changed
        assert B.abs().sum() == 0


def _avoid_expert_three(module, args, output):
    """Router forward hook (top-2): a token's pick of expert 3 goes to expert 0, or to 1 if 0 is its other pick."""
    logits, scores, indices = output
    first, second = indices[:, 0], indices[:, 1]
    first = torch.where(first == 3, torch.where(second == 0, 1, 0), first)
    second = torch.where(second == 3, torch.where(first == 0, 1, 0), second)
    return logits, scores, torch.stack([first, second], dim=1)


class TestOtherFamilies:
    @pytest.mark.parametrize("name", sorted(OTHER_FAMILIES))
    def test_every_expert_gets_factors_and_starts_at_the_formula(self, name):
        build, path = OTHER_FAMILIES[name]
        torch.manual_seed(0)
        base = build().eval()
        model = adapt(copy.deepcopy(base), target_parameters=[f"{path}.gate_up_proj", f"{path}.down_proj"])
        report = initialize_lora_da(model, data(), CFG)
        assert report.initialized_weights == report.adapted_weights == 16  # 2 blocks x 2 stacks x 4 experts
        block = model.base_model.model.model.layers[0].get_submodule(path)
        wrapper = block if block.parameter_name == "down_proj" else block.base_layer
        stack = wrapper.get_param()
        delta = wrapper.get_delta_weight("default")  # PEFT's own merge of the stacked factors
        for expert in range(4):
            A, B = stacked_factors(wrapper, expert)
            assert torch.allclose(delta[expert], wrapper.scaling["default"] * B @ A, atol=1e-7)
            assert B.abs().sum() > 0
        assert delta.shape == stack.shape


class TestStatisticsFile:
    def test_saved_statistics_give_the_same_factors_and_keep_unrouted_experts_at_default(self, tmp_path):
        def unrouted_model():
            base = tiny_mixtral()
            for layer in base.model.layers:
                layer.mlp.gate.register_forward_hook(_avoid_expert_three)
            return adapt(base)

        direct = unrouted_model()
        initialize_lora_da(direct, data(), CFG)
        path = tmp_path / "moe.safetensors"
        compute_and_save_statistics(unrouted_model(), data(), path, CFG)
        from_file = unrouted_model()
        report = initialize_lora_da(from_file, None, CFG, statistics=path)
        assert len(report.default_init) == 4
        expected = lora_state(direct)
        for key, value in lora_state(from_file).items():
            assert relative_error(value, expected[key]) < 1e-6, key


class TestMemoryPlan:
    def test_plan_counts_every_experts_statistics(self):
        model = adapt(tiny_mixtral())
        report = initialize_lora_da(model, data(), CFG)
        wrappers = [wrapper_of(model, b, p) for b in (0, 1) for p in ("gate_up_proj", "down_proj")]
        expected = sum(w.num_experts * statistics_bytes(w.out_features, w.in_features) for w in wrappers)
        assert report.statistics_bytes_estimate == expected

    def test_probe_counts_the_inputs_each_expert_holds(self):
        """The observer holds each expert's routed tokens until the backward; with them, the probe counts most of
        what a pass adds."""
        model = tiny_mixtral()
        names, batch = expert_names(model) + target_layer_names(model), data()[0]
        added = bytes_a_pass_adds(model, batch, names, CFG)
        assert 0.75 * added < probe_batch(model, batch, names, CFG).activation_bytes <= added

    def test_memory_budget_passes_give_the_one_pass_factors(self):
        one = adapt(tiny_mixtral())
        initialize_lora_da(one, data(), CFG)
        budgeted = adapt(tiny_mixtral())
        wrapper = wrapper_of(budgeted, 0, "gate_up_proj")
        # about 6 experts' statistics, with Z summed without float32 chunks (which saves passes here)
        budget = 6 * statistics_bytes(wrapper.out_features, wrapper.in_features, input_chunk=False)
        report = initialize_lora_da(budgeted, data(), CFG, memory_budget=budget)
        assert report.passes > 2 and report.statistics_bytes_estimate <= budget
        for key, value in lora_state(one).items():
            assert relative_error(lora_state(budgeted)[key], value) < 1e-5, key

    def test_several_passes_give_the_one_pass_factors(self):
        one = adapt(tiny_mixtral())
        initialize_lora_da(one, data(), CFG)
        several = adapt(tiny_mixtral())
        report = initialize_lora_da(several, data(), CFG, layers_per_pass=5)
        assert report.passes == 4
        for key, value in lora_state(one).items():
            assert relative_error(lora_state(several)[key], value) < 1e-5, key


WORLD = 2


def dora_model() -> nn.Module:
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))


def dora_data() -> list[dict]:
    """4 batches: 2 per rank (each forward of an FSDP2 model is a collective, so the ranks take equal steps)."""
    return batches(examples(8), 2)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with recording_failure(out, rank):
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
        results = {}
        model = adapt(tiny_mixtral())
        report = initialize_lora_da(model, data(), CFG, shard=True)
        results["factors"], results["report"] = lora_state(model), report.to_dict()
        try:
            initialize_lora_da(adapt(tiny_mixtral()), data(), CFG, shard=True, shard_statistics=True)
        except LoraDAError as exc:
            results["sharded_error"] = str(exc)
        dora = dora_model()
        for layer in dora.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(dora)
        initialize_lora_da(dora, dora_data(), CFG, shard=True)
        results["dora_fsdp2"] = {k: v.full_tensor().clone() for k, v in dora.state_dict().items() if "lora_" in k}
        save_results_and_finish(out, rank, results)


class TestDataParallel:
    def test_two_ranks_give_the_one_process_factors(self, tmp_path):
        per_rank = run_ranks(_worker, tmp_path, WORLD, timeout=240)
        model = adapt(tiny_mixtral())
        initialize_lora_da(model, data(), CFG)
        reference = lora_state(model)
        for key, value in reference.items():
            assert torch.equal(per_rank[0]["factors"][key], per_rank[1]["factors"][key]), key
            assert relative_error(per_rank[0]["factors"][key], value) < 1e-5, key
        assert per_rank[0]["report"]["initialized_weights"] == 16
        assert "cannot be sharded" in per_rank[0]["sharded_error"]
        dora = dora_model()
        initialize_lora_da(dora, dora_data(), CFG)
        for key, value in lora_state(dora).items():  # factors and DoRA magnitudes
            assert torch.equal(per_rank[0]["dora_fsdp2"][key], per_rank[1]["dora_fsdp2"][key]), key
            assert relative_error(per_rank[0]["dora_fsdp2"][key], value) < 1e-5, key
