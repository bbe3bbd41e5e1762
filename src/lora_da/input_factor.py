"""The damped input factor `K = Z + lam I` of a layer and its Cholesky factor, shared by the layers that read
one input: solves, products and the repair of a Z that rounding left indefinite."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
        """K^{-1} rhs for rhs [n, k], by two triangular solves (faster than torch's `cholesky_solve` for a few
        columns on CPUs)."""
        lower = torch.linalg.solve_triangular(self.cholesky, rhs, upper=False)
        return torch.linalg.solve_triangular(self.cholesky.T, lower, upper=True)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """K x = L (L^T x) for x [n, k]."""
        return self.cholesky @ (self.cholesky.T @ x)


def factor_inverses(factors: list[InputFactor]) -> list[torch.Tensor]:
    """K^{-1} of each factor, the missing ones of one size computed together (one batched call on a GPU)."""
    by_size: dict[int, list[InputFactor]] = {}
    for factor in {id(factor): factor for factor in factors if factor.inverse is None}.values():  # each once
        by_size.setdefault(factor.cholesky.shape[0], []).append(factor)
    for same in by_size.values():
        inverses = torch.cholesky_inverse(stacked([factor.cholesky for factor in same]))
        for factor, inverse in zip(same, inverses, strict=True):
            factor.inverse = inverse
    return [factor.get_inverse() for factor in factors]


def factor_input(input_factor: torch.Tensor | PackedGram, config: LoraDAConfig, layer: str = "layer") -> InputFactor:
    """Cholesky-factor `Z + lam I` in float64 (Z: [n, n] of any float dtype, or packed)."""
    return factor_inputs([input_factor], config, [layer])[0]


def factor_inputs(inputs: Sequence[torch.Tensor | PackedGram], config: LoraDAConfig, layers: Sequence[str]
                  ) -> list[InputFactor]:
    """`factor_input` of each; the narrow ones of one size together (one batched factorization and one read from
    the device for all of them)."""
    zs = [_float64(z, config) for z in inputs]
    factors: list[InputFactor | None] = [None] * len(zs)
    by_size: dict[int, list[int]] = {}
    for index, z in enumerate(zs):
        by_size.setdefault(_width(z), []).append(index)
    for n, same in by_size.items():
        if n >= DENSE_MAX_SIZE:
            for index in same:
                damping = _damping(zs[index], config)
                cholesky, info, clamped, shift = _factor_wide(zs[index], damping)
                factors[index] = _checked(InputFactor(cholesky, damping, clamped, shift=shift), info, layers[index])
            continue
        damped = stacked([_damped(zs[index], 0.0) for index in same])
        diagonal = damped.diagonal(dim1=1, dim2=2)
        if config.damping_mode == "relative":
            dampings = config.damping * diagonal.mean(dim=1)
        else:
            dampings = torch.full((len(same),), config.damping, dtype=damped.dtype, device=damped.device)
        diagonal.add_(dampings[:, None])
        cholesky, info = torch.linalg.cholesky_ex(damped)
        del damped, diagonal
        # one read from the device: a NaN or inf survives the sum
        infos, sums, dampings = torch.stack([info.to(cholesky.dtype), cholesky.sum(dim=(1, 2)), dampings]).tolist()
        for position, index in enumerate(same):
            if infos[position] == 0 and math.isfinite(sums[position]):
                factors[index] = InputFactor(cholesky[position], dampings[position])
            else:  # rounding left Z indefinite (repaired one by one), or an error that names the layer
                factors[index] = _factor_narrow(zs[index], dampings[position], layers[index])
    return factors


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(tensors)`, without a copy for one tensor (a wide layer's n x n factor is a GiB)."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _float64(z: torch.Tensor | PackedGram, config: LoraDAConfig) -> torch.Tensor | PackedGram:
    """Z in float64 (the identity under `fisher="identity"`)."""
    if config.fisher == "identity":
        return torch.eye(_width(z), dtype=torch.float64, device=z.device)
    if isinstance(z, PackedGram):
        return PackedGram(z.values.to(torch.float64), z.width)
    return z.to(torch.float64)


def _width(z: torch.Tensor | PackedGram) -> int:
    return z.width if isinstance(z, PackedGram) else z.shape[0]


def _damping(z: torch.Tensor | PackedGram, config: LoraDAConfig) -> float:
    """lam of Z: `damping`, times Z's mean diagonal under `damping_mode="relative"`."""
    if config.damping_mode == "relative":
        return config.damping * float(z.diagonal().mean())
    return config.damping


def _factor_narrow(z: torch.Tensor | PackedGram, damping: float, layer: str) -> InputFactor:
    """The Cholesky factor of one narrow layer's damped Z, with a Z that rounding left indefinite clamped by eigh."""
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
