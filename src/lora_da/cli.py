"""The `lora-da` command: init, train, eval and demo subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

from .models import DEFAULT_MODEL

PROG = "lora-da"


# ----------------------------------------------------------------------------------------------- arguments
def _add_model_args(parser: argparse.ArgumentParser, default_model: str | None = DEFAULT_MODEL) -> None:
    """--model, --dtype, --device, --max-length, --batch-size, --seed."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=default_model, required=default_model is None,
                       help=f"alias ({DEFAULT_MODEL}), a .gguf file, a local model folder or a hub id"
                       + (f" (default: {default_model})" if default_model else ""))
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="compute precision: float32, or bfloat16 autocast (default: float32)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto)")
    group.add_argument("--max-length", type=int, default=256,
                       help="truncate each tokenized example to this many tokens (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed of init and data order (default: %(default)s)")
    group.add_argument("--data-seed", type=int, default=0,
                       help="seed of the generated built-in tasks (kept fixed across --seed; default: 0)")


def _add_init_args(parser: argparse.ArgumentParser, method_flag: str, default_method: str) -> None:
    """Adapter and initialization flags shared by init, train and demo."""
    group = parser.add_argument_group("adapter initialization")
    if method_flag:
        group.add_argument(method_flag, dest="method", default=default_method,
                           help=f"initialization method (default: {default_method}); see `lora-da methods`")
    group.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    group.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=True,
                       help="rank-stabilized scaling alpha/sqrt(r) (default: on)")
    group.add_argument("--target-modules", default="all-linear",
                       help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj (default: all-linear)")
    group.add_argument("--num-calibration", type=int, default=256,
                       help="calibration examples for data-aware methods, capped by data size (default: %(default)s)")
    group.add_argument("--population-size", type=int, default=None,
                       help="N_pop of LoRA-DA's variance term (default: number of training examples)")
    group.add_argument("--gamma", type=float, default=None, help="LoRA-DA gamma (default: 1024)")
    group.add_argument("--variance-weight", type=float, default=None, help="LoRA-DA beta (default: 0.03)")
    group.add_argument("--bias-weight", type=float, default=None, help="LoRA-DA alpha (default: 1.0)")
    group.add_argument("--token-mask", choices=["attention", "labels"], default=None,
                       help="LoRA-DA calibration tokens (default: attention)")


def _add_train_args(parser: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """Optimization flags shared by train and demo."""
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)")
    group.add_argument("--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    group.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                       help="learning-rate schedule after warmup (default: cosine)")
    group.add_argument("--warmup-ratio", type=float, default=0.03, help="warmup fraction (default: %(default)s)")
    group.add_argument("--eval-every", type=int, default=0,
                       help="evaluate the eval loss every N steps; 0 = only at the end (default: %(default)s)")


def _add_data_size_args(parser: argparse.ArgumentParser, num_eval: int, num_generate: int) -> None:
    """Sizes of generated tasks and of the evaluation."""
    group = parser.add_argument_group("data sizes")
    group.add_argument("--num-train", type=int, default=None,
                       help="training examples to generate for a built-in task "
                       "(default: steps x batch size x grad accum, i.e. one epoch)")
    group.add_argument("--num-eval", type=int, default=num_eval,
                       help="evaluation examples for the loss (default: %(default)s)")
    group.add_argument("--num-generate", type=int, default=num_generate,
                       help="evaluation examples for exact-match accuracy; 0 = skip (default: %(default)s)")
    group.add_argument("--max-new-tokens", type=int, default=96,
                       help="generation budget per answer (default: %(default)s)")


def _add_calibration_data_args(parser: argparse.ArgumentParser, required: bool, output_help: str) -> None:
    """--data, --output and --num-train of the commands that read calibration data (init, stats)."""
    parser.add_argument("--data", required=required, default=None,
                        help="calibration data: JSONL file or built-in task (e.g. arith)"
                        + ("" if required else "; not needed with --stats"))
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--num-train", type=int, default=None,
                        help="examples to generate for a built-in task (default: 1000)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `lora-da`."""
    from .data import BUILTIN_TASKS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA-DA: data-aware LoRA initialization. Initialize, fine-tune and evaluate PEFT "
        "adapters, or run the built-in comparison (`lora-da demo`). DATA is a JSONL file (fields "
        "prompt/completion, question/answer, messages or text) or a built-in task "
        f"({', '.join(BUILTIN_TASKS)}; NAME:train or NAME:test picks a split).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="initialize an adapter and save it (PEFT folder + init_report.json)",
                       description="Initialize a LoRA adapter with METHOD on calibration data and save it as a "
                       "PEFT adapter folder (loads with PeftModel.from_pretrained) plus init_report.json.")
    _add_model_args(p)
    _add_calibration_data_args(p, required=False, output_help="output adapter folder")
    p.add_argument("--stats", default=None,
                   help="LoRA-DA statistics file from `lora-da stats`: solve from it with no model pass")
    _add_init_args(p, "--method", "lora_da")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("stats", help="gather LoRA-DA statistics once and save them (for init --stats)",
                       description="One forward+backward pass over calibration data; writes the statistics "
                       "(safetensors with a manifest of model, data hash, token mask and counts) to --output. "
                       "Works under torchrun: each rank takes its shard, rank 0 writes.")
    _add_model_args(p)
    _add_calibration_data_args(p, required=True, output_help="statistics file to write (.safetensors)")
    p.add_argument("--num-calibration", type=int, default=256, help="calibration examples (default: %(default)s)")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' or comma-separated module names (default: all-linear)")
    p.add_argument("--token-mask", choices=["attention", "labels"], default="attention",
                   help="calibration tokens for Z and y (default: attention)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("bench", help="compare initializations: methods x ranks x seeds x learning rates",
                       description="Run a resumable grid; each method's learning rate is picked on a validation "
                       "split, test metrics are mean +- std over seeds. Writes results.json, report.md and plots.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    p.add_argument("--data", default="arith", help=f"{', '.join(BUILTIN_TASKS)} or a JSONL file (default: arith)")
    p.add_argument("--output", required=True, help="output folder (rerun to resume)")
    p.add_argument("--methods", default="lora lora_da",
                   help="space-separated methods or ablations, e.g. 'lora lora_da lora_da@gamma=256,calibration=64' "
                   "(default: %(default)s)")
    p.add_argument("--ranks", default="8", help="comma-separated ranks (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--lrs", default="2e-4,1e-3,3e-3", help="comma-separated learning rates (default: %(default)s)")
    p.add_argument("--sweep-seeds", type=int, default=1,
                   help="seeds used to pick the learning rate; the others run at the chosen one (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the harness's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the harness's)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per example (default: the harness's)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="initialize with --init METHOD, fine-tune, evaluate, save the adapter",
                       description="Initialize an adapter with --init METHOD, fine-tune it, evaluate it on "
                       "--eval-data (default for built-in tasks: their test split) and save it to --output "
                       "with train_log.jsonl, init_report.json and results.json.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="training data: JSONL file or built-in task (e.g. arith)")
    p.add_argument("--eval-data", default=None,
                   help="evaluation data (default: the test split of a built-in task; none for a file)")
    p.add_argument("--output", required=True, help="output folder")
    _add_init_args(p, "--init", "lora_da")
    _add_train_args(p, steps=100, lr=2e-4)
    _add_data_size_args(p, num_eval=64, num_generate=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model (optionally with an adapter): loss, perplexity, accuracy",
                       description="Evaluate mean loss and perplexity over completion tokens, and exact-match "
                       "accuracy of greedy answers for QA data (answers ending in '#### <number>' are "
                       "compared by that number).")
    _add_model_args(p)
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (default: evaluate the bare model)")
    p.add_argument("--data", required=True, help="evaluation data: JSONL file or built-in task (arith = arith:test)")
    p.add_argument("--num-eval", type=int, default=None, help="use only the first N examples (default: all; "
                   "200 for a built-in task)")
    p.add_argument("--num-generate", type=int, default=64,
                   help="examples scored by exact match; 0 = skip (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation budget per answer (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="LoRA vs LoRA-DA on SmolLM2-135M and the arith task (<= 10 min on 2 CPUs)",
                       description="Compare initializations (default: standard LoRA vs LoRA-DA) with the same "
                       "rank, steps and learning rate on the embedded default (SmolLM2-135M-Instruct, arith "
                       "task). Prints a table and writes report.md, results.json and loss_curves.png. Raise "
                       "--steps, --num-train, --num-eval, --num-generate, --max-length to make it bigger.")
    _add_model_args(p)
    p.set_defaults(max_length=192)
    p.add_argument("--data", default="arith", help="training data (default: arith)")
    p.add_argument("--eval-data", default=None, help="evaluation data (default: arith:test)")
    p.add_argument("--output", default="./lora-da-demo", help="output folder (default: ./lora-da-demo)")
    p.add_argument("--methods", default="lora,lora_da",
                   help="comma-separated initialization methods to compare (default: lora,lora_da)")
    _add_init_args(p, "", "")
    p.set_defaults(num_calibration=32)
    _add_train_args(p, steps=24, lr=1e-3)
    p.set_defaults(eval_every=12)
    _add_data_size_args(p, num_eval=32, num_generate=16)
    p.set_defaults(max_new_tokens=80, func=cmd_demo)

    p = sub.add_parser("methods", help="list the initialization methods", description="List the "
                       "initialization methods of the registry.")
    p.set_defaults(func=cmd_methods)
    return parser


# ------------------------------------------------------------------------------------------------ helpers
def _status(message: str) -> None:
    """Print a progress line on stderr (stdout stays for results)."""
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _target_modules(value: str) -> str | list[str]:
    """'all-linear' or a list of module names."""
    if value.strip().lower() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError("--target-modules is empty; pass 'all-linear' or names such as q_proj,v_proj")
    return names


def _lora_da_config(args: argparse.Namespace, population_size: int):
    """LoraDAConfig from the flags that were given (others keep the library defaults)."""
    from . import LoraDAConfig

    given = {"gamma": args.gamma, "variance_weight": args.variance_weight, "bias_weight": args.bias_weight,
             "token_mask": args.token_mask}
    kwargs = {k: v for k, v in given.items() if v is not None}
    return LoraDAConfig(population_size=args.population_size or population_size, seed=args.seed, **kwargs)


def _load(args: argparse.Namespace):
    """Load (model, tokenizer) per the flags, with a status line."""
    from .models import load_model_and_tokenizer

    _status(f"loading model {args.model}")
    return load_model_and_tokenizer(args.model, dtype="float32", device=args.device)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError for flags that must be >= 1."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _encode(examples, tokenizer, max_length: int):
    """Completion-only features of examples."""
    from .data import encode_examples

    return encode_examples(examples, tokenizer, max_length)


def _adapt(base, tokenizer, features, method: str, args: argparse.Namespace, population_size: int):
    """create_adapted_model with the CLI's flags; returns (model, info)."""
    from .data import calibration_batches
    from .methods import METHODS, create_adapted_model, normalize_method

    key = normalize_method(method)
    batches = None
    if METHODS[key].needs_calibration:
        num = min(args.num_calibration, len(features))
        _status(f"calibration: {num} examples for {key}")
        batches = calibration_batches(features, num, args.batch_size, tokenizer.pad_token_id, args.seed)
    config = _lora_da_config(args, population_size) if key == "lora_da" else None
    return create_adapted_model(
        base, key, rank=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
        target_modules=_target_modules(args.target_modules), calibration_batches=batches,
        population_size=args.population_size or population_size, lora_da_config=config, seed=args.seed,
        tokenizer=tokenizer,
    )


def _write_json(path: Path, payload) -> None:
    """Write pretty JSON."""
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def _train_config(args: argparse.Namespace, log_path: Path | None):
    """TrainConfig from the flags."""
    from .train import TrainConfig

    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       schedule=args.schedule, warmup_ratio=args.warmup_ratio, dtype=args.dtype,
                       eval_every=args.eval_every, eval_batch_size=args.batch_size, seed=args.seed,
                       log_path=str(log_path) if log_path else None)


def _default_num_train(args: argparse.Namespace) -> int:
    """One epoch of training examples unless --num-train is given."""
    return args.num_train or args.steps * args.batch_size * args.grad_accum


def _eval_examples(args: argparse.Namespace):
    """Evaluation examples: --eval-data, else the test split of a built-in --data, else None."""
    from .data import is_builtin, load_examples, parse_spec

    spec = args.eval_data
    if spec is None and is_builtin(args.data):
        spec = f"{parse_spec(args.data)[0]}:test"
    if spec is None:
        return None
    return load_examples(spec, "test", args.num_eval, args.data_seed)


def _evaluate(model, tokenizer, features, examples, args: argparse.Namespace, known_loss=None) -> dict:
    """{'eval_loss', 'perplexity'[, 'accuracy']} on encoded and raw evaluation examples.

    `known_loss` (e.g. the training loop's final eval loss on the same features) skips recomputing it.
    """
    from .evaluate import evaluate_loss, exact_match

    if known_loss is None:
        known_loss = evaluate_loss(model, features, tokenizer.pad_token_id, args.batch_size, args.dtype)["loss"]
    metrics = {"eval_loss": known_loss, "perplexity": math.exp(min(known_loss, 700.0))}
    qa = [ex for ex in examples if ex.is_qa][: args.num_generate]
    if args.num_generate and qa:
        em = exact_match(model, tokenizer, qa, max(args.batch_size, 16), args.max_new_tokens, args.max_length)
        metrics["accuracy"], metrics["correct"], metrics["total"] = em["accuracy"], em["correct"], em["total"]
    return metrics


# ----------------------------------------------------------------------------------------------- commands
def cmd_init(args: argparse.Namespace) -> int:
    """`lora-da init`: initialize an adapter and save it."""
    from .data import load_examples
    from .methods import normalize_method

    _check_positive(args, "rank", "batch_size", "num_calibration", "max_length", "num_train")
    normalize_method(args.method)
    from . import init_distributed_from_env

    init_distributed_from_env()  # under torchrun every rank gathers statistics, rank 0 saves
    if args.stats is not None:
        return _init_from_statistics(args)
    if args.data is None:
        raise ValueError("--data is required (or --stats FILE from `lora-da stats`)")
    examples = load_examples(args.data, "train", args.num_train, args.data_seed)
    base, tokenizer = _load(args)
    features = _encode(examples, tokenizer, args.max_length)
    model, info = _adapt(base, tokenizer, features, args.method, args, len(features))
    _save(model, info, tokenizer, Path(args.output), args)
    print(f"{info.method}: initialized rank {args.rank} in {info.init_seconds:.2f} s; saved to {args.output}")
    return 0


def _init_from_statistics(args: argparse.Namespace) -> int:
    """`lora-da init --stats FILE`: LoRA-DA factors solved from saved statistics, no model pass."""
    from peft import LoraConfig, get_peft_model

    from . import initialize_lora_da
    from .methods import InitInfo, normalize_method

    if normalize_method(args.method) != "lora_da":
        raise ValueError("--stats works with --method lora_da only")
    if not Path(args.stats).is_file():
        raise FileNotFoundError(f"statistics file not found: {args.stats}")
    base, tokenizer = _load(args)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                                            target_modules=_target_modules(args.target_modules), lora_dropout=0.0))
    if args.population_size is None and args.variance_weight != 0:
        raise ValueError("--population-size is required with --stats (the size of your fine-tuning set)")
    config = _lora_da_config(args, args.population_size)
    start = time.perf_counter()
    report = initialize_lora_da(model, None, config, statistics=args.stats)
    info = InitInfo("lora_da", time.perf_counter() - start, False, report.to_dict())
    _save(model, info, tokenizer, Path(args.output), args)
    print(f"lora_da: solved rank {args.rank} from {args.stats} in {info.init_seconds:.2f} s; saved to {args.output}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """`lora-da stats`: gather and save LoRA-DA statistics."""
    from . import LoraDAConfig, compute_and_save_statistics, init_distributed_from_env
    from .data import calibration_batches, load_examples
    from .distributed import is_main_process

    _check_positive(args, "batch_size", "num_calibration", "max_length", "num_train")
    init_distributed_from_env()
    examples = load_examples(args.data, "train", args.num_train, args.data_seed)
    base, tokenizer = _load(args)
    features = _encode(examples, tokenizer, args.max_length)
    num = min(args.num_calibration, len(features))
    batches = calibration_batches(features, num, args.batch_size, tokenizer.pad_token_id, args.seed)
    config = LoraDAConfig(variance_weight=0.0, token_mask=args.token_mask)
    stats = compute_and_save_statistics(base, batches, args.output, config,
                                        target_modules=_target_modules(args.target_modules),
                                        model_name=args.model, shard=True)
    if is_main_process():
        print(f"statistics of {len(stats.layer_names)} layers from {stats.num_examples} examples "
              f"({stats.num_tokens} tokens) saved to {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`lora-da bench`: run (or resume) a comparison grid."""
    from .bench import run_bench

    def numbers(text: str, kind):
        return [kind(v) for v in text.split(",") if v.strip()]

    sizes = {k: getattr(args, k) for k in ("steps", "batch_size", "max_length") if getattr(args, k) is not None}
    run_bench(args.output, model=args.model, data=args.data, methods=args.methods.split(),
              ranks=numbers(args.ranks, int), seeds=numbers(args.seeds, int),
              learning_rates=numbers(args.lrs, float), sweep_seeds=args.sweep_seeds, **sizes)
    print(f"results in {args.output}/results.json and {args.output}/report.md")
    return 0


def _save(model, info, tokenizer, output: Path, args: argparse.Namespace) -> None:
    """Save the adapter folder and init_report.json (under torchrun: rank 0 writes, the others wait)."""
    from .distributed import barrier, is_main_process
    from .methods import save_adapter

    if not is_main_process():
        barrier()
        return
    output.mkdir(parents=True, exist_ok=True)
    save_adapter(model, info, output)
    if info.method == "full":
        tokenizer.save_pretrained(output)  # a full model folder is used as --model, so it needs its tokenizer
    report = {"method": info.method, "init_seconds": info.init_seconds, "modifies_base": info.modifies_base,
              "rank": args.rank, "lora_alpha": args.lora_alpha, "use_rslora": args.rslora,
              "target_modules": args.target_modules, "model": args.model, "data": args.data,
              "seed": args.seed, "report": info.report}
    _write_json(output / "init_report.json", report)
    barrier()


def cmd_train(args: argparse.Namespace) -> int:
    """`lora-da train`: initialize, fine-tune, evaluate, save."""
    from .data import encode_examples, load_examples
    from .methods import normalize_method
    from .train import train

    _check_positive(args, "rank", "batch_size", "num_calibration", "max_length", "num_train", "num_eval", "steps")
    method = normalize_method(args.method)
    output = Path(args.output)
    config = _train_config(args, output / "train_log.jsonl")
    examples = load_examples(args.data, "train", _default_num_train(args) if _is_builtin(args) else
                             args.num_train, args.data_seed)
    eval_examples = _eval_examples(args)
    base, tokenizer = _load(args)
    features = _encode(examples, tokenizer, args.max_length)
    eval_features = encode_examples(eval_examples, tokenizer, args.max_length) if eval_examples else None
    model, info = _adapt(base, tokenizer, features, method, args, len(features))
    _status(f"{method}: initialized in {info.init_seconds:.2f} s; training {args.steps} steps")
    output.mkdir(parents=True, exist_ok=True)
    history = train(model, features, config, tokenizer.pad_token_id, eval_features)
    metrics = {}
    if eval_features:
        metrics = _evaluate(model, tokenizer, eval_features, eval_examples, args, history[-1]["eval_loss"])
    _save(model, info, tokenizer, output, args)
    summary = {"method": method, "init_seconds": info.init_seconds, "train_config": config.to_dict(),
               "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], **metrics}
    _write_json(output / "results.json", summary)
    line = f"{method}: train loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"
    if metrics:
        line += f"; eval loss {metrics['eval_loss']:.4f} (ppl {metrics['perplexity']:.2f})"
    if "accuracy" in metrics:
        line += f"; exact match {metrics['accuracy']:.1%}"
    print(line + f"; saved to {output}")
    return 0


def _is_builtin(args: argparse.Namespace) -> bool:
    """True when --data names a built-in task."""
    from .data import is_builtin

    return is_builtin(args.data)


def cmd_eval(args: argparse.Namespace) -> int:
    """`lora-da eval`: loss, perplexity and exact-match accuracy."""
    from .data import load_examples

    _check_positive(args, "batch_size", "max_length", "num_eval")
    examples = load_examples(args.data, "test", args.num_eval, args.data_seed)
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"adapter folder not found: {args.adapter}")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{args.adapter} is not a PEFT adapter folder (no adapter_config.json); "
            "pass a fully fine-tuned model folder as --model instead"
        )
    model, tokenizer = _load(args)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        model.eval()
    features = _encode(examples, tokenizer, args.max_length)
    metrics = {"examples": len(features), **_evaluate(model, tokenizer, features, examples, args)}
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"eval loss   {metrics['eval_loss']:.4f}")
    print(f"perplexity  {metrics['perplexity']:.2f}")
    if "accuracy" in metrics:
        print(f"exact match {metrics['accuracy']:.1%} ({metrics['correct']}/{metrics['total']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`lora-da demo`: LoRA vs LoRA-DA with the same budget; table, report.md, results.json, PNG."""
    from .demo import run_demo

    start = time.perf_counter()
    results = run_demo(args)
    print(results["table"])
    print(f"\nwrote {args.output}/report.md, results.json, loss_curves.png "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """`lora-da methods`: list the registry."""
    from .methods import METHODS

    for name, spec in METHODS.items():
        flags = []
        if spec.needs_calibration:
            flags.append("calibration data")
        if spec.modifies_base:
            flags.append("modifies base weights")
        print(f"{name:10s} {spec.description}" + (f" [{', '.join(flags)}]" if flags else ""))
    return 0


def _message(err: BaseException) -> str:
    """One line for an error (KeyError's repr quotes are dropped)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lora-da`; returns the exit status (errors: one line on stderr, status 1)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, KeyError, ImportError) as err:
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
