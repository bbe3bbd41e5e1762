"""LoRA-DA on a PEFT model sharded with FSDP2 (`fully_shard`), under `torchrun`.

Each decoder layer and the root are sharded, so no rank holds the whole model; LoRA-DA writes every rank's shard
of the factors in place. The adapter's tensors (not the base weights) are then gathered and rank 0 saves a stock
PEFT adapter.
Gloo on CPUs, NCCL (one GPU per rank) when CUDA is available.

    torchrun --nproc_per_node 2 examples/fsdp2.py
    torchrun --nproc_per_node 8 examples/fsdp2.py --model path/to/model --examples 256 --output-dir my-adapter
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_da import LoraDAConfig, init_distributed_from_env, initialize_lora_da
from lora_da.data import calibration_batches, encode_examples, generate_arith, record_to_example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--examples", type=int, default=32, help="calibration examples, over all ranks")
    parser.add_argument("--population-size", type=int, default=1000, help="examples in the whole fine-tuning set")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output-dir", default="lora-da-fsdp2")
    args = parser.parse_args()

    # FSDP2 needs a process group: the one torchrun describes (NCCL and this rank's GPU with CUDA, else gloo).
    if not init_distributed_from_env():
        raise SystemExit("run under torchrun with --nproc_per_node 2 or more")
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding needs a token id; the pad positions are masked out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, use_rslora=True, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)

    # The LoRA layers are wrapped with the model, so every decoder layer is one FSDP unit (the classes
    # transformers lists in _no_split_modules), and the root shards the rest (embeddings, head).
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in peft_model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise SystemExit(f"found no decoder layer of {sorted(layer_classes)} to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(peft_model)

    # Every rank builds the same list of batches; shard=True keeps batch i on rank i % world_size.
    records = [record_to_example(r) for r in generate_arith("train", args.examples)]
    features = encode_examples(records, tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, len(features), args.batch_size, tokenizer.pad_token_id)
    config = LoraDAConfig(population_size=args.population_size)
    report = initialize_lora_da(peft_model, batches, config, shard=True)

    # Collective: every rank sends its shards of the LoRA tensors only; the base weights stay sharded.
    state = {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()
             for name, tensor in peft_model.state_dict().items() if "lora_" in name}
    if rank == 0:
        print(f"LoRA-DA on {report.world_size} ranks, {len(layers)} FSDP2 decoder layers: {len(report.layers)} "
              f"LoRA layers from {report.num_examples} examples in {report.total_seconds:.2f} s")
        # save_pretrained keeps only the adapter's tensors of the state dict given.
        peft_model.save_pretrained(args.output_dir, state_dict=state)
        print(f"Saved {args.output_dir}")
    # Without it the other ranks tear gloo down while rank 0 still saves, which can abort them at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
