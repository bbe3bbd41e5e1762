"""The flags of `lora-da`; their defaults come from the settings dataclasses (one set of defaults)."""

from __future__ import annotations

import argparse
import dataclasses

from lora_da import LoraDAConfig
from lora_da.bench import BenchConfig
from lora_da.cli.commands import cmd_bench, cmd_eval, cmd_init, cmd_methods, cmd_stats, cmd_train
from lora_da.cli.common import PROG
from lora_da.cli.demo import DEMO_DEFAULTS, DEMO_METHODS, DEMO_OUTPUT, cmd_demo
from lora_da.config import RANK_ALLOCATIONS
from lora_da.data import BUILTIN_TASKS
from lora_da.evaluate import EvalConfig
from lora_da.methods import InitConfig
from lora_da.models import DEFAULT_MODEL
from lora_da.train import LORAPLUS_LR_RATIO, REGIMES, SCHEDULES, TrainConfig


def default(settings: type, name: str):
    """The default of field `name` of a settings dataclass."""
    found = {f.name: f for f in dataclasses.fields(settings)}[name]
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --max-length, --batch-size, --seed, --data-seed."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"alias ({DEFAULT_MODEL}), a .gguf file, a local model folder or a hub id "
                       "(default: %(default)s)")
    group.add_argument("--dtype", default=TrainConfig.dtype, choices=["float32", "bfloat16"],
                       help="compute precision: float32, or bfloat16 autocast (default: %(default)s)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto)")
    group.add_argument("--max-length", type=int, default=EvalConfig.max_length,
                       help="truncate each tokenized example to this many tokens (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                       help="examples per batch (default: %(default)s)")
    group.add_argument("--seed", type=int, default=TrainConfig.seed,
                       help="seed of init and data order (default: %(default)s)")
    group.add_argument("--data-seed", type=int, default=0,
                       help="seed of the generated built-in tasks (kept fixed across --seed; default: 0)")


def _add_lora_da_args(group) -> None:
    """LoRA-DA's options (LoraDAConfig fields); unset ones keep the library defaults."""
    group.add_argument("--population-size", type=int, default=None,
                       help="N_pop of LoRA-DA's variance term (default: number of training examples)")
    group.add_argument("--gamma", type=float, default=None, help=f"LoRA-DA gamma (default: {LoraDAConfig.gamma:g})")
    group.add_argument("--variance-weight", type=float, default=None,
                       help=f"LoRA-DA beta (default: {LoraDAConfig.variance_weight:g})")
    group.add_argument("--bias-weight", type=float, default=None,
                       help=f"LoRA-DA alpha (default: {LoraDAConfig.bias_weight:g})")
    group.add_argument("--token-mask", choices=["attention", "labels"], default=None,
                       help=f"LoRA-DA calibration tokens (default: {LoraDAConfig.token_mask})")
    group.add_argument("--rank-allocation", choices=list(RANK_ALLOCATIONS), default=None,
                       help="spread the adapter's trainable parameters over its weights: uniform (--rank "
                       "everywhere), lora_da (by LoRA-DA's objective) or gradient (by |W * G|); the total stays "
                       f"that of --rank (default: {LoraDAConfig.rank_allocation})")
    group.add_argument("--min-rank", type=int, default=None,
                       help=f"smallest rank of a weight under a rank allocation (default: {LoraDAConfig.min_rank})")
    group.add_argument("--max-rank", type=int, default=None,
                       help="largest rank of a weight under a rank allocation (default: 4 x --rank)")


def _add_init_args(parser: argparse.ArgumentParser, method_flag: str | None) -> None:
    """Adapter and initialization flags shared by init, train and demo."""
    group = parser.add_argument_group("adapter initialization")
    if method_flag:
        group.add_argument(method_flag, dest="method", default=InitConfig.method,
                           help="initialization method, optionally with options as in bench, e.g. "
                           "lora_da@gamma=256,factor_balance=kaiming (default: %(default)s); see `lora-da methods`")
    group.add_argument("--rank", type=int, default=InitConfig.rank, help="LoRA rank r (default: %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=InitConfig.lora_alpha,
                       help="LoRA alpha (default: %(default)s)")
    group.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=InitConfig.use_rslora,
                       help="rank-stabilized scaling alpha/sqrt(r) (default: on)")
    group.add_argument("--target-modules", default=InitConfig.target_modules,
                       help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj (default: all-linear)")
    group.add_argument("--num-calibration", type=int, default=InitConfig.num_calibration,
                       help="calibration examples for data-aware methods, capped by data size (default: %(default)s)")
    _add_lora_da_args(group)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """Optimization flags shared by train and demo."""
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (default: %(default)s)")
    group.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (default: %(default)s)")
    group.add_argument("--grad-accum", type=int, default=TrainConfig.grad_accum,
                       help="micro-batches per step (default: %(default)s)")
    group.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule,
                       help="learning-rate schedule after warmup (default: %(default)s)")
    group.add_argument("--warmup-ratio", type=float, default=TrainConfig.warmup_ratio,
                       help="warmup fraction (default: %(default)s)")
    group.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                       help="evaluate the eval loss every N steps; 0 = only at the end (default: %(default)s)")
    _add_regime(group)


