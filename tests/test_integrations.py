"""LoraDACallback with transformers.Trainer and TRL's SFTTrainer; initializing one of several adapters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _archs import build, calibration, update
from _ranks import free_port
from _tiny import factor_tolerance, relative_error
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from lora_da import LoraDAConfig, LoraDAError, initialize_lora_da
from lora_da.integrations import REPORT_FILE, LoraDACallback, first_batches

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
PAIRS = [(f"say {c}{i % 3}", f" {c * (2 + i % 3)} ok") for i, c in enumerate("abcdefghijklmnop")]


def encode(tokenizer, prompt, completion):
    """input_ids of prompt + completion; labels -100 on the prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}


class Probe(TrainerCallback):
    """Copies the adapter's weights when step 1 begins and counts optimizer steps."""

    def __init__(self):
        self.at_first_step = None
        self.steps = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.at_first_step = update(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def training_args(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


@pytest.fixture
def features(tiny_tokenizer):
    return [encode(tiny_tokenizer, p, c) for p, c in PAIRS]


class TestTrainerCallback:
    def run(self, tmp_path, model, tokenizer, features, callback, **overrides):
        probe = Probe()
        trainer = Trainer(
            model=model, args=training_args(tmp_path, **overrides), train_dataset=features,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[callback, probe],
        )
        trainer.train()
        return trainer, probe

    def test_initializes_before_first_step(self, tmp_path, tiny_model_and_tokenizer, tiny_model_dir, features):
        model, tokenizer = tiny_model_and_tokenizer
        model = get_peft_model(model, LoraConfig(**LORA))
        callback = LoraDACallback(num_samples=8, batch_size=3)
        trainer, probe = self.run(tmp_path, model, tokenizer, features, callback)

        assert probe.steps == 3 and trainer.state.global_step == 3
        report = callback.report
        assert report is not None and len(report.layers) == 14 and report.num_examples == 8
        assert report.config["population_size"] == len(features)  # the default: the whole training set
        saved = json.loads((tmp_path / REPORT_FILE).read_text())
        assert saved["layers"].keys() == report.layers.keys()

        # At step 1 the adapter holds exactly what initialize_lora_da gives on the first 8 collated examples.
        from conftest import load_tiny

        reference = get_peft_model(load_tiny(tiny_model_dir)[0], LoraConfig(**LORA))
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
        batches = [collate(features[i : i + 3]) for i in (0, 3, 6)]
        batches[-1] = collate(features[6:8])
        initialize_lora_da(reference, batches, LoraDAConfig(population_size=len(features), show_progress=False))
        expected = update(reference)
        assert probe.at_first_step.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.count_nonzero(probe.at_first_step[name]) > 0
            torch.testing.assert_close(probe.at_first_step[name], value, rtol=1e-5, atol=1e-7)
        trained = update(model)
        assert any(not torch.allclose(trained[n], v) for n, v in expected.items())  # training moved it
        assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)

    def test_config_dict_overrides_and_explicit_config(self, tmp_path, tiny_model_and_tokenizer, features):
        model, tokenizer = tiny_model_and_tokenizer
        model = get_peft_model(model, LoraConfig(**LORA))
        callback = LoraDACallback(num_samples=4, config={"variance_weight": 0.1, "gamma": 64.0})
        self.run(tmp_path, model, tokenizer, features, callback, max_steps=1)
        assert callback.report.config["gamma"] == 64.0 and callback.report.config["population_size"] == 16
        explicit = LoraDAConfig(population_size=5000, show_progress=False)
        assert LoraDACallback(config=explicit).resolve_config(features) is explicit

    def test_not_a_peft_model_is_refused(self, tmp_path, tiny_model_and_tokenizer, features):
        model, tokenizer = tiny_model_and_tokenizer
        with pytest.raises(LoraDAError, match="peft.PeftModel"):
            self.run(tmp_path, model, tokenizer, features, LoraDACallback(num_samples=4))

    def test_resumed_run_keeps_the_checkpoint_adapter(self, features, tiny_tokenizer):
        from transformers import TrainerControl, TrainerState

        model = get_peft_model(build("llama"), LoraConfig(**LORA))
        before = update(model)
        state = TrainerState()
        state.global_step = 5
        callback = LoraDACallback(num_samples=4)
        loader = torch.utils.data.DataLoader(features, collate_fn=DataCollatorForSeq2Seq(tiny_tokenizer))
        callback.on_train_begin(training_args("unused"), state, TrainerControl(), model=model,
                                train_dataloader=loader)
        assert callback.report is None
        after = update(model)
        assert all(torch.equal(after[n], v) for n, v in before.items())

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(num_samples=0), "num_samples"),
            (dict(batch_size=0), "batch_size"),
            (dict(config={"gama": 1.0}), "gama"),
            (dict(config=3), "LoraDAConfig"),
            (dict(config={"gamma": -1.0}), "gamma"),
        ],
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(LoraDAError, match=message):
            LoraDACallback(**kwargs)

    def test_fsdp1_is_refused(self, features, tiny_tokenizer):
        from types import SimpleNamespace

        from transformers import TrainerState

        model = get_peft_model(build("llama"), LoraConfig(**LORA))
        args = SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 1}, deepspeed=None,
                               per_device_train_batch_size=2, output_dir=None)
        loader = torch.utils.data.DataLoader(features, collate_fn=DataCollatorForSeq2Seq(tiny_tokenizer))
        with pytest.raises(LoraDAError, match="FSDP1"):
            LoraDACallback().on_train_begin(args, TrainerState(), None, model=model, train_dataloader=loader)

    def test_iterable_dataset_needs_population_size(self, features):
        stream = iter(features)
        with pytest.raises(LoraDAError, match="population_size"):
            LoraDACallback().resolve_config(stream)
        assert LoraDACallback(config={"population_size": 99}).resolve_config(stream).population_size == 99
        assert LoraDACallback(config={"variance_weight": 0.0}).resolve_config(stream).population_size is None

    def test_calibration_batches_take_the_first_examples_in_order(self, features, tiny_tokenizer):
        collate = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True)
        from_list = list(first_batches(features, collate, 7, 3))
        from_stream = list(first_batches(iter(features), collate, 7, 3))
        assert [b["input_ids"].shape[0] for b in from_list] == [3, 3, 1]
        for one, two in zip(from_list, from_stream, strict=True):
            assert torch.equal(one["input_ids"], two["input_ids"]) and torch.equal(one["labels"], two["labels"])
        assert torch.equal(from_list[0]["input_ids"], collate(features[:3])["input_ids"])
        with pytest.raises(LoraDAError, match="empty"):
            list(first_batches([], collate, 7, 3))


