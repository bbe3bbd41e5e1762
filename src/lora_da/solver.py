"""The LoRA-DA solve: per layer, from (G, Z, y) to the initial factors (A, B). Pure tensor math."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .config import LoraDAConfig, check_ranks
from .eigensolvers import fix_signs
from .gram import PackedGram, packed_size
from .input_factor import DENSE_MAX_SIZE, InputFactor, factor_input, factor_inputs, stacked
from .layer_solvers import (
    ImplicitLayer,
    Solved,
    block_size,
    dense_eigenvectors,
    finish_dense,
    form_dense,
    layer_seed,
    solve_implicit,
)

# "auto" on a CPU solves layers with at least this many inputs iteratively, on an implicit operator: from about
# this size that beats forming M and a dense eigh, and the gap grows like n^3 / n^2.
AUTO_LOBPCG_MIN_SIZE = 384
# "chebyshev" solves the formed M of narrow layers together, in chunks of up to this much solve memory (each
# layer counted as `solve_working_bytes` counts a formed M); the memory plan keeps this much free for the solve.
# SmolLM2-135M's 210 layers then take 6 chunks (each a few batched calls and reads from the device), not 20. On a
# CPU the chunks are what the solver threads share out: smaller ones keep both of 2 cores busy (21 s vs 29 s).
CHUNK_BYTES = 2 * 2**30
CPU_CHUNK_BYTES = 512 * 2**20
# "chebyshev" (the default on CUDA) forms M only below this many inputs: at 11008 (a 7B down projection) the
# formed n x n matrices take about 8 GiB, at 28672 (70B) 52 GiB against block Davidson's 12 GiB.
CHEBYSHEV_MAX_SIZE = 16384
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
    check_ranks({layer: tuple(gradient.shape)}, rank)
    config = replace(config, eigensolver=config.eigensolver_on(gradient.device.type))
    if not isinstance(input_factor, InputFactor):
        input_factor = factor_input(input_factor, config, layer)
    return _solve_layers([_LayerInput(layer, gradient, input_factor, output_factor, rank)], config)[0]


@dataclass
class _LayerInput:
    """What one layer's solve reads: G [m, n], the factorization of its Z, y [m] and its rank."""

    name: str
    gradient: torch.Tensor
    factor: InputFactor
    output_factor: torch.Tensor
    rank: int


def _solve_layers(layers: list[_LayerInput], config: LoraDAConfig) -> list[LayerSolution]:
    """Solve each layer: the wide ones iteratively one by one, the formed ones in batches of one shape (their
    eigenproblems all at once under "chebyshev"). A formed layer's `seconds` are its share of the batched work."""
    inverse_ys, medians, y_dampings = _output_weights([layer.output_factor for layer in layers], config)
    solved: list[Solved | None] = [None] * len(layers)
    seconds = [0.0] * len(layers)
    by_factor: dict[int, list[int]] = {}  # layers solved iteratively, by the input factor they share
    for index, layer in enumerate(layers):
        if _iterative(layer, config):
            by_factor.setdefault(id(layer.factor), []).append(index)
    for same in by_factor.values():
        start = time.perf_counter()
        answers = solve_implicit([ImplicitLayer(layers[i].gradient.to(torch.float64), inverse_ys[i], layers[i].rank,
                                                layers[i].name) for i in same], layers[same[0]].factor, config)
        for index, answer in zip(same, answers, strict=True):
            n = layers[index].gradient.shape[1]
            if answer.info["converged"] or config.eigensolver != "auto" or n >= DENSE_MAX_SIZE:
                solved[index] = answer  # else the dense path below: exact and still affordable at this size
            seconds[index] = (time.perf_counter() - start) / len(same)
    start = time.perf_counter()
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for index, layer in enumerate(layers):
        if solved[index] is None:
            shapes.setdefault((*layer.gradient.shape, layer.rank), []).append(index)
    batches = [form_dense(stacked([layers[i].gradient for i in same]).to(torch.float64),
                          [layers[i].factor for i in same], stacked([inverse_ys[i] for i in same]), config,
                          [layers[i].name for i in same]) for same in shapes.values()]
    found = dense_eigenvectors(batches, [rank for _, _, rank in shapes], config)
    for same, batch, answers in zip(shapes.values(), batches, found, strict=True):
        solved_batch = finish_dense(batch, answers, config)
        for index, answer in zip(same, solved_batch, strict=True):
            solved[index] = answer
    del batches
    dense = [index for same in shapes.values() for index in same]
    share = (time.perf_counter() - start) / max(len(dense), 1)
    for index in dense:
        seconds[index] = share
    return [_solution(*row, config) for row in zip(layers, solved, medians, y_dampings, seconds, strict=True)]


