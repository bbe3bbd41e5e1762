"""Fine-tune a LoRA-DA-initialized adapter with a stock `transformers.Trainer`, or TRL's `SFTTrainer`.

The only LoRA-DA line is the callback: before the first optimizer step it gathers statistics on the first
`--num-samples` training examples, collated by the trainer's own collator, and sets the adapter's factors.

    python examples/trainer_callback.py                            # SmolLM2-135M-Instruct, transformers.Trainer
    python examples/trainer_callback.py --trl                      # the same with trl.SFTTrainer
    python examples/trainer_callback.py --model path/to/model --steps 100 --output-dir runs/mine
    torchrun --nproc-per-node 2 examples/trainer_callback.py       # data parallel: same factors on every rank
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from lora_da.data import encode_examples, generate_arith, record_to_example
from lora_da.integrations import LoraDACallback


def prompt_completion_records(count: int) -> list[dict]:
    """Arithmetic word problems as prompt/completion pairs; the completion is the worked solution."""
    return [{"prompt": r["question"], "completion": r["answer"]} for r in generate_arith("train", count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder")
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

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the collators pad; the pad positions are masked out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, use_rslora=True, target_modules="all-linear")
    records = prompt_completion_records(args.examples)
    # With no config given, population_size defaults to len(train_dataset).
    callback = LoraDACallback(num_samples=args.num_samples)
    common = dict(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=5, save_strategy="no", report_to="none", seed=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # under torchrun: every LoRA weight gets a gradient, no search needed
    )
    if args.trl:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # SFTTrainer wraps the model in PEFT itself and masks the prompt of prompt/completion records.
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common, max_length=args.max_length), processing_class=tokenizer,
            train_dataset=Dataset.from_list(records), peft_config=lora, callbacks=[callback],
        )
    else:
        # Completion-only labels (-100 on the prompt), padded per batch by the seq2seq collator.
        features = encode_examples([record_to_example(r) for r in records], tokenizer, max_length=args.max_length)
        trainer = Trainer(
            model=get_peft_model(model, lora), args=TrainingArguments(**common), train_dataset=features,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[callback],
        )
    result = trainer.train()
    if trainer.is_world_process_zero():
        report = callback.report
        print(f"LoRA-DA: {len(report.layers)} layers from {report.num_examples} examples in "
              f"{report.total_seconds:.2f} s; mean training loss over {result.global_step} steps: "
              f"{result.training_loss:.3f}")
    # A stock PEFT adapter folder (the callback already wrote lora_da_report.json next to it).
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
