"""The two ways one layer's LoRA-DA eigenproblem is solved, pure tensor math: dense (M [n, n] formed, then a dense
or a batched filtered eigensolver) and implicit (block Davidson on an operator that is never formed)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import LoraDAConfig, LoraDAError
from .eigensolvers import block_davidson, filtered_subspace, smallest_eigenvectors, top_eigenvalue, top_singular_value
from .input_factor import DENSE_MAX_SIZE, InputFactor

LOBPCG_MAX_ITERATIONS = 300
# Relative residual of the top eigenpair of D0 D0^T: sigma^2 is then exact to about its square.
SIGMA_TOL = 1e-3


@dataclass
class Solved:
    """The orthonormal basis U [n, r] of one layer, `project(U) = D^T U` [m, r] (D normalized), and the report."""

    basis: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    info: dict


@dataclass
class DenseProblem:
    """One layer's guidance matrix, formed: `guidance` [n, n] is M up to a positive factor (M's eigenvectors),
    `step` the unnormalized D0 [n, m], `bias` = D0 D0^T / unit; `unit` and sigma turn them into M's scale."""

    step: torch.Tensor
    bias: torch.Tensor
    guidance: torch.Tensor
    unit: float
    variance: float  # beta c of ALGORITHM.md, times sigma^2
    variance_ratio: float | None
    factor: InputFactor
    layer: str
    seed: int


@dataclass
class Eigenvectors:
    """The `rank` smallest eigenpairs of one guidance matrix and how they were found."""

    basis: torch.Tensor  # [n, r]
    values: torch.Tensor  # [r]
    residual: float
    solver: str
    gap: float | None  # eigenvalue r+1 minus eigenvalue r
    iterations: int | None = None  # of an iterative solver


def form_dense(
    g: torch.Tensor, factor: InputFactor, inv_y: torch.Tensor, config: LoraDAConfig, layer: str
) -> DenseProblem:
    """ALGORITHM.md with D [n, m] and M [n, n] formed, M up to a positive factor (sigma comes after the
    eigenvectors: see `finish_dense`)."""
    # Natural-gradient step D = -(Z + lam I)^{-1} G^T diag(1 / (y + lam)), shape [n, m].
    step = -torch.cholesky_solve(g.T, factor.cholesky) * inv_y[None, :]
    outer = step @ step.T  # [n, n]: the bias term up to sigma^2
    # max diag(D D^T) <= sigma^2 <= n max diag(D D^T): M / unit is of order one for the float32 eigh
    unit = float(outer.diagonal().max())
    check_sigma(unit, layer)  # finite and nonzero exactly when sigma is
    bias = outer.div_(unit)
    guidance = -config.bias_weight * bias
    variance_ratio = None
    variance = variance_term(inv_y, config)
    if variance != 0:  # in place: a wide layer's n x n temporaries are what its solve's memory is
        inverse = factor.get_inverse()
        guidance.add_(inverse, alpha=variance / unit)
        if config.bias_weight != 0:
            variance_ratio = variance / unit * float(inverse.norm()) / (config.bias_weight * float(bias.norm()))
    guidance = torch.add(guidance, guidance.T).mul_(0.5)  # exact symmetry for the eigensolvers
    return DenseProblem(step, bias, guidance, unit, variance, variance_ratio, factor, layer,
                        layer_seed(config.seed, layer))


def dense_eigenvectors(problems: Sequence[DenseProblem], ranks: Sequence[int], config: LoraDAConfig
                       ) -> list[Eigenvectors]:
    """The smallest eigenvectors of each problem's guidance: dense `eigh` (first in float32 under "auto"), or
    under "chebyshev" filtered subspace iteration with the problems of one size and rank batched, started from
    the step's range (the answer when the bias term dominates); those it leaves above tolerance get `eigh`."""
    found: list[Eigenvectors | None] = [None] * len(problems)
    if config.eigensolver == "chebyshev":
        batches: dict[tuple[int, int], list[int]] = {}
        for index, (problem, rank) in enumerate(zip(problems, ranks, strict=True)):
            n = problem.guidance.shape[0]
            if n >= 6 * block_size(rank, n):  # a block that is most of R^n: eigh is as cheap
                batches.setdefault((n, rank), []).append(index)
        for (n, rank), indices in batches.items():
            _filtered(problems, indices, n, rank, config, found)
    for index, (problem, rank) in enumerate(zip(problems, ranks, strict=True)):
        if found[index] is None:
            basis, values, residual, solver, gap = smallest_eigenvectors(
                problem.guidance, rank, config.eigensolver_tol, try_float32=config.eigensolver in ("auto", "chebyshev"))
            found[index] = Eigenvectors(basis, values, residual, solver, gap)
    return found


