"""Symmetric eigensolvers for the LoRA-DA solve, pure linear algebra: a dense one with a float32 shortcut, block
Davidson on an implicit operator (for wide layers, where the matrix is never formed), Chebyshev-filtered subspace
iteration on a batch of formed matrices (`filtered_subspace`), and the top eigenvalue or singular value for sigma."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch

# The iterative solver adds `K r` to its expansion (a preconditioner for the stiff variance term) once the
# largest Ritz value is this many times the wanted ones: below that plain residuals converged faster.
STIFF_RATIO = 300.0
# Ritz pairs beyond the wanted ones whose residuals also grow the basis: a block wider than that keeps more of the
# spectrum at each restart, but expanding by all of its residuals made each iteration dearer without fewer of them.
GUARD_VECTORS = 8

@dataclass
class Eigenpairs:
    vectors: torch.Tensor  # [n, block] Ritz vectors, by ascending Ritz value
    values: torch.Tensor  # [block]
    residual: float  # ||M X_r - X_r diag(values_r)||_F / max(|values_0|, |values_r|)
    first_residual: float  # the same for the first pair alone
    iterations: int
    converged: bool


def davidson_steps(
    start: torch.Tensor,
    rank: int,
    tol: float,
    max_iterations: int,
    generator: torch.Generator,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Generator[torch.Tensor, torch.Tensor, Eigenpairs]:
    """Block Davidson for the `rank` smallest eigenpairs of a symmetric operator, as a generator that yields each
    block [n, k] the operator must be applied to and is sent its image (`run_in_step` drives it, so that several
    such solves can share their applications). Rayleigh-Ritz on a basis grown by the residuals of the current
    Ritz vectors (the block Krylov space, without its breakdowns; those of the wanted pairs and GUARD_VECTORS
    more), restarted from the block's Ritz vectors when it reaches 6 blocks. Converged when the residual of the
    wanted pairs, relative to the size of the wanted end of the spectrum (not ||M||, which a stiff variance term
    can make 1e6 times larger), is <= tol. `precondition` (K) joins the expansion while the spectrum is stiff: it
    maps the huge eigenvalues of K^{-1} back to order one."""
    n, block = start.shape
    max_basis = min(6 * block, n)
    basis = orthonormal_complement(start, None, generator)
    image = yield basis
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
            return Eigenpairs(vectors, values[:kept], residual, first, iteration, residual <= tol)
        expansion = residuals[:, : rank + GUARD_VECTORS]
        if precondition is not None and float(values[-1]) > STIFF_RATIO * scale:
            expansion = torch.cat([expansion, precondition(expansion)], dim=1)
        if basis.shape[1] + expansion.shape[1] > max_basis:
            basis, image = vectors, images  # thick restart from the current best block
        fresh = orthonormal_complement(expansion, basis, generator)[:, : n - basis.shape[1]]
        if fresh.shape[1] == 0:
            return Eigenpairs(vectors, values[:kept], residual, first, iteration, residual <= tol)
        fresh_image = yield fresh
        basis, image = torch.cat([basis, fresh], dim=1), torch.cat([image, fresh_image], dim=1)
    return Eigenpairs(vectors, values[:kept], residual, first, max_iterations, False)


def run_in_step(solves: Sequence[Generator[torch.Tensor, torch.Tensor, Eigenpairs]],
                apply_all: Callable[[list[int], list[torch.Tensor]], list[torch.Tensor]]) -> list[Eigenpairs]:
    """Drive solves such as `davidson_steps` in step: each round, the blocks that the unfinished ones ask for go to
    one `apply_all(indices, blocks) -> images` call (`indices`: which of `solves` asked; e.g. one triangular solve
    with a shared factor for all of them)."""
    results: list[Eigenpairs | None] = [None] * len(solves)
    pending = {index: next(solve) for index, solve in enumerate(solves)}
    while pending:
        images = apply_all(list(pending), list(pending.values()))
        for (index, _), image in zip(list(pending.items()), images, strict=True):
            try:
                pending[index] = solves[index].send(image)
            except StopIteration as done:
                results[index] = done.value
                del pending[index]
    return results


def orthonormal_complement(
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


def seeded_normal(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normal entries from `seed`, drawn on `device` itself (a host draw and copy per layer would be a
    noticeable share of a GPU's batched solve)."""
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), dtype=dtype, device=device)


def smallest_eigenvectors(
    matrix: torch.Tensor, rank: int, tol: float, try_float32: bool
) -> tuple[torch.Tensor, torch.Tensor, float, str, float | None]:
    """The `rank` eigenvectors of the smallest eigenvalues of a symmetric [n, n] matrix, by dense `eigh` (first in
    float32 when `try_float32`, kept if its residual is within `tol`)."""
    n = matrix.shape[0]
    if try_float32:
        # float32 LAPACK is several times faster; its answer is kept only if the float64 residual is small.
        values, vectors = torch.linalg.eigh(matrix.float())
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
        residual = relative_residual(matrix, vectors[:, :rank], values, rank)
        if residual <= tol:
            gap = float(values[rank] - values[rank - 1]) if n > rank else None
            return vectors[:, :rank], values[:rank], residual, "eigh-float32", gap
    values, vectors = torch.linalg.eigh(matrix)
    gap = float(values[rank] - values[rank - 1]) if n > rank else None
    residual = relative_residual(matrix, vectors[:, :rank], values, rank)
    return vectors[:, :rank], values[:rank], residual, "eigh", gap


