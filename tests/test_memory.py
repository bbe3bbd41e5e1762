"""Bounded memory: statistics gathered, solved and freed a group of layers at a time give the same factors."""

import logging

import pytest
import torch
from _tiny import batches, bytes_a_pass_adds, examples, lora_state, tiny_llama, wrap

from lora_da import LoraDAConfig, LoraDAError, adapter, hooks, initialize_lora_da, schedule
from lora_da.collect import collect_statistics, estimate_statistics_bytes, probe_batch
from lora_da.layers import layer_shape
from lora_da.schedule import plan_passes
from lora_da.statistics import statistics_bytes

CFG = LoraDAConfig(population_size=1000, show_progress=False)


@pytest.fixture(scope="module")
def all_at_once():
    model = wrap(tiny_llama())
    report = initialize_lora_da(model, batches(examples(6), 3), CFG)
    return lora_state(model), report


def assert_same(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=0)


def assert_close_to_one_pass(state: dict, one_pass: dict) -> None:
    """Factors from Z summed otherwise (each batch's products straight into float64 without float32 chunks, or
    folded after other batches) against one pass: Z agrees to float32 rounding, which moves the factors of the GQA
    o_proj, whose Z is rank-deficient, by up to 1e-3 (as in test_statistics.TestPrecision) and the other layers' by
    1e-6 to 2e-5."""
    assert state.keys() == one_pass.keys()
    for key, value in state.items():
        error = float((value - one_pass[key]).norm() / one_pass[key].norm())
        assert error < (1e-2 if "o_proj" in key else 1e-4), key


def test_one_layer_per_pass_equals_all_at_once(all_at_once):
    model = wrap(tiny_llama())
    report = initialize_lora_da(model, batches(examples(6), 3), CFG, layers_per_pass=1)
    assert_same(lora_state(model), all_at_once[0])
    assert report.passes == 14 and all_at_once[1].passes == 1
    assert report.statistics_bytes < all_at_once[1].statistics_bytes / 5
    assert report.num_examples == 6


def test_memory_budget_bounds_each_pass(all_at_once):
    sizes = estimate_statistics_bytes(tiny_llama(), list(_names()))
    budget = 3 * max(sizes.values())
    model = wrap(tiny_llama())
    report = initialize_lora_da(model, batches(examples(6), 3), CFG, memory_budget=budget)
    assert_same(lora_state(model), all_at_once[0])
    assert 1 < report.passes < 14
    assert report.statistics_bytes <= report.statistics_bytes_estimate <= budget


def test_default_is_one_pass_and_a_large_budget_too(all_at_once):
    total = all_at_once[1].statistics_bytes_estimate
    assert all_at_once[1].statistics_bytes <= total  # shared inputs make the real size smaller
    model = wrap(tiny_llama())
    assert initialize_lora_da(model, batches(examples(6), 3), CFG, memory_budget=total).passes == 1


def test_estimate_is_logged_before_the_pass(caplog):
    with caplog.at_level(logging.INFO, logger="lora_da"):
        initialize_lora_da(wrap(tiny_llama()), batches(examples(2), 2), CFG, layers_per_pass=7)
    assert any("2 pass(es) over the data (1 extra) for 14 layers" in r.message for r in caplog.records)


def test_automatic_plan_follows_free_memory(monkeypatch, all_at_once):
    sizes = estimate_statistics_bytes(tiny_llama(), list(_names()))
    solve = dict.fromkeys(sizes, 1000)
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: 10**12)
    roomy = schedule.plan_memory(sizes, solve, torch.device("cpu"))
    assert roomy.rule == "one pass" and len(roomy.passes) == 1 and roomy.activation_bytes is None
    # Room for about three layers' statistics next to the largest solve: several passes, each within the share.
    free = int((3 * max(sizes.values()) + 1000) / schedule.STATISTICS_SHARE)
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: free)
    tight = schedule.plan_memory(sizes, solve, torch.device("cpu"))
    assert tight.rule == "automatic" and 2 <= len(tight.passes) < 14
    assert all(b <= schedule.STATISTICS_SHARE * free and b + 1000 <= schedule.FILL_SHARE * free
               for b in tight.pass_bytes)
    assert "automatic" in tight.describe() and "MiB free" in tight.describe()
    # The default call plans by the free memory too, and its several passes give the factors of one.
    model = wrap(tiny_llama())
    report = initialize_lora_da(model, batches(examples(6), 3), CFG)
    assert 1 < report.passes <= 14
    assert_same(lora_state(model), all_at_once[0])


