"""The LoRA-DA solve: per layer, from (G, Z, y) to the initial factors (A, B). Pure tensor math."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .config import LoraDAConfig, LoraDAError, check_ranks
from .eigensolvers import block_davidson, fix_signs, smallest_eigenvectors, top_eigenvalue, top_singular_value
from .gram import PackedGram, packed_size
from .input_factor import DENSE_MAX_SIZE, InputFactor, factor_input

# "auto" on a CPU solves layers with at least this many inputs iteratively, on an implicit operator: at n = 576
# that takes ~15 ms where forming M and a dense float32 eigh take ~50 ms, and the gap grows like n^3 / n^2.
AUTO_LOBPCG_MIN_SIZE = 384
LOBPCG_MAX_ITERATIONS = 300
# Norm of a row of PEFT's default A (Kaiming-uniform, a=sqrt(5)): entries U(-1/sqrt(n), 1/sqrt(n)).
KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)


class LayerStatistics(Protocol):
    """What `solve_all` reads from a statistics object (see `lora_da.statistics.LoraDAStatistics`)."""

    num_examples: int
    gradient_sums: dict[str, torch.Tensor]  # [m, n] per layer: shapes and device

    @property
    def layer_names(self) -> list[str]: ...

    def gradient(self, name: str) -> torch.Tensor: ...

    def packed_input_factor(self, name: str) -> PackedGram: ...

    def output_factor(self, name: str) -> torch.Tensor: ...

    def input_group(self, name: str) -> str: ...

    def pop_group(self, names: list[str]) -> tuple[PackedGram, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Z and (G, y) per layer of layers sharing one input, removed from the statistics (`release=True`)."""
        ...


@dataclass
class LayerSolution:
    """Initial factors of one layer and what the solve saw on the way."""

    A: torch.Tensor  # [r, n]
    B: torch.Tensor  # [m, r]
    info: dict = field(default_factory=dict)


def solve_layer(
    gradient: torch.Tensor,
    input_factor: torch.Tensor | InputFactor,
    output_factor: torch.Tensor,
    rank: int,
    config: LoraDAConfig,
    *,
    layer: str = "layer",
) -> LayerSolution:
    """Solve one layer: G [m, n], Z [n, n] (or its factorization), y [m] -> A [r, n], B [m, r] (float32).

    Inputs may be any float dtype; the math runs in float64."""
    start = time.perf_counter()
    m, n = gradient.shape
    check_ranks({layer: (m, n)}, rank)
    if not isinstance(input_factor, InputFactor):
        input_factor = factor_input(input_factor, config, layer)
    g = gradient.to(torch.float64)
    y = output_factor.to(torch.float64)
    if config.fisher == "identity":
        y = torch.ones_like(y)
    median_y = float(y.median())
    y_damping = config.damping * median_y if config.damping_mode == "relative" else config.damping
    inv_y = 1.0 / (y + y_damping)

    solved = None
    if uses_lobpcg(n, _block_size(rank, n), g.device, config):
        solved = _solve_implicit(g, input_factor, inv_y, rank, config, layer)
        if not solved.info["converged"] and config.eigensolver == "auto" and n < DENSE_MAX_SIZE:
            solved = None  # the dense path below is exact and still affordable at this size
    if solved is None:
        solved = _solve_dense(g, input_factor, inv_y, rank, config, layer)
    basis = fix_signs(solved.basis)
    a, b = _balance(basis.T.contiguous(), solved.project(basis), config)
    info = {
        "shape": [m, n],
        "rank": rank,
        **solved.info,
        "median_y_over_damping": median_y / y_damping if y_damping > 0 else math.inf,
        "input_factor_clamped": input_factor.clamped,
        "seconds": time.perf_counter() - start,
    }
    if input_factor.shift:
        info["input_factor_shift"] = input_factor.shift
    return LayerSolution(A=a.to(torch.float32), B=b.to(torch.float32), info=info)


@dataclass
class _Solved:
    """The orthonormal basis U [n, r] of one layer, `project(U) = D^T U` [m, r] (D normalized), and the report."""

    basis: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    info: dict