def test_sft_trainer(tmp_path, tiny_model_and_tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = tiny_model_and_tokenizer
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS])
    callback, probe = LoraDACallback(num_samples=8), Probe()
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, max_length=64,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(**LORA), callbacks=[callback, probe],
    )
    assert isinstance(trainer.model, PeftModel)
    trainer.train()

    assert probe.steps == 3
    assert callback.report is not None and len(callback.report.layers) == 14
    assert callback.report.num_examples == 8 and callback.report.config["population_size"] == len(PAIRS)
    assert all(torch.count_nonzero(v) > 0 for v in probe.at_first_step.values())


class TestMultipleAdapters:
    def model_with_three_adapters(self):
        model = get_peft_model(build("gpt2-conv1d"), LoraConfig(**LORA, init_lora_weights=False))  # non-zero B
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
        model.add_adapter("third", LoraConfig(**LORA, init_lora_weights=False))
        return model

    def test_initializing_a_non_active_adapter_leaves_the_others(self):
        model = self.model_with_three_adapters()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        report = initialize_lora_da(model, calibration("gpt2-conv1d"), LoraDAConfig(population_size=100,
                                                                                    show_progress=False),
                                    adapter_name="second")

        assert len(report.layers) == 4 and model.active_adapter == "default"
        after = model.state_dict()
        changed = {k for k, v in weights.items() if not torch.equal(after[k], v)}
        assert changed and all(".second." in k for k in changed)
        # The statistics are the base model's: the other adapters' (non-zero) weights do not enter them.
        alone = get_peft_model(build("gpt2-conv1d"), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
        initialize_lora_da(alone, calibration("gpt2-conv1d"), LoraDAConfig(population_size=100, show_progress=False))
        expected = {k.replace(".default", ""): v for k, v in update(alone).items()}
        got = {k.replace(".second", ""): v for k, v in update(model, "second").items()}
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)

    def test_callback_initializes_the_named_adapter(self, tmp_path, tiny_tokenizer):
        model = self.model_with_three_adapters()
        batch = calibration("gpt2-conv1d", count=1, batch_size=8)[0]  # ids within the tiny GPT-2's vocabulary
        features = [
            {"input_ids": ids.tolist(), "labels": labels.tolist()}
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
        ]
        default_before, third_before = update(model, "default"), update(model, "third")
        callback = LoraDACallback(num_samples=4, adapter_name="third")
        Trainer(
            model=model, args=training_args(tmp_path, max_steps=1, learning_rate=0.0), train_dataset=features,
            data_collator=DataCollatorForSeq2Seq(tiny_tokenizer, padding=True), callbacks=[callback],
        ).train()
        assert callback.report is not None and len(callback.report.layers) == 8
        default_after, third_after = update(model, "default"), update(model, "third")
        assert all(torch.equal(default_after[n], v) for n, v in default_before.items())
        assert all(not torch.equal(third_after[n], v) for n, v in third_before.items())


