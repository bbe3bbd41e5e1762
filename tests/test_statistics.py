"""Statistics against a per-example autograd reference; invariances; save/load; state restored."""

import pytest
import torch
from _tiny import batches, examples, tiny_llama
from torch import nn

from lora_da import LoraDAConfig, LoraDAError, LoraDAStatistics, collect_statistics, gram, hooks, solve_all
from lora_da.collect import collect_in_two_passes

TARGETS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
]
CFG = LoraDAConfig(variance_weight=0.0, show_progress=False)


def reference_statistics(model, items, names, token_mask="attention"):
    """Per example (batch size 1, no padding): G from W.grad; Z, y from retained activations."""
    modules = {name: model.get_submodule(name) for name in names}
    grads = {name: 0 for name in names}
    z_sum, y_sum, tokens, count = {}, {}, 0, 0
    for item in items:
        ids, labels = item["input_ids"][None], item["labels"][None]
        if (labels[:, 1:] != -100).sum() == 0:
            continue
        seen = {}
        hooks = [
            m.register_forward_hook(lambda mod, args, out, name=name, seen=seen: seen.__setitem__(name, (args[0], out)))
            for name, m in modules.items()
        ]
        for m in modules.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        try:
            logits = model(input_ids=ids).logits
            for _, out in seen.values():
                out.retain_grad()
            loss = nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        if token_mask == "attention":
            keep = torch.ones(ids.shape[1], dtype=torch.bool)
        else:
            keep = torch.zeros(ids.shape[1], dtype=torch.bool)
            keep[:-1] = labels[0, 1:] != -100
        for name, m in modules.items():
            grads[name] = grads[name] + m.weight.grad.double()
            x, out = seen[name]
            x, g = x[0][keep].detach().double(), out.grad[0][keep].double()
            z_sum[name] = z_sum.get(name, 0) + x.T @ x
            y_sum[name] = y_sum.get(name, 0) + (g * g).sum(0)
        tokens += int(keep.sum())
        count += 1
    for m in modules.values():
        m.weight.requires_grad_(False)
    return (
        {n: grads[n] / count for n in names},
        {n: z_sum[n] / tokens for n in names},
        {n: y_sum[n] / tokens for n in names},
        count,
    )


def statistic_means(stats: LoraDAStatistics) -> dict[str, list[torch.Tensor]]:
    """Each layer's G, full Z and y (read before a test changes the packed layout of Z)."""
    return {name: [stats.gradient(name), stats.input_factor(name), stats.output_factor(name)]
            for name in stats.layer_names}


def assert_same_statistics(first, second, rtol=1e-4):
    """Equal means of two LoraDAStatistics (or of their `statistic_means`)."""
    first, second = (s if isinstance(s, dict) else statistic_means(s) for s in (first, second))
    for name, means in first.items():
        for a, b in zip(means, second[name], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 * float(a.abs().max()))


