"""The two ways one layer's LoRA-DA eigenproblem is solved, pure tensor math: dense (M [n, n] formed, then a dense
or a batched filtered eigensolver) and implicit (block Davidson on an operator that is never formed)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .config import LoraDAConfig, LoraDAError
from .eigensolvers import (
    Eigenpairs,
    davidson_steps,
    filtered_subspace,
    run_in_step,
    seeded_normal,
    smallest_eigenvectors,
    top_eigenvalues,
    top_singular_value,
)
from .input_factor import DENSE_MAX_SIZE, InputFactor, factor_inverses, stacked

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
class DenseBatch:
    """Same-shaped layers' guidance matrices, formed: `guidance` [b, n, n] is each M up to a positive factor (M's
    eigenvectors), `step` the unnormalized D0 [b, n, m], `bias` = D0 D0^T / unit; `units` and sigma turn them into
    M's scale. A batch reads its per-layer numbers from the device together (a GPU waits once, not per layer)."""

    step: torch.Tensor
    bias: torch.Tensor
    guidance: torch.Tensor
    cholesky: torch.Tensor  # [b, n, n]: the layers' input factors
    units: list[float]
    variance: torch.Tensor  # [b]: beta c of ALGORITHM.md, times sigma^2
    variance_ratio: torch.Tensor | None  # [b]
    layers: list[str]
    seeds: list[int]


@dataclass
class Eigenvectors:
    """The `rank` smallest eigenpairs of one guidance matrix and how they were found."""

    basis: torch.Tensor  # [n, r]
    values: torch.Tensor  # [r]
    residual: float
    solver: str
    gap: float | None  # eigenvalue r+1 minus eigenvalue r
    iterations: int | None = None  # of an iterative solver


def form_dense(g: torch.Tensor, factors: Sequence[InputFactor], inv_y: torch.Tensor, config: LoraDAConfig,
               layers: list[str]) -> DenseBatch:
    """ALGORITHM.md with D and M formed for a batch of layers: G [b, m, n], their input factors and 1 / (y + lam)
    [b, m]; M up to a positive factor (sigma comes after the eigenvectors: see `finish_dense`)."""
    cholesky = stacked([factor.cholesky for factor in factors])
    # Natural-gradient step D = -(Z + lam I)^{-1} G^T diag(1 / (y + lam)), shape [b, n, m].
    step = -torch.cholesky_solve(g.mT, cholesky) * inv_y[:, None, :]
    outer = step @ step.mT  # [b, n, n]: the bias term up to sigma^2
    # max diag(D D^T) <= sigma^2 <= n max diag(D D^T): M / unit is of order one for the float32 eigh
    unit = outer.diagonal(dim1=1, dim2=2).amax(dim=1)
    variance = variance_term(inv_y, config)
    units, variances = torch.stack([unit, variance]).tolist()  # one read from the device
    for value, layer in zip(units, layers, strict=True):
        check_sigma(value, layer)  # finite and nonzero exactly when sigma is
    bias = outer.div_(unit[:, None, None])
    guidance = bias * -config.bias_weight
    variance_ratio = None
    if config.variance_weight != 0:  # in place: a wide layer's n x n temporaries are what its solve's memory is
        inverses = factor_inverses(factors)
        for matrix, inverse, weight, scale in zip(guidance, inverses, variances, units, strict=True):
            matrix.add_(inverse, alpha=weight / scale)
        if config.bias_weight != 0:
            inverse_norms = torch.stack([inverse.norm() for inverse in inverses])
            variance_ratio = variance / unit * inverse_norms / (config.bias_weight * bias.norm(dim=(1, 2)))
    guidance = torch.add(guidance, guidance.mT).mul_(0.5)  # exact symmetry for the eigensolvers
    return DenseBatch(step, bias, guidance, cholesky, units, variance, variance_ratio, layers,
                      [layer_seed(config.seed, layer) for layer in layers])