def _filtered(problems: Sequence[DenseProblem], indices: list[int], n: int, rank: int, config: LoraDAConfig,
              found: list[Eigenvectors | None]) -> None:
    """Batched `filtered_subspace` for the problems `indices` (all [n, n], one rank); fills `found` where it met
    the tolerance."""
    block = block_size(rank, n)
    starts = []
    for index in indices:
        problem = problems[index]
        generator = torch.Generator(device="cpu").manual_seed(problem.seed)
        omega = torch.randn(problem.step.shape[1], block, generator=generator, dtype=problem.step.dtype)
        starts.append(problem.step @ omega.to(problem.step.device))
    result = filtered_subspace(torch.stack([problems[i].guidance for i in indices]), torch.stack(starts), rank,
                               config.eigensolver_tol, [problems[i].seed for i in indices])
    for position, index in enumerate(indices):
        if result.converged[position]:
            values = result.values[position]
            found[index] = Eigenvectors(result.vectors[position, :, :rank], values[:rank],
                                        result.residuals[position], "chebyshev",
                                        float(values[rank] - values[rank - 1]) if block > rank else None,
                                        result.cycles[position])


def finish_dense(problem: DenseProblem, found: Eigenvectors, config: LoraDAConfig) -> Solved:
    """sigma from the bias term's top eigenvalue, started at the found eigenvectors (`top_eigenvalue`: a second
    eigendecomposition cost as much), the normalized step and the report."""
    n, m = problem.step.shape
    top = top_eigenvalue(problem.bias, found.basis, SIGMA_TOL)  # a dense eigvalsh only if that fails
    unit = problem.unit
    if top is not None:
        sigma = math.sqrt(top * unit)
    else:
        sigma = top_singular_value(problem.step, problem.bias * unit if n <= m else None)
    check_sigma(sigma, problem.layer)
    scale = sigma if config.normalize else 1.0
    step = problem.step / scale
    to_m = unit / scale**2  # guidance * to_m is M
    info = {
        "sigma": sigma,
        "eigenvalues": (found.values * to_m).tolist(),
        "eigengap": found.gap * to_m if found.gap is not None else None,
        "eigensolver": found.solver,
        "residual": found.residual,
        "variance_bias_ratio": problem.variance_ratio,
        "variance_bias_ratio_on_subspace": subspace_ratio(found.basis, step.T @ found.basis, problem.factor,
                                                          problem.variance / scale**2, config),
    }
    if found.iterations is not None:
        info["iterations"] = found.iterations
    return Solved(basis=found.basis, project=lambda u: step.T @ u, info=info)


def variance_term(inv_y: torch.Tensor, config: LoraDAConfig) -> float:
    """beta c of ALGORITHM.md times sigma^2: beta sum(1 / (y + lam)) / N_pop (0 when beta is 0)."""
    if config.variance_weight == 0:
        return 0.0
    return config.variance_weight * float(inv_y.sum()) / config.population_size


def check_sigma(sigma: float, layer: str) -> None:
    if not math.isfinite(sigma):
        raise LoraDAError(f"Layer {layer!r}: the natural-gradient step is not finite; check the statistics.")
    if sigma == 0.0:
        raise LoraDAError(f"Layer {layer!r}: the gradient is exactly zero, so LoRA-DA has no direction to pick.")


def subspace_ratio(
    basis: torch.Tensor, projected: torch.Tensor, factor: InputFactor, variance: float, config: LoraDAConfig
) -> float | None:
    """tr(U^T (beta c K^{-1}) U) / tr(U^T (alpha D D^T) U) on the chosen U [n, r] (projected = D^T U [m, r])."""
    if variance == 0 or config.bias_weight == 0:
        return None
    bias = config.bias_weight * float((projected * projected).sum())
    return variance * float((basis * factor.solve(basis)).sum()) / bias if bias > 0 else math.inf


