"""`LoraDAConfig`: every knob of the LoRA-DA method, validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

TOKEN_MASKS = ("attention", "labels")
EIGENSOLVERS = ("auto", "eigh", "lobpcg", "chebyshev")
FISHERS = ("kfac", "identity")
FACTOR_BALANCES = ("released", "kaiming", "svd")
OUTPUT_SCALINGS = ("mean", "token")
DAMPING_MODES = ("absolute", "relative")
RANK_ALLOCATIONS = ("uniform", "lora_da", "gradient")


class LoraDAError(ValueError):
    """Bad input to LoRA-DA: the message says what to change."""


@dataclass
class LoraDAConfig:
    """Settings of LoRA-DA; the defaults reproduce the authors' released configuration.

    Args:
        bias_weight: alpha, weight of the bias term (the natural-gradient step the subspace must express).
        variance_weight: beta, weight of the variance term (estimation noise of the fine-tuning data).
        gamma: initial factors are divided by sqrt(gamma); acts as the initial step size.
        damping: lambda added to both Kronecker factors before inverting them.
        population_size: N_pop, the number of examples of the whole fine-tuning set (not the calibration
            set). Required when `variance_weight != 0`.
        token_mask: which positions feed the statistics: "attention" (every attended position) or
            "labels" (positions that make a supervised prediction).
        normalize: divide the natural-gradient step by its largest singular value.
        eigensolver: "eigh" (exact), "lobpcg" (iterative, to `eigensolver_tol`), "chebyshev" (M formed for
            layers below 16384 inputs and solved by Chebyshev-filtered subspace iteration, same-sized layers below
            4096 inputs batched; block Davidson from 16384 inputs on: for GPUs, where a dense eigh runs one matrix
            at a time and the iterative solver's many small steps each wait for the device), or "auto":
            "chebyshev" on a CUDA device, else by size (see `eigensolver_on`).
        eigensolver_tol: relative residual tolerance of the iterative solvers; "auto" and "chebyshev" fall back to
            "eigh" above it.
        seed: seeds the iterative eigensolver's start so runs are reproducible.
        fisher: "kfac" (the method) or "identity" (Z = I, y = 1: an ablation).
        factor_balance: how the scale of `B @ A` is split: "released" (A = U^T / sqrt(gamma)), "kaiming"
            (rows of A at the norm of PEFT's default A, B absorbs the rest) or "svd" (B = P S^1/2,
            A = S^1/2 Q^T). `B @ A` is the same for all three.
        output_scaling: "mean" (per-example mean loss, the method) or "token" (output gradients
            scaled by the example's supervised token count: the Fisher of the per-token loss).
        damping_mode: "absolute" (lambda as given) or "relative" (lambda times median(y) for the output
            factor and times mean(diag(Z)) for the input factor).
        rank_allocation: how the adapter's trainable parameters are spread over its weights: "uniform" (each
            weight keeps the rank of its `LoraConfig`), "lora_da" (the budget goes to the directions that lower
            LoRA-DA's objective most: each weight's rank from the eigenvalues its solve computes) or "gradient"
            (ranks in proportion to each weight's gradient sensitivity, the mean of |W * G|). Both keep the
            adapter's trainable parameters `sum(r * (m + n))` and write the ranks as PEFT's `rank_pattern`.
        min_rank: the smallest rank of a weight under a rank allocation.
        max_rank: the largest rank of a weight under a rank allocation (None: four times the adapter's largest
            rank); never above `min(m, n)`.
        show_progress: show tqdm progress bars.
    """

    bias_weight: float = 1.0
    variance_weight: float = 0.03
    gamma: float = 1024.0
    damping: float = 1e-6
    population_size: int | None = None
    token_mask: Literal["attention", "labels"] = "attention"
    normalize: bool = True
    eigensolver: Literal["auto", "eigh", "lobpcg", "chebyshev"] = "auto"
    eigensolver_tol: float = 1e-4
    seed: int = 0
    fisher: Literal["kfac", "identity"] = "kfac"
    factor_balance: Literal["released", "kaiming", "svd"] = "released"
    output_scaling: Literal["mean", "token"] = "mean"
    damping_mode: Literal["absolute", "relative"] = "absolute"
    rank_allocation: Literal["uniform", "lora_da", "gradient"] = "uniform"
    min_rank: int = 1
    max_rank: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("token_mask", self.token_mask, TOKEN_MASKS)
        _check_choice("eigensolver", self.eigensolver, EIGENSOLVERS)
        _check_choice("fisher", self.fisher, FISHERS)
        _check_choice("factor_balance", self.factor_balance, FACTOR_BALANCES)
        _check_choice("output_scaling", self.output_scaling, OUTPUT_SCALINGS)
        _check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        _check_choice("rank_allocation", self.rank_allocation, RANK_ALLOCATIONS)
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise LoraDAError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise LoraDAError(f"`max_rank` ({self.max_rank}) must be at least `min_rank` ({self.min_rank}).")
        for name in ("bias_weight", "variance_weight", "damping"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise LoraDAError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if self.bias_weight == 0 and self.variance_weight == 0:
            raise LoraDAError("`bias_weight` and `variance_weight` cannot both be 0: nothing would pick A.")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise LoraDAError(f"`gamma` must be a finite number > 0, got {self.gamma!r}.")
        if not self.eigensolver_tol > 0:
            raise LoraDAError(f"`eigensolver_tol` must be > 0, got {self.eigensolver_tol!r}.")
        if self.variance_weight != 0:
            if self.population_size is None:
                raise LoraDAError(
                    "`variance_weight` != 0 needs `population_size`: pass the number of examples in your whole "
                    "fine-tuning set (e.g. population_size=len(train_dataset)), or set variance_weight=0."
                )
            if int(self.population_size) != self.population_size or self.population_size < 1:
                raise LoraDAError(f"`population_size` must be a positive integer, got {self.population_size!r}.")

    def eigensolver_on(self, device_type: str) -> str:
        """The eigensolver run on a device of `device_type`: "auto" is "chebyshev" on CUDA, where batched GEMMs beat
        block Davidson's many small steps (see the docs' performance page), else as set."""
        return "chebyshev" if self.eigensolver == "auto" and device_type == "cuda" else self.eigensolver

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict."""
        return asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LoraDAError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def check_ranks(shapes: Mapping[str, tuple[int, int]], ranks: int | Mapping[str, int]) -> None:
    """Raise `LoraDAError` naming the first layer whose rank is not in [1, min(out, in)]."""
    for name, (m, n) in shapes.items():
        rank = ranks if isinstance(ranks, int) else ranks[name]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoraDAError(f"Layer {name!r}: the rank must be a positive integer, got {rank!r}.")
        if rank > min(m, n):
            raise LoraDAError(
                f"Layer {name!r}: rank {rank} is larger than min(out, in) = {min(m, n)}; choose a smaller rank."
            )