def _add_regime(group) -> None:
    """--regime: how the adapter is trained (train, demo, bench)."""
    group.add_argument("--regime", choices=REGIMES, default=TrainConfig.regime,
                       help="standard (AdamW on A and B), lora_fa (A frozen, B by PEFT's LoRA-FA optimizer) or "
                       f"lora_plus (PEFT's LoRA+: B at {LORAPLUS_LR_RATIO:g}x A's learning rate) "
                       "(default: %(default)s)")


def _add_eval_args(parser: argparse.ArgumentParser, num_eval: int | None) -> None:
    """Sizes of the evaluation; --num-eval None = every example (200 generated for a built-in task)."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--num-eval", type=int, default=num_eval,
                       help="evaluation examples for the loss (default: "
                       + ("%(default)s)" if num_eval else "all; 200 for a built-in task)"))
    group.add_argument("--num-generate", type=int, default=EvalConfig.num_generate,
                       help="evaluation examples for exact-match accuracy; 0 = skip (default: %(default)s)")
    group.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens,
                       help="generation budget per answer (default: %(default)s)")


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    """--overwrite: replace a non-empty --output folder (only once the new run has finished)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output folder; it is replaced only when the new run finishes")


def _add_num_train(parser: argparse.ArgumentParser, default_help: str) -> None:
    """--num-train: examples generated for a built-in task."""
    parser.add_argument("--num-train", type=int, default=None,
                        help=f"training examples to generate for a built-in task (default: {default_help})")


def _add_calibration_data_args(parser: argparse.ArgumentParser, required: bool, output_help: str) -> None:
    """--data, --output and --num-train of the commands that read calibration data (init, stats)."""
    parser.add_argument("--data", required=required, default=None,
                        help="calibration data: JSONL file or built-in task (e.g. arith)"
                        + ("" if required else "; not needed with --stats"))
    parser.add_argument("--output", required=True, help=output_help)
    _add_num_train(parser, "1000")


def _add_init_parser(sub) -> None:
    p = sub.add_parser("init", help="initialize an adapter and save it (PEFT folder + init_report.json)",
                       description="Initialize a LoRA adapter with METHOD on calibration data and save it as a "
                       "PEFT adapter folder (loads with PeftModel.from_pretrained) plus init_report.json.")
    _add_model_args(p)
    _add_calibration_data_args(p, required=False, output_help="output adapter folder")
    p.add_argument("--stats", default=None,
                   help="LoRA-DA statistics file from `lora-da stats`: solve from it with no model pass")
    _add_overwrite(p)
    _add_init_args(p, "--method")
    p.set_defaults(func=cmd_init)


