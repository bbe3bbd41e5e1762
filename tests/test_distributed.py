"""Two gloo processes on the tiny model give the single-process factors and statistics on every rank."""

import dataclasses
import os
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from _ranks import recording_failure, run_ranks, save_results_and_finish
from _tiny import assert_factors_match, batches, collate, examples, lora_state, relative_error, tiny_llama, wrap
from transformers import TrainerState

from lora_da import LoraDAConfig, LoraDAError, LoraDAStatistics, collect_statistics, initialize_lora_da
from lora_da.cache import compute_and_save_statistics
from lora_da.distributed import shard_batches
from lora_da.integrations import LoraDACallback
from lora_da.schedule import assign_groups, plan_memory

CFG = LoraDAConfig(population_size=1000, show_progress=False)
WORLD = 2
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
          "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
# The tiny model's statistics (194 kB with each input's Z counted once, 151 kB without Z's float32 chunks) and
# the largest solve after them (172 kB) then need 2 passes in one process (85% of the free memory leaves 142 kB),
# but 1 pass sharded over 2 ranks.
FAKE_FREE_BYTES = 370_000
# With a 1000-byte solve and the first batch's activations measured at this (up to 225 kB for the largest batch):
# all statistics (151 kB with Z summed straight into float64) do not fit one pass beside them, but G and y (65 kB)
# do, and then Z too without the activations.
FAKE_ACTIVATION_BYTES = 180_000
# The batch with the longest examples (2 of them) measured at this: 200 kB an example. With the free memory below,
# all statistics (194 kB) fit one pass beside one example's activations, not beside two examples', even without
# Z's chunks (151 kB).
MICRO_ACTIVATION_BYTES = 400_000
MICRO_FREE_BYTES = int((194_048 + 260_000 + 1000) / 0.85)


def measuring_activations_as(module, activation_bytes: int):
    """`module.probe_batch` (the adapter's) reporting `activation_bytes` as the batch's activations."""
    probe = module.probe_batch
    return lambda *args, **kwargs: dataclasses.replace(probe(*args, **kwargs), activation_bytes=activation_bytes)


def sharded_data() -> list[dict]:
    """5 batches; the fourth has no supervised token."""
    data = batches(examples(7), 2)
    unlabeled = dict(data[0], labels=torch.full_like(data[0]["labels"], -100))
    return [*data[:3], unlabeled, data[3]]


