"""Rank allocation under a parameter budget, against exhaustive search on small cases."""

from __future__ import annotations

import itertools
import random

import pytest

from lora_da.allocation import allocate_ranks, lora_da_gains, uniform_budget
from lora_da.config import LoraDAError

# One block of a small Llama: q/o, k/v and the MLP have three different costs m + n.
BLOCK = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "gate": (176, 64), "up": (176, 64),
         "down": (64, 176)}
SHAPES = {f"{layer}.{name}": shape for layer in range(3) for name, shape in BLOCK.items()}


def falling_gains(seed: int, count: int = 32) -> dict[str, list[float]]:
    rng = random.Random(seed)
    return {name: sorted((rng.expovariate(1.0) * rng.choice([0.1, 1, 10]) for _ in range(count)), reverse=True)
            for name in SHAPES}


def total_gain(gains, ranks) -> float:
    return sum(sum(gains[name][: ranks[name]]) for name in ranks)


class TestBudget:
    @pytest.mark.parametrize("rank", [2, 8, 16])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_the_budget_is_met_exactly(self, rank, seed):
        allocation = allocate_ranks(falling_gains(seed), SHAPES, rank, max_rank=32)
        assert allocation.used == allocation.budget == uniform_budget(SHAPES, rank)
        assert sum(r * sum(SHAPES[name]) for name, r in allocation.ranks.items()) == allocation.budget

    def test_deterministic(self):
        first = allocate_ranks(falling_gains(3), SHAPES, 8, max_rank=32)
        again = allocate_ranks(dict(reversed(list(falling_gains(3).items()))), SHAPES, 8, max_rank=32)
        assert first.ranks == again.ranks

    def test_equal_gain_per_parameter_gives_the_uniform_rank(self):
        gains = {name: [0.5 * sum(shape)] * 32 for name, shape in SHAPES.items()}
        assert set(allocate_ranks(gains, SHAPES, 8).ranks.values()) == {8}

    def test_bounds_and_shapes_are_respected(self):
        gains = {name: [1e6] * 40 if name.startswith("0.k") else [1.0] * 40 for name in SHAPES}
        ranks = allocate_ranks(gains, SHAPES, 8, min_rank=2, max_rank=24).ranks
        assert all(2 <= r <= min(24, *SHAPES[name]) for name, r in ranks.items())
        assert ranks["0.k"] == 16  # min(m, n): the most its gains ask for that the shape allows

    def test_the_gains_given_bound_the_rank(self):
        gains = {name: [1.0] * 4 for name in SHAPES}
        gains["0.q"] = [100.0] * 10
        assert allocate_ranks(gains, SHAPES, 2).ranks["0.q"] == 10


class TestOptimality:
    @pytest.mark.parametrize("seed", range(6))
    def test_matches_exhaustive_search(self, seed):
        rng = random.Random(seed)
        shapes = {"a": (6, 4), "b": (3, 4), "c": (6, 4), "d": (2, 6)}
        gains = {name: sorted((rng.random() for _ in range(4)), reverse=True) for name in shapes}
        budget = uniform_budget(shapes, 2)
        best = max(
            (dict(zip(shapes, ranks, strict=True))
             for ranks in itertools.product(*(range(1, min(4, *shape) + 1) for shape in shapes.values()))
             if sum(r * sum(shape) for r, shape in zip(ranks, shapes.values(), strict=True)) == budget),
            key=lambda ranks: total_gain(gains, ranks),
        )
        found = allocate_ranks(gains, shapes, 2, max_rank=4)
        assert found.used == budget
        assert total_gain(gains, found.ranks) == pytest.approx(total_gain(gains, best), rel=1e-12)


class TestGains:
    def test_lora_da_gains_undo_the_normalization(self):
        info = {"sigma": 2.0, "eigenvalues": [-0.5, -0.25, 0.01]}
        assert lora_da_gains(info) == [2.0, 1.0, -0.04]
        assert lora_da_gains(info, normalize=False) == [0.5, 0.25, -0.01]


class TestBadInput:
    def test_rising_gains_are_refused(self):
        gains = {name: [1.0, 2.0] for name in SHAPES}
        with pytest.raises(LoraDAError, match="non-increasing"):
            allocate_ranks(gains, SHAPES, 1)

    def test_min_rank_above_the_budget_is_refused(self):
        with pytest.raises(LoraDAError, match="exceeds the budget"):
            allocate_ranks(falling_gains(0), SHAPES, 2, min_rank=4)

    def test_too_few_gains_for_min_rank(self):
        gains = {name: [1.0] for name in SHAPES}
        with pytest.raises(LoraDAError, match="below min_rank"):
            allocate_ranks(gains, SHAPES, 1, min_rank=2)