def dense_eigenvectors(batches: Sequence[DenseBatch], ranks: Sequence[int], config: LoraDAConfig
                       ) -> list[list[Eigenvectors]]:
    """The smallest eigenvectors of each batch's guidance matrices: dense `eigh` (first in float32 under "auto"),
    or under "chebyshev" filtered subspace iteration with all matrices of one size and rank batched, started from
    the step's range (the answer when the bias term dominates); those it leaves above tolerance get `eigh`."""
    found: list[list[Eigenvectors | None]] = [[None] * len(batch.layers) for batch in batches]
    if config.eigensolver == "chebyshev":
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, (batch, rank) in enumerate(zip(batches, ranks, strict=True)):
            n = batch.guidance.shape[1]
            if n >= 6 * block_size(rank, n):  # a block that is most of R^n: eigh is as cheap
                by_size.setdefault((n, rank), []).append(index)
        for (n, rank), indices in by_size.items():
            _filtered([batches[i] for i in indices], n, rank, config, [found[i] for i in indices])
    for batch, rank, results in zip(batches, ranks, found, strict=True):
        for position, result in enumerate(results):
            if result is None:
                results[position] = Eigenvectors(*smallest_eigenvectors(
                    batch.guidance[position], rank, config.eigensolver_tol,
                    try_float32=config.eigensolver in ("auto", "chebyshev")))
    return found


def _filtered(batches: Sequence[DenseBatch], n: int, rank: int, config: LoraDAConfig,
              found: list[list[Eigenvectors | None]]) -> None:
    """One batched `filtered_subspace` for every matrix of `batches` (all [n, n], one rank); fills `found` where
    it met the tolerance."""
    block = block_size(rank, n)
    starts = []
    for batch in batches:
        omega = torch.stack([seeded_normal((batch.step.shape[2], block), seed, batch.step.dtype, batch.step.device)
                             for seed in batch.seeds])
        starts.append(batch.step @ omega)
    guidance = batches[0].guidance if len(batches) == 1 else torch.cat([batch.guidance for batch in batches])
    result = filtered_subspace(guidance, torch.cat(starts), rank, config.eigensolver_tol,
                               [seed for batch in batches for seed in batch.seeds])
    del guidance
    gaps = (result.values[:, rank] - result.values[:, rank - 1]).tolist() if block > rank else None
    position = 0
    for results in found:
        for index in range(len(results)):
            if result.converged[position]:
                results[index] = Eigenvectors(result.vectors[position, :, :rank], result.values[position, :rank],
                                              result.residuals[position], "chebyshev",
                                              gaps[position] if gaps else None, result.cycles[position])
            position += 1


def finish_dense(batch: DenseBatch, found: Sequence[Eigenvectors], config: LoraDAConfig) -> list[Solved]:
    """sigma from each bias term's top eigenvalue, started at the found eigenvectors (`top_eigenvalues`: a second
    eigendecomposition cost as much), the normalized steps and the reports."""
    _, n, m = batch.step.shape
    basis = torch.stack([answer.basis for answer in found])  # [b, n, r]
    sigmas = []
    for index, top in enumerate(top_eigenvalues(batch.bias, basis, SIGMA_TOL)):  # a dense eigvalsh only if it fails
        unit = batch.units[index]
        if top is not None:
            sigma = math.sqrt(top * unit)
        else:
            sigma = top_singular_value(batch.step[index], batch.bias[index] * unit if n <= m else None)
        check_sigma(sigma, batch.layers[index])
        sigmas.append(sigma)
    scale = [sigma if config.normalize else 1.0 for sigma in sigmas]
    to_m = [unit / value**2 for unit, value in zip(batch.units, scale, strict=True)]  # guidance * to_m is M
    scales, to_m_factors = torch.tensor([scale, to_m], dtype=basis.dtype).to(basis.device)
    step = batch.step / scales[:, None, None]
    eigenvalues = torch.stack([answer.values for answer in found]) * to_m_factors[:, None]
    ratios = subspace_ratio(basis, step.mT @ basis, lambda u: torch.cholesky_solve(u, batch.cholesky),
                            batch.variance / scales**2, config)
    numbers = [eigenvalues, *(part[:, None] for part in (batch.variance_ratio, ratios) if part is not None)]
    rows = torch.cat(numbers, dim=1).tolist()  # one read from the device for the batch's reports
    solved = []
    for index, (answer, row) in enumerate(zip(found, rows, strict=True)):
        rank = answer.values.numel()
        extra = iter(row[rank:])
        info = {
            "sigma": sigmas[index],
            "eigenvalues": row[:rank],
            "eigengap": answer.gap * to_m[index] if answer.gap is not None else None,
            "eigensolver": answer.solver,
            "residual": answer.residual,
            "variance_bias_ratio": next(extra) if batch.variance_ratio is not None else None,
            "variance_bias_ratio_on_subspace": next(extra) if ratios is not None else None,
        }
        if answer.iterations is not None:
            info["iterations"] = answer.iterations
        solved.append(Solved(basis=basis[index], project=partial(torch.matmul, step[index].T), info=info))
    return solved