class TestCollectStatistics:
    @pytest.mark.parametrize("token_mask", ["attention", "labels"])
    def test_matches_per_example_autograd(self, token_mask):
        model = tiny_llama()
        items = examples(6)
        items[2]["labels"][:] = -100  # an example with no supervised token is skipped entirely
        cfg = LoraDAConfig(variance_weight=0.0, token_mask=token_mask, show_progress=False)
        stats = collect_statistics(model, batches(items, 4), TARGETS, cfg)
        g_ref, z_ref, y_ref, count = reference_statistics(model, items, TARGETS, token_mask)
        assert stats.num_examples == count == 5
        for name in TARGETS:
            torch.testing.assert_close(stats.gradient(name).double(), g_ref[name], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(stats.input_factor(name).double(), z_ref[name], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stats.output_factor(name).double(), y_ref[name], rtol=1e-4, atol=1e-12)

    def test_output_head_projects_only_supervised_positions(self):
        model, items = tiny_llama(), examples(4)
        seen = []
        handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
        try:
            collect_statistics(model, batches(items, 4), TARGETS, CFG)
        finally:
            handle.remove()
        supervised = sum(int((item["labels"][1:] != -100).sum()) for item in items)
        assert seen == [(1, supervised, model.config.hidden_size)]

    def test_output_head_as_target_sees_every_position(self):
        model, items = tiny_llama(), examples(4)
        names = [*TARGETS, "lm_head"]
        stats = collect_statistics(model, batches(items, 2), names, CFG)
        g_ref, z_ref, y_ref, _ = reference_statistics(model, items, names)
        torch.testing.assert_close(stats.input_factor("lm_head").double(), z_ref["lm_head"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.gradient("lm_head").double(), g_ref["lm_head"], rtol=1e-4, atol=1e-7)

    @pytest.mark.parametrize("token_mask", ["attention", "labels"])
    def test_two_passes_give_the_one_pass_statistics(self, token_mask):
        """G and y from a forward+backward, then Z from a forward without gradients: G and y bit for bit, Z to
        float32 rounding (each batch's product goes straight into the float64 total, not through a float32
        chunk), with q/k/v (one input) sharing one Z."""
        model, items = tiny_llama(), examples(7)
        items[3]["labels"][:] = -100
        cfg = LoraDAConfig(variance_weight=0.0, token_mask=token_mask, show_progress=False)
        names = [*TARGETS, "model.layers.0.self_attn.v_proj"]
        once = collect_statistics(model, batches(items, 3), names, cfg)
        twice = collect_in_two_passes(model, batches(items, 3), names, cfg)
        assert twice.input_groups == once.input_groups and twice.num_examples == once.num_examples == 6
        assert twice.input_token_counts == once.input_token_counts
        assert twice.output_token_counts == once.output_token_counts
        for sums in ("gradient_sums", "output_sq_sums"):
            first, second = getattr(once, sums), getattr(twice, sums)
            assert first.keys() == second.keys()
            assert all(torch.equal(first[key], second[key]) for key in first), sums
        assert once.input_sums.keys() == twice.input_sums.keys()
        for key, total in once.input_sums.items():
            torch.testing.assert_close(twice.input_sums[key], total, rtol=1e-6, atol=1e-6 * float(total.abs().max()))
        assert twice.metadata["data_hash"] == once.metadata["data_hash"]

    def test_two_passes_need_the_same_examples_twice(self):
        model, items = tiny_llama(), examples(4)

        class Changing:  # once both batches have been read, iterations give fewer examples
            seen = 0

            def __iter__(self):
                for batch in batches(items if self.seen < 2 else items[:3], 2):
                    self.seen += 1
                    yield batch

        with pytest.raises(LoraDAError, match="same examples"):
            collect_in_two_passes(model, Changing(), TARGETS, CFG)

    def test_batch_size_invariance(self):
        model, items = tiny_llama(), examples(7)
        per_size = [collect_statistics(model, batches(items, size), TARGETS, CFG) for size in (1, 3, 7)]
        assert_same_statistics(per_size[0], per_size[1])
        assert_same_statistics(per_size[0], per_size[2])

    def test_duplicated_data_changes_nothing(self):
        model, items = tiny_llama(), examples(5)
        once = collect_statistics(model, batches(items, 2), TARGETS, CFG)
        twice = collect_statistics(model, batches(items + items, 3), TARGETS, CFG)
        assert twice.num_examples == 2 * once.num_examples
        assert_same_statistics(once, twice)

    def test_backward_stops_at_the_earliest_target_layer(self):
        """A pass over the second block's layers builds no graph through the first block (so it keeps none of its
        activations and runs no backward there) and gathers what a pass over every layer gathers for them."""
        model, data, deep = tiny_llama(), batches(examples(4), 2), TARGETS[3:]
        needs_gradient = []

        def record(_module, _args, out):
            needs_gradient.append((out[0] if isinstance(out, tuple) else out).requires_grad)

        first_block = model.model.layers[0].register_forward_hook(record)
        stats = collect_statistics(model, data, deep, CFG)
        first_block.remove()
        assert needs_gradient and not any(needs_gradient)
        assert_same_statistics(stats, collect_statistics(model, data, TARGETS, CFG).select({n: n for n in deep}))

    def test_earliest_target_layer_output_may_change_in_place(self):
        """The graph starts at the pass's earliest layer; the model may still change that layer's output in place
        (the MLP's output is down_proj's)."""
        model, data, last = tiny_llama(), batches(examples(4), 2), TARGETS[-1:]
        expected = collect_statistics(model, data, last, CFG)
        in_place = model.model.layers[1].mlp.register_forward_hook(lambda _module, _args, out: out.mul_(1.0))
        stats = collect_statistics(model, data, last, CFG)
        in_place.remove()
        assert_same_statistics(stats, expected)

    def test_shared_inputs_share_one_input_factor(self):
        stats = collect_statistics(tiny_llama(), batches(examples(3), 3), TARGETS, CFG)
        assert stats.input_group(TARGETS[1]) == TARGETS[0]  # k_proj reads q_proj's input
        assert stats.input_group(TARGETS[2]) == TARGETS[2]
        assert set(stats.input_sums) == {TARGETS[0], TARGETS[2], TARGETS[3], TARGETS[4]}

    def test_token_scaling_multiplies_y_by_count_squared(self):
        model, items = tiny_llama(), examples(1)
        mean = collect_statistics(model, batches(items, 1), TARGETS, CFG)
        token_cfg = LoraDAConfig(variance_weight=0.0, output_scaling="token", show_progress=False)
        token = collect_statistics(model, batches(items, 1), TARGETS, token_cfg)
        count = int((items[0]["labels"][1:] != -100).sum())
        for name in TARGETS:
            torch.testing.assert_close(token.output_factor(name), mean.output_factor(name) * count**2)
            torch.testing.assert_close(token.gradient(name), mean.gradient(name))

    def test_save_load_round_trip(self, tmp_path):
        stats = collect_statistics(tiny_llama(), batches(examples(3), 2), TARGETS, CFG)
        path = tmp_path / "stats.safetensors"
        stats.save(path)
        loaded = LoraDAStatistics.load(path)
        assert loaded.layer_names == stats.layer_names and loaded.num_examples == stats.num_examples
        assert loaded.input_groups == stats.input_groups and loaded.metadata["token_mask"] == "attention"
        assert_same_statistics(stats, loaded, rtol=0)
        assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]

    def test_base_weights_need_no_grad_and_state_is_restored(self):
        model = tiny_llama()
        model.train()
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        collect_statistics(model, batches(examples(2), 2), TARGETS, CFG)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())

    def test_state_restored_when_loss_is_not_finite(self):
        model = tiny_llama()
        model.train()
        with torch.no_grad():
            model.lm_head.weight[0, 0] = float("nan")
        with pytest.raises(LoraDAError, match="not finite"):
            collect_statistics(model, batches(examples(2), 2), TARGETS, CFG)
        assert all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())

    def test_no_supervised_token_is_an_error(self):
        items = examples(2)
        for item in items:
            item["labels"][:] = -100
        with pytest.raises(LoraDAError, match="supervised token"):
            collect_statistics(tiny_llama(), batches(items, 2), TARGETS, CFG)

    def test_empty_data_is_an_error(self):
        with pytest.raises(LoraDAError, match="supervised token"):
            collect_statistics(tiny_llama(), [], TARGETS, CFG)

    def test_unknown_layer_is_an_error(self):
        with pytest.raises(LoraDAError, match="No module named"):
            collect_statistics(tiny_llama(), batches(examples(2), 2), ["model.nope"], CFG)


