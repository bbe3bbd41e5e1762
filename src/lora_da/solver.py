"""The LoRA-DA solve: per layer, from (G, Z, y) to the initial factors (A, B). Pure tensor math."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .config import LoraDAConfig, LoraDAError

# Above this input size "auto" tries LOBPCG first on a CPU: below it exact `eigh` costs only tens of milliseconds.
AUTO_LOBPCG_MIN_SIZE = 1024
LOBPCG_MAX_ITERATIONS = 200
# Norm of a row of PEFT's default A (Kaiming-uniform, a=sqrt(5)): entries U(-1/sqrt(n), 1/sqrt(n)).
KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)


class LayerStatistics(Protocol):
    """What the solver reads from a statistics object (see `lora_da.statistics.LoraDAStatistics`)."""

    num_examples: int

    @property
    def layer_names(self) -> list[str]: ...

    def gradient(self, name: str) -> torch.Tensor: ...

    def input_factor(self, name: str) -> torch.Tensor: ...

    def output_factor(self, name: str) -> torch.Tensor: ...

    def input_group(self, name: str) -> str: ...


@dataclass
class LayerSolution:
    """Initial factors of one layer and what the solve saw on the way."""

    A: torch.Tensor  # [r, n]
    B: torch.Tensor  # [m, r]
    info: dict = field(default_factory=dict)


@dataclass
class _InputFactor:
    """Cholesky factor of the damped input factor `Z + lam I`, shared by the layers that read one input."""

    cholesky: torch.Tensor
    damping: float
    clamped: bool = False  # negative rounding eigenvalues of Z were set to zero first
    inverse: torch.Tensor | None = None

    def get_inverse(self) -> torch.Tensor:
        if self.inverse is None:
            self.inverse = torch.cholesky_inverse(self.cholesky)
        return self.inverse


def factor_input(input_factor: torch.Tensor, config: LoraDAConfig, layer: str = "layer") -> _InputFactor:
    """Cholesky-factor `Z + lam I` in float64 (Z: [n, n])."""
    z = input_factor.to(torch.float64)
    n = z.shape[0]
    if config.fisher == "identity":
        z = torch.eye(n, dtype=torch.float64, device=z.device)
    damping = config.damping
    if config.damping_mode == "relative":
        damping = config.damping * float(torch.diagonal(z).mean())
    eye = torch.eye(n, dtype=torch.float64, device=z.device)
    z = (z + z.T) / 2
    cholesky, info = torch.linalg.cholesky_ex(z + damping * eye)
    clamped = False
    if int(info) != 0:
        # Z is a Gram matrix, so negative eigenvalues are float32 rounding: drop them, then damp.
        values, vectors = torch.linalg.eigh(z)
        z = (vectors * values.clamp(min=0)) @ vectors.T
        cholesky, info = torch.linalg.cholesky_ex(z + damping * eye)
        clamped = True
    if int(info) != 0 or not torch.isfinite(cholesky).all():
        raise LoraDAError(
            f"Layer {layer!r}: the input factor Z + damping*I is not positive definite (damping={damping:g}); "
            "increase `damping`."
        )
    return _InputFactor(cholesky=cholesky, damping=damping, clamped=clamped)


def solve_layer(
    gradient: torch.Tensor,
    input_factor: torch.Tensor | _InputFactor,
    output_factor: torch.Tensor,
    rank: int,
    config: LoraDAConfig,
    *,
    layer: str = "layer",
) -> LayerSolution:
    """Solve one layer: G [m, n], Z [n, n] (or its factorization), y [m] -> A [r, n], B [m, r] (float32)."""
    start = time.perf_counter()
    m, n = gradient.shape
    if not 1 <= rank <= min(m, n):
        raise LoraDAError(f"Layer {layer!r}: rank {rank} must be between 1 and min(in, out) = {min(m, n)}.")
    if not isinstance(input_factor, _InputFactor):
        input_factor = factor_input(input_factor, config, layer)
    g = gradient.to(torch.float64)
    y = output_factor.to(torch.float64)
    if config.fisher == "identity":
        y = torch.ones_like(y)
    median_y = float(y.median())
    y_damping = config.damping * median_y if config.damping_mode == "relative" else config.damping
    inv_y = 1.0 / (y + y_damping)

    # Natural-gradient step D = -(Z + lam I)^{-1} G^T diag(1 / (y + lam)), shape [n, m].
    step = -torch.cholesky_solve(g.T, input_factor.cholesky) * inv_y[None, :]
    outer = step @ step.T  # [n, n]: the bias term before scaling, and sigma's Gram matrix when n <= m
    sigma = _top_singular_value(step, outer if n <= m else None)
    if not math.isfinite(sigma):
        raise LoraDAError(f"Layer {layer!r}: the natural-gradient step is not finite; check the statistics.")
    if sigma == 0.0:
        raise LoraDAError(f"Layer {layer!r}: the gradient is exactly zero, so LoRA-DA has no direction to pick.")
    scale = sigma if config.normalize else 1.0
    step = step / scale

    bias = outer / scale**2
    guidance = -config.bias_weight * bias
    variance_ratio = None
    if config.variance_weight != 0:
        c = float(inv_y.sum()) / config.population_size / scale**2
        variance = (config.variance_weight * c) * input_factor.get_inverse()
        guidance = guidance + variance
        if config.bias_weight != 0:
            variance_ratio = float(variance.norm() / (config.bias_weight * bias.norm()))
    guidance = (guidance + guidance.T) / 2  # exact symmetry for the eigensolvers

    basis, eigenvalues, residual, solver_used, gap = _smallest_eigenvectors(guidance, rank, config, layer)
    basis = _fix_signs(basis)
    a, b = _balance(basis.T.contiguous(), step.T @ basis, config)
    info = {
        "shape": [m, n],
        "rank": rank,
        "sigma": sigma,
        "eigenvalues": eigenvalues.tolist(),
        "eigengap": gap,
        "eigensolver": solver_used,
        "residual": residual,
        "median_y_over_damping": median_y / y_damping if y_damping > 0 else math.inf,
        "input_factor_clamped": input_factor.clamped,
        "variance_bias_ratio": variance_ratio,
        "seconds": time.perf_counter() - start,
    }
    return LayerSolution(A=a.to(torch.float32), B=b.to(torch.float32), info=info)


def solve_all(
    stats: LayerStatistics,
    rank: int | Mapping[str, int],
    config: LoraDAConfig,
    *,
    layers: Iterable[str] | None = None,
    progress: bool | None = None,
) -> dict[str, LayerSolution]:
    """Solve every layer of `stats` (or just `layers`); `rank` is one int or a rank per layer."""
    from tqdm.auto import tqdm  # local: keeps the math importable without the progress bar

    names = list(stats.layer_names if layers is None else layers)
    ranks = {name: rank if isinstance(rank, int) else rank[name] for name in names}
    for name in names:  # every rank is checked before any work is done (the shape, not the mean gradient)
        m, n = stats.gradient_sums[name].shape
        if not 1 <= ranks[name] <= min(m, n):
            raise LoraDAError(
                f"Layer {name!r}: rank {ranks[name]} must be between 1 and min(in, out) = {min(m, n)}."
            )
    show = config.show_progress if progress is None else progress
    groups: dict[str, list[str]] = {}  # layers that read one input share the Cholesky factor of its Z
    for name in names:
        groups.setdefault(stats.input_group(name), []).append(name)

    def solve_group(members: list[str]) -> dict[str, LayerSolution]:
        factor = factor_input(stats.input_factor(members[0]), config, members[0])
        solved = {}
        for name in members:
            solved[name] = solve_layer(stats.gradient(name), factor, stats.output_factor(name), ranks[name], config,
                                       layer=name)
            solved[name].info["seed"] = layer_seed(config.seed, name)
        return solved

    solutions: dict[str, LayerSolution] = {}
    device = stats.gradient_sums[names[0]].device if names else torch.device("cpu")
    previous = torch.get_num_threads()
    # each worker thread runs its LAPACK calls on one thread: see `solver_threads`
    pool = ThreadPoolExecutor(solver_threads(device, previous), initializer=torch.set_num_threads, initargs=(1,))
    try:
        with tqdm(total=len(names), desc="LoRA-DA solve", unit="layer", disable=not show) as bar:
            for solved in pool.map(solve_group, groups.values()):  # in order: the first error is raised
                solutions.update(solved)
                bar.update(len(solved))
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(previous)
    return {name: solutions[name] for name in names}


def solver_threads(device: torch.device, cpu_threads: int) -> int:
    """Layers solved at once: on a CPU one group of layers per thread, each LAPACK call on one thread (for n in
    the hundreds to thousands threaded eigh gains little, and on a busy machine its spinning threads made it 100x
    slower: 15 s vs 0.06 s at n=576); on a GPU one at a time (the device runs them in turn anyway)."""
    return max(1, cpu_threads) if device.type == "cpu" else 1


def solve_factors(
    stats: LayerStatistics, rank: int | Mapping[str, int], config: LoraDAConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Initial factors `{layer: (A [r, n], B [m, r])}` from statistics, with no model pass."""
    return {name: (s.A, s.B) for name, s in solve_all(stats, rank, config).items()}


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order or number of layers solved."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _smallest_eigenvectors(
    matrix: torch.Tensor, rank: int, config: LoraDAConfig, layer: str
) -> tuple[torch.Tensor, torch.Tensor, float, str, float | None]:
    """The `rank` eigenvectors of the smallest eigenvalues of a symmetric [n, n] matrix."""
    n = matrix.shape[0]
    want = min(rank + 1, n)  # one more than needed, for the eigen-gap
    if uses_lobpcg(n, want, matrix.device, config):
        generator = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, layer))
        start = torch.randn(n, want, generator=generator, dtype=matrix.dtype).to(matrix.device)
        values, vectors = torch.lobpcg(
            matrix, k=want, X=start, largest=False, tol=config.eigensolver_tol, niter=LOBPCG_MAX_ITERATIONS
        )
        order = torch.argsort(values)
        values, vectors = values[order], vectors[:, order]
        residual = _residual(matrix, vectors[:, :rank], values[:rank])
        if residual <= config.eigensolver_tol or config.eigensolver == "lobpcg":
            gap = float(values[rank] - values[rank - 1]) if want > rank else None
            return vectors[:, :rank], values[:rank], residual, "lobpcg", gap
    if config.eigensolver == "auto":
        # float32 LAPACK is several times faster; its answer is kept only if the float64 residual is small.
        values, vectors = torch.linalg.eigh(matrix.float())
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
        residual = _residual(matrix, vectors[:, :rank], values[:rank])
        if residual <= config.eigensolver_tol:
            gap = float(values[rank] - values[rank - 1]) if n > rank else None
            return vectors[:, :rank], values[:rank], residual, "eigh-float32", gap
    values, vectors = torch.linalg.eigh(matrix)
    gap = float(values[rank] - values[rank - 1]) if n > rank else None
    residual = _residual(matrix, vectors[:, :rank], values[:rank])
    return vectors[:, :rank], values[:rank], residual, "eigh", gap


