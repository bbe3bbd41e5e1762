"""Statistics cache: manifest, round trip to identical factors, refusal of mismatches, atomic writes."""

import json
import multiprocessing
import os
import signal

import pytest
import torch
from _tiny import batches, examples, lora_state, tiny_gpt2, tiny_llama, wrap

from lora_da import LoraDAConfig, LoraDAError, LoraDAStatistics, initialize_lora_da
from lora_da.cache import compute_and_save_statistics, load_statistics, manifest_of
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
        assert len(manifest["config_hash"]) == 32 and manifest["weights"].keys() == manifest["layers"].keys()
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
        with pytest.raises(LoraDAError, match="another model.*the weights of layer"):
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