class ImplicitGuidance:
    """`sigma^2 M = -alpha D0 D0^T + v K^{-1}` as an operator that is never formed: D0 = -K^{-1} G^T diag(w) is
    the unnormalized step [n, m], w = 1/(y + lam) [m], v = beta sum(w) / N_pop. Applying it to k vectors costs
    four triangular solves with L and two products with G, O((n^2 + m n) k), where forming it costs
    O(m n^2 + n^3). The eigenvectors of M and of sigma^2 M are the same, so sigma can come last."""

    def __init__(self, factor: InputFactor, g: torch.Tensor, w: torch.Tensor, alpha: float, variance: float):
        self.factor, self.g, self.alpha, self.variance = factor, g, alpha, variance
        self.w, self.w2 = w[None, :], (w * w)[None, :]  # [1, m]: scale the rows of a [k, m] block

    # Products with G are taken as [k, n] @ G^T and [k, m] @ G (blocks stored as rows): on MKL that ran 2-4x
    # faster than G @ [n, k] for n = 4096; the triangular solves prefer [n, k] columns.

    def step(self, omega: torch.Tensor) -> torch.Tensor:
        """D0 omega for omega [m, k] -> [n, k]."""
        return -self.factor.solve(((self.w * omega.T) @ self.g).T)

    def step_t(self, v: torch.Tensor) -> torch.Tensor:
        """D0^T v for v [n, k] -> [m, k]."""
        return -((self.factor.solve(v).T @ self.g.T) * self.w).T

    def _pull(self, v: torch.Tensor) -> torch.Tensor:
        """G^T diag(w^2) G K^{-1} v for v [n, k] -> [n, k], so that D0 D0^T v = K^{-1} pull(v)."""
        return (((self.factor.solve(v).T @ self.g.T) * self.w2) @ self.g).T

    def guidance(self, v: torch.Tensor) -> torch.Tensor:
        """(-alpha D0 D0^T + variance K^{-1}) v for v [n, k], as K^{-1} (variance v - alpha pull(v))."""
        return self.factor.solve(self.variance * v - self.alpha * self._pull(v))

    def bias(self, v: torch.Tensor) -> torch.Tensor:
        """-D0 D0^T v for v [n, k]: its smallest eigenvalue is -sigma^2."""
        return -self.factor.solve(self._pull(v))


def solve_implicit(
    g: torch.Tensor, factor: InputFactor, inv_y: torch.Tensor, rank: int, config: LoraDAConfig, layer: str
) -> Solved:
    """The smallest eigenvectors of M by block Davidson on the implicit operator, then sigma from the same
    operator without the variance term, started from the converged block."""
    if not (bool(g.sum().isfinite()) and bool(inv_y.sum().isfinite())):  # NaN or inf survives a sum; no m x n mask
        check_sigma(math.nan, layer)
    if not bool(g.any()):
        check_sigma(0.0, layer)
    m, n = g.shape
    variance = variance_term(inv_y, config)
    operator = ImplicitGuidance(factor, g, inv_y, config.bias_weight, variance)
    block = block_size(rank, n)
    generator = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, layer))
    omega = torch.randn(m, block, generator=generator, dtype=torch.float64).to(g.device)
    # D0 omega spans roughly the top left singular vectors of D0: the answer when the bias term dominates
    found = block_davidson(operator.guidance, operator.step(omega), rank, config.eigensolver_tol,
                            LOBPCG_MAX_ITERATIONS, generator, factor.apply if variance else None)
    if variance == 0 and config.bias_weight != 0 and found.first_residual <= SIGMA_TOL:
        sigma_sq = -float(found.values[0]) / config.bias_weight  # M0 is -alpha D0 D0^T itself
    else:
        # A wide layer's triangular solves cost about the same for 9 or 16 columns (bound by reading L), and the
        # wider start needs fewer of them (a 7B-shaped block's 7 layers on 2 CPU cores: 5.8 s -> 4.3 s for sigma).
        width = rank + 1 if n < DENSE_MAX_SIZE else max(rank + 1, min(2 * rank, block))
        top = block_davidson(operator.bias, found.vectors[:, :width], 1, SIGMA_TOL, LOBPCG_MAX_ITERATIONS, generator)
        sigma_sq = -float(top.values[0])
    sigma = math.sqrt(max(sigma_sq, 0.0))
    check_sigma(sigma, layer)
    scale = sigma if config.normalize else 1.0
    values = found.values / scale**2
    basis = found.vectors[:, :rank]

    def project(u: torch.Tensor) -> torch.Tensor:
        return operator.step_t(u) / scale

    info = {
        "sigma": sigma,
        "eigenvalues": values[:rank].tolist(),
        "eigengap": float(values[rank] - values[rank - 1]) if values.numel() > rank else None,
        "eigensolver": "davidson",
        "residual": found.residual,
        "variance_bias_ratio": None,  # needs ||K^{-1}||_F: an n^3 inverse, which this path avoids
        "variance_bias_ratio_on_subspace": subspace_ratio(basis, project(basis), factor, variance / scale**2,
                                                           config),
        "iterations": found.iterations,
        "converged": found.converged,
        "block_size": block,
    }
    return Solved(basis=basis, project=project, info=info)


def block_size(rank: int, n: int) -> int:
    """Vectors iterated at once: twice the rank (at least rank + 8), four times (at least rank + 24) for wide
    layers. Convergence of the wanted r depends on the gap to the (block + 1)-th eigenvalue, and the triangular
    solves of a wide layer are bound by reading L, so more columns cost little more (down_proj of a 7B block:
    30 iterations, 19 s with 32 vectors; 50 iterations, 26 s with 16)."""
    if n >= DENSE_MAX_SIZE:
        return min(max(4 * rank, rank + 24), n)
    return min(max(2 * rank, rank + 8), n)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order or number of layers solved."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)

