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

from .config import LoraDAConfig, LoraDAError

# "auto" on a CPU solves layers with at least this many inputs iteratively, on an implicit operator: at n = 576
# that takes ~15 ms where forming M and a dense float32 eigh take ~50 ms, and the gap grows like n^3 / n^2.
AUTO_LOBPCG_MIN_SIZE = 384
# From this input size on, "auto" never forms M nor runs a dense eigendecomposition (any device), input
# factors that fail Cholesky are shifted instead of clamped by `eigh`, and `solve_all` gives each such layer
# all CPU threads instead of one thread per layer.
DENSE_MAX_SIZE = 4096
LOBPCG_MAX_ITERATIONS = 300
# The iterative solver adds `K r` to its expansion (a preconditioner for the stiff variance term) once the
# largest Ritz value is this many times the wanted ones: below that plain residuals converged faster.
STIFF_RATIO = 300.0
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
    """Cholesky factor `L` of the damped input factor `K = Z + lam I = L L^T`, shared by the layers that read one
    input."""

    cholesky: torch.Tensor  # [n, n], lower triangular, float64
    damping: float
    clamped: bool = False  # Z was not positive semidefinite (rounding): clamped by eigh, or shifted for large n
    inverse: torch.Tensor | None = None
    shift: float = 0.0  # extra damping added instead of the clamp (n >= DENSE_MAX_SIZE only)

    def get_inverse(self) -> torch.Tensor:
        if self.inverse is None:
            self.inverse = torch.cholesky_inverse(self.cholesky)
        return self.inverse

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """K^{-1} rhs for rhs [n, k], by two triangular solves (torch's `cholesky_solve` was 5-10x slower for a
        few columns on this CPU)."""
        lower = torch.linalg.solve_triangular(self.cholesky, rhs, upper=False)
        return torch.linalg.solve_triangular(self.cholesky.T, lower, upper=True)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """K x = L (L^T x) for x [n, k]."""
        return self.cholesky @ (self.cholesky.T @ x)


def factor_input(input_factor: torch.Tensor, config: LoraDAConfig, layer: str = "layer") -> _InputFactor:
    """Cholesky-factor `Z + lam I` in float64 (Z: [n, n], any float dtype)."""
    z = input_factor.to(torch.float64)
    n = z.shape[0]
    if config.fisher == "identity":
        z = torch.eye(n, dtype=torch.float64, device=z.device)
    damping = config.damping
    if config.damping_mode == "relative":
        damping = config.damping * float(torch.diagonal(z).mean())
    damped = z + z.T  # a new tensor: the caller's Z is never written to
    del z
    damped.mul_(0.5)
    damped.diagonal().add_(damping)
    cholesky, info = torch.linalg.cholesky_ex(damped)
    clamped, shift = False, 0.0
    if int(info) != 0 and n < DENSE_MAX_SIZE:
        # Z is a Gram matrix, so negative eigenvalues are rounding: drop them, then damp.
        damped.diagonal().sub_(damping)
        values, vectors = torch.linalg.eigh(damped)
        damped = (vectors * values.clamp(min=0)) @ vectors.T
        damped.diagonal().add_(damping)
        cholesky, info = torch.linalg.cholesky_ex(damped)
        clamped = True
    elif int(info) != 0:
        # A dense eigh would take minutes here: shift by what float32 rounding of Z can reach, ||E||_2 <=
        # eps ||Z||_F, growing tenfold while Cholesky still fails.
        step = float(torch.finfo(torch.float32).eps) * float(damped.norm())
        for _ in range(4):
            damped.diagonal().add_(step - shift)
            shift = step
            cholesky, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                break
            step *= 10
        clamped = True
    if int(info) != 0 or not torch.isfinite(cholesky).all():
        raise LoraDAError(
            f"Layer {layer!r}: the input factor Z + damping*I is not positive definite (damping={damping:g}); "
            "increase `damping`."
        )
    return _InputFactor(cholesky=cholesky, damping=damping, clamped=clamped, shift=shift)