def _solve_dense(
    g: torch.Tensor, factor: InputFactor, inv_y: torch.Tensor, rank: int, config: LoraDAConfig, layer: str
) -> _Solved:
    """ALGORITHM.md with D [n, m] and M [n, n] formed, then a dense eigensolver. M is formed up to a positive
    factor and sigma found from its eigenvectors (`top_eigenvalue`): a second eigendecomposition cost as much."""
    n, m = g.shape[1], g.shape[0]
    # Natural-gradient step D = -(Z + lam I)^{-1} G^T diag(1 / (y + lam)), shape [n, m].
    step = -torch.cholesky_solve(g.T, factor.cholesky) * inv_y[None, :]
    outer = step @ step.T  # [n, n]: the bias term up to sigma^2
    # max diag(D D^T) <= sigma^2 <= n max diag(D D^T): M / unit is of order one for the float32 eigh
    unit = float(outer.diagonal().max())
    _check_sigma(unit, layer)  # finite and nonzero exactly when sigma is
    bias = outer / unit
    guidance = -config.bias_weight * bias
    variance_ratio = None
    variance = 0.0  # beta c of ALGORITHM.md, times sigma^2
    if config.variance_weight != 0:
        variance = config.variance_weight * float(inv_y.sum()) / config.population_size
        variance_term = (variance / unit) * factor.get_inverse()
        guidance = guidance + variance_term
        if config.bias_weight != 0:
            variance_ratio = float(variance_term.norm() / (config.bias_weight * bias.norm()))
    guidance = (guidance + guidance.T) / 2  # exact symmetry for the eigensolvers

    basis, values, residual, solver_used, gap = smallest_eigenvectors(guidance, rank, config.eigensolver_tol,
                                                                      try_float32=config.eigensolver == "auto")
    top = top_eigenvalue(bias, basis, SIGMA_TOL)  # a dense eigvalsh only if that fails
    sigma = math.sqrt(top * unit) if top is not None else top_singular_value(step, outer if n <= m else None)
    _check_sigma(sigma, layer)
    scale = sigma if config.normalize else 1.0
    step = step / scale
    to_m = unit / scale**2  # guidance * to_m is M
    info = {
        "sigma": sigma,
        "eigenvalues": (values * to_m).tolist(),
        "eigengap": gap * to_m if gap is not None else None,
        "eigensolver": solver_used,
        "residual": residual,
        "variance_bias_ratio": variance_ratio,
        "variance_bias_ratio_on_subspace": _subspace_ratio(basis, step.T @ basis, factor, variance / scale**2, config),
    }
    return _Solved(basis=basis, project=lambda u: step.T @ u, info=info)


def _check_sigma(sigma: float, layer: str) -> None:
    if not math.isfinite(sigma):
        raise LoraDAError(f"Layer {layer!r}: the natural-gradient step is not finite; check the statistics.")
    if sigma == 0.0:
        raise LoraDAError(f"Layer {layer!r}: the gradient is exactly zero, so LoRA-DA has no direction to pick.")


def _subspace_ratio(
    basis: torch.Tensor, projected: torch.Tensor, factor: InputFactor, variance: float, config: LoraDAConfig
) -> float | None:
    """tr(U^T (beta c K^{-1}) U) / tr(U^T (alpha D D^T) U) on the chosen U [n, r] (projected = D^T U [m, r])."""
    if variance == 0 or config.bias_weight == 0:
        return None
    bias = config.bias_weight * float((projected * projected).sum())
    return variance * float((basis * factor.solve(basis)).sum()) / bias if bias > 0 else math.inf


class _ImplicitGuidance:
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