def test_pass_budget_keeps_the_solve_out_of_the_pass(monkeypatch):
    """A pass's statistics share the memory with its activations, and after the pass with the largest solve:
    a solve smaller than the activations' share costs the pass nothing, a larger one takes its excess."""
    free = 10_000
    assert schedule.pass_budget(free, 1000) == free * schedule.STATISTICS_SHARE
    assert schedule.pass_budget(free, 6000) == free * schedule.FILL_SHARE - 6000
    # sharded: one layer more on a rank, and during the pass one layer in flight
    assert schedule.pass_budget(free, 1000, largest_statistics=300, shards=4) == free * schedule.STATISTICS_SHARE - 600
    sizes = {f"layer{i}": 1000 for i in range(12)}
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: free)
    passes = {}
    for solve in (100, 3000, 6000):
        plan = schedule.plan_memory(sizes, {"layer0": solve}, torch.device("cpu"))
        assert sum(map(len, plan.passes)) == 12
        assert all(b <= schedule.STATISTICS_SHARE * free and b + solve <= schedule.FILL_SHARE * free
                   for b in plan.pass_bytes)
        passes[solve] = len(plan.passes)
    assert passes[3000] == 3  # 5 layers a pass
    assert passes[6000] == 6  # a 6000-byte solve leaves 2500 bytes: 2 layers a pass


def test_inputs_apart_when_gradients_fit_one_pass_but_not_with_z():
    """Several passes for want of memory, though every layer's G and y fit beside the activations and all the
    statistics after them: one forward+backward for G and y, then one forward (no activations kept) for Z."""
    sizes, inputs = {"a": 200, "b": 200, "c": 200}, {"a": 500, "b": 500, "c": 500}  # G and y, and Z
    # 1600 bytes free: G and y fit half of it, but all 2100 bytes and a 100-byte solve do not fit 85%
    base = schedule.PassPlan([["a"], ["b"], ["c"]], [700] * 3, 100, 1600, "automatic")
    assert schedule.plan_inputs_apart(base, sizes, inputs) is base
    roomy = schedule.PassPlan([["a", "b"], ["c"]], [1400, 700], 100, 2600, "automatic")
    apart = schedule.plan_inputs_apart(roomy, sizes, inputs)
    assert apart.inputs_apart and apart.data_passes == 2 and apart.passes == [["a", "b", "c"]]
    assert apart.pass_bytes == [2100] and "then their Z in a forward without gradients" in apart.describe()
    big_gradients = {"a": 500, "b": 500, "c": 500}  # G and y: 1500 > half of 2600
    assert schedule.plan_inputs_apart(roomy, big_gradients, inputs) is roomy
    chosen = schedule.PassPlan([["a"], ["b", "c"]], [700, 1400], 100, None, "memory_budget")
    assert schedule.plan_inputs_apart(chosen, sizes, inputs) is chosen  # a budget the caller set is kept


def test_inputs_apart_gives_the_factors_of_one_pass(monkeypatch, all_at_once, caplog):
    """With a faked free memory where the layers' statistics need several passes but their G and y fit one."""
    monkeypatch.setattr(adapter, "solve_working_bytes", lambda *shape: 1000)
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: 300_000)
    model = wrap(tiny_llama())
    with caplog.at_level(logging.INFO, logger="lora_da"):
        report = initialize_lora_da(model, batches(examples(6), 3), CFG)
    assert report.passes == 2
    assert any("then their Z in a forward without gradients" in r.message for r in caplog.records)
    assert_close_to_one_pass(lora_state(model), all_at_once[0])
    with pytest.raises(LoraDAError, match="one-shot iterator"):
        initialize_lora_da(wrap(tiny_llama()), iter(batches(examples(6), 3)), CFG)