def uses_lobpcg(n: int, want: int, device: torch.device, config: LoraDAConfig) -> bool:
    """Whether to try LOBPCG for `want` eigenpairs of an [n, n] matrix: when asked, or ("auto") for large n on
    a CPU. On a GPU "auto" keeps eigh: LOBPCG's many small steps each wait for the device, and eigh is fast there."""
    if n < 3 * want:  # torch's LOBPCG needs n >= 3k
        return False
    return config.eigensolver == "lobpcg" or (
        config.eigensolver == "auto" and n >= AUTO_LOBPCG_MIN_SIZE and device.type == "cpu"
    )


def _top_singular_value(matrix: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Largest singular value of [n, m] `matrix`, from its smaller Gram matrix (pass it if already computed),
    in float32 and scaled against overflow."""
    if gram is None:
        gram = matrix.T @ matrix if matrix.shape[1] < matrix.shape[0] else matrix @ matrix.T
    scale = float(gram.diagonal().max())
    if not math.isfinite(scale) or scale <= 0.0:  # zero, inf or nan: the norm is the same
        return math.sqrt(max(scale, 0.0))
    return math.sqrt(max(float(torch.linalg.eigvalsh((gram / scale).float())[-1]), 0.0) * scale)


def _residual(matrix: torch.Tensor, vectors: torch.Tensor, values: torch.Tensor) -> float:
    """Relative residual ||M U - U diag(values)||_F / ||M||_F."""
    scale = float(matrix.norm()) or 1.0
    return float((matrix @ vectors - vectors * values[None, :]).norm()) / scale


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive (eigenvectors have no sign)."""
    index = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, index[None, :]))
    signs[signs == 0] = 1
    return vectors * signs


def _balance(basis_t: torch.Tensor, projected: torch.Tensor, config: LoraDAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `projected @ basis_t / gamma` ([m, n], rank r) into B [m, r] @ A [r, n] per `factor_balance`."""
    root = math.sqrt(config.gamma)
    if config.factor_balance == "released":
        return basis_t / root, projected / root
    if config.factor_balance == "kaiming":
        return basis_t * KAIMING_ROW_NORM, projected / (config.gamma * KAIMING_ROW_NORM)
    # "svd": projected = P S Q^T, so the update is P S (basis Q)^T; give each side S^1/2.
    left, singular, right_t = torch.linalg.svd(projected, full_matrices=False)
    half = singular.sqrt()
    return (half[:, None] * (right_t @ basis_t)) / root, (left * half[None, :]) / root
