"""The damped input factor `K = Z + lam I` of a layer and its Cholesky factor, shared by the layers that read
one input: solves, products and the repair of a Z that rounding left indefinite."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LoraDAConfig, LoraDAError
from .gram import PackedGram

# From this input size on, "auto" never forms M nor runs a dense eigendecomposition (any device), input
# factors that fail Cholesky are shifted instead of clamped by `eigh`, and `solve_all` gives each such layer
# all CPU threads instead of one thread per layer.
DENSE_MAX_SIZE = 4096

@dataclass
class InputFactor:
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


def factor_input(input_factor: torch.Tensor | PackedGram, config: LoraDAConfig, layer: str = "layer") -> InputFactor:
    """Cholesky-factor `Z + lam I` in float64 (Z: [n, n] of any float dtype, or packed)."""
    if isinstance(input_factor, PackedGram):
        z = PackedGram(input_factor.values.to(torch.float64), input_factor.width)
        n = z.width
    else:
        z = input_factor.to(torch.float64)
        n = z.shape[0]
    if config.fisher == "identity":
        z = torch.eye(n, dtype=torch.float64, device=z.device)
    damping = config.damping
    if config.damping_mode == "relative":
        damping = config.damping * float(z.diagonal().mean())
    if n >= DENSE_MAX_SIZE:
        cholesky, info, clamped, shift = _factor_wide(z, damping)
        return _checked(InputFactor(cholesky=cholesky, damping=damping, clamped=clamped, shift=shift), info, layer)
    damped = _damped(z, damping)
    cholesky, info = torch.linalg.cholesky_ex(damped)
    clamped = False
    if int(info) != 0:
        # Z is a Gram matrix, so negative eigenvalues are rounding: drop them, then damp.
        damped.diagonal().sub_(damping)
        values, vectors = torch.linalg.eigh(damped)
        damped = (vectors * values.clamp(min=0)) @ vectors.T
        damped.diagonal().add_(damping)
        cholesky, info = torch.linalg.cholesky_ex(damped)
        clamped = True
    return _checked(InputFactor(cholesky=cholesky, damping=damping, clamped=clamped), info, layer)


def _damped(z: torch.Tensor | PackedGram, damping: float) -> torch.Tensor:
    """Z (symmetrized) + damping I as a new [n, n] tensor: the caller's Z is never written to."""
    if isinstance(z, PackedGram):
        damped = z.full()
    else:
        damped = z + z.T
        damped.mul_(0.5)
    damped.diagonal().add_(damping)
    return damped


def _factor_wide(z: torch.Tensor | PackedGram, damping: float) -> tuple[torch.Tensor, torch.Tensor, bool, float]:
    """Cholesky factor of a wide layer's damped Z, computed in the damped matrix's own storage (one n x n matrix
    beside packed Z).
    A dense eigh would take minutes here, so a Z that rounding left indefinite is shifted instead of clamped:
    by what float32 rounding of Z can reach, ||E||_2 <= eps ||Z||_F, growing tenfold while Cholesky fails."""
    step = float(torch.finfo(torch.float32).eps) * float(z.norm())
    for shift in (0.0, step, 10 * step, 100 * step, 1000 * step):
        # The damped matrix is symmetric, so its transpose (a column-major view) is the same matrix in the layout
        # LAPACK factors in place; a row-major `out` would be copied first (one more n x n: 0.9 GiB at n=11008).
        lower = _damped(z, damping + shift).T
        info = torch.empty((), dtype=torch.int32, device=lower.device)
        torch.linalg.cholesky_ex(lower, out=(lower, info))
        if int(info) == 0:
            break
    return lower, info, shift > 0.0, shift


def _checked(factor: InputFactor, info: torch.Tensor, layer: str) -> InputFactor:
    """`factor` if its Cholesky factorization succeeded, else a `LoraDAError` that says what to change."""
    if int(info) != 0 or not bool(factor.cholesky.sum().isfinite()):  # one read: NaN or inf survives the sum
        raise LoraDAError(
            f"Layer {layer!r}: the input factor Z + damping*I is not positive definite (damping="
            f"{factor.damping:g}); increase `damping`."
        )
    return factor
