"""DeepSpeed ZeRO-2 and ZeRO-3 engines on 2 gloo ranks (CPU): LoRA-DA writes the factors into the (partitioned)
LoRA weights and into the optimizer's float32 master copies, which the next step starts from. Skipped where
deepspeed is not installed."""

import os
from types import SimpleNamespace

import pytest
import torch
from _ranks import recording_failure, run_ranks, save_results_and_finish
from _tiny import assert_factors_match, batches, collate, examples, lora_state, tiny_llama, wrap
from transformers import TrainerState

from lora_da import LoraDAConfig, initialize_lora_da
from lora_da.integrations import LoraDACallback

deepspeed = pytest.importorskip("deepspeed")

CFG = LoraDAConfig(population_size=1000, show_progress=False)
WORLD = 2


def _engine(stage: int):
    """A ZeRO engine around the tiny PEFT model; AdamW at lr 0, so that a step leaves the master copies."""
    model = wrap(tiny_llama())
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    return engine


def _lora_weights(engine) -> dict:
    """Full copies of the LoRA weights (ZeRO-3 partitions gathered)."""
    named = [(name, p) for name, p in engine.module.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {name: p.detach().clone() for name, p in named}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    with recording_failure(out, rank):
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        results = {}
        for stage in (2, 3):
            engine = _engine(stage)
            initialize_lora_da(engine, batches(examples(8), 2), CFG, shard=True)
            results[f"zero{stage}"] = _lora_weights(engine)
            batch = batches(examples(2), 2)[0]
            engine.backward(engine(**batch).loss)
            engine.step()
            results[f"zero{stage}_after_step"] = _lora_weights(engine)
        engine = _engine(3)
        args = SimpleNamespace(fsdp=None, fsdp_config={}, deepspeed={"zero_optimization": {"stage": 3}},
                               per_device_train_batch_size=2, output_dir=None)
        loader = torch.utils.data.DataLoader(examples(8), batch_size=2, collate_fn=collate)
        callback = LoraDACallback(num_samples=8, config={"show_progress": False})
        callback.on_train_begin(args, TrainerState(), None, model=engine.module, train_dataloader=loader)
        results["callback_zero3"] = _lora_weights(engine)
        save_results_and_finish(out, rank, results)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("deepspeed"), WORLD, timeout=300)


@pytest.fixture(scope="module")
def single_process():
    model = wrap(tiny_llama())
    initialize_lora_da(model, batches(examples(8), 2), CFG)
    return lora_state(model)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engine_gets_the_single_process_factors(ranks, single_process, stage):
    assert_factors_match([r[f"zero{stage}"] for r in ranks], single_process)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_optimizer_steps_from_the_new_factors(ranks, single_process, stage):
    # at lr 0 a step sets the weights to the optimizer's float32 master copies: stale copies would undo the init
    assert_factors_match([r[f"zero{stage}_after_step"] for r in ranks], single_process)


def test_callback_on_zero3_model(ranks):
    model = wrap(tiny_llama())
    initialize_lora_da(model, batches(examples(8), 2), LoraDAConfig(population_size=8, show_progress=False))
    assert_factors_match([r["callback_zero3"] for r in ranks], lora_state(model))