def _solve_implicit(
    g: torch.Tensor, factor: InputFactor, inv_y: torch.Tensor, rank: int, config: LoraDAConfig, layer: str
) -> _Solved:
    """The smallest eigenvectors of M by block Davidson on the implicit operator, then sigma from the same
    operator without the variance term, started from the converged block."""
    if not (bool(g.sum().isfinite()) and bool(inv_y.sum().isfinite())):  # NaN or inf survives a sum; no m x n mask
        _check_sigma(math.nan, layer)
    if not bool(g.any()):
        _check_sigma(0.0, layer)
    m, n = g.shape
    variance = 0.0
    if config.variance_weight != 0:
        variance = config.variance_weight * float(inv_y.sum()) / config.population_size
    operator = _ImplicitGuidance(factor, g, inv_y, config.bias_weight, variance)
    block = _block_size(rank, n)
    generator = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, layer))
    omega = torch.randn(m, block, generator=generator, dtype=torch.float64).to(g.device)
    # D0 omega spans roughly the top left singular vectors of D0: the answer when the bias term dominates
    found = block_davidson(operator.guidance, operator.step(omega), rank, config.eigensolver_tol,
                            LOBPCG_MAX_ITERATIONS, generator, factor.apply if variance else None)
    if variance == 0 and config.bias_weight != 0 and found.first_residual <= SIGMA_TOL:
        sigma_sq = -float(found.values[0]) / config.bias_weight  # M0 is -alpha D0 D0^T itself
    else:
        top = block_davidson(operator.bias, found.vectors[:, : rank + 1], 1, SIGMA_TOL, LOBPCG_MAX_ITERATIONS,
                              generator)
        sigma_sq = -float(top.values[0])
    sigma = math.sqrt(max(sigma_sq, 0.0))
    _check_sigma(sigma, layer)
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
        "variance_bias_ratio_on_subspace": _subspace_ratio(basis, project(basis), factor, variance / scale**2,
                                                           config),
        "iterations": found.iterations,
        "converged": found.converged,
        "block_size": block,
    }
    return _Solved(basis=basis, project=project, info=info)


# Relative residual of the top eigenpair of D0 D0^T: sigma^2 is then exact to about its square.
SIGMA_TOL = 1e-3


def _block_size(rank: int, n: int) -> int:
    """Vectors iterated at once: twice the rank (at least rank + 8), four times (at least rank + 24) for wide
    layers. Convergence of the wanted r depends on the gap to the (block + 1)-th eigenvalue, and the triangular
    solves of a wide layer are bound by reading L, so more columns cost little more (down_proj of a 7B block:
    30 iterations, 19 s with 32 vectors; 50 iterations, 26 s with 16)."""
    if n >= DENSE_MAX_SIZE:
        return min(max(4 * rank, rank + 24), n)
    return min(max(2 * rank, rank + 8), n)


def solve_working_bytes(m: int, n: int) -> int:
    """Upper bound of the memory the solve of one [m, n] layer holds at once: Z's mean (packed), the damped Z
    that becomes its Cholesky factor in place, and a float64 G; the dense path adds the inverse, the step D and
    more n x n matrices."""
    if n >= DENSE_MAX_SIZE:
        return 8 * (n * n + packed_size(n) + m * n)
    return 8 * (8 * n * n + 2 * m * n)


