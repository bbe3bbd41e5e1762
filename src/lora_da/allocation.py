"""Data-aware ranks: split a budget of trainable parameters over the adapted weights by what each added rank-1
direction is worth.

A weight of shape `[m, n]` at rank `r` costs `r * (m + n)` trainable parameters. Given, per weight, the gain of its
1st, 2nd, ... direction (non-increasing), `allocate_ranks` picks the ranks that maximize the total gain at exactly
the budget of a uniform rank. Weights of equal cost `m + n` trade directions one for one; across costs the budget
is split by an exact knapsack over the few distinct costs, so no parameter of the budget is left unspent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import pairwise

import numpy as np

from .config import LoraDAError


@dataclass
class RankAllocation:
    """Ranks chosen per weight, with the budget they fill and the gain of every chosen direction."""

    ranks: dict[str, int]
    budget: int  # trainable parameters of the uniform rank
    used: int  # trainable parameters of `ranks` (equal to `budget` when it can be met exactly)
    gains: dict[str, list[float]] = field(default_factory=dict)  # per weight, the gain of each chosen direction

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"ranks": self.ranks, "budget": self.budget, "used": self.used, "gains": self.gains}


def lora_da_gains(info: Mapping, normalize: bool = True) -> list[float]:
    """Gain of each successive direction of one weight from its LoRA-DA solve report (`LayerSolution.info`).

    The objective `tr(U^T M U)` falls by `-lambda_k` when the k-th smallest eigenvector of `M` joins `U`. The
    report's eigenvalues are those of `M` for the step normalized by `sigma`, so they are scaled back by
    `sigma^2`: the gains of different weights are then in the same units (squared parameter distance).
    """
    scale = float(info["sigma"]) ** 2 if normalize else 1.0
    return [-scale * float(value) for value in info["eigenvalues"]]


def gradient_gains(scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], budget: int,
                   count: int) -> dict[str, list[float]]:
    """Gains of `count` directions per weight that lead `allocate_ranks` to ranks in proportion to `scores`
    (e.g. gradient sensitivities, the mean of |W * G|): weight l's share of the budget is `budget * s_l / sum(s)`,
    so its target rank is `t_l = share / (m + n)`. Each direction's gain is the rise of `-(m + n) (r - t_l)^2`,
    which falls with the rank and is the same per parameter for every weight at its target."""
    total = sum(scores.values())
    if not (math.isfinite(total) and total > 0) or any(v < 0 or not math.isfinite(v) for v in scores.values()):
        raise LoraDAError("Gradient sensitivities must be finite, >= 0 and not all 0.")
    gains = {}
    for name, (m, n) in shapes.items():
        target = budget * scores[name] / total / (m + n)
        gains[name] = [(m + n) * (2 * target - 2 * k + 1) for k in range(1, count + 1)]
    return gains


def uniform_budget(shapes: Mapping[str, tuple[int, int]], rank: int | Mapping[str, int]) -> int:
    """Trainable parameters of LoRA at `rank` (one for every weight, or one per weight): `sum(r * (m + n))`."""
    return sum(_rank_of(rank, name) * (m + n) for name, (m, n) in shapes.items())


def _rank_of(rank: int | Mapping[str, int], name: str) -> int:
    return rank if isinstance(rank, int) else int(rank[name])


def allocate_ranks(
    gains: Mapping[str, Sequence[float]],
    shapes: Mapping[str, tuple[int, int]],
    rank: int | Mapping[str, int],
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> RankAllocation:
    """Ranks per weight that maximize the summed gain within the trainable parameters of the ranks `rank` (one
    for every weight, or one per weight, e.g. a `rank_pattern`).

    Args:
        gains: per weight, the gain of its 1st, 2nd, ... direction; non-increasing; at least `min_rank` of them.
            A weight's rank never exceeds the number of gains given.
        shapes: per weight, `(m, n)`.
        rank: the ranks whose trainable parameters are the budget.
        min_rank: the smallest rank of every weight.
        max_rank: the largest rank of every weight (None: no bound but `min(m, n)`).

    Deterministic. Where every weight's gain per parameter is equal, the result is `rank` itself; where the budget
    cannot be met exactly within the bounds, the most of it that can be is used.
    """
    names = sorted(shapes)
    if set(gains) != set(names):
        raise LoraDAError("`gains` and `shapes` must name the same weights.")
    if min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise LoraDAError(f"Rank bounds must satisfy 1 <= min_rank <= max_rank, got {min_rank} and {max_rank}.")
    costs = {name: sum(shapes[name]) for name in names}
    tops = {name: min(len(gains[name]), *shapes[name], max_rank or math.inf) for name in names}
    short = [name for name in names if tops[name] < min_rank]
    if short:
        raise LoraDAError(f"Weight {short[0]!r} allows at most rank {tops[short[0]]}, below min_rank={min_rank}.")
    for name in names:
        values = list(gains[name][: tops[name]])
        if any(not math.isfinite(v) for v in values) or any(b > a for a, b in pairwise(values)):
            raise LoraDAError(f"The gains of {name!r} must be finite and non-increasing.")
    budget = uniform_budget(shapes, rank)
    spare = budget - sum(min_rank * costs[name] for name in names)
    if spare < 0:
        raise LoraDAError(f"min_rank={min_rank} on every weight exceeds the budget of {budget} trainable parameters.")

    # Within one cost the best n directions are the n largest gains (each weight's gains fall with its rank).
    by_cost: dict[int, list[tuple[float, int, str]]] = {}
    for name in names:
        for k in range(min_rank, tops[name]):
            by_cost.setdefault(costs[name], []).append((-float(gains[name][k]), k, name))
    for options in by_cost.values():
        options.sort()
    counts = _split_budget(by_cost, spare, {cost: _uniform_count(names, costs, cost, rank, min_rank, tops)
                                            for cost in by_cost})
    ranks = {name: min_rank for name in names}
    for cost, options in by_cost.items():
        for _, _, name in options[: counts[cost]]:
            ranks[name] += 1
    used = sum(ranks[name] * costs[name] for name in names)
    chosen = {name: [float(g) for g in gains[name][: ranks[name]]] for name in names}
    return RankAllocation(ranks=ranks, budget=budget, used=used, gains=chosen)


def _uniform_count(names: list[str], costs: Mapping[str, int], cost: int, rank: int | Mapping[str, int],
                   min_rank: int, tops: Mapping[str, int]) -> int:
    """Directions above `min_rank` that the uniform rank gives the weights of one cost."""
    return sum(max(0, min(_rank_of(rank, name), tops[name]) - min_rank) for name in names if costs[name] == cost)


def _split_budget(by_cost: Mapping[int, list[tuple[float, int, str]]], spare: int,
                  uniform: Mapping[int, int]) -> dict[int, int]:
    """How many extra directions each cost gets: an exact knapsack over the distinct costs, in units of their
    greatest common divisor. Near-ties go to the split closest to the uniform rank's."""
    if not by_cost:
        return {}
    unit = reduce(math.gcd, by_cost)
    capacity = spare // unit
    total_gain = sum(abs(g) for options in by_cost.values() for g, _, _ in options) or 1.0
    most = max(len(options) for options in by_cost.values())
    tie_weight = 1e-9 * total_gain / (1 + most) ** 2
    best = np.full(capacity + 1, -np.inf)
    best[0] = 0.0
    choices = {}
    for cost, options in sorted(by_cost.items()):
        width = cost // unit
        cumulative = np.concatenate([[0.0], np.cumsum([-g for g, _, _ in options])])
        counts = np.arange(len(options) + 1)
        values = cumulative - tie_weight * (counts - uniform[cost]) ** 2
        merged = np.full(capacity + 1, -np.inf)
        choice = np.zeros(capacity + 1, dtype=np.int64)
        for count in range(min(len(options), capacity // width) + 1):
            shift = count * width
            candidate = best[: capacity + 1 - shift] + values[count]
            better = candidate > merged[shift:]
            merged[shift:][better] = candidate[better]
            choice[shift:][better] = count
        best, choices[cost] = merged, choice
    reachable = np.flatnonzero(np.isfinite(best))
    position = int(reachable[-1])  # the whole budget where it can be met, else the most of it
    counts = {}
    for cost in sorted(by_cost, reverse=True):
        counts[cost] = int(choices[cost][position])
        position -= counts[cost] * (cost // unit)
    return counts
