"""What a frozen A lets each layer learn (LoRA-FA): with A fixed, a layer's update is B @ A, so it can only
read the inputs through A's row space. Per initialization and layer, for the row space P of A (orthonormalized):

- input energy: tr(P Z) / (r tr(Z) / n), Z the mean x x^T of the layer's inputs. How strongly the adapter sees
  the typical input, relative to a random r-dimensional subspace (1 on average). An update confined to directions
  the inputs rarely take changes the layer's outputs little per unit of its norm.
- gradient capture: ||G P||^2 / ||G||^2, G the mean loss gradient of the base weight. The share of the first
  full-LoRA step that a frozen A can follow (a random subspace: about r / n).

Inits: PEFT's default LoRA (Kaiming-uniform A, seed 0), LoRA-DA (row space U^T of its solve; the released and
kaiming splits share it), LoRA-One (top right singular vectors of G), PEFT's LoRA-GA (singular vectors r+1..2r of
G) and PiSSA (top right singular vectors of W). Statistics from the grid's calibration batches (arith, 256
examples, seed 0), read from or written to the grid's statistics cache:

    python benchmarks/diagnostics/frozen_subspace.py
    # writes benchmarks/results/frozen_subspace/{results.json,report.md}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness, grid
from _harness import results_dir, write_results  # noqa: E402
from grid import PROTOCOL, bench_config  # noqa: E402

RANK = 8
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def row_space(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [n, r] of the row space of A [r, n]."""
    q, _ = torch.linalg.qr(a.T.to(torch.float64))
    return q


def right_singular_vectors(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` right singular vectors of [m, n] `matrix`, as columns [n, count]."""
    _, _, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return vh[:count].T


def measures(basis: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """(input energy relative to a random subspace, share of ||G||^2 in the subspace) of an [n, r] basis."""
    n, r = basis.shape
    energy = float((basis * (z @ basis)).sum()) / (r * float(z.diagonal().sum()) / n)
    capture = float((g @ basis).square().sum()) / float(g.square().sum())
    return energy, capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="~/.cache/lora-da/grid-model",
                        help="the grid's de-quantized model folder (see grid.py --model-cache), alias or .gguf")
    parser.add_argument("--statistics-cache", default="~/.cache/lora-da/grid-statistics")
    parser.add_argument("--calibration", type=int, default=PROTOCOL["calibration_examples"],
                        help="calibration examples (the grid's by default; fewer for a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(results_dir("frozen_subspace")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lora_da import LoraDAConfig, find_lora_layers
    from lora_da.bench import load_bench_task
    from lora_da.cache import cached_statistics
    from lora_da.data import calibration_batches
    from lora_da.layers import canonical_layer_name, match_target_modules
    from lora_da.methods import create_adapted_model
    from lora_da.methods.base import add_labels, prepare_batches
    from lora_da.models import load_model_and_tokenizer
    from lora_da.solver import solve_all

    model_path = str(Path(args.model).expanduser()) if Path(args.model).expanduser().exists() else args.model
    base, tokenizer = load_model_and_tokenizer(model_path, dtype="float32")
    base.eval()
    config = bench_config("arith", ["lora_da"], [RANK])
    task = load_bench_task(config, tokenizer)
    # the batches exactly as the grid's init sees them, so that the cache serves both
    batches = prepare_batches(calibration_batches(task.train, args.calibration,
                                                  PROTOCOL["calibration_batch_size"], tokenizer.pad_token_id, 0),
                              torch.device("cpu"))
    add_labels(batches)
    names = match_target_modules(base, config.target_modules)
    options = LoraDAConfig(population_size=len(task.train), show_progress=False)
    stats, reused = cached_statistics(base, batches, names, options, Path(args.statistics_cache).expanduser())
    solved = solve_all(stats, RANK, options)
    lora, _ = create_adapted_model(copy.deepcopy(base), "lora", rank=RANK, lora_alpha=config.lora_alpha,
                                   use_rslora=config.use_rslora, target_modules=config.target_modules, seed=0)
    kaiming = {canonical_layer_name(name): layer.lora_A["default"].weight.detach()
               for name, layer in find_lora_layers(lora)[0].items()}
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in names:
        z, g = stats.input_factor(name), stats.gradient(name).to(torch.float64)
        gradient_vectors = right_singular_vectors(g, 2 * RANK)
        bases = {
            "lora (Kaiming A)": row_space(kaiming[name]),
            "lora_da": row_space(solved[name].A),
            "lora_one": gradient_vectors[:, :RANK],
            "lora_ga": gradient_vectors[:, RANK:],
            "pissa": right_singular_vectors(base.get_submodule(name).weight.detach(), RANK),
        }
        kind = next(k for k in KINDS if name.endswith(k))
        for init, basis in bases.items():
            rows.setdefault(init, {}).setdefault(kind, []).append(measures(basis, z, g))
    median = statistics.median
    table = ["| init | " + " | ".join(f"`{k}`" for k in KINDS) + " | all layers |",
             "| --- |" + " ---: |" * (len(KINDS) + 1)]
    summary = {}
    for init, by_kind in rows.items():
        every = [v for values in by_kind.values() for v in values]
        summary[init] = {kind: {"input_energy": median(e for e, _ in values),
                                "gradient_capture": median(c for _, c in values)}
                         for kind, values in [*by_kind.items(), ("all", every)]}
        cells = [f"{summary[init][k]['input_energy']:.3g} / {summary[init][k]['gradient_capture']:.3g}"
                 for k in [*KINDS, "all"]]
        table.append(f"| `{init}` | " + " | ".join(cells) + " |")
    text = (
        "# What a frozen A can see and follow\n\n"
        f"`python benchmarks/diagnostics/frozen_subspace.py`: SmolLM2-135M, `arith`, rank {RANK}, the grid's "
        "calibration batches "
        f"({stats.num_examples} examples, {stats.num_tokens} tokens, seed 0), all {len(names)} linear layers. Each "
        "cell: median over the layers of that kind of *input energy* (tr(P Z) / (r tr(Z) / n): how strongly the "
        "row space P of A sees the layer's typical input, 1 = a random subspace) / *gradient capture* "
        "(||G P||^2 / ||G||^2: the share of the mean gradient a frozen A lets B follow; a random subspace about "
        "r / n = 0.014 for n = 576). See the script's docstring.\n\n" + "\n".join(table) + "\n")
    write_results(args.out, {"rank": RANK, "calibration_examples": stats.num_examples, "tokens": stats.num_tokens,
                             "statistics_reused": reused is not None, "median": summary}, text)
    print(text)


if __name__ == "__main__":
    main()