def apart_data() -> list[dict]:
    """3 batches, then one with no supervised token."""
    data = batches(examples(5), 2)
    return [*data, dict(data[0], labels=torch.full_like(data[0]["labels"], -100))]


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: every scenario in a row (one process group start-up for all of them)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from lora_da.distributed import local_config

    torch.set_num_threads(1)  # forked from a process that used OpenMP; also 2 ranks on 2 cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with recording_failure(out, rank):
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
        results = {"progress": local_config(LoraDAConfig(population_size=10)).show_progress}
        # A DDP-wrapped PEFT model; the library shards the batches (rank 0: 0, 2; rank 1: 1, 3).
        model = wrap(tiny_llama())
        report = initialize_lora_da(DistributedDataParallel(model), batches(examples(8), 2), CFG, shard=True)
        results["ddp"], results["ddp_report"] = lora_state(model), report.to_dict()
        # The user shards (rank 1 gets nothing) and memory is bounded to 3 layers per pass.
        model = wrap(tiny_llama())
        data = batches(examples(5), 2) if rank == 0 else []
        report = initialize_lora_da(model, data, CFG, layers_per_pass=3)
        results["empty_rank"], results["empty_rank_passes"] = lora_state(model), report.passes
        # Every rank passes all batches (no sharding): same statistics, and a warning on rank 0 only.
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = wrap(tiny_llama())
            initialize_lora_da(model, batches(examples(8), 2), CFG)
        results["unsharded"] = lora_state(model)
        results["warnings"] = [str(w.message) for w in caught if "same calibration batches" in str(w.message)]
        # FSDP2: every decoder layer and the root sharded; factors written into the DTensor LoRA weights.
        model = wrap(tiny_llama())
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        # a budget of several passes: the forward that finds the shared inputs runs on the sharded model too
        report = initialize_lora_da(model, batches(examples(8), 2), CFG, shard=True, memory_budget=100_000)
        results["fsdp2_passes"] = report.passes
        results["fsdp2"] = {k: v.full_tensor().clone() for k, v in model.state_dict().items() if "lora_" in k}
        results["fsdp2_sharded"] = all(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_" in n)
        # The Trainer callback on an FSDP2 model (the Trainer's FSDP2 needs an accelerator, so it is called directly).
        model = wrap(tiny_llama())
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        args = SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, deepspeed=None,
                               per_device_train_batch_size=2, output_dir=None)
        loader = torch.utils.data.DataLoader(examples(8), batch_size=2, collate_fn=collate)
        callback = LoraDACallback(num_samples=8, config={"show_progress": False})
        callback.on_train_begin(args, TrainerState(), None, model=model, train_dataloader=loader)
        results["callback_fsdp2"] = {k: v.full_tensor().clone() for k, v in model.state_dict().items() if "lora_" in k}
        # Sharded statistics: rank 0 gets batches 0, 2, 4, rank 1 gets 1 and 3, which has no supervised token: rank 1
        # joins the reductions of steps 2 and 3 with nothing of its own.
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, sharded_data(), CFG, shard=True, shard_statistics=True)
        results["sharded"], results["sharded_report"] = lora_state(model), report.to_dict()
        stats = collect_statistics(tiny_llama(), shard_batches(sharded_data()), LAYERS, CFG, shard_statistics=True)
        results["sharded_stats"] = {
            "owners": stats.owners, "examples": stats.num_examples, "hash": stats.metadata["data_hash"],
            "layers": {name: [stats.gradient(name), stats.input_factor(name), stats.output_factor(name)]
                       for name in stats.layer_names},
        }
        try:
            stats.save(os.path.join(out, f"sharded{rank}.safetensors"))
        except LoraDAError as exc:
            results["sharded_save"] = str(exc)
        # FSDP2 with sharded statistics.
        model = wrap(tiny_llama())
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        initialize_lora_da(model, batches(examples(8), 2), CFG, shard=True, shard_statistics=True)
        results["fsdp2_sharded_stats"] = {k: v.full_tensor().clone() for k, v in model.state_dict().items()
                                          if "lora_" in k}
        # Sharded statistics over several passes (4 layers each).
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, batches(examples(8), 2), CFG, shard=True, shard_statistics=True,
                                    layers_per_pass=4)
        results["sharded_passes"], results["sharded_passes_count"] = lora_state(model), report.passes
        # Automatic: the free memory (faked) holds less than all statistics in one pass, so they are sharded.
        import lora_da.schedule

        lora_da.schedule.free_memory_bytes = lambda device: FAKE_FREE_BYTES
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, batches(examples(8), 2), CFG, shard=True)
        results["auto_sharded"], results["auto_report"] = lora_state(model), report.to_dict()
        # Statistics all-reduced under the same free memory, with a small solve: G and y of every layer in one
        # forward+backward, then Z in a forward; asked for, and where rank 1's one batch has no supervised token.
        import lora_da.adapter

        solve_bytes, lora_da.adapter.solve_working_bytes = lora_da.adapter.solve_working_bytes, lambda *shape: 1000
        probe, lora_da.adapter.probe_batch = (lora_da.adapter.probe_batch,
                                              measuring_activations_as(lora_da.adapter, FAKE_ACTIVATION_BYTES))
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, batches(examples(8), 2), CFG, shard=True, shard_statistics=False)
        results["apart"], results["apart_report"] = lora_state(model), report.to_dict()
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, apart_data()[:3] if rank == 0 else apart_data()[3:], CFG,
                                    shard_statistics=False)
        results["apart_unsupervised"], results["apart_unsupervised_report"] = lora_state(model), report.to_dict()
        # All-reduced, where every layer's statistics fit one pass beside the activations of one example but not of
        # a batch of two: micro-batches of one example.
        lora_da.adapter.probe_batch = measuring_activations_as(lora_da.adapter, MICRO_ACTIVATION_BYTES)
        lora_da.schedule.free_memory_bytes = lambda device: MICRO_FREE_BYTES
        min_positions, lora_da.schedule.MIN_MICRO_BATCH_POSITIONS = lora_da.schedule.MIN_MICRO_BATCH_POSITIONS, 1
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, batches(examples(8), 2), CFG, shard=True, shard_statistics=False)
        results["micro"], results["micro_report"] = lora_state(model), report.to_dict()
        lora_da.schedule.free_memory_bytes = lambda device: FAKE_FREE_BYTES
        lora_da.schedule.MIN_MICRO_BATCH_POSITIONS = min_positions
        lora_da.adapter.solve_working_bytes, lora_da.adapter.probe_batch = solve_bytes, probe
        # Asked for, with no batch on rank 1: one clear error on both ranks.
        try:
            initialize_lora_da(wrap(tiny_llama()), batches(examples(2), 2) if rank == 0 else [], CFG,
                               shard_statistics=True)
            results["sharded_empty_rank"] = None
        except LoraDAError as exc:
            results["sharded_empty_rank"] = str(exc)
        # Cache written by rank 0 only, from both ranks' shards.
        compute_and_save_statistics(tiny_llama(), batches(examples(8), 2), os.path.join(out, "stats.safetensors"),
                                    CFG, shard=True)
        # A failure on one rank reaches every rank instead of hanging the other.
        def loss_fn(outputs, batch):
            raise RuntimeError("boom on rank 1") if rank == 1 else NotImplementedError
        try:
            collect_statistics(tiny_llama(), batches(examples(2), 2), ["model.layers.0.mlp.up_proj"], CFG,
                               loss_fn=loss_fn if rank == 1 else None)
            results["error"] = None
        except Exception as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
        save_results_and_finish(out, rank, results)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the scenarios on 2 forked gloo ranks; their results, rank 0 first, and the output folder."""
    out = tmp_path_factory.mktemp("dist")
    return run_ranks(_worker, out, WORLD, timeout=240), out


class TestTwoRanks:
    def test_ddp_sharded_factors_equal_single_process(self, ranks):
        results, _ = ranks
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(8), 2), CFG)
        assert_factors_match([r["ddp"] for r in results], lora_state(model))
        report = results[0]["ddp_report"]
        assert report["world_size"] == 2 and report["num_examples"] == 8
        assert results[1]["ddp_report"]["layers"].keys() == report["layers"].keys()

    def test_fsdp2_sharded_factors_equal_single_process(self, ranks):
        results, _ = ranks
        assert all(r["fsdp2_sharded"] for r in results)
        assert all(r["fsdp2_passes"] > 1 for r in results)
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(8), 2), CFG)
        assert_factors_match([r["fsdp2"] for r in results], lora_state(model))

    def test_callback_on_fsdp2_model_equals_single_process(self, ranks):
        results, _ = ranks
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(8), 2), LoraDAConfig(population_size=8, show_progress=False))
        assert_factors_match([r["callback_fsdp2"] for r in results], lora_state(model))

    def test_unsharded_batches_give_the_same_factors_and_a_warning(self, ranks):
        results, _ = ranks
        assert_factors_match([r["unsharded"] for r in results], results[0]["ddp"])
        assert len(results[0]["warnings"]) == 1 and results[1]["warnings"] == []

    def test_empty_rank_and_layers_per_pass(self, ranks):
        results, _ = ranks
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(5), 2), CFG)
        assert_factors_match([r["empty_rank"] for r in results], lora_state(model))
        assert results[0]["empty_rank_passes"] == 5  # 14 layers, 3 per pass

    def test_cache_written_once_with_all_shards(self, ranks):
        _, out = ranks
        stats = LoraDAStatistics.load(out / "stats.safetensors")
        names = stats.layer_names
        single = collect_statistics(tiny_llama(), batches(examples(8), 2), names, CFG)
        assert stats.num_examples == single.num_examples == 8
        assert stats.input_groups == single.input_groups
        assert stats.metadata["data_hash"] == single.metadata["data_hash"]
        for name in names:
            for what in ("gradient", "input_factor", "output_factor"):
                assert relative_error(getattr(stats, what)(name), getattr(single, what)(name)) <= 1e-5
        assert [p.name for p in out.iterdir() if p.suffix == ".safetensors"] == ["stats.safetensors"]

    def test_failure_on_one_rank_raises_on_all(self, ranks):
        results, _ = ranks
        assert results[1]["error"] == "RuntimeError: boom on rank 1"
        assert results[0]["error"].startswith("LoraDAError: Rank 1 failed") and "boom" in results[0]["error"]

    def test_progress_only_on_rank_zero(self, ranks):
        results, _ = ranks
        assert [r["progress"] for r in results] == [True, False]


class TestShardedStatistics:
    def test_factors_equal_single_process_with_uneven_and_unsupervised_batches(self, ranks):
        results, _ = ranks
        model = wrap(tiny_llama())
        single = initialize_lora_da(model, sharded_data(), CFG)
        assert_factors_match([r["sharded"] for r in results], lora_state(model))
        reports = [r["sharded_report"] for r in results]
        assert all(r["statistics_sharded"] and r["num_examples"] == 7 for r in reports)
        assert reports[0]["num_tokens"] == reports[1]["num_tokens"] == single.num_tokens
        assert reports[0]["data_hash"] == single.data_hash
        # each rank held only its own layers: together about what one process holds, none of them all of it
        held = [r["statistics_bytes"] for r in reports]
        assert max(held) < single.statistics_bytes and sum(held) <= single.statistics_bytes * 1.01

    def test_each_layer_on_its_owner_only_equal_to_one_process(self, ranks):
        results, _ = ranks
        sharded = [r["sharded_stats"] for r in results]
        owners = sharded[0]["owners"]
        assert owners == sharded[1]["owners"] and set(owners) == set(LAYERS) and set(owners.values()) == {0, 1}
        for rank, stats in enumerate(sharded):
            assert set(stats["layers"]) == {name for name in LAYERS if owners[name] == rank}
        single = collect_statistics(tiny_llama(), sharded_data(), LAYERS, CFG)
        assert all(s["examples"] == single.num_examples == 7 for s in sharded)
        assert all(s["hash"] == single.metadata["data_hash"] for s in sharded)
        for stats in sharded:
            for name, (gradient, input_factor, output_factor) in stats["layers"].items():
                assert relative_error(gradient, single.gradient(name)) <= 1e-5, name
                assert relative_error(input_factor, single.input_factor(name)) <= 1e-6, name
                assert relative_error(output_factor, single.output_factor(name)) <= 1e-5, name
        assert all("sharded over ranks" in r["sharded_save"] for r in results)

    def test_fsdp2_model_with_sharded_statistics(self, ranks):
        results, _ = ranks
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(8), 2), CFG)
        assert_factors_match([r["fsdp2_sharded_stats"] for r in results], lora_state(model))

    def test_several_passes(self, ranks):
        results, _ = ranks
        assert results[0]["sharded_passes_count"] == 4  # 14 layers, 4 per pass
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(8), 2), CFG)
        assert_factors_match([r["sharded_passes"] for r in results], lora_state(model))

    def test_sharded_automatically_when_one_pass_does_not_fit(self, ranks):
        results, _ = ranks
        reports = [r["auto_report"] for r in results]
        assert all(r["statistics_sharded"] and r["passes"] == 1 for r in reports)
        model = wrap(tiny_llama())
        initialize_lora_da(model, batches(examples(8), 2), CFG)
        assert_factors_match([r["auto_sharded"] for r in results], lora_state(model))

    def test_statistics_all_reduced_with_inputs_apart(self, ranks, monkeypatch):
        results, _ = ranks
        import lora_da.adapter
        import lora_da.schedule

        every_layer_at_once = initialize_lora_da(wrap(tiny_llama()), batches(examples(8), 2), CFG).statistics_bytes
        monkeypatch.setattr(lora_da.adapter, "solve_working_bytes", lambda *shape: 1000)
        monkeypatch.setattr(lora_da.schedule, "free_memory_bytes", lambda device: FAKE_FREE_BYTES)
        monkeypatch.setattr(lora_da.adapter, "probe_batch", measuring_activations_as(lora_da.adapter,
                                                                                      FAKE_ACTIVATION_BYTES))
        for key, data in (("apart", batches(examples(8), 2)), ("apart_unsupervised", apart_data())):
            reports = [r[f"{key}_report"] for r in results]
            # 2 passes over the data, each rank holding the statistics of every layer: G and y first, then Z
            assert all(r["passes"] == 2 and not r["statistics_sharded"] for r in reports), key
            assert all(r["statistics_bytes"] == every_layer_at_once for r in reports)
            model = wrap(tiny_llama())
            report = initialize_lora_da(model, data, CFG)
            assert report.passes == 2  # the same plan in one process
            assert reports[0]["data_hash"] == report.data_hash
            assert_factors_match([r[key] for r in results], lora_state(model))

    def test_micro_batches_when_a_whole_batch_leaves_too_little(self, ranks, monkeypatch):
        results, _ = ranks
        import lora_da.adapter
        import lora_da.schedule

        reports = [r["micro_report"] for r in results]
        assert all(r["passes"] == 1 and not r["statistics_sharded"] and r["micro_batch_examples"] == 1
                   for r in reports)
        monkeypatch.setattr(lora_da.adapter, "solve_working_bytes", lambda *shape: 1000)
        monkeypatch.setattr(lora_da.schedule, "free_memory_bytes", lambda device: MICRO_FREE_BYTES)
        monkeypatch.setattr(lora_da.schedule, "MIN_MICRO_BATCH_POSITIONS", 1)
        monkeypatch.setattr(lora_da.adapter, "probe_batch", measuring_activations_as(lora_da.adapter,
                                                                                      MICRO_ACTIVATION_BYTES))
        model = wrap(tiny_llama())
        report = initialize_lora_da(model, batches(examples(8), 2), CFG)
        assert report.passes == 1 and report.micro_batch_examples == 1
        assert report.activation_bytes == reports[0]["activation_bytes"]
        assert_factors_match([r["micro"] for r in results], lora_state(model))

    def test_a_rank_without_batch_is_refused_on_every_rank(self, ranks):
        results, _ = ranks
        assert "Rank 1 failed" in results[0]["sharded_empty_rank"]
        assert "every rank needs at least one" in results[1]["sharded_empty_rank"]


def test_sharded_plan_counts_bytes_per_rank():
    sizes = {f"layer{i}": 100 for i in range(8)}
    whole = plan_memory(sizes, {"layer0": 10}, torch.device("cpu"), memory_budget=400)
    sharded = plan_memory(sizes, {"layer0": 10}, torch.device("cpu"), memory_budget=400, shards=4)
    assert len(whole.passes) == 2 and len(sharded.passes) == 1
    assert sharded.pass_bytes == [200] and sharded.solve_bytes == 10 and "over 4 ranks" in sharded.describe()


def test_shard_batches_round_robin_and_reiterable():
    shard = shard_batches(range(7), rank=1, world_size=3)
    assert list(shard) == [1, 4] and list(shard) == [1, 4]
    with pytest.raises(LoraDAError, match="rank 3"):
        shard_batches(range(7), rank=3, world_size=3)


def test_assign_groups_balances_and_is_deterministic():
    costs = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0}
    owner = assign_groups(costs, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert assign_groups(costs, 2) == owner and set(assign_groups(costs, 1).values()) == {0}