def test_pass_budget_with_measured_activations():
    """Measured activations replace the share left to them: the statistics get what they leave free within
    FILL_SHARE, more than STATISTICS_SHARE where they are small, less where they are large."""
    free = 10_000
    # the activations are gone when the solve runs: the larger of the two counts
    assert schedule.pass_budget(free, 1000, activation_bytes=500) == free * schedule.FILL_SHARE - 1000
    assert schedule.pass_budget(free, 100, activation_bytes=500) == free * schedule.FILL_SHARE - 500
    assert schedule.pass_budget(free, 100, activation_bytes=6000) == free * schedule.FILL_SHARE - 6000
    assert schedule.pass_budget(free, 100, activation_bytes=500) > schedule.pass_budget(free, 100)
    assert schedule.pass_budget(free, 100, activation_bytes=6000) < schedule.pass_budget(free, 100)


def test_plan_sums_z_without_chunks_where_that_saves_passes():
    sizes = {"a": 300, "b": 300, "c": 300}
    chunks = dict.fromkeys(sizes, 100)
    plan = schedule.plan_memory(sizes, {"a": 0}, torch.device("cpu"), memory_budget=600, chunk_sizes=chunks)
    assert plan.passes == [["a", "b", "c"]] and plan.pass_bytes == [600] and not plan.input_chunks
    assert "without float32 chunks" in plan.describe()
    plan = schedule.plan_memory(sizes, {"a": 0}, torch.device("cpu"), memory_budget=500, chunk_sizes=chunks)
    assert plan.passes == [["a", "b"], ["c"]] and not plan.input_chunks
    # 3 passes either way: the chunks are kept
    plan = schedule.plan_memory(sizes, {"a": 0}, torch.device("cpu"), memory_budget=350, chunk_sizes=chunks)
    assert len(plan.passes) == 3 and plan.input_chunks and plan.pass_bytes == [300] * 3
    plan = schedule.plan_memory(sizes, {"a": 0}, torch.device("cpu"), memory_budget=600)
    assert len(plan.passes) == 2 and plan.input_chunks


def test_collector_without_chunks_adds_every_product_into_float64(monkeypatch):
    """Batches of a few tokens fill a float32 chunk of Z by default; without chunks none is folded, and Z agrees
    to float32 rounding."""
    names = list(_names())
    folds = []
    fold = hooks.Collector._fold
    monkeypatch.setattr(hooks.Collector, "_fold", lambda self, group: folds.append(group) or fold(self, group))
    chunked = collect_statistics(tiny_llama(), batches(examples(6), 2), names, CFG)
    assert folds
    folds.clear()
    straight = collect_statistics(tiny_llama(), batches(examples(6), 2), names, CFG, input_chunks=False)
    assert not folds
    assert straight.input_sums.keys() == chunked.input_sums.keys()
    for group, total in straight.input_sums.items():
        assert total.dtype == torch.float64
        torch.testing.assert_close(total, chunked.input_sums[group], rtol=1e-6, atol=1e-6)


def test_probe_measures_what_a_pass_keeps_for_the_backward():
    """The bytes grow in proportion to a batch's positions and hold at least every distinct input of the target
    layers (q/k/v and gate/up read one each), which the hooks keep until the backward."""
    model, names = tiny_llama(), list(_names())
    small, large = batches(examples(3), 3)[0], batches(examples(12), 12)[0]
    small_bytes, large_bytes = (probe_batch(model, batch, names, CFG).activation_bytes for batch in (small, large))
    assert small_bytes == probe_batch(model, small, names, CFG).activation_bytes
    positions = large["input_ids"].numel() / small["input_ids"].numel()
    assert 0.85 * positions < large_bytes / small_bytes < 1.15 * positions
    config = model.config
    inputs_per_position = config.num_hidden_layers * (3 * config.hidden_size + config.intermediate_size) * 4
    assert small_bytes >= inputs_per_position * small["input_ids"].numel()


def test_probe_counts_what_a_pass_adds():
    """What the pass keeps for the backward and the gradients passing through it: without the latter (twice the
    largest tensor kept) the probe would count 84% of the pass."""
    model, names, batch = tiny_llama(), list(_names()), batches(examples(6), 6)[0]
    added = bytes_a_pass_adds(model, batch, names, CFG)
    assert 0.88 * added < probe_batch(model, batch, names, CFG).activation_bytes <= 1.05 * added