def _add_stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="gather LoRA-DA statistics once and save them (for init --stats)",
                       description="One forward+backward pass over calibration data; writes the statistics "
                       "(safetensors with a manifest of model, data hash, token mask and counts) to --output. "
                       "Works under torchrun: each rank takes its shard, rank 0 writes.")
    _add_model_args(p)
    _add_calibration_data_args(p, required=True, output_help="statistics file to write (.safetensors)")
    p.add_argument("--num-calibration", type=int, default=InitConfig.num_calibration,
                   help="calibration examples (default: %(default)s)")
    p.add_argument("--target-modules", default=InitConfig.target_modules,
                   help="'all-linear' or comma-separated module names (default: all-linear)")
    p.add_argument("--token-mask", choices=["attention", "labels"], default=LoraDAConfig.token_mask,
                   help="calibration tokens for Z and y (default: %(default)s)")
    p.set_defaults(func=cmd_stats)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare initializations: methods x ranks x seeds x learning rates",
                       description="Run a resumable grid; each method's learning rate is picked on a validation "
                       "split, test metrics are mean +- std over seeds. Writes results.json, report.md and plots.")

    def joined(name: str, sep: str = ",") -> str:
        return sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in default(BenchConfig, name))

    p.add_argument("--model", default=default(BenchConfig, "model"), help="model (default: %(default)s)")
    p.add_argument("--data", default=default(BenchConfig, "data"),
                   help=f"{', '.join(BUILTIN_TASKS)} or a JSONL file (default: %(default)s)")
    p.add_argument("--output", required=True, help="output folder (rerun to resume)")
    p.add_argument("--methods", default=joined("methods", " "),
                   help="space-separated methods or ablations, e.g. 'lora lora_da lora_da@gamma=256,calibration=64' "
                   "(default: %(default)s)")
    p.add_argument("--ranks", default=joined("ranks"), help="comma-separated ranks (default: %(default)s)")
    p.add_argument("--seeds", default=joined("seeds"), help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--lrs", default=joined("learning_rates"),
                   help="comma-separated learning rates (default: %(default)s)")
    _add_regime(p)
    p.add_argument("--retry-failed", action="store_true",
                   help="rerun the runs that failed in an earlier invocation (default: keep them as failed)")
    p.add_argument("--statistics-cache", metavar="DIR",
                   help="folder where lora_da and lora_one keep their calibration statistics, so that variants and "
                   "learning rates of one seed gather them once (a file holds about 9 bytes per adapted weight: "
                   "1 GB for SmolLM2-135M; default: gather them for every run)")
    p.add_argument("--sweep-seeds", type=int, default=1,
                   help="seeds used to pick the learning rate; the others run at the chosen one (default: 1)")
    p.add_argument("--extend-edges", action="store_true",
                   help="where a method's best rate is the smallest or largest of --lrs, also run one step past it")
    for flag, name, text in (("--steps", "steps", "training steps per run"), ("--batch-size", "batch_size",
                             "batch size"), ("--max-length", "max_length", "max tokens per example")):
        p.add_argument(flag, type=int, default=default(BenchConfig, name), help=text + " (default: %(default)s)")
    p.set_defaults(func=cmd_bench)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="initialize with --init METHOD, fine-tune, evaluate, save the adapter",
                       description="Initialize an adapter with --init METHOD, fine-tune it, evaluate it on "
                       "--eval-data (default for built-in tasks: their test split) and save it to --output "
                       "with train_log.jsonl, init_report.json and results.json.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="training data: JSONL file or built-in task (e.g. arith)")
    p.add_argument("--eval-data", default=None,
                   help="evaluation data (default: the test split of a built-in task; none for a file)")
    p.add_argument("--output", required=True, help="output folder")
    _add_overwrite(p)
    _add_init_args(p, "--init")
    _add_train_args(p)
    _add_num_train(p, "steps x batch size x grad accum, i.e. one epoch")
    _add_eval_args(p, num_eval=64)
    p.set_defaults(num_generate=0, func=cmd_train)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (optionally with an adapter): loss, perplexity, accuracy",
                       description="Evaluate mean loss and perplexity over completion tokens, and exact-match "
                       "accuracy of greedy answers for QA data (answers ending in '#### <number>' are "
                       "compared by that number).")
    _add_model_args(p)
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (default: evaluate the bare model)")
    p.add_argument("--data", required=True, help="evaluation data: JSONL file or built-in task (arith = arith:test)")
    _add_eval_args(p, num_eval=None)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_eval)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="LoRA vs LoRA-DA on SmolLM2-135M and arith (about 5 min on 2 CPU cores)",
                       description="Compare initializations (default: standard LoRA vs LoRA-DA) with the same "
                       "rank, steps and learning rate on the embedded default (SmolLM2-135M-Instruct, arith "
                       "task). Prints a table and writes report.md, results.json and loss_curves.png. Raise "
                       "--steps, --num-train, --num-eval, --num-generate, --max-length to make it bigger.")
    _add_model_args(p)
    p.add_argument("--data", default="arith", help="training data (default: arith)")
    p.add_argument("--eval-data", default=None, help="evaluation data (default: arith:test)")
    p.add_argument("--output", default=DEMO_OUTPUT, help="output folder (default: %(default)s)")
    p.add_argument("--methods", default=DEMO_METHODS,
                   help="comma-separated initialization methods to compare (default: %(default)s)")
    _add_init_args(p, None)
    _add_train_args(p)
    _add_num_train(p, "steps x batch size x grad accum, i.e. one epoch")
    _add_eval_args(p, num_eval=DEMO_DEFAULTS["num_eval"])
    p.set_defaults(**DEMO_DEFAULTS, func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `lora-da`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA-DA: data-aware LoRA initialization. Initialize, fine-tune and evaluate PEFT "
        "adapters, or run the built-in comparison (`lora-da demo`). DATA is a JSONL file (fields "
        "prompt/completion, question/answer, messages or text) or a built-in task "
        f"({', '.join(BUILTIN_TASKS)}; NAME:train or NAME:test picks a split).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_init_parser, _add_stats_parser, _add_bench_parser, _add_train_parser, _add_eval_parser,
                _add_demo_parser):
        add(sub)
    p = sub.add_parser("methods", help="list the initialization methods",
                       description="List the initialization methods of the registry.")
    p.set_defaults(func=cmd_methods)
    return parser