def solve_layer(
    gradient: torch.Tensor,
    input_factor: torch.Tensor | _InputFactor,
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

    solved = None
    if uses_lobpcg(n, _block_size(rank, n), g.device, config):
        solved = _solve_implicit(g, input_factor, inv_y, rank, config, layer)
        if not solved.info["converged"] and config.eigensolver == "auto" and n < DENSE_MAX_SIZE:
            solved = None  # the dense path below is exact and still affordable at this size
    if solved is None:
        solved = _solve_dense(g, input_factor, inv_y, rank, config, layer)
    basis = _fix_signs(solved.basis)
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
    g: torch.Tensor, factor: _InputFactor, inv_y: torch.Tensor, rank: int, config: LoraDAConfig, layer: str
) -> _Solved:
    """ALGORITHM.md with the step D [n, m] and the guidance matrix M [n, n] formed, then a dense eigensolver."""
    n, m = g.shape[1], g.shape[0]
    # Natural-gradient step D = -(Z + lam I)^{-1} G^T diag(1 / (y + lam)), shape [n, m].
    step = -torch.cholesky_solve(g.T, factor.cholesky) * inv_y[None, :]
    outer = step @ step.T  # [n, n]: the bias term before scaling, and sigma's Gram matrix when n <= m
    sigma = _top_singular_value(step, outer if n <= m else None)
    _check_sigma(sigma, layer)
    scale = sigma if config.normalize else 1.0
    step = step / scale

    bias = outer / scale**2
    guidance = -config.bias_weight * bias
    variance_ratio = None
    variance = 0.0
    if config.variance_weight != 0:
        variance = config.variance_weight * float(inv_y.sum()) / config.population_size / scale**2
        variance_term = variance * factor.get_inverse()
        guidance = guidance + variance_term
        if config.bias_weight != 0:
            variance_ratio = float(variance_term.norm() / (config.bias_weight * bias.norm()))
    guidance = (guidance + guidance.T) / 2  # exact symmetry for the eigensolvers

    basis, eigenvalues, residual, solver_used, gap = _smallest_eigenvectors(guidance, rank, config)
    info = {
        "sigma": sigma,
        "eigenvalues": eigenvalues.tolist(),
        "eigengap": gap,
        "eigensolver": solver_used,
        "residual": residual,
        "variance_bias_ratio": variance_ratio,
        "variance_bias_ratio_on_subspace": _subspace_ratio(basis, step.T @ basis, factor, variance, config),
    }
    return _Solved(basis=basis, project=lambda u: step.T @ u, info=info)


def _check_sigma(sigma: float, layer: str) -> None:
    if not math.isfinite(sigma):
        raise LoraDAError(f"Layer {layer!r}: the natural-gradient step is not finite; check the statistics.")
    if sigma == 0.0:
        raise LoraDAError(f"Layer {layer!r}: the gradient is exactly zero, so LoRA-DA has no direction to pick.")