def test_can_cut_only_batches_whose_tensors_follow_the_examples():
    batch = batches(examples(4), 4)[0]
    assert schedule.can_cut(batch) and schedule.can_cut({**batch, "scale": 0.5, "temperature": torch.tensor(1.0)})
    assert not schedule.can_cut({**batch, "pixel_values": torch.zeros(9, 3)})  # image patches, not examples
    assert not schedule.can_cut({**batch, "texts": ["a", "b", "c", "d"]})


def test_batches_that_cannot_be_cut_are_counted_whole():
    """A value that does not follow the examples (here position ids shared by the batch) keeps batches whole: the
    estimate is still a whole batch's, and no micro-batch is planned."""
    model, names = wrap(tiny_llama()), list(_names())
    data = [{**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
            for batch in batches(examples(8), 4)]
    layers = list(adapter.find_adapted_weights(model, "default")[0])
    _, estimate = adapter._probe_batches(model, data, layers, CFG, None, measure=True)
    longest = max(data, key=lambda batch: batch["input_ids"].shape[1])
    assert not estimate.cuttable and estimate.most_examples == 4
    assert estimate.bytes() >= probe_batch(model.get_base_model(), longest, names, CFG).activation_bytes * 0.99
    plan = schedule.plan_micro_batches(lambda activation_bytes: schedule.PassPlan([["a"]], [1], 0, 1, "automatic"),
                                       estimate, passes=2)
    assert plan is None


def test_activations_that_leave_no_room_are_reported(monkeypatch):
    data = batches(examples(4), 2)
    free = int(_measured_activations(wrap(tiny_llama()), data) / schedule.FILL_SHARE)
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: free)
    with pytest.warns(UserWarning, match="Pass smaller batches"):
        initialize_lora_da(wrap(tiny_llama()), data, CFG)


def test_measured_activations_let_one_pass_hold_more_than_the_share(monkeypatch):
    """Free memory where the share left to unknown activations needs several passes, but the measured
    activations of batches of one example leave room for every layer's statistics in one pass."""
    data = batches(examples(6), 1)
    reference = wrap(tiny_llama())
    initialize_lora_da(reference, data, CFG)
    model = wrap(tiny_llama())
    chunked = _grouped_bytes(input_chunk=True)
    activations = _measured_activations(model, data)
    free = int((chunked + activations + 1000) / schedule.FILL_SHARE) + 1
    assert schedule.STATISTICS_SHARE * free < chunked
    monkeypatch.setattr(adapter, "solve_working_bytes", lambda *shape: 1000)
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: free)
    report = initialize_lora_da(model, data, CFG)
    assert report.passes == 1 and report.activation_bytes == activations
    assert_same(lora_state(model), lora_state(reference))


def test_z_without_chunks_when_that_saves_a_pass(monkeypatch, all_at_once, caplog):
    data = batches(examples(6), 3)
    model = wrap(tiny_llama())
    unchunked, activations = _grouped_bytes(input_chunk=False), _measured_activations(model, data)
    free = int((unchunked + activations + 1000) / schedule.FILL_SHARE) + 1
    assert unchunked < schedule.FILL_SHARE * free - activations < _grouped_bytes(input_chunk=True)
    monkeypatch.setattr(adapter, "solve_working_bytes", lambda *shape: 1000)
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: free)
    with caplog.at_level(logging.INFO, logger="lora_da"):
        report = initialize_lora_da(model, data, CFG)
    assert report.passes == 1 and report.statistics_bytes <= unchunked and report.activation_bytes == activations
    plan_line = next(r.message for r in caplog.records if "LoRA-DA plan" in r.message)
    assert "without float32 chunks" in plan_line and "MiB of activations measured" in plan_line
    assert_close_to_one_pass(lora_state(model), all_at_once[0])


def _grouped_sizes(input_chunk: bool = True) -> dict[str, int]:
    """Statistics bytes of the tiny_llama layers that read one input (q/k/v, o, gate/up, down), by the first."""
    model = tiny_llama()
    shapes = {name: layer_shape(model.get_submodule(name)) for name in _names()}
    shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # Llama's layers on one input
    rows: dict[str, int] = {}
    for name, (m, _) in shapes.items():
        parent, leaf = name.rsplit(".", 1)
        unit = f"{parent}.{shared.get(leaf, leaf)}"
        rows[unit] = rows.get(unit, 0) + m
    return {unit: statistics_bytes(m, shapes[unit][1], input_chunk=input_chunk) for unit, m in rows.items()}


