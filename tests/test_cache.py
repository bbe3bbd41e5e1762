"""Statistics cache: manifest, round trip to identical factors, refusal of mismatches, atomic writes."""

import json
import multiprocessing
import os
import signal

import pytest
import torch
from _tiny import batches, examples, lora_state, tiny_gpt2, tiny_llama, wrap

from lora_da import LoraDAConfig, LoraDAError, LoraDAStatistics, initialize_lora_da
from lora_da.cache import compute_and_save_statistics, load_statistics, manifest_of, sample_indices
from lora_da.layers import target_layer_names

CFG = LoraDAConfig(population_size=1000, show_progress=False)


def save_stats(path, model=None, items=None, **kwargs):
    return compute_and_save_statistics(model or tiny_llama(), batches(items or examples(6), 3), path, CFG, **kwargs)


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "stats.safetensors"
    save_stats(path)
    return path


def no_forward(model):
    """Make any model pass fail: solving from a cache must not need one."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was run")
    model.base_model.model.forward = fail
    return model


class TestRoundTrip:
    def test_factors_identical_to_a_direct_init(self, cache):
        direct = wrap(tiny_llama())
        initialize_lora_da(direct, batches(examples(6), 3), CFG)
        cached = no_forward(wrap(tiny_llama()))
        report = initialize_lora_da(cached, None, CFG, statistics=cache)
        one, two = lora_state(direct), lora_state(cached)
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        assert report.num_examples == 6 and report.data_hash is not None

    def test_any_rank_gamma_beta_and_subset_of_layers(self, cache):
        cfg = LoraDAConfig(population_size=50, variance_weight=0.5, gamma=16.0, show_progress=False)
        direct = wrap(tiny_llama(), rank=2, target_modules=["q_proj", "down_proj"])
        initialize_lora_da(direct, batches(examples(6), 3), cfg)
        cached = no_forward(wrap(tiny_llama(), rank=2, target_modules=["q_proj", "down_proj"]))
        initialize_lora_da(cached, None, cfg, statistics=load_statistics(cache, cached, config=cfg))
        one, two = lora_state(direct), lora_state(cached)
        assert len(one) == 8 and all(torch.equal(one[k], two[k]) for k in one)

    def test_manifest(self, cache):
        stats = LoraDAStatistics.load(cache)
        manifest = manifest_of(stats)
        assert manifest["token_mask"] == "attention" and manifest["num_examples"] == 6
        assert manifest["data_hash"] == stats.metadata["data_hash"]
        assert manifest["layers"]["model.layers.1.mlp.down_proj"] == [32, 48]
        assert set(manifest["layers"]) == set(target_layer_names(tiny_llama()))
        assert len(manifest["config_hash"]) == 32
        assert {f"{name}.weight" for name in manifest["layers"]} < set(manifest["tensors"])
        json.dumps(manifest)

    def test_data_hash_ignores_batching_and_order_but_not_content(self, tmp_path):
        items = examples(6)
        first = save_stats(tmp_path / "a.safetensors", items=items).metadata["data_hash"]
        again = compute_and_save_statistics(tiny_llama(), batches(items[::-1], 4), tmp_path / "b.safetensors", CFG)
        other = save_stats(tmp_path / "c.safetensors", items=examples(6, seed=1)).metadata["data_hash"]
        assert again.metadata["data_hash"] == first != other

    def test_peft_model_targets_and_adapters_do_not_matter(self, tmp_path):
        model = wrap(tiny_llama(), target_modules=["v_proj"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        stats = save_stats(tmp_path / "s.safetensors", model=model)
        assert stats.layer_names == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
        bare = save_stats(tmp_path / "t.safetensors", target_modules="v_proj")
        assert all(torch.equal(stats.gradient_sums[k], bare.gradient_sums[k]) for k in stats.layer_names)


class TestRefused:
    def test_other_weights(self, cache):
        model = wrap(tiny_llama(seed=1))
        with pytest.raises(LoraDAError, match="another model.*the weights of"):
            initialize_lora_da(model, None, CFG, statistics=cache)

    def test_other_config(self, tmp_path, cache):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = tiny_llama().config.to_dict()
        config["rms_norm_eps"] = 1e-3  # same shapes, another function
        torch.manual_seed(0)
        model = wrap(LlamaForCausalLM(LlamaConfig.from_dict(config)))
        with pytest.raises(LoraDAError, match="configuration differs"):
            initialize_lora_da(model, None, CFG, statistics=cache)

    def test_other_architecture(self, cache):
        with pytest.raises(LoraDAError, match="do not cover layer"):
            initialize_lora_da(wrap(tiny_gpt2()), None, CFG, statistics=cache)

    def test_missing_layers(self, tmp_path):
        path = tmp_path / "q.safetensors"
        save_stats(path, target_modules=["q_proj"])
        with pytest.raises(LoraDAError, match="do not cover layer.*same --target-modules"):
            load_statistics(path, tiny_llama(), target_modules="all-linear")

    def test_other_token_mask(self, cache):
        cfg = LoraDAConfig(population_size=1000, token_mask="labels", show_progress=False)
        with pytest.raises(LoraDAError, match="token_mask='attention'"):
            initialize_lora_da(wrap(tiny_llama()), None, cfg, statistics=cache)

    def test_refusal_changes_nothing(self, cache):
        model = wrap(tiny_llama(seed=1))
        before = lora_state(model)
        with pytest.raises(LoraDAError):
            initialize_lora_da(model, None, CFG, statistics=cache)
        after = lora_state(model)
        assert all(torch.equal(before[k], after[k]) for k in before)

    def test_truncated_file(self, cache, tmp_path):
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
        with pytest.raises(LoraDAError, match="truncated or corrupt"):
            LoraDAStatistics.load(broken)

    def test_not_a_statistics_file(self, tmp_path):
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({"w": torch.zeros(2)}, path)
        with pytest.raises(LoraDAError, match="not a LoRA-DA statistics file"):
            LoraDAStatistics.load(path)


def _half_write_then_die(path: str) -> None:
    """Child: start overwriting `path` with new statistics, write half a file, then get SIGKILLed."""
    import lora_da.statistics

    torch.set_num_threads(1)
    real_save_file = lora_da.statistics.save_file

    def dying_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    lora_da.statistics.save_file = dying_save_file
    save_stats(path, items=examples(6, seed=1))


class TestAtomicWrite:
    def test_killed_writer_leaves_previous_cache_valid(self, cache):
        before = LoraDAStatistics.load(cache)
        child = multiprocessing.get_context("fork").Process(target=_half_write_then_die, args=(str(cache),))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == -signal.SIGKILL
        after = LoraDAStatistics.load(cache)
        assert after.metadata == before.metadata
        assert all(torch.equal(after.gradient_sums[k], v) for k, v in before.gradient_sums.items())
        leftovers = [p for p in cache.parent.iterdir() if p != cache]
        assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # never under the cache's name

    def test_failing_save_leaves_previous_cache_and_no_temp_file(self, cache, monkeypatch):
        import lora_da.statistics

        before = cache.read_bytes()
        real = lora_da.statistics.save_file

        def failing_save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            raise OSError("disk full")

        monkeypatch.setattr(lora_da.statistics, "save_file", failing_save_file)
        with pytest.raises(OSError, match="disk full"):
            save_stats(cache, items=examples(6, seed=1))
        assert cache.read_bytes() == before
        assert [p.name for p in cache.parent.iterdir()] == [cache.name]


class TestModelIdentity:
    """The manifest covers every tensor that shapes the forward pass, not only the target layers' first elements."""

    @pytest.mark.parametrize("numel", [1, 1024, 1025, 28_311_552, 2**31 + 7])
    def test_sample_indices_stay_inside_large_tensors(self, numel):
        indices = sample_indices(numel)
        assert indices[0] == 0 and indices[-1] == numel - 1 and len(indices) == min(numel, 1024)
        assert bool((indices[1:] > indices[:-1]).all())

    @pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                        "model.layers.0.input_layernorm.weight"])
    def test_a_changed_non_target_tensor_is_refused(self, cache, tensor):
        model = tiny_llama()
        with torch.no_grad():
            model.get_parameter(tensor).mul_(1.5)
        with pytest.raises(LoraDAError, match=f"another model.*the weights of '{tensor}' differ"):
            load_statistics(cache, wrap(model))

    def test_a_target_weight_changed_after_its_first_64_elements_is_refused(self, cache):
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.view(-1)[64:].add_(1e-2)
        with pytest.raises(LoraDAError, match="the weights of 'model.layers.1.mlp.down_proj.weight' differ"):
            load_statistics(cache, model)

    def test_a_bfloat16_copy_of_the_same_model_is_accepted(self, cache):
        load_statistics(cache, wrap(tiny_llama().to(torch.bfloat16)))

    def test_a_manifest_without_the_full_identity_is_refused(self, cache, tmp_path):
        stats = LoraDAStatistics.load(cache)
        manifest = manifest_of(stats)
        del manifest["identity_version"], manifest["tensors"]
        stats.metadata["lora_da_manifest"] = json.dumps(manifest)
        stats.save(tmp_path / "old.safetensors")
        with pytest.raises(LoraDAError, match="older lora-da"):
            load_statistics(tmp_path / "old.safetensors", tiny_llama())