def solve_all(
    stats: LayerStatistics,
    rank: int | Mapping[str, int],
    config: LoraDAConfig,
    *,
    layers: Iterable[str] | None = None,
    progress: bool | None = None,
    release: bool = False,
) -> dict[str, LayerSolution]:
    """Solve every layer of `stats` (or just `layers`); `rank` is one int or a rank per layer.

    `release`: take each group's statistics out of `stats` as it is solved (see `pop_group`), so memory falls as
    the solve goes on; the widest groups are then solved last, when the others' statistics are gone."""
    names = list(stats.layer_names if layers is None else layers)
    ranks = {name: rank if isinstance(rank, int) else rank[name] for name in names}
    # every rank is checked before any work is done (the shape, not the mean gradient)
    check_ranks({name: tuple(stats.gradient_sums[name].shape) for name in names}, ranks)
    show = config.show_progress if progress is None else progress
    groups: dict[str, list[str]] = {}  # layers that read one input share the Cholesky factor of its Z
    for name in names:
        groups.setdefault(stats.input_group(name), []).append(name)

    def solve_group(members: list[str]) -> dict[str, LayerSolution]:
        if release:
            input_factor, means = stats.pop_group(members)
        else:
            input_factor = stats.packed_input_factor(members[0])
            means = {name: (stats.gradient(name), stats.output_factor(name)) for name in members}
        factor = factor_input(input_factor, config, members[0])
        del input_factor  # only its Cholesky factor is needed from here on
        solved = {}
        for name in members:
            gradient, output_factor = means.pop(name)
            gradient = gradient.to(torch.float64)  # the solve's dtype; the float32 mean is freed before its work
            solved[name] = solve_layer(gradient, factor, output_factor, ranks[name], config, layer=name)
            solved[name].info["seed"] = layer_seed(config.seed, name)
        return solved

    # Wide groups first, one at a time with every thread (their Cholesky factorizations and triangular solves
    # scale with threads); then the rest in a pool, one thread each (see `solver_threads`).
    width = {group: stats.gradient_sums[members[0]].shape[1] for group, members in groups.items()}
    wide = [members for group, members in groups.items() if width[group] >= DENSE_MAX_SIZE]
    narrow = [members for group, members in groups.items() if width[group] < DENSE_MAX_SIZE]
    if release:  # narrow groups first, then wide ones by width: each solve's temporaries meet the fewest sums
        wide.sort(key=lambda members: width[stats.input_group(members[0])])
    solutions: dict[str, LayerSolution] = {}
    device = stats.gradient_sums[names[0]].device if names else torch.device("cpu")
    previous = torch.get_num_threads()
    with tqdm(total=len(names), desc="LoRA-DA solve", unit="layer", disable=not show) as bar:

        def solve_wide() -> None:
            for members in wide:
                solutions.update(solve_group(members))
                bar.update(len(members))

        if not release:
            solve_wide()
        # each worker thread runs its LAPACK calls on one thread: see `solver_threads`
        pool = ThreadPoolExecutor(solver_threads(device, previous), initializer=torch.set_num_threads, initargs=(1,))
        try:
            for solved in pool.map(solve_group, narrow):  # in order: the first error is raised
                solutions.update(solved)
                bar.update(len(solved))
        finally:
            pool.shutdown(cancel_futures=True)
            torch.set_num_threads(previous)
        if release:
            solve_wide()
    return {name: solutions[name] for name in names}


def solver_threads(device: torch.device, cpu_threads: int) -> int:
    """Layers solved at once: on a CPU one group of layers per thread, each LAPACK call on one thread (for n in
    the hundreds to thousands threaded eigh gains little, and on a busy machine its spinning threads made it 100x
    slower: 15 s vs 0.06 s at n=576); on a GPU one at a time (the device runs them in turn anyway). Groups with
    n >= DENSE_MAX_SIZE inputs are not pooled: `solve_all` gives each of them all threads in turn."""
    return max(1, cpu_threads) if device.type == "cpu" else 1


def solve_factors(
    stats: LayerStatistics, rank: int | Mapping[str, int], config: LoraDAConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Initial factors `{layer: (A [r, n], B [m, r])}` from statistics, with no model pass."""
    return {name: (s.A, s.B) for name, s in solve_all(stats, rank, config).items()}


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order or number of layers solved."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def uses_lobpcg(n: int, want: int, device: torch.device, config: LoraDAConfig) -> bool:
    """Whether the layer is solved iteratively (block Davidson on the implicit operator, iterating `want`
    vectors) rather than by forming M and a dense `eigh`: when asked ("lobpcg"), or ("auto") on a CPU for
    n >= AUTO_LOBPCG_MIN_SIZE and on any device for n >= DENSE_MAX_SIZE. On a GPU "auto" keeps eigh below that:
    the iteration's many small steps each wait for the device, and eigh is fast there."""
    if n < 6 * want:  # the search space holds up to 6 blocks
        return False
    if config.eigensolver == "lobpcg":
        return True
    return config.eigensolver == "auto" and (
        n >= DENSE_MAX_SIZE or (n >= AUTO_LOBPCG_MIN_SIZE and device.type == "cpu")
    )


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