_RANK_SCRIPT = '''
import json, os, sys
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
sys.path.insert(0, {tests!r})
from conftest import build_tiny_model, build_tiny_tokenizer
from lora_da.integrations import LoraDACallback

tokenizer = build_tiny_tokenizer()
features = [{{"input_ids": [5 + (i * 7 + j) % 90 for j in range(6 + i % 5)], "labels": [-100] * 3
             + [5 + (i * 7 + j) % 90 for j in range(3, 6 + i % 5)]}} for i in range(16)]
model = get_peft_model(build_tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
args = TrainingArguments(output_dir={out!r}, max_steps=1, per_device_train_batch_size=2, learning_rate=0.0,
                         report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
callback = LoraDACallback(num_samples=8)
trainer = Trainer(model=model, args=args, train_dataset=features,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[callback])
trainer.train()
lora = {{k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}}
state = {{k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous() for k, v in lora.items()}}
name = "rank%s-of-%s" % (os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1"))
save_file(state, os.path.join({out!r}, name + ".safetensors"))
with open(os.path.join({out!r}, name + ".json"), "w") as handle:
    json.dump({{"distributed_type": str(trainer.accelerator.distributed_type),
               "sharded": any(isinstance(v, DTensor) for v in lora.values())}}, handle)
assert callback.report.num_examples == 8, callback.report.num_examples
'''


@pytest.fixture(scope="module")
def rank_script(tmp_path_factory):
    """The Trainer script above, written to a folder, and the adapter it gives in one plain process."""
    out = tmp_path_factory.mktemp("launch")
    script = out / "run.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    subprocess.run([sys.executable, str(script)], check=True, env=_launch_env(), timeout=600)
    return script, load_file(out / "rank0-of-1.safetensors")


def _launch_env() -> dict:
    """This environment without the variables of an enclosing launcher, on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _two_ranks_match(script: Path, single: dict, launcher: list[str]) -> list[dict]:
    """Run the script on 2 ranks under `launcher`: both ranks' adapters are identical and equal the single-process
    one. Returns what each rank reported."""
    out = script.parent
    for old in out.glob("rank*-of-2.*"):
        old.unlink()
    subprocess.run([*launcher, str(script)], check=True, env=_launch_env(), timeout=600)
    rank0, rank1 = load_file(out / "rank0-of-2.safetensors"), load_file(out / "rank1-of-2.safetensors")
    assert single.keys() == rank0.keys() == rank1.keys()
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key
        assert relative_error(rank0[key], value) <= factor_tolerance(key), key
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in single.items())
    return [json.loads((out / f"rank{rank}-of-2.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(rank_script):
    """Under torchrun every rank ends with the same adapter, equal to a single-process run's."""
    script, single = rank_script
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    _two_ranks_match(script, single, torchrun)


def test_accelerate_launch_with_fsdp2_config_matches_one_process(rank_script):
    """`accelerate launch` with an FSDP2 config, 2 CPU processes: the same adapter on both ranks, equal to one
    process's. (accelerate 1.16 enables FSDP only on accelerators: on a CPU it wraps the Trainer's model in DDP
    instead, which each rank reports; a sharded model must still give the same factors.)"""
    script, single = rank_script
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    reported = _two_ranks_match(script, single, launch)
    assert reported[0] == reported[1]
    assert reported[0]["sharded"] == (reported[0]["distributed_type"] == "DistributedType.FSDP")