def top_eigenvalues(matrices: torch.Tensor, starts: torch.Tensor, tol: float, blocks: int = 4) -> list[float | None]:
    """Largest eigenvalue of each symmetric positive semidefinite matrix of a batch [b, n, n], by Rayleigh-Ritz on
    the block Krylov space of (at most 8 columns of) its start [b, n, k] and one seeded random column (so that no
    start lies in an invariant subspace without the top eigenvector); None where the top Ritz pair's residual is
    not within `tol` of the value (else the value is exact to about tol^2). From a block near the top eigenvectors
    this is a few products and one small QR, where a dense `eigvalsh` costs a whole eigendecomposition."""
    count, n, _ = matrices.shape
    random = seeded_normal((n, 1), 0, matrices.dtype, matrices.device)
    block = torch.cat([starts[..., : min(starts.shape[2], 8)], random.expand(count, n, 1)], dim=2)
    if blocks * block.shape[2] >= n:
        return [None] * count  # the space would be most of R^n: a dense eigensolver is as cheap
    krylov = [block]
    for _ in range(blocks - 1):
        krylov.append(matrices @ krylov[-1])
    basis = torch.linalg.qr(torch.cat(krylov, dim=2)).Q
    image = matrices @ basis
    values, vectors = torch.linalg.eigh(basis.mT @ image)
    top = vectors[..., -1:]
    residuals = (image @ top - values[:, -1, None, None] * (basis @ top)).norm(dim=(1, 2))
    pairs = torch.stack([values[:, -1], residuals], dim=1).tolist()  # one read from the device
    return [value if value > 0 and residual <= tol * value else None for value, residual in pairs]