def _grouped_bytes(input_chunk: bool) -> int:
    return sum(_grouped_sizes(input_chunk).values())


def _measured_activations(model, data, examples: int | None = None) -> int:
    """What the plan reads: the bytes kept for the backward of the batch with the longest examples, per example,
    for as many examples as the batch with the most (or `examples`)."""
    longest = max(data, key=lambda batch: batch["input_ids"].shape[1])
    kept = probe_batch(model.get_base_model(), longest, list(_names()), CFG).activation_bytes
    most = max(batch["input_ids"].shape[0] for batch in data)
    return int(kept / longest["input_ids"].shape[0] * min(examples or most, most))


def test_micro_batches_slice_every_tensor_of_the_batch():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(10).view(5, 2), "scale": 0.5,
             "bias": torch.zeros(3)}
    micro = schedule.MicroBatches([batch], 2)
    for _ in range(2):  # as often as the batches
        parts = list(micro)
        assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
        assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])
        assert all(p["scale"] == 0.5 and p["bias"] is batch["bias"] for p in parts)


def test_plan_micro_batches_takes_the_fewest_passes_with_the_most_examples(monkeypatch):
    estimate = schedule.ActivationEstimate(bytes_per_example=1000.0, longest_example=100, most_examples=8)
    assert estimate.bytes() == 8000 and estimate.bytes(3) == 3000 and estimate.bytes(20) == 8000

    def plan(activation_bytes: int) -> schedule.PassPlan:  # fewer passes, the fewer bytes left to activations
        passes = 1 if activation_bytes <= 4500 else 2 if activation_bytes <= 6500 else 3
        return schedule.PassPlan([["a"]] * passes, [1], 0, 10_000, "automatic", activation_bytes=activation_bytes)

    monkeypatch.setattr(schedule, "MIN_MICRO_BATCH_POSITIONS", 1)
    chosen = schedule.plan_micro_batches(plan, estimate, passes=3)
    assert chosen.micro_batch_examples == 4 and chosen.activation_bytes == 4000 and len(chosen.passes) == 1
    assert "micro-batches of at most 4 examples" in chosen.describe()
    monkeypatch.setattr(schedule, "MIN_MICRO_BATCH_POSITIONS", 500)  # at least 5 examples: 2 passes at best
    chosen = schedule.plan_micro_batches(plan, estimate, passes=3)
    assert chosen.micro_batch_examples == 6 and len(chosen.passes) == 2
    monkeypatch.setattr(schedule, "MIN_MICRO_BATCH_POSITIONS", 700)  # 7 examples: no fewer passes than 8
    assert schedule.plan_micro_batches(plan, estimate, passes=3) is None


def test_one_pass_in_micro_batches_where_whole_batches_leave_too_little(monkeypatch, caplog):
    """Free memory where the statistics fit one pass beside the activations of 3 examples but not of a whole
    batch of 6: the batches are passed in micro-batches of 3, and the factors are those of whole batches."""
    data = batches(examples(12), 6)
    reference = wrap(tiny_llama())
    initialize_lora_da(reference, data, CFG)
    model = wrap(tiny_llama())
    free = int((_grouped_bytes(input_chunk=True) + _measured_activations(model, data, 3) + 1000)
               / schedule.FILL_SHARE) + 1
    whole_batches = schedule.FILL_SHARE * free - _measured_activations(model, data)
    assert whole_batches < _grouped_bytes(input_chunk=False)
    monkeypatch.setattr(schedule, "MIN_MICRO_BATCH_POSITIONS", 1)
    monkeypatch.setattr(adapter, "solve_working_bytes", lambda *shape: 1000)
    readings = []
    monkeypatch.setattr(schedule, "free_memory_bytes", lambda device: readings.append(device) or free)
    with caplog.at_level(logging.INFO, logger="lora_da"):
        report = initialize_lora_da(model, data, CFG)
    assert report.passes == 1 and report.num_examples == 12 and report.micro_batch_examples == 3
    assert len(readings) == 2  # before and after the probe, not once per micro-batch size tried
    plan_line = next(r.message for r in caplog.records if "LoRA-DA plan" in r.message)
    assert "micro-batches of at most 3 examples" in plan_line
    assert_close_to_one_pass(lora_state(model), lora_state(reference))