def solved_update(stats: LoraDAStatistics, rank: int = 4) -> dict[str, torch.Tensor]:
    """B @ A of every layer solved from `stats`."""
    config = LoraDAConfig(population_size=1000, show_progress=False)
    return {name: s.B.double() @ s.A.double() for name, s in solve_all(stats, rank, config).items()}


def relative_errors(found: dict, expected: dict) -> dict[str, float]:
    return {name: float((found[name] - expected[name]).norm() / expected[name].norm()) for name in expected}


class TestPrecision:
    """float32 sums of G and float32 chunks of Z (folded into float64 every FOLD_TOKENS tokens) against float64
    products of the same activations, and against per-batch float64 sums of Z (the former path)."""

    def test_factors_as_accurate_as_float64_sums(self, monkeypatch):
        model, items = tiny_llama(), examples(16)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
        g_ref, z_ref, y_ref, count = reference_statistics(model, items, names)
        exact = LoraDAStatistics(
            gradient_sums={n: g_ref[n] * count for n in names}, output_sq_sums=y_ref,
            output_token_counts=dict.fromkeys(names, 1), input_groups={n: n for n in names}, input_sums=z_ref,
            input_token_counts=dict.fromkeys(names, 1), num_examples=count,
        )
        expected = solved_update(exact)
        default = relative_errors(solved_update(collect_statistics(model, batches(items, 1), names, CFG)), expected)
        monkeypatch.setattr(hooks, "FOLD_TOKENS", 1)  # fold Z into float64 after every batch
        per_batch = relative_errors(solved_update(collect_statistics(model, batches(items, 1), names, CFG)), expected)
        for name in names:
            if "o_proj" in name:  # GQA: heads of one key-value group agree, so Z is rank-deficient
                assert 1e-5 < per_batch[name] < 1e-2  # float32 products alone already move it
                assert default[name] < 5 * per_batch[name], name
            else:
                assert default[name] < 1e-5 and per_batch[name] < 1e-5, name

    def test_half_precision_rows_multiply_into_float32_exactly(self):
        """Products of bfloat16 numbers are exact in float32: the result is the float32 GEMM of the upcasts."""
        gen = torch.Generator().manual_seed(0)
        left, right = torch.randn(40, 12, generator=gen), torch.randn(40, 9, generator=gen)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        left, right = left.bfloat16().to(device), right.bfloat16().to(device)
        product = gram.float32_product(left.T, right)  # a transposed view, as the hooks pass it
        assert product.dtype == torch.float32
        torch.testing.assert_close(product.double(), left.T.double() @ right.double(), rtol=1e-6, atol=1e-6)
        assert not gram.multiplies_half_into_float32("cpu", torch.bfloat16)  # a CPU upcasts first
        assert not gram.multiplies_half_into_float32(device, torch.float32)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_model_on_a_gpu_matches_upcast_rows(self, monkeypatch, dtype):
        model, items = tiny_llama().to("cuda", dtype), examples(9)
        assert gram.multiplies_half_into_float32("cuda", dtype)
        half = statistic_means(collect_statistics(model, batches(items, 3), TARGETS, CFG))
        monkeypatch.setattr(hooks, "multiplies_half_into_float32", lambda device_type, dtype: False)
        upcast = collect_statistics(model, batches(items, 3), TARGETS, CFG)
        assert_same_statistics(half, upcast, rtol=1e-5)

    def test_blockwise_input_factor_equals_full_product(self, monkeypatch):
        model, items = tiny_llama(), examples(7)
        full = statistic_means(collect_statistics(model, batches(items, 3), TARGETS, CFG))
        monkeypatch.setattr(gram, "GRAM_BLOCK", 10)  # n = 32 and 48: packed in blocks of at most 10 rows
        blocks = collect_statistics(model, batches(items, 3), TARGETS, CFG)
        assert_same_statistics(full, blocks, rtol=1e-5)
        for name in TARGETS:
            z = blocks.input_factor(name)
            assert torch.equal(z, z.T)

    def test_large_batches_add_straight_into_the_float64_total(self, monkeypatch):
        model, items = tiny_llama(), examples(9)
        chunked = statistic_means(collect_statistics(model, batches(items, 3), TARGETS, CFG))
        original, added = hooks.Collector._add_to_total, []

        def spy(self, group: str, xs: torch.Tensor) -> None:
            added.append(group)
            original(self, group, xs)

        monkeypatch.setattr(hooks.Collector, "_add_to_total", spy)
        monkeypatch.setattr(hooks, "FOLD_TOKENS", 20)  # batches of 3 examples hold 30-45 tokens
        monkeypatch.setattr(gram, "GRAM_BLOCK", 10)
        direct = collect_statistics(model, batches(items, 3), TARGETS, CFG)
        assert added, "the direct path was not taken"
        assert_same_statistics(chunked, direct, rtol=1e-6)
        for name in TARGETS:
            z = direct.input_factor(name)
            assert torch.equal(z, z.T)


def test_release_gives_the_same_factors_and_empties_the_statistics():
    model, items = tiny_llama(), examples(6)
    config = LoraDAConfig(population_size=1000, show_progress=False)
    kept = collect_statistics(model, batches(items, 2), TARGETS, CFG)
    released = collect_statistics(model, batches(items, 2), TARGETS, CFG)
    expected = solve_all(kept, 4, config)
    found = solve_all(released, 4, config, release=True)
    for name in TARGETS:
        assert torch.equal(found[name].A, expected[name].A) and torch.equal(found[name].B, expected[name].B)
    assert kept.layer_names == TARGETS and kept.input_sums
    assert not released.gradient_sums and not released.output_sq_sums and not released.input_sums
