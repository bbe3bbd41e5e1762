"""Packed storage of a symmetric Gram sum `Z = sum_t x_t x_t^T` [n, n]: its row blocks on and above the block
diagonal, one after another in a 1-D tensor, about half of n x n (SmolLM2's n = 1536: 0.67 of it, a 7B's
n = 11008: 0.52). The products below the diagonal are never computed nor stored; a full matrix is built only
where the solve needs one, for one layer at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Rows per block, at most: smaller blocks store and compute less (the diagonal blocks are full squares) but make
# more, smaller GEMMs.
GRAM_BLOCK = 512


def gram_blocks(n: int) -> list[tuple[int, int]]:
    """(start, end) of the row blocks of an [n, n] Gram sum: about equal, at most GRAM_BLOCK rows each."""
    count = max(1, -(-n // GRAM_BLOCK))
    size = max(1, -(-n // count))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def packed_size(n: int) -> int:
    """Elements of the packed storage of an [n, n] Gram sum."""
    return sum((end - start) * (n - start) for start, end in gram_blocks(n))


def block_views(packed: torch.Tensor, n: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, view [end - start, n - start]) of each row block of `packed` (views share its storage)."""
    if packed.numel() != packed_size(n):
        raise ValueError(f"a packed Gram sum of width {n} has {packed_size(n)} elements, not {packed.numel()}")
    views, offset = [], 0
    for start, end in gram_blocks(n):
        size = (end - start) * (n - start)
        views.append((start, end, packed[offset : offset + size].view(end - start, n - start)))
        offset += size
    return views


def new_packed(n: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Uninitialized packed storage for an [n, n] Gram sum."""
    return torch.empty(packed_size(n), dtype=dtype, device=device)


HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def multiplies_half_into_float32(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch on this device multiplies `dtype` (bfloat16, float16) matrices into a float32 result at the
    half type's own speed (`torch.mm(..., out_dtype=torch.float32)`: CUDA in recent torch, not a CPU). The
    products of half-precision numbers are exact in float32, so such GEMMs lose nothing against upcast inputs,
    and on a GPU they run on the tensor cores, many times faster than float32 GEMMs."""
    if dtype not in HALF_DTYPES or device_type == "cpu":
        return False
    try:
        ones = torch.ones(2, 2, dtype=dtype, device=device_type)
        return bool(torch.mm(ones, ones, out_dtype=torch.float32).eq(2).all())
    except (RuntimeError, TypeError):  # a backend without the op (the dispatcher raises a RuntimeError subclass)
        return False


def float32_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left @ right` in float32: half-precision inputs stay so where `multiplies_half_into_float32`."""
    if left.shape[1] and left.dtype == right.dtype and multiplies_half_into_float32(left.device.type, left.dtype):
        return torch.mm(left, right, out_dtype=torch.float32)  # (no inner dimension: the plain path's zeros)
    return left.float() @ right.float()


def add_gram(packed: torch.Tensor, xs: torch.Tensor, overwrite: bool = False) -> None:
    """`packed += xs^T xs` (`=` when `overwrite`) for rows `xs` [tokens, n], a row block at a time. Products are
    formed in float32 (see `float32_product`) and added into packed's dtype (float64 totals)."""
    n = xs.shape[1]
    for start, end, view in block_views(packed, n):
        if packed.dtype == xs.dtype:  # one GEMM into the storage, no temporary
            view.addmm_(xs[:, start:end].T, xs[:, start:], beta=0.0 if overwrite else 1.0)
        elif overwrite:
            view.copy_(float32_product(xs[:, start:end].T, xs[:, start:]))
        else:
            view += float32_product(xs[:, start:end].T, xs[:, start:])


def pack(full: torch.Tensor) -> torch.Tensor:
    """The packed storage of a symmetric [n, n] matrix (its blocks on and above the block diagonal)."""
    n = full.shape[0]
    return torch.cat([full[start:end, start:].reshape(-1) for start, end in gram_blocks(n)])


@dataclass(frozen=True)
class PackedGram:
    """A symmetric [width, width] matrix in packed storage (see the module docstring)."""

    values: torch.Tensor  # 1-D, packed_size(width)
    width: int

    @property
    def device(self) -> torch.device:
        return self.values.device

    def norm(self) -> torch.Tensor:
        """Frobenius norm of the full matrix (blocks off the diagonal count twice)."""
        total = torch.zeros((), dtype=self.values.dtype, device=self.device)
        for start, end, view in self.blocks():
            total += view[:, : end - start].square().sum() + 2 * view[:, end - start :].square().sum()
        return total.sqrt()

    def diagonal(self) -> torch.Tensor:
        """The diagonal [width] (a new tensor)."""
        return torch.cat([view[:, : end - start].diagonal() for start, end, view in self.blocks()])

    def blocks(self) -> list[tuple[int, int, torch.Tensor]]:
        return block_views(self.values, self.width)

    def full(self) -> torch.Tensor:
        """The symmetric [width, width] matrix as a new tensor; diagonal blocks are symmetrized (their two halves
        come from one GEMM and may differ in the last bit)."""
        out = torch.empty(self.width, self.width, dtype=self.values.dtype, device=self.device)
        for start, end, view in self.blocks():
            out[start:end, start:] = view
            out[end:, start:end] = view[:, end - start :].T
            square = out[start:end, start:end]
            square.copy_((square + square.T) / 2)
        return out
