"""Gather LoRA-DA statistics once, then solve adapters of several ranks from them with no further model pass.

The model pass is the expensive half of LoRA-DA; the solve reads only the saved statistics, so trying other
ranks (or `gamma`, `variance_weight`) costs seconds. One stock PEFT adapter is saved per rank.

    python examples/statistics_once.py                             # SmolLM2-135M-Instruct, ranks 4 8 16
    python examples/statistics_once.py --model path/to/model --ranks 8 32 --examples 256 --output-dir adapters
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_da import LoraDAConfig, LoraDAStatistics, compute_and_save_statistics, initialize_lora_da
from lora_da.data import calibration_batches, encode_examples, generate_arith, record_to_example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="LoRA ranks to solve for")
    parser.add_argument("--examples", type=int, default=32, help="calibration examples")
    parser.add_argument("--population-size", type=int, default=1000, help="examples in the whole fine-tuning set")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output-dir", default="lora-da-ranks")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding needs a token id; the pad positions are masked out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)

    records = [record_to_example(r) for r in generate_arith("train", args.examples)]
    features = encode_examples(records, tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, len(features), args.batch_size, tokenizer.pad_token_id)
    config = LoraDAConfig(population_size=args.population_size)

    # One forward+backward over the calibration data; the file also records which model it came from, so
    # solving it on another model is refused.
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "statistics.safetensors")
    compute_and_save_statistics(model, batches, path, config, target_modules="all-linear")
    stats = LoraDAStatistics.load(path, device=device)  # as a later process would read it
    print(f"Statistics of {len(stats.layer_names)} layers from {stats.num_examples} examples saved to {path}")

    for rank in args.ranks:
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, use_rslora=True, target_modules="all-linear")
        peft_model = get_peft_model(model, lora)
        # No batches: the factors come from the saved statistics alone.
        report = initialize_lora_da(peft_model, [], config, statistics=stats)
        folder = os.path.join(args.output_dir, f"rank-{rank}")
        peft_model.save_pretrained(folder)
        print(f"rank {rank}: {len(report.layers)} layers solved in {report.solve_seconds:.2f} s -> {folder}")
        # unload() takes the LoRA layers out again, giving back the untouched base model for the next rank.
        model = peft_model.unload()


if __name__ == "__main__":
    main()