def top_singular_value(matrix: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Largest singular value of [n, m] `matrix`, from its smaller Gram matrix (pass it if already computed),
    in float32 and scaled against overflow."""
    if gram is None:
        gram = matrix.T @ matrix if matrix.shape[1] < matrix.shape[0] else matrix @ matrix.T
    scale = float(gram.diagonal().max())
    if not math.isfinite(scale) or scale <= 0.0:  # zero, inf or nan: the norm is the same
        return math.sqrt(max(scale, 0.0))
    return math.sqrt(max(float(torch.linalg.eigvalsh((gram / scale).float())[-1]), 0.0) * scale)


def relative_residual(matrix: torch.Tensor, vectors: torch.Tensor, values: torch.Tensor, rank: int) -> float:
    """Relative residual ||M U - U diag(values_r)||_F / max(|values_0|, |values_r|) of the first `rank` of
    ascending `values`: relative to the wanted end of the spectrum, like the iterative solver's."""
    scale = max(abs(float(values[0])), abs(float(values[min(rank, values.numel() - 1)]))) or 1.0
    return float((matrix @ vectors - vectors * values[None, :rank]).norm()) / scale


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive (eigenvectors have no sign)."""
    index = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, index[None, :]))
    signs[signs == 0] = 1
    return vectors * signs


# Chebyshev-filtered subspace iteration: polynomial degree per cycle and cycles before a matrix is given up (its
# caller then runs a dense eigensolver). On the grid's SmolLM2 statistics, degree 12 from the step's own range
# reached a residual of 1e-4 in 2-3 cycles.
CHEBYSHEV_DEGREE = 12
CHEBYSHEV_MAX_CYCLES = 8
LANCZOS_STEPS = 8


@dataclass
class BatchedEigenpairs:
    vectors: torch.Tensor  # [b, n, k] Ritz vectors, by ascending Ritz value
    values: torch.Tensor  # [b, k]
    residuals: list[float]  # per matrix, as `Eigenpairs.residual`
    converged: list[bool]
    cycles: list[int]  # Rayleigh-Ritz steps taken


def filtered_subspace(
    matrices: torch.Tensor, starts: torch.Tensor, rank: int, tol: float, seeds: list[int],
    degree: int = CHEBYSHEV_DEGREE, max_cycles: int = CHEBYSHEV_MAX_CYCLES,
) -> BatchedEigenpairs:
    """The `rank` smallest eigenpairs of each symmetric matrix of a batch [b, n, n], by Chebyshev-filtered
    subspace iteration from `starts` [b, n, k]: Rayleigh-Ritz on the block, then a polynomial in the matrix that
    damps its spectrum from the block's largest Ritz value up to a Lanczos bound and grows the end below it.
    Every step is a batched product or a batch of k x k problems, so a GPU runs a batch of same-shaped layers in
    the kernel launches of one layer (a dense `eigh` runs the matrices in turn). A matrix stops once its residual
    (relative as in `davidson_steps`) is within `tol`; the ones still above it after `max_cycles` are returned
    with `converged` False. `seeds` (one per matrix) start the Lanczos bounds, so that a matrix's answer does not
    depend on the batch it is in."""
    count, n, k = starts.shape
    upper = _upper_bounds(matrices, seeds)
    vectors, values = torch.empty_like(starts), starts.new_empty(count, k)
    residuals, converged, cycles = [math.inf] * count, [False] * count, [max_cycles] * count
    active = list(range(count))
    block = starts
    for cycle in range(1, max_cycles + 1):
        basis = _orthonormal_columns(block)
        image = matrices @ basis
        gram = basis.mT @ image
        ritz, coefficients = torch.linalg.eigh((gram + gram.mT) / 2)
        block, images = basis @ coefficients, image @ coefficients
        scale = torch.maximum(ritz[:, 0].abs(), ritz[:, min(rank, k - 1)].abs())
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        wanted = images[..., :rank] - block[..., :rank] * ritz[:, None, :rank]
        relative = (wanted.norm(dim=(1, 2)) / scale).tolist()  # one read from the device per cycle
        index = torch.tensor(active, device=starts.device)
        vectors[index], values[index] = block, ritz
        keep = []
        for position, (matrix, residual) in enumerate(zip(active, relative, strict=True)):
            residuals[matrix] = residual
            if residual <= tol:
                converged[matrix], cycles[matrix] = True, cycle
            else:
                keep.append(position)
        if not keep or cycle == max_cycles:
            break
        if len(keep) < len(active):  # only the matrices still above tol go on
            rows = torch.tensor(keep, device=starts.device)
            matrices, block, ritz, upper = matrices[rows], block[rows], ritz[rows], upper[rows]
            active = [active[position] for position in keep]
        upper = torch.maximum(upper, ritz[:, -1])
        block = _chebyshev_filter(matrices, block, ritz[:, 0], ritz[:, -1], upper, degree)
    return BatchedEigenpairs(vectors, values, residuals, converged, cycles)


def _upper_bounds(matrices: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """An upper bound [b] of each matrix's spectrum: the top Ritz value of a few Lanczos steps from a seeded
    vector plus the last off-diagonal (Zhou & Saad's estimate; the filter only slows if it is loose)."""
    count, n, _ = matrices.shape
    start = torch.stack([seeded_normal((n, 1), seed, matrices.dtype, matrices.device) for seed in seeds])
    vector = start / start.norm(dim=1, keepdim=True)
    previous, beta = torch.zeros_like(vector), matrices.new_zeros(count)
    alphas, betas = [], []
    tiny = torch.finfo(matrices.dtype).tiny
    for _ in range(min(LANCZOS_STEPS, n)):
        product = matrices @ vector - beta[:, None, None] * previous
        alpha = (vector * product).sum(dim=(1, 2))
        product = product - alpha[:, None, None] * vector
        beta = product.norm(dim=(1, 2))
        alphas.append(alpha)
        betas.append(beta)
        previous, vector = vector, product / beta.clamp(min=tiny)[:, None, None]
    tridiagonal = torch.diag_embed(torch.stack(alphas, dim=1))
    if len(betas) > 1:
        off = torch.stack(betas[:-1], dim=1)
        tridiagonal = tridiagonal + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    return torch.linalg.eigvalsh(tridiagonal)[:, -1] + betas[-1]


def _orthonormal_columns(block: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning each [n, k] block of a batch: Cholesky QR twice (batched GEMMs and k x k
    factorizations) on unit-norm columns; Householder QR if a block is too ill-conditioned for it."""
    norms = block.norm(dim=1, keepdim=True)
    unit = block / norms.clamp(min=torch.finfo(block.dtype).tiny)
    basis = unit
    for _ in range(2):
        cholesky, info = torch.linalg.cholesky_ex(basis.mT @ basis)
        if bool(info.any()):
            return torch.linalg.qr(unit).Q
        basis = torch.linalg.solve_triangular(cholesky.mT, basis, upper=True, left=False)
    return basis


def _chebyshev_filter(
    matrices: torch.Tensor, block: torch.Tensor, lowest: torch.Tensor, cut: torch.Tensor, upper: torch.Tensor,
    degree: int,
) -> torch.Tensor:
    """p(M) block for the Chebyshev polynomial p of `degree` that stays within [-1, 1] on [cut, upper] and grows
    fastest below it, scaled to about 1 at `lowest` (the three-term recurrence of Zhou & Saad, which keeps the
    values from overflowing); all arguments but `block` [b, n, k] and `degree` are per matrix [b]."""
    spread = torch.finfo(block.dtype).eps * (upper.abs() + lowest.abs())
    half = ((upper - cut) / 2).clamp(min=spread.clamp(min=torch.finfo(block.dtype).tiny))[:, None, None]
    center = ((upper + cut) / 2)[:, None, None]
    sigma = half / (lowest[:, None, None] - center)
    first = sigma
    current = (matrices @ block - center * block) * (sigma / half)
    for _ in range(2, degree + 1):
        following = 1.0 / (2.0 / first - sigma)
        step = (matrices @ current - center * current) * (2.0 * following / half) - (sigma * following) * block
        block, current, sigma = current, step, following
    return current
