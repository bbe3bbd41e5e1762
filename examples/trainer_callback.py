"""Fine-tune with a LoRA-DA-initialized adapter from a stock `transformers.Trainer` (or TRL `SFTTrainer`).

The only LoRA-DA line is the callback: it runs on the first `--num-samples` training examples, collated by the
trainer's own collator, before the first optimizer step.

    python examples/trainer_callback.py                          # tiny random model, seconds on a CPU
    python examples/trainer_callback.py --model smollm2-135m     # the bundled SmolLM2-135M-Instruct GGUF
    python examples/trainer_callback.py --trl                    # the same with trl.SFTTrainer
    torchrun --nproc-per-node 2 examples/trainer_callback.py     # data parallel: same factors on every rank
"""

from __future__ import annotations

import argparse
import logging
import string

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from lora_da.data.arith import generate_arith
from lora_da.integrations import LoraDACallback


def tiny_model_and_tokenizer():
    """A random 2-layer Llama (hidden 64) and a character-level tokenizer, built locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [c for c in string.printable if c not in "\x0b\x0c\r"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config), tokenizer


def load(name: str):
    if name == "tiny":
        return tiny_model_and_tokenizer()
    from lora_da.models import load_model_and_tokenizer

    return load_model_and_tokenizer(name, dtype="float32", device="auto")


def prompt_completion_records(count: int) -> list[dict]:
    """Arithmetic word problems as prompt/completion pairs (the completion is the worked answer)."""
    return [
        {"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]}
        for r in generate_arith("train", count)
    ]


def encode(record: dict, tokenizer, max_length: int) -> dict:
    """input_ids of prompt + completion + eos; labels are -100 on the prompt (completion-only loss)."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": (prompt + completion)[:max_length],
        "labels": ([-100] * len(prompt) + completion)[:max_length],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2-135m', a folder, a .gguf or a hub id")
    parser.add_argument("--trl", action="store_true", help="use trl.SFTTrainer instead of transformers.Trainer")
    parser.add_argument("--examples", type=int, default=200, help="training set size")
    parser.add_argument("--num-samples", type=int, default=32, help="LoRA-DA calibration examples")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output-dir", default="runs/trainer-callback")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model, tokenizer = load(args.model)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.05)
    records = prompt_completion_records(args.examples)
    callback = LoraDACallback(num_samples=args.num_samples)  # population_size = len(train_dataset)
    common = dict(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=5, save_strategy="no", report_to="none", seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if args.trl:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common, max_length=args.max_length), processing_class=tokenizer,
            train_dataset=Dataset.from_list(records), peft_config=lora, callbacks=[callback],
        )
    else:
        features = [encode(r, tokenizer, args.max_length) for r in records]
        trainer = Trainer(
            model=get_peft_model(model, lora), args=TrainingArguments(**common), train_dataset=features,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[callback],
        )
    result = trainer.train()
    if trainer.is_world_process_zero():
        report = callback.report
        print(
            f"LoRA-DA: {len(report.layers)} layers, {report.num_examples} examples, {report.total_seconds:.1f} s; "
            f"mean training loss over {result.global_step} steps: {result.training_loss:.3f}"
        )
        trainer.save_model(args.output_dir)  # a stock PEFT adapter folder


if __name__ == "__main__":
    main()