def test_free_memory_is_read_from_the_machine():
    assert 0 < schedule.free_memory_bytes(torch.device("cpu")) < 2**50


def test_several_passes_need_reiterable_batches():
    model = wrap(tiny_llama())
    before = lora_state(model)
    with pytest.raises(LoraDAError, match="one-shot iterator"):
        initialize_lora_da(model, iter(batches(examples(4), 2)), CFG, layers_per_pass=2)
    after = lora_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_over_budget_gets_its_own_pass():
    with pytest.warns(UserWarning, match="exceed memory_budget"):
        report = initialize_lora_da(wrap(tiny_llama()), batches(examples(2), 2), CFG, memory_budget=10)
    assert report.passes == 8  # layers reading one input stay together: q/k/v, o, gate/up, down of 2 blocks


def test_layers_reading_one_input_are_planned_with_one_z(all_at_once):
    """Before any forward each layer is counted with a Z of its own; a forward of the first batch finds the
    inputs that q/k/v and gate/up share, and the plan counts each Z once: fewer passes for the same budget; fewer
    still with Z summed without float32 chunks."""
    grouped, unchunked = _grouped_sizes(), _grouped_sizes(input_chunk=False)
    budget = max(grouped.values())
    per_layer = estimate_statistics_bytes(tiny_llama(), list(_names()))
    model = wrap(tiny_llama())
    report = initialize_lora_da(model, batches(examples(6), 3), CFG, memory_budget=budget)
    assert report.passes == len(plan_passes(unchunked, memory_budget=budget))
    assert report.passes < len(plan_passes(grouped, memory_budget=budget)) < len(plan_passes(per_layer,
                                                                                              memory_budget=budget))
    assert report.statistics_bytes <= report.statistics_bytes_estimate <= budget
    assert_close_to_one_pass(lora_state(model), all_at_once[0])


def test_plan_passes():
    sizes = {"a": 4, "b": 4, "c": 8, "d": 1}
    assert plan_passes(sizes) == [["a", "b", "c", "d"]]
    assert plan_passes(sizes, layers_per_pass=3) == [["a", "b", "c"], ["d"]]
    assert plan_passes(sizes, memory_budget=8) == [["a", "b"], ["c"], ["d"]]
    assert plan_passes(sizes, layers_per_pass=1, memory_budget=100) == [["a"], ["b"], ["c"], ["d"]]
    for bad in ({"layers_per_pass": 0}, {"layers_per_pass": 1.5}, {"memory_budget": 0}):
        with pytest.raises(LoraDAError):
            plan_passes(sizes, **bad)


def _names():
    from lora_da.layers import target_layer_names

    return target_layer_names(tiny_llama())


def test_an_example_s_positions_count_the_decoder_s_for_encoder_decoder_models():
    """The probe measures the batch whose examples have the most positions: a seq2seq model's decoder positions
    (`decoder_input_ids`, else `labels`) count with its encoder's; a causal LM's labels repeat its inputs."""
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 9, dtype=torch.long)}
    assert adapter._examples_and_length(batch, seq2seq=True) == (2, 14)
    assert adapter._examples_and_length({**batch, "decoder_input_ids": torch.ones(2, 3)}, seq2seq=True) == (2, 8)
    assert adapter._examples_and_length(batch) == (2, 5)


def test_of_batches_of_one_length_the_probe_measures_the_most_supervised(monkeypatch):
    """Padded to one length, batches differ in how many positions the statistics pass projects onto the
    vocabulary: the probe measures the batch with the most supervised positions."""
    dense = batches(examples(2), 2)[0]
    sparse = {**dense, "labels": dense["labels"].clone()}
    sparse["labels"][:, 1:] = -100
    probed = []
    monkeypatch.setattr(adapter, "probe_batch",
                        lambda model, batch, *rest: probed.append(batch) or probe_batch(model, batch, *rest))
    model = wrap(tiny_llama())
    layers = list(adapter.find_adapted_weights(model, "default")[0])
    adapter._probe_batches(model, [sparse, dense], layers, CFG, None, measure=True)
    assert len(probed) == 1 and probed[0] is dense