class TestInvalidContentsRefusedOnLoad:
    """A file whose numbers cannot be statistics is refused when read, with a message that says so."""

    @pytest.mark.parametrize("part", ["gradient_sums", "output_sq_sums", "input_sums"])
    def test_non_finite_tensor(self, cache, tmp_path, part):
        stats = LoraDAStatistics.load(cache)
        tensors = getattr(stats, part)
        next(iter(tensors.values())).view(-1)[3] = float("nan")
        stats.save(tmp_path / "nan.safetensors")
        with pytest.raises(LoraDAError, match="is not finite"):
            LoraDAStatistics.load(tmp_path / "nan.safetensors")

    @pytest.mark.parametrize("count", ["num_examples", "output_token_counts", "input_token_counts"])
    def test_count_below_one(self, cache, tmp_path, count):
        stats = LoraDAStatistics.load(cache)
        if count == "num_examples":
            stats.num_examples = -2
        else:
            counts = getattr(stats, count)
            counts[next(iter(counts))] = -5
        stats.save(tmp_path / "negative.safetensors")
        with pytest.raises(LoraDAError, match="a positive count is needed"):
            LoraDAStatistics.load(tmp_path / "negative.safetensors")


def test_next_write_removes_the_temp_file_of_a_dead_writer_only(cache):
    """A SIGKILLed writer's full-size temp file goes at the next write into the folder; a live one's stays."""
    child = multiprocessing.get_context("fork").Process(target=_half_write_then_die, args=(str(cache),))
    child.start()
    child.join(timeout=120)
    dead = [p for p in cache.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(dead) == 1 and f"-{child.pid}-" in dead[0].name  # the writer's pid is in the name
    alive = dead[0].with_name(dead[0].name.replace(f"-{child.pid}-", f"-{os.getppid()}-"))
    alive.write_bytes(b"being written")
    save_stats(cache)
    assert not dead[0].exists() and alive.exists()
    assert sorted(p.name for p in cache.parent.iterdir()) == sorted([cache.name, alive.name])