def _iterative(layer: _LayerInput, config: LoraDAConfig) -> bool:
    """Whether `layer` is solved by block Davidson on the implicit operator (see `uses_lobpcg`)."""
    n = layer.gradient.shape[1]
    return uses_lobpcg(n, block_size(layer.rank, n), layer.gradient.device, config)


def _output_weights(output_factors: list[torch.Tensor], config: LoraDAConfig
                    ) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Per layer 1 / (y + lam) [m] in float64, median y and the damping lam of y (the medians read from the
    device at once)."""
    ys = [y.to(torch.float64) for y in output_factors]
    if config.fisher == "identity":
        ys = [torch.ones_like(y) for y in ys]
    medians = torch.stack([y.median() for y in ys]) if ys else torch.empty(0)
    relative = config.damping_mode == "relative"
    dampings = config.damping * medians if relative else torch.full_like(medians, config.damping)
    inverses = [1.0 / (y + damping) for y, damping in zip(ys, dampings, strict=True)]
    median_values, damping_values = torch.stack([medians, dampings]).tolist()  # one read from the device
    return inverses, median_values, damping_values


def _solution(layer: _LayerInput, solved: Solved, median_y: float, y_damping: float, seconds: float,
              config: LoraDAConfig) -> LayerSolution:
    """The factors (A, B) of a solved basis, with the report."""
    start = time.perf_counter()
    basis = fix_signs(solved.basis)
    a, b = _balance(basis.T.contiguous(), solved.project(basis), config)
    info = {
        "shape": list(layer.gradient.shape),
        "rank": layer.rank,
        **solved.info,
        "median_y_over_damping": median_y / y_damping if y_damping > 0 else math.inf,
        "input_factor_clamped": layer.factor.clamped,
        "seconds": seconds + time.perf_counter() - start,
    }
    if layer.factor.shift:
        info["input_factor_shift"] = layer.factor.shift
    return LayerSolution(A=a.to(torch.float32), B=b.to(torch.float32), info=info)


def solve_working_bytes(m: int, n: int, eigensolver: str = "auto") -> int:
    """Upper bound of the memory held while one [m, n] layer is solved: Z's mean (packed), the damped Z that
    becomes its Cholesky factor in place, and a float64 G; where M is formed (below DENSE_MAX_SIZE inputs, for
    any size under "eigh", below CHEBYSHEV_MAX_SIZE under "chebyshev") also the inverse, the step D and more
    n x n matrices; under "chebyshev" a narrow layer is solved in a chunk of up to CHUNK_BYTES. Layers that read
    one input and are solved iteratively run in step: each of the others adds its float64 G to the first's bound."""
    implicit = {"auto": DENSE_MAX_SIZE, "lobpcg": DENSE_MAX_SIZE, "chebyshev": CHEBYSHEV_MAX_SIZE}
    if n >= implicit.get(eigensolver, math.inf):
        return 8 * (n * n + packed_size(n) + m * n)
    formed = _formed_bytes(m, n)
    return max(formed, CHUNK_BYTES) if eigensolver == "chebyshev" and n < DENSE_MAX_SIZE else formed


