"""What the commands share: progress lines, and each pipeline step's settings built once from the flags."""

from __future__ import annotations

import argparse
import sys
import time

from lora_da.bench import parse_variant
from lora_da.data import is_builtin, load_examples, parse_spec
from lora_da.evaluate import EvalConfig
from lora_da.methods import METHODS, InitConfig, normalize_method
from lora_da.models import is_hub_id, load_model_and_tokenizer, resolve_device
from lora_da.train import TrainConfig

PROG = "lora-da"
#: LoRA-DA option flags (dest names are LoraDAConfig fields); None = not given.
LORA_DA_FLAGS = ("gamma", "variance_weight", "bias_weight", "token_mask", "population_size", "rank_allocation",
                 "min_rank", "max_rank")


def status(message: str, since: float | None = None) -> None:
    """Print a progress line on stderr (stdout stays for results), with the elapsed time when `since` is given."""
    elapsed = f" [{time.perf_counter() - since:.0f} s]" if since is not None else ""
    print(f"[{PROG}]{elapsed} {message}", file=sys.stderr, flush=True)


def target_modules(value: str) -> str | list[str]:
    """--target-modules as the library takes it: 'all-linear' or a list of module names."""
    if value.strip().lower() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError("--target-modules is empty; pass 'all-linear' or names such as q_proj,v_proj")
    return names


def check_model_args(args: argparse.Namespace) -> None:
    """Checks of the flags that every model command has, before anything is loaded."""
    if args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2 (a prompt token and a predicted one), got {args.max_length}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    resolve_device(args.device)


def load_model(args: argparse.Namespace):
    """Load (model, tokenizer) per --model and --device, with a progress line."""
    where = " from the Hugging Face hub (HF_HUB_OFFLINE=1: the local cache only)" if is_hub_id(args.model) else ""
    status(f"loading model {args.model}{where}")
    return load_model_and_tokenizer(args.model, dtype="float32", device=args.device)


def method_options(args: argparse.Namespace, method: str) -> dict:
    """The LoRA-DA option flags that were given, for methods that take options (lora_da, lora_one)."""
    if METHODS[normalize_method(method)].options_type is None:
        return {}
    return {name: getattr(args, name) for name in LORA_DA_FLAGS if getattr(args, name, None) is not None}


def init_config(args: argparse.Namespace, method: str | None = None) -> InitConfig:
    """The initialization settings from the adapter flags (calibration batches of --batch-size).

    The method may be a spec as in `bench`: 'lora_da@gamma=256,calibration=64' sets any option of the method
    (and the calibration size); an option both in the spec and a flag must agree.
    """
    variant = parse_variant(method or args.method)
    flags = method_options(args, variant.method)
    twice = sorted(k for k in flags if k in variant.overrides and flags[k] != variant.overrides[k])
    if twice:
        raise ValueError(f"{twice[0]} is set twice, to {flags[twice[0]]!r} by --{twice[0].replace('_', '-')} and "
                         f"to {variant.overrides[twice[0]]!r} in {variant.name!r}")
    return InitConfig(method=variant.method, rank=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                      target_modules=target_modules(args.target_modules),
                      num_calibration=variant.calibration or args.num_calibration,
                      calibration_batch_size=args.batch_size, seed=args.seed,
                      options={**flags, **variant.overrides})


def train_config(args: argparse.Namespace, log_path=None) -> TrainConfig:
    """The fine-tuning settings from the training flags."""
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       schedule=args.schedule, warmup_ratio=args.warmup_ratio, dtype=args.dtype,
                       eval_every=args.eval_every, eval_batch_size=args.batch_size, seed=args.seed,
                       regime=args.regime, log_path=str(log_path) if log_path else None)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The evaluation settings from the flags (generation batches of at least 16)."""
    return EvalConfig(batch_size=args.batch_size, dtype=args.dtype, num_generate=args.num_generate,
                      generate_batch_size=max(args.batch_size, 16), max_new_tokens=args.max_new_tokens,
                      max_length=args.max_length)


def one_epoch(args: argparse.Namespace) -> int:
    """Training examples to generate for a built-in task: --num-train, else one epoch of the training steps."""
    return args.num_train if args.num_train is not None else args.steps * args.batch_size * args.grad_accum


def eval_data_spec(args: argparse.Namespace) -> str | None:
    """--eval-data, else the test split of a built-in --data, else None."""
    if args.eval_data is None and is_builtin(args.data):
        return f"{parse_spec(args.data)[0]}:test"
    return args.eval_data


def eval_examples(args: argparse.Namespace):
    """The evaluation examples (first --num-eval), or None when there is no evaluation data."""
    spec = eval_data_spec(args)
    return None if spec is None else load_examples(spec, "test", args.num_eval, args.data_seed)
