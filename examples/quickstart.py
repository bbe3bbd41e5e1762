"""Initialize a PEFT LoRA adapter with LoRA-DA, save it, and reload it with stock PEFT.

A handful of prompt/completion records are the calibration data; only the completions are supervised.

    python examples/quickstart.py                                   # SmolLM2-135M-Instruct from the hub
    python examples/quickstart.py --model path/to/model --rank 16 --output-dir my-adapter
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_da import LoraDAConfig, initialize_lora_da
from lora_da.data import calibration_batches, encode_examples, record_to_example

RECORDS = [
    {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
    {"prompt": "Translate to German: good morning", "completion": "Guten Morgen."},
    {"prompt": "What is 12 + 30?", "completion": "12 + 30 = 42."},
    {"prompt": "Name a primary colour.", "completion": "Red is a primary colour."},
    {"prompt": "Reverse the word 'stone'.", "completion": "enots"},
    {"prompt": "Is 17 a prime number?", "completion": "Yes, 17 is prime."},
    {"prompt": "Give a synonym of 'quick'.", "completion": "Fast."},
    {"prompt": "What is the plural of 'mouse'?", "completion": "Mice."},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output-dir", default="lora-da-quickstart")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding needs a token id; the pad positions are masked out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)

    # The prompt tokens get label -100 (the chat template is applied when the tokenizer has one), so the
    # statistics follow the loss of the completions, as fine-tuning on these records would.
    features = encode_examples([record_to_example(r) for r in RECORDS], tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, len(features), args.batch_size, tokenizer.pad_token_id)

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, use_rslora=True, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    # population_size is the size of the whole fine-tuning set; here the records are all of it.
    config = LoraDAConfig(population_size=len(RECORDS))
    report = initialize_lora_da(peft_model, batches, config)
    print(f"LoRA-DA initialized {len(report.layers)} layers from {report.num_examples} examples "
          f"({report.num_tokens} tokens) in {report.total_seconds:.2f} s")

    peft_model.save_pretrained(args.output_dir)
    saved = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}

    # A fresh base model and stock PEFT: the adapter folder needs nothing from lora-da to load.
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    reloaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, args.output_dir))
    assert reloaded.keys() == saved.keys(), sorted(set(reloaded) ^ set(saved))
    for key, value in saved.items():
        assert torch.equal(reloaded[key].cpu(), value), f"{key} changed on reload"
    print(f"Saved {args.output_dir}; reloaded with PeftModel.from_pretrained: {len(saved)} LoRA tensors equal")


if __name__ == "__main__":
    main()