def _subspace_ratio(
    basis: torch.Tensor, projected: torch.Tensor, factor: _InputFactor, variance: float, config: LoraDAConfig
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

    def __init__(self, factor: _InputFactor, g: torch.Tensor, w: torch.Tensor, alpha: float, variance: float):
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
    g: torch.Tensor, factor: _InputFactor, inv_y: torch.Tensor, rank: int, config: LoraDAConfig, layer: str
) -> _Solved:
    """The smallest eigenvectors of M by block Davidson on the implicit operator, then sigma from the same
    operator without the variance term, started from the converged block."""
    if not (torch.isfinite(g).all() and torch.isfinite(inv_y).all()):
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
    found = _block_davidson(operator.guidance, operator.step(omega), rank, config.eigensolver_tol,
                            LOBPCG_MAX_ITERATIONS, generator, factor.apply if variance else None)
    if variance == 0 and config.bias_weight != 0 and found.first_residual <= SIGMA_TOL:
        sigma_sq = -float(found.values[0]) / config.bias_weight  # M0 is -alpha D0 D0^T itself
    else:
        top = _block_davidson(operator.bias, found.vectors[:, : rank + 1], 1, SIGMA_TOL, LOBPCG_MAX_ITERATIONS,
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
SIGMA_TOL = 1e-6


def _block_size(rank: int, n: int) -> int:
    """Vectors iterated at once: twice the rank (at least rank + 8): convergence of the wanted r then depends on
    the gap to the (block + 1)-th eigenvalue, and more columns per triangular solve cost little more time."""
    return min(max(2 * rank, rank + 8), n)


@dataclass
class _Eigenpairs:
    vectors: torch.Tensor  # [n, block] Ritz vectors, by ascending Ritz value
    values: torch.Tensor  # [block]
    residual: float  # ||M X_r - X_r diag(values_r)||_F / max(|values_0|, |values_r|)
    first_residual: float  # the same for the first pair alone
    iterations: int
    converged: bool


def _block_davidson(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    rank: int,
    tol: float,
    max_iterations: int,
    generator: torch.Generator,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> _Eigenpairs:
    """The `rank` smallest eigenpairs of the symmetric operator `apply` ([n, k] -> [n, k]) by block Davidson:
    Rayleigh-Ritz on a basis grown by the residuals of the current Ritz vectors (the block Krylov space, without
    its breakdowns), restarted from the Ritz vectors when it reaches 6 blocks. Converged when the residual of the
    wanted pairs, relative to the size of the wanted end of the spectrum (not ||M||, which a stiff variance
    term can make 1e6 times larger), is <= tol. `precondition` (K) joins the expansion while the spectrum is
    stiff: it maps the huge eigenvalues of K^{-1} back to order one."""
    n, block = start.shape
    max_basis = min(6 * block, n)
    basis = _orthonormal_complement(start, None, generator)
    image = apply(basis)
    residual = first = math.inf
    for iteration in range(1, max_iterations + 1):
        gram = basis.T @ image
        values, coefficients = torch.linalg.eigh((gram + gram.T) / 2)
        kept = min(block, values.numel())
        vectors, images = basis @ coefficients[:, :kept], image @ coefficients[:, :kept]
        residuals = images - vectors * values[None, :kept]
        scale = max(abs(float(values[0])), abs(float(values[min(rank, kept - 1)]))) or 1.0
        residual = float(residuals[:, :rank].norm()) / scale
        first = float(residuals[:, 0].norm()) / (abs(float(values[0])) or 1.0)
        if residual <= tol or basis.shape[1] == n:
            return _Eigenpairs(vectors, values[:kept], residual, first, iteration, residual <= tol)
        expansion = residuals
        if precondition is not None and float(values[-1]) > STIFF_RATIO * scale:
            expansion = torch.cat([residuals, precondition(residuals)], dim=1)
        if basis.shape[1] + expansion.shape[1] > max_basis:
            basis, image = vectors, images  # thick restart from the current best block
        fresh = _orthonormal_complement(expansion, basis, generator)[:, : n - basis.shape[1]]
        if fresh.shape[1] == 0:
            return _Eigenpairs(vectors, values[:kept], residual, first, iteration, residual <= tol)
        basis, image = torch.cat([basis, fresh], dim=1), torch.cat([image, apply(fresh)], dim=1)
    return _Eigenpairs(vectors, values[:kept], residual, first, max_iterations, False)


def _orthonormal_complement(
    vectors: torch.Tensor, basis: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """Orthonormal columns spanning `vectors` [n, k] minus its part in the orthonormal `basis` [n, s]; directions
    that vanish (converged residuals, rank-deficient D) are replaced by seeded random ones so the basis still
    grows."""
    for attempt in range(2):
        projected = vectors
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            if basis is not None and basis.shape[1] > 0:
                projected = projected - basis @ (basis.T @ projected)
        q, r = torch.linalg.qr(projected)
        norms = vectors.norm(dim=0)
        keep = r.diagonal().abs() > 1e-10 * norms.clamp(min=torch.finfo(norms.dtype).tiny)
        if bool(keep.any()):
            q = q[:, keep]
            if basis is not None and basis.shape[1] > 0:  # one more pass: a kept column may carry rounding
                q, _ = torch.linalg.qr(q - basis @ (basis.T @ q))
            return q
        if attempt == 0:
            vectors = torch.randn(vectors.shape, generator=generator, dtype=vectors.dtype).to(vectors.device)
    return vectors[:, :0]


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

    # Wide groups first, one at a time with every thread (their Cholesky factorizations and triangular solves
    # scale with threads); then the rest in a pool, one thread each (see `solver_threads`).
    wide = [members for members in groups.values() if stats.gradient_sums[members[0]].shape[1] >= DENSE_MAX_SIZE]
    narrow = [members for members in groups.values() if stats.gradient_sums[members[0]].shape[1] < DENSE_MAX_SIZE]
    solutions: dict[str, LayerSolution] = {}
    device = stats.gradient_sums[names[0]].device if names else torch.device("cpu")
    previous = torch.get_num_threads()
    with tqdm(total=len(names), desc="LoRA-DA solve", unit="layer", disable=not show) as bar:
        for members in wide:
            solutions.update(solve_group(members))
            bar.update(len(members))
        # each worker thread runs its LAPACK calls on one thread: see `solver_threads`
        pool = ThreadPoolExecutor(solver_threads(device, previous), initializer=torch.set_num_threads, initargs=(1,))
        try:
            for solved in pool.map(solve_group, narrow):  # in order: the first error is raised
                solutions.update(solved)
                bar.update(len(solved))
        finally:
            pool.shutdown(cancel_futures=True)
            torch.set_num_threads(previous)
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


def _smallest_eigenvectors(
    matrix: torch.Tensor, rank: int, config: LoraDAConfig
) -> tuple[torch.Tensor, torch.Tensor, float, str, float | None]:
    """The `rank` eigenvectors of the smallest eigenvalues of a symmetric [n, n] matrix, by dense `eigh`."""
    n = matrix.shape[0]
    if config.eigensolver == "auto":
        # float32 LAPACK is several times faster; its answer is kept only if the float64 residual is small.
        values, vectors = torch.linalg.eigh(matrix.float())
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
        residual = _residual(matrix, vectors[:, :rank], values, rank)
        if residual <= config.eigensolver_tol:
            gap = float(values[rank] - values[rank - 1]) if n > rank else None
            return vectors[:, :rank], values[:rank], residual, "eigh-float32", gap
    values, vectors = torch.linalg.eigh(matrix)
    gap = float(values[rank] - values[rank - 1]) if n > rank else None
    residual = _residual(matrix, vectors[:, :rank], values, rank)
    return vectors[:, :rank], values[:rank], residual, "eigh", gap


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


def _top_singular_value(matrix: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Largest singular value of [n, m] `matrix`, from its smaller Gram matrix (pass it if already computed),
    in float32 and scaled against overflow."""
    if gram is None:
        gram = matrix.T @ matrix if matrix.shape[1] < matrix.shape[0] else matrix @ matrix.T
    scale = float(gram.diagonal().max())
    if not math.isfinite(scale) or scale <= 0.0:  # zero, inf or nan: the norm is the same
        return math.sqrt(max(scale, 0.0))
    return math.sqrt(max(float(torch.linalg.eigvalsh((gram / scale).float())[-1]), 0.0) * scale)


def _residual(matrix: torch.Tensor, vectors: torch.Tensor, values: torch.Tensor, rank: int) -> float:
    """Relative residual ||M U - U diag(values_r)||_F / max(|values_0|, |values_r|) of the first `rank` of
    ascending `values`: relative to the wanted end of the spectrum, like the iterative solver's."""
    scale = max(abs(float(values[0])), abs(float(values[min(rank, values.numel() - 1)]))) or 1.0
    return float((matrix @ vectors - vectors * values[None, :rank]).norm()) / scale


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