def _formed_bytes(m: int, n: int) -> int:
    """Upper bound of one [m, n] layer's solve with M formed: a few n x n matrices and two of [m, n]."""
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
    device = stats.gradient_sums[names[0]].device if names else torch.device("cpu")
    config = replace(config, eigensolver=config.eigensolver_on(device.type))
    groups: dict[str, list[str]] = {}  # layers that read one input share the Cholesky factor of its Z
    for name in names:
        groups.setdefault(stats.input_group(name), []).append(name)

    def solve_groups(chunk: list[list[str]], together: bool = False) -> dict[str, LayerSolution]:
        """Solve the groups of `chunk`: one layer at a time, or (`together`) all their layers at once."""
        solved, batch, inputs, means = {}, [], [], {}
        for members in chunk:
            if release:
                input_factor, group_means = stats.pop_group(members)
            else:
                input_factor = stats.packed_input_factor(members[0])
                group_means = {name: (stats.gradient(name), stats.output_factor(name)) for name in members}
            inputs.append(input_factor)
            means.update(group_means)
        factors = factor_inputs(inputs, config, [members[0] for members in chunk])
        del inputs, input_factor  # only their Cholesky factors are needed from here on
        for members, factor in zip(chunk, factors, strict=True):
            for name in members:
                gradient, output_factor = means.pop(name)
                # the solve's dtype; the float32 mean is freed before its work
                batch.append(_LayerInput(name, gradient.to(torch.float64), factor, output_factor, ranks[name]))
                del gradient
                # one layer at a time, but the iterative solves of layers sharing an input run in step (their
                # triangular solves with L taken together)
                if not together and not _iterative(batch[-1], config):
                    solved.update(_solved_batch(batch[-1:], config))
                    batch.pop()
        solved.update(_solved_batch(batch, config))
        return solved

    # Wide groups first, one at a time with every thread (their Cholesky factorizations and triangular solves
    # scale with threads); then the rest in a pool, one thread each (see `solver_threads`).
    width = {group: stats.gradient_sums[members[0]].shape[1] for group, members in groups.items()}
    wide = [members for group, members in groups.items() if width[group] >= DENSE_MAX_SIZE]
    narrow = [members for group, members in groups.items() if width[group] < DENSE_MAX_SIZE]

    def by_width(members: list[str]) -> int:
        return width[stats.input_group(members[0])]

    if release:  # narrow groups first, then wide ones by width: each solve's temporaries meet the fewest sums
        wide.sort(key=by_width)
    together = config.eigensolver == "chebyshev"  # the narrow layers' formed M solved together, batched
    if together:  # by width, so that a chunk holds many layers of one size
        narrow.sort(key=by_width)
        limit = CPU_CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES
        chunks = _batched_groups(narrow, {name: _formed_bytes(*stats.gradient_sums[name].shape) for name in names},
                                 limit)
    else:
        chunks = [[members] for members in narrow]
    solutions: dict[str, LayerSolution] = {}
    previous = torch.get_num_threads()
    with tqdm(total=len(names), desc="LoRA-DA solve", unit="layer", disable=not show) as bar:

        def solve_wide() -> None:
            for members in wide:
                solutions.update(solve_groups([members]))
                bar.update(len(members))

        if not release:
            solve_wide()
        # each worker thread runs its LAPACK calls on one thread (see `solver_threads`); a single worker is this
        # thread (where a profiler sees its ops)
        workers = solver_threads(device, previous)
        pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
        try:
            solve_chunk = partial(solve_groups, together=together)
            # in order: the first error is raised
            for solved in pool.map(solve_chunk, chunks) if pool else map(solve_chunk, chunks):
                solutions.update(solved)
                bar.update(len(solved))
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
            torch.set_num_threads(previous)
        if release:
            solve_wide()
    return {name: solutions[name] for name in names}


def _solved_batch(batch: list[_LayerInput], config: LoraDAConfig) -> dict[str, LayerSolution]:
    """`_solve_layers` of `batch` by layer name, each report with the layer's seed."""
    solved = dict(zip((layer.name for layer in batch), _solve_layers(batch, config), strict=True)) if batch else {}
    for name, solution in solved.items():
        solution.info["seed"] = layer_seed(config.seed, name)
    return solved


def _batched_groups(groups: list[list[str]], solve_bytes: Mapping[str, int], limit: int) -> list[list[list[str]]]:
    """Consecutive groups in chunks whose layers' solve memory adds up to at most `limit` bytes (or one group)."""
    chunks, total = [], 0
    for members in groups:
        size = sum(solve_bytes[name] for name in members)
        if not chunks or total + size > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(members)
        total += size
    return chunks


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


def uses_lobpcg(n: int, want: int, device: torch.device, config: LoraDAConfig) -> bool:
    """Whether the layer is solved iteratively (block Davidson on the implicit operator, iterating `want`
    vectors) rather than by forming M: when asked ("lobpcg"), and under "auto" on any device for
    n >= DENSE_MAX_SIZE and on a CPU for n >= AUTO_LOBPCG_MIN_SIZE. On another device (where "auto" is not
    "chebyshev", see `LoraDAConfig.eigensolver_on`) it keeps eigh below that: the iteration's many small steps each
    wait for the device, and eigh is fast there. "chebyshev" forms M below CHEBYSHEV_MAX_SIZE inputs."""
    if n < 6 * want:  # the search space holds up to 6 blocks
        return False
    if config.eigensolver == "lobpcg":
        return True
    if config.eigensolver == "chebyshev":
        return n >= CHEBYSHEV_MAX_SIZE
    return config.eigensolver == "auto" and (
        n >= DENSE_MAX_SIZE or (n >= AUTO_LOBPCG_MIN_SIZE and device.type == "cpu")
    )


def truncate_solution(solution: LayerSolution, rank: int, config: LoraDAConfig) -> LayerSolution:
    """The factors of the `rank` smallest eigenvectors of a layer solved at a larger rank with
    `factor_balance="released"` (`A = U^T / sqrt(gamma)`, `B = D^T U / sqrt(gamma)`, whose columns are
    independent), split per `config.factor_balance`: the same factors as a solve at `rank`."""
    root = math.sqrt(config.gamma)
    a, b = _balance(solution.A[:rank].double() * root, solution.B[:, :rank].double() * root, config)
    values = solution.info["eigenvalues"]
    info = {**solution.info, "rank": rank, "eigenvalues": values[:rank],
            "eigengap": values[rank] - values[rank - 1] if len(values) > rank else solution.info["eigengap"],
            "variance_bias_ratio_on_subspace": None}  # measured on the larger subspace
    return LayerSolution(A=a.to(torch.float32), B=b.to(torch.float32), info=info)


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