def variance_term(inv_y: torch.Tensor, config: LoraDAConfig) -> torch.Tensor:
    """beta c of ALGORITHM.md times sigma^2 per layer: beta sum(1 / (y + lam)) / N_pop over the last dim of `inv_y`
    (0 when beta is 0)."""
    if config.variance_weight == 0:
        return inv_y.new_zeros(inv_y.shape[:-1])
    return config.variance_weight * inv_y.sum(-1) / config.population_size


def check_sigma(sigma: float, layer: str) -> None:
    if not math.isfinite(sigma):
        raise LoraDAError(f"Layer {layer!r}: the natural-gradient step is not finite; check the statistics.")
    if sigma == 0.0:
        raise LoraDAError(f"Layer {layer!r}: the gradient is exactly zero, so LoRA-DA has no direction to pick.")


def subspace_ratio(basis: torch.Tensor, projected: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor],
                   variance: torch.Tensor | float, config: LoraDAConfig) -> torch.Tensor | None:
    """tr(U^T (beta c K^{-1}) U) / tr(U^T (alpha D D^T) U) on each chosen U [..., n, r] (projected = D^T U
    [..., m, r], `solve` applies K^{-1}); None without a variance or a bias term."""
    if config.variance_weight == 0 or config.bias_weight == 0:
        return None
    bias = config.bias_weight * (projected * projected).sum((-2, -1))
    spread = variance * (basis * solve(basis)).sum((-2, -1))
    return torch.where(bias > 0, spread / bias, math.inf)


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

    def pull(self, solved: torch.Tensor) -> torch.Tensor:
        """G^T diag(w^2) G s for s = K^{-1} v [n, k] -> [n, k], so that D0 D0^T v = K^{-1} pull(K^{-1} v)."""
        return (((solved.T @ self.g.T) * self.w2) @ self.g).T


def guidance_together(operators: Sequence[ImplicitGuidance], blocks: Sequence[torch.Tensor],
                      bias_only: bool = False) -> list[torch.Tensor]:
    """(-alpha D0 D0^T + variance K^{-1}) v of each operator's block v [n, k_i], as K^{-1} (variance v - alpha
    pull(K^{-1} v)), or with `bias_only` -D0 D0^T v (its smallest eigenvalue is -sigma^2). The operators share one
    input factor, so each of the two solves is one call for all blocks: a wide L is read once, not per layer."""
    factor = operators[0].factor
    solved = _solved_together(factor, blocks)
    pulled = [op.pull(s) if bias_only else op.variance * v - op.alpha * op.pull(s)
              for op, v, s in zip(operators, blocks, solved, strict=True)]
    images = _solved_together(factor, pulled)
    return [-image for image in images] if bias_only else images


