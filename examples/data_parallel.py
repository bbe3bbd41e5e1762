"""Data-parallel LoRA-DA under `torchrun`: each rank passes over its share of the calibration batches.

The statistics are summed over ranks and the layer solves split among them, so every rank ends with the same
factors; this script checks that by comparing a checksum of each rank's LoRA weights, and rank 0 saves the
adapter. Gloo on CPUs, NCCL (one GPU per rank) when CUDA is available. Without torchrun it runs as one process.

    torchrun --nproc_per_node 2 examples/data_parallel.py
    torchrun --nproc_per_node 2 examples/data_parallel.py --model path/to/model --examples 256 --output-dir my-adapter
    python examples/data_parallel.py                               # one process, the same adapter
"""

from __future__ import annotations

import argparse
import hashlib

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_da import LoraDAConfig, init_distributed_from_env, initialize_lora_da
from lora_da.data import calibration_batches, encode_examples, generate_arith, record_to_example


def lora_checksum(peft_model) -> str:
    """SHA-256 of the adapter's LoRA tensors as saved (names and raw bytes, in name order)."""
    digest = hashlib.sha256()
    state = get_peft_model_state_dict(peft_model)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--examples", type=int, default=32, help="calibration examples, over all ranks")
    parser.add_argument("--population-size", type=int, default=1000, help="examples in the whole fine-tuning set")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output-dir", default="lora-da-data-parallel")
    args = parser.parse_args()

    # Joins the process group torchrun describes (NCCL and this rank's GPU with CUDA, else gloo).
    distributed = init_distributed_from_env()
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding needs a token id; the pad positions are masked out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, use_rslora=True, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)

    # Every rank builds the same list of batches; shard=True below keeps batch i on rank i % world_size.
    records = [record_to_example(r) for r in generate_arith("train", args.examples)]
    features = encode_examples(records, tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, len(features), args.batch_size, tokenizer.pad_token_id)

    config = LoraDAConfig(population_size=args.population_size)
    report = initialize_lora_da(peft_model, batches, config, shard=True)

    # Each rank's checksum, gathered on every rank, so that every rank can tell whether they agree.
    checksums = [lora_checksum(peft_model)]
    if distributed:
        checksums = [None] * dist.get_world_size()
        dist.all_gather_object(checksums, lora_checksum(peft_model))
        dist.destroy_process_group()
    agree = len(set(checksums)) == 1
    if rank == 0:
        print(f"LoRA-DA on {report.world_size} rank(s): {len(report.layers)} layers from {report.num_examples} "
              f"examples in {report.total_seconds:.2f} s")
        print(f"LoRA checksums per rank: {' '.join(checksums)}; ranks agree: {agree}")
    if not agree:
        raise SystemExit("the ranks ended with different LoRA factors")
    if rank == 0:
        peft_model.save_pretrained(args.output_dir)
        print(f"Saved {args.output_dir}")

if __name__ == "__main__":
    main()