def _solved_together(factor: InputFactor, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """K^{-1} v of each block v [n, k_i], by one solve of their columns side by side."""
    if len(blocks) == 1:
        return [factor.solve(blocks[0])]
    return list(factor.solve(torch.cat(list(blocks), dim=1)).split([v.shape[1] for v in blocks], dim=1))


@dataclass
class ImplicitLayer:
    """What `solve_implicit` reads of one layer: G [m, n], 1 / (y + lam) [m], its rank and name."""

    gradient: torch.Tensor
    inv_y: torch.Tensor
    rank: int
    name: str


def solve_implicit(layers: Sequence[ImplicitLayer], factor: InputFactor, config: LoraDAConfig) -> list[Solved]:
    """Per layer (all reading the input whose factor is `factor`), the smallest eigenvectors of M by block
    Davidson on the implicit operator, then sigma from the same operator without the variance term, started
    from the converged block. The layers' iterations run in step, sharing each triangular solve with L."""
    operators, starts, generators = [], [], []
    for layer in layers:
        g, inv_y = layer.gradient, layer.inv_y
        if not (bool(g.sum().isfinite()) and bool(inv_y.sum().isfinite())):  # NaN or inf survives a sum
            check_sigma(math.nan, layer.name)
        if not bool(g.any()):
            check_sigma(0.0, layer.name)
        operators.append(ImplicitGuidance(factor, g, inv_y, config.bias_weight,
                                          float(variance_term(inv_y, config))))
        generator = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, layer.name))
        omega = torch.randn(g.shape[0], block_size(layer.rank, g.shape[1]), generator=generator,
                            dtype=torch.float64).to(g.device)
        # D0 omega spans roughly the top left singular vectors of D0: the answer when the bias term dominates
        starts.append(operators[-1].step(omega))
        generators.append(generator)
    found = run_in_step([davidson_steps(start, layer.rank, config.eigensolver_tol, LOBPCG_MAX_ITERATIONS, generator,
                                        factor.apply if op.variance else None)
                         for layer, op, start, generator in zip(layers, operators, starts, generators, strict=True)],
                        lambda indices, blocks: guidance_together([operators[i] for i in indices], blocks))
    sigma_squares: list[float | None] = [None] * len(layers)
    sigma_solves = {}
    for index, (layer, op, answer) in enumerate(zip(layers, operators, found, strict=True)):
        if op.variance == 0 and config.bias_weight != 0 and answer.first_residual <= SIGMA_TOL:
            sigma_squares[index] = -float(answer.values[0]) / config.bias_weight  # M0 is -alpha D0 D0^T itself
        else:
            # A wide layer's triangular solves cost about the same for 9 or 16 columns (bound by reading L), and
            # the wider start needs fewer of them.
            n, block = layer.gradient.shape[1], block_size(layer.rank, layer.gradient.shape[1])
            width = layer.rank + 1 if n < DENSE_MAX_SIZE else max(layer.rank + 1, min(2 * layer.rank, block))
            sigma_solves[index] = davidson_steps(answer.vectors[:, :width], 1, SIGMA_TOL, LOBPCG_MAX_ITERATIONS,
                                                 generators[index])
    sigma_layers = list(sigma_solves)
    tops = run_in_step(list(sigma_solves.values()), lambda indices, blocks: guidance_together(
        [operators[sigma_layers[i]] for i in indices], blocks, bias_only=True))
    for index, top in zip(sigma_solves, tops, strict=True):
        sigma_squares[index] = -float(top.values[0])
    return [_implicit_solved(layer, op, answer, sigma_sq, config)
            for layer, op, answer, sigma_sq in zip(layers, operators, found, sigma_squares, strict=True)]


def _implicit_solved(layer: ImplicitLayer, operator: ImplicitGuidance, found: Eigenpairs, sigma_sq: float,
                     config: LoraDAConfig) -> Solved:
    """The basis, its projection and the report of one layer solved by `solve_implicit`."""
    sigma = math.sqrt(max(sigma_sq, 0.0))
    check_sigma(sigma, layer.name)
    scale = sigma if config.normalize else 1.0
    values = found.values / scale**2
    rank = layer.rank
    basis = found.vectors[:, :rank]

    def project(u: torch.Tensor) -> torch.Tensor:
        return operator.step_t(u) / scale

    ratio = subspace_ratio(basis, project(basis), operator.factor.solve, operator.variance / scale**2, config)
    info = {
        "sigma": sigma,
        "eigenvalues": values[:rank].tolist(),
        "eigengap": float(values[rank] - values[rank - 1]) if values.numel() > rank else None,
        "eigensolver": "davidson",
        "residual": found.residual,
        "variance_bias_ratio": None,  # needs ||K^{-1}||_F: an n^3 inverse, which this path avoids
        "variance_bias_ratio_on_subspace": None if ratio is None else float(ratio),
        "iterations": found.iterations,
        "converged": found.converged,
        "block_size": block_size(rank, layer.gradient.shape[1]),
    }
    return Solved(basis=basis, project=project, info=info)


def block_size(rank: int, n: int) -> int:
    """Ritz vectors kept at once: twice the rank (at least rank + 8), four times (at least rank + 24) for wide
    layers. Convergence of the wanted r depends on the gap to the (block + 1)-th eigenvalue, so a wide layer's
    restarts keep more of the spectrum; its basis grows by the residuals of the wanted pairs and a few more
    (`davidson_steps`), which keeps each iteration's products small."""
    if n >= DENSE_MAX_SIZE:
        return min(max(4 * rank, rank + 24), n)
    return min(max(2 * rank, rank + 8), n)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order or number of layers solved."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)

