"""The solver against a direct float64 computation of ALGORITHM.md, and its sanity properties."""

import math

import pytest
import torch

from lora_da import (
    LoraDAConfig,
    LoraDAError,
    LoraDAStatistics,
    eigensolvers,
    input_factor,
    layer_solvers,
    solve_all,
    solve_layer,
    solver,
)
from lora_da.solver import uses_lobpcg


def random_problem(m=24, n=16, seed=0, spread=3.0):
    """G [m, n], an anisotropic SPD Z [n, n] and a positive y [m]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    z = q @ torch.diag(torch.logspace(-spread, 0, n, dtype=torch.float64)) @ q.T
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    y = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    return g, z, y


def reference(g, z, y, rank, alpha, beta, lam, n_pop, gamma):
    """ALGORITHM.md with explicit inverses and a dense eigendecomposition, in float64."""
    n = z.shape[0]
    z_inv = torch.linalg.inv(z + lam * torch.eye(n, dtype=torch.float64))
    d = -z_inv @ g.T @ torch.diag(1 / (y + lam))
    sigma = torch.linalg.svdvals(d)[0]
    d = d / sigma
    c = (1 / (y + lam)).sum() / n_pop / sigma**2
    m_mat = -alpha * d @ d.T + beta * c * z_inv
    values, vectors = torch.linalg.eigh(m_mat)
    u = vectors[:, :rank]
    index = u.abs().argmax(dim=0)
    u = u * torch.sign(u[index, torch.arange(rank)])
    return u.T / math.sqrt(gamma), d.T @ u / math.sqrt(gamma), m_mat, values[:rank]


class TestSolveLayer:
    def test_matches_dense_reference(self):
        g, z, y = random_problem()
        cfg = LoraDAConfig(variance_weight=0.3, population_size=50, damping=1e-3, eigensolver="eigh")
        solution = solve_layer(g, z, y, 4, cfg)
        a_ref, b_ref, _, values = reference(g, z, y, 4, 1.0, 0.3, 1e-3, 50, 1024.0)
        torch.testing.assert_close(solution.A, a_ref.float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(solution.B, b_ref.float(), rtol=1e-4, atol=1e-6)
        assert solution.info["eigenvalues"] == pytest.approx(values.tolist(), rel=1e-5, abs=1e-10)
        assert solution.info["residual"] < 1e-10
        assert solution.info["variance_bias_ratio"] > 0

    def test_lora_one_reduction(self):
        """beta = 0, Z = I, y constant: B @ A is proportional to the best rank-r approximation of -G."""
        g, z, y = random_problem(seed=1)
        cfg = LoraDAConfig(variance_weight=0.0, fisher="identity", eigensolver="eigh")
        solution = solve_layer(g, z, y, 3, cfg)
        u, s, vh = torch.linalg.svd(-g)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        update = (solution.B @ solution.A).double()
        cosine = (update * best).sum() / (update.norm() * best.norm())
        assert float(cosine) == pytest.approx(1.0, abs=1e-6)

    def test_subspace_beats_random_orthonormal(self):
        g, z, y = random_problem(seed=2)
        cfg = LoraDAConfig(variance_weight=0.5, population_size=20, damping=1e-3, eigensolver="eigh")
        rank = 3
        solution = solve_layer(g, z, y, rank, cfg)
        _, _, m_mat, _ = reference(g, z, y, rank, 1.0, 0.5, 1e-3, 20, 1024.0)
        u = solution.A.double().T * math.sqrt(cfg.gamma)
        best = torch.trace(u.T @ m_mat @ u)
        gen = torch.Generator().manual_seed(3)
        for _ in range(200):
            q, _ = torch.linalg.qr(torch.randn(z.shape[0], rank, generator=gen, dtype=torch.float64))
            assert torch.trace(q.T @ m_mat @ q) >= best - 1e-9

    @pytest.mark.parametrize("scaled", ["inputs", "loss"])
    def test_scale_invariance(self, scaled):
        g, z, y = random_problem(seed=4)
        cfg = LoraDAConfig(variance_weight=0.2, population_size=30, damping=1e-12, eigensolver="eigh")
        k = 7.0
        if scaled == "inputs":
            g2, z2, y2 = g * k, z * k**2, y
        else:
            g2, z2, y2 = g * k, z, y * k**2
        first, second = solve_layer(g, z, y, 4, cfg), solve_layer(g2, z2, y2, 4, cfg)
        torch.testing.assert_close(first.A, second.A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(first.B @ first.A, second.B @ second.A, rtol=1e-4, atol=1e-7)

    def test_lobpcg_matches_eigh(self):
        g, z, y = random_problem(m=64, n=96, seed=5, spread=1.0)
        base = dict(variance_weight=0.1, population_size=100, damping=1e-4)
        exact = solve_layer(g, z, y, 4, LoraDAConfig(eigensolver="eigh", **base))
        iterative = solve_layer(g, z, y, 4, LoraDAConfig(eigensolver="lobpcg", eigensolver_tol=1e-8, **base))
        assert iterative.info["eigensolver"] == "davidson" and iterative.info["converged"]
        assert iterative.info["residual"] < 1e-6
        torch.testing.assert_close(iterative.A, exact.A, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(iterative.B @ iterative.A, exact.B @ exact.A, rtol=1e-3, atol=1e-7)

    def test_auto_eigensolver_uses_lobpcg_only_for_large_inputs_on_a_cpu(self):
        auto, cpu, gpu = LoraDAConfig(population_size=100), torch.device("cpu"), torch.device("cuda")
        assert uses_lobpcg(576, 16, cpu, auto) and not uses_lobpcg(256, 16, cpu, auto)
        assert not uses_lobpcg(1536, 16, gpu, auto)  # eigh is fast on a GPU, the iteration's small steps are not
        assert uses_lobpcg(4096, 16, gpu, auto)  # ... but never a dense n x n eigh for n >= 4096 unless asked
        assert not uses_lobpcg(11008, 16, cpu, LoraDAConfig(eigensolver="eigh", population_size=100))
        assert not uses_lobpcg(11008, 16, gpu, LoraDAConfig(eigensolver="chebyshev", population_size=100))
        forced = LoraDAConfig(eigensolver="lobpcg", population_size=100)
        assert uses_lobpcg(1536, 16, gpu, forced)
        # on CUDA "auto" is "chebyshev"; elsewhere, and when set, as set
        assert auto.eigensolver_on("cuda") == "chebyshev" and auto.eigensolver_on("cpu") == "auto"
        assert forced.eigensolver_on("cuda") == "lobpcg"
        assert not uses_lobpcg(90, 16, cpu, forced)  # the search space holds 6 blocks

    @pytest.mark.parametrize("balance", ["kaiming", "svd"])
    def test_factor_balance_keeps_update(self, balance):
        g, z, y = random_problem(seed=6)
        released = solve_layer(g, z, y, 4, LoraDAConfig(variance_weight=0))
        other = solve_layer(g, z, y, 4, LoraDAConfig(variance_weight=0, factor_balance=balance))
        torch.testing.assert_close(other.B @ other.A, released.B @ released.A, rtol=1e-5, atol=1e-9)
        if balance == "kaiming":
            assert other.A.norm(dim=1).tolist() == pytest.approx([1 / math.sqrt(3)] * 4, rel=1e-5)
        else:
            assert torch.allclose(other.A.norm(dim=1), other.B.norm(dim=0), rtol=1e-4)

    def test_released_factor_scale(self):
        g, z, y = random_problem(seed=7)
        solution = solve_layer(g, z, y, 4, LoraDAConfig(variance_weight=0))
        assert solution.A.norm(dim=1).tolist() == pytest.approx([1 / 32] * 4, rel=1e-5)  # 1/sqrt(1024)
        assert solution.info["sigma"] > 0

    def test_relative_damping_uses_median_y(self):
        g, z, y = random_problem(seed=8)
        y = y * 1e-9
        solution = solve_layer(g, z, y, 2, LoraDAConfig(variance_weight=0, damping=0.5, damping_mode="relative"))
        assert solution.info["median_y_over_damping"] == pytest.approx(2.0)
        absolute = solve_layer(g, z, y, 2, LoraDAConfig(variance_weight=0))
        assert absolute.info["median_y_over_damping"] < 1e-2

    def test_rank_larger_than_layer_is_an_error(self):
        g, z, y = random_problem(m=24, n=16)
        with pytest.raises(LoraDAError, match="rank 17"):
            solve_layer(g, z, y, 17, LoraDAConfig(variance_weight=0))

    def test_deterministic(self):
        g, z, y = random_problem(m=64, n=96, seed=9)
        cfg = LoraDAConfig(variance_weight=0.1, population_size=10, eigensolver="lobpcg")
        first, second = solve_layer(g, z, y, 4, cfg), solve_layer(g, z, y, 4, cfg)
        assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)


class TestConfig:
    def test_variance_needs_population_size(self):
        with pytest.raises(LoraDAError, match="population_size"):
            LoraDAConfig()
        LoraDAConfig(variance_weight=0.0)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"token_mask": "all"},
            {"eigensolver": "svd"},
            {"gamma": 0},
            {"damping": -1},
            {"variance_weight": 0, "bias_weight": 0},
            {"population_size": 0},
        ],
    )
    def test_bad_values(self, kwargs):
        with pytest.raises(LoraDAError):
            LoraDAConfig(**{"population_size": 100, **kwargs})


def test_rounding_negative_eigenvalues_of_z_are_clamped():
    """A float32-rounded Gram matrix can be slightly indefinite; the solve must still succeed."""
    g, _, y = random_problem(m=12, n=40, seed=10)
    x = torch.randn(8, 40, dtype=torch.float64) * 100  # rank 8 < n: Z is singular
    z = x.T @ x / 8
    values, vectors = torch.linalg.eigh(z)
    z_bad = z - 1e-3 * vectors[:, :1] @ vectors[:, :1].T  # one eigenvalue at -1e-3 (> damping)
    solution = solve_layer(g, z_bad, y, 2, LoraDAConfig(variance_weight=0.1, population_size=10, damping=1e-6))
    assert solution.info["input_factor_clamped"]
    reference_solution = solve_layer(g, z, y, 2, LoraDAConfig(variance_weight=0.1, population_size=10))
    assert not reference_solution.info["input_factor_clamped"]
    assert torch.isfinite(solution.A).all() and torch.isfinite(solution.B).all()


def _statistics(layers: dict[str, tuple[int, int, str]], seed: int = 0) -> LoraDAStatistics:
    """Sums of random problems; `layers` maps a name to (m, n, input group) and a group's first layer owns Z."""
    gradients, outputs, zs = {}, {}, {}
    for index, (name, (m, n, group)) in enumerate(layers.items()):
        g, z, y = random_problem(m=m, n=n, seed=seed + index)
        gradients[name], outputs[name] = g, y
        zs.setdefault(group, (name, z))
    owner = {group: name for group, (name, _) in zs.items()}
    return LoraDAStatistics(
        gradient_sums=gradients,
        output_sq_sums=outputs,
        output_token_counts=dict.fromkeys(layers, 1),
        input_groups={name: owner[group] for name, (_, _, group) in layers.items()},
        input_sums={name: z for name, z in zs.values()},
        input_token_counts={name: 1 for name, _ in zs.values()},
        num_examples=1,
    )


LAYERS = {"q": (24, 16, "x"), "k": (8, 16, "x"), "o": (16, 16, "o"), "up": (40, 16, "h"), "down": (16, 40, "d")}


@pytest.mark.parametrize("threads", [1, 3])
def test_solve_all_in_threads_matches_each_layer_alone(threads):
    stats = _statistics(LAYERS)
    cfg = LoraDAConfig(variance_weight=0.2, population_size=30, show_progress=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        solutions = solve_all(stats, 4, cfg)
        assert torch.get_num_threads() == threads  # the solve's one-thread LAPACK setting is undone
    finally:
        torch.set_num_threads(previous)
    assert list(solutions) == list(LAYERS)
    for name, solution in solutions.items():
        z = stats.input_factor(name)
        alone = solve_layer(stats.gradient(name), z, stats.output_factor(name), 4, cfg, layer=name)
        assert torch.equal(solution.A, alone.A) and torch.equal(solution.B, alone.B)


def test_top_eigenvalues_from_a_nearby_block_are_exact_or_declined():
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(60, 20, generator=gen, dtype=torch.float64)
    outer = d @ d.T  # PSD, rank 20
    values, vectors = torch.linalg.eigh(outer)
    near = vectors[:, -8:] + 1e-3 * torch.randn(60, 8, generator=gen, dtype=torch.float64)
    # an invariant subspace without the top (eigenvectors 2-9): exact lower pairs, but the random column finds it
    invariant = vectors[:, -9:-1]
    scaled = 3.0 * outer  # a batch's matrices are independent problems
    found = eigensolvers.top_eigenvalues(torch.stack([outer, outer, scaled]), torch.stack([near, invariant, near]),
                                         1e-3)
    assert found[0] == pytest.approx(float(values[-1]), rel=1e-9)
    assert found[1] is None or found[1] == pytest.approx(float(values[-1]), rel=1e-6)
    assert found[2] == pytest.approx(3.0 * float(values[-1]), rel=1e-9)
    # 4 blocks of 9 >= n: declined
    assert eigensolvers.top_eigenvalues(outer[None, :30, :30], near[None, :30], 1e-3) == [None]


def test_solve_all_raises_the_failing_layer():
    stats = _statistics(LAYERS)
    stats.gradient_sums["up"].zero_()
    with pytest.raises(LoraDAError, match="'up'.*exactly zero"):
        solve_all(stats, 4, LoraDAConfig(variance_weight=0.0, show_progress=False))


def wide_problem(m: int, n: int, tokens: int, seed: int):
    """Statistics built like the hooks build them, from `tokens` < n tokens: Z has rank `tokens` (so with
    damping 1e-6, (Z + lam I)^{-1} has eigenvalues up to 1e6), G = sum_t g_t x_t^T, y = mean g^2 << damping."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) * scales + 0.3
    g = (x @ torch.randn(n, 4, generator=gen, dtype=torch.float64)) @ torch.randn(4, m, generator=gen,
                                                                                   dtype=torch.float64)
    g = (0.1 * g / math.sqrt(n) + torch.randn(tokens, m, generator=gen, dtype=torch.float64)) * 1e-4
    return (g.T @ x / 4).float(), x.T @ x / tokens, (g * g).mean(0)


class TestImplicitSolver:
    """The iterative path (block Davidson on the never-formed M) against dense eigh of the explicit M."""

    @pytest.mark.parametrize("beta, n_pop", [(0.0, 100), (0.03, 100), (0.03, 1), (1.0, 1)])
    def test_matches_dense_eigh_with_rank_deficient_z(self, beta, n_pop):
        g, z, y = wide_problem(m=160, n=300, tokens=120, seed=11)
        rank = 6
        cfg = LoraDAConfig(variance_weight=beta, population_size=n_pop, eigensolver="lobpcg", eigensolver_tol=1e-6)
        solution = solve_layer(g, z, y, rank, cfg)
        assert solution.info["eigensolver"] == "davidson" and solution.info["converged"]
        assert solution.info["residual"] <= 1e-6
        a_ref, b_ref, m_mat, values = reference(g.double(), z, y, rank, 1.0, beta, 1e-6, n_pop, 1024.0)
        u, u_ref = solution.A.double().T * 32, a_ref.T * 32
        gap = float(torch.linalg.eigvalsh(m_mat)[rank] - values[-1])
        # sin-theta: the subspace error is at most residual / gap; the objective is second order in it
        assert float((u @ u.T - u_ref @ u_ref.T).norm()) < 1e-4 + 10 * 1e-6 * abs(float(values[0])) / gap
        optimum = float(values.sum())
        assert float(torch.trace(u.T @ m_mat @ u)) == pytest.approx(optimum, rel=1e-6, abs=1e-9)
        # the explicit reference holds K^{-1} (entries up to 1e6): its own eigenvalues err by ~eps ||M||
        assert solution.info["eigenvalues"] == pytest.approx(values.tolist(), rel=1e-5, abs=1e-9 * float(m_mat.norm()))
        update, update_ref = (solution.B @ solution.A).double(), b_ref @ a_ref
        assert float((update - update_ref).norm() / update_ref.norm()) < 1e-3

    def test_auto_takes_the_fast_path_and_never_falls_back_for_wide_layers(self, monkeypatch):
        monkeypatch.setattr(solver, "DENSE_MAX_SIZE", 256)
        g, z, y = wide_problem(m=120, n=300, tokens=100, seed=12)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=1000)
        solution = solve_layer(g, z, y, 4, cfg)
        assert solution.info["eigensolver"] == "davidson"
        assert solution.info["residual"] <= cfg.eigensolver_tol and solution.info["iterations"] < 50

    def test_deterministic_bitwise(self, monkeypatch):
        monkeypatch.setattr(solver, "AUTO_LOBPCG_MIN_SIZE", 256)
        g, z, y = wide_problem(m=120, n=300, tokens=100, seed=13)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=10)
        first, second = solve_layer(g, z, y, 4, cfg, layer="a"), solve_layer(g, z, y, 4, cfg, layer="a")
        assert first.info["eigensolver"] == "davidson"
        assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)

    def test_input_dtype_does_not_matter(self):
        """float32 statistics (as a future container may give) solve like float64 ones, up to their rounding."""
        g, z, y = wide_problem(m=120, n=300, tokens=400, seed=14)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=1000, damping=1e-3)
        wide = solve_layer(g.double(), z, y, 4, cfg)
        narrow = solve_layer(g.float(), z.float(), y.float(), 4, cfg)
        torch.testing.assert_close(narrow.B @ narrow.A, wide.B @ wide.A, rtol=1e-3, atol=1e-6)

    def test_large_n_shifts_instead_of_clamping_by_eigh(self, monkeypatch):
        monkeypatch.setattr(input_factor, "DENSE_MAX_SIZE", 32)
        _, z, _ = wide_problem(m=12, n=40, tokens=8, seed=15)
        values, vectors = torch.linalg.eigh(z)
        z_bad = z - 1e-5 * vectors[:, :1] @ vectors[:, :1].T  # -1e-5 < -damping: Cholesky fails
        factor = input_factor.factor_input(z_bad, LoraDAConfig(variance_weight=0))
        assert factor.clamped and factor.shift > 0  # shifted: the eigh clamp leaves shift at 0

    def test_solve_all_gives_wide_groups_all_threads(self, monkeypatch):
        monkeypatch.setattr(solver, "DENSE_MAX_SIZE", 40)
        seen = {}
        original = solver._solve_layers

        def spy(layers, config):
            seen.update({layer.name: torch.get_num_threads() for layer in layers})
            return original(layers, config)

        monkeypatch.setattr(solver, "_solve_layers", spy)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            solve_all(_statistics(LAYERS), 4, LoraDAConfig(variance_weight=0.2, population_size=30,
                                                            show_progress=False))
        finally:
            torch.set_num_threads(previous)
        assert seen["down"] == 2 and seen["q"] == 1  # down_proj has n = 40 inputs

    def test_layers_sharing_an_input_solve_in_step_as_each_alone(self, monkeypatch):
        """q/k/v-like layers (one Z) iterate together, each triangular solve with L taken once for all of them:
        the same factors as each layer solved alone, in fewer solves than the layers alone take."""
        monkeypatch.setattr(solver, "DENSE_MAX_SIZE", 256)
        monkeypatch.setattr(input_factor, "DENSE_MAX_SIZE", 256)
        _, z, _ = wide_problem(m=8, n=300, tokens=100, seed=16)
        problems = {name: wide_problem(m=m, n=300, tokens=100, seed=seed)
                    for name, m, seed in (("q", 120, 17), ("k", 40, 18), ("v", 40, 19))}
        stats = LoraDAStatistics(
            gradient_sums={name: g for name, (g, _, _) in problems.items()},
            output_sq_sums={name: y for name, (_, _, y) in problems.items()},
            output_token_counts=dict.fromkeys(problems, 1), input_groups=dict.fromkeys(problems, "q"),
            input_sums={"q": z}, input_token_counts={"q": 1}, num_examples=1)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=1000, show_progress=False)
        solves = []
        original = input_factor.InputFactor.solve

        def counted(self, rhs):
            solves.append(rhs.shape[1])
            return original(self, rhs)

        monkeypatch.setattr(input_factor.InputFactor, "solve", counted)
        together = solve_all(stats, 4, cfg)
        in_step = len(solves)
        solves.clear()
        for name, (g, _, y) in problems.items():
            alone = solve_layer(g, z, y, 4, cfg, layer=name)
            assert together[name].info["eigensolver"] == "davidson" and together[name].info["converged"]
            assert together[name].info["iterations"] == alone.info["iterations"], name
            torch.testing.assert_close(together[name].B @ together[name].A, alone.B @ alone.A, rtol=1e-6, atol=1e-9)
        assert in_step < 0.7 * len(solves)


def known_spectrum(count: int, n: int, seed: int) -> torch.Tensor:
    """A batch [count, n, n] of symmetric matrices with a crowded negative end and a long positive tail (like M)."""
    gen = torch.Generator().manual_seed(seed)
    matrices = []
    for _ in range(count):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        low = -torch.linspace(1.0, 0.6, 12, dtype=torch.float64)
        spectrum = torch.cat([low, torch.rand(n - 12, generator=gen, dtype=torch.float64) * 50 - 0.5])
        matrices.append(q @ torch.diag(spectrum) @ q.T)
    return torch.stack(matrices)


class TestChebyshev:
    """Batched Chebyshev-filtered subspace iteration on formed M (eigensolver="chebyshev") against dense eigh."""

    def test_filtered_subspace_finds_each_matrix_of_a_batch(self):
        matrices = known_spectrum(count=5, n=90, seed=20)
        starts = torch.randn(5, 90, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        found = eigensolvers.filtered_subspace(matrices, starts, 8, 1e-8, seeds=list(range(5)))
        assert all(found.converged) and max(found.residuals) <= 1e-8
        for index in range(5):
            exact, exact_vectors = torch.linalg.eigh(matrices[index])
            torch.testing.assert_close(found.values[index, :8], exact[:8], rtol=1e-10, atol=1e-12)
            u = found.vectors[index, :, :8]
            assert float((u @ u.T - exact_vectors[:, :8] @ exact_vectors[:, :8].T).norm()) < 1e-6

    def test_filtered_subspace_reports_what_it_did_not_reach(self):
        matrices = known_spectrum(count=2, n=90, seed=21)
        starts = torch.randn(2, 90, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        found = eigensolvers.filtered_subspace(matrices, starts, 8, 1e-12, seeds=[0, 1], max_cycles=1)
        assert not any(found.converged) and min(found.residuals) > 1e-12

    # a stiff variance term (N_pop = 1: K^{-1}'s eigenvalues up to 1e6 dominate M) is left to eigh
    @pytest.mark.parametrize("beta, n_pop, used", [(0.0, 100, "chebyshev"), (0.03, 100, "chebyshev"), (1.0, 1, "eigh")])
    def test_matches_dense_reference(self, beta, n_pop, used):
        g, z, y = wide_problem(m=160, n=300, tokens=120, seed=11)
        rank = 6
        cfg = LoraDAConfig(variance_weight=beta, population_size=n_pop, eigensolver="chebyshev", eigensolver_tol=1e-6)
        solution = solve_layer(g, z, y, rank, cfg)
        assert solution.info["eigensolver"] == used and solution.info["residual"] <= 1e-6
        a_ref, b_ref, m_mat, values = reference(g.double(), z, y, rank, 1.0, beta, 1e-6, n_pop, 1024.0)
        u = solution.A.double().T * 32
        assert float(torch.trace(u.T @ m_mat @ u)) == pytest.approx(float(values.sum()), rel=1e-6, abs=1e-9)
        update, update_ref = (solution.B @ solution.A).double(), b_ref @ a_ref
        assert float((update - update_ref).norm() / update_ref.norm()) < 1e-3

    def test_solve_all_batches_same_sized_layers(self, monkeypatch):
        layers = {"q": (48, 96, "x"), "k": (24, 96, "x"), "o": (48, 96, "o"), "up": (120, 96, "h"),
                  "down": (96, 120, "d")}
        stats = _statistics(layers, seed=3)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=100, eigensolver="chebyshev", show_progress=False)
        batches = []
        original = eigensolvers.filtered_subspace

        def spy(matrices, *args, **kwargs):
            batches.append(tuple(matrices.shape))
            return original(matrices, *args, **kwargs)

        monkeypatch.setattr(layer_solvers, "filtered_subspace", spy)
        solutions = solve_all(stats, 4, cfg)
        assert sorted(batches) == [(1, 120, 120), (4, 96, 96)]  # one call per size, its layers together
        assert solve_all(stats, 4, cfg)["up"].A.equal(solutions["up"].A)  # deterministic
        released = solve_all(_statistics(layers, seed=3), 4, cfg, release=True)  # the adapter's way
        for name in layers:  # its means are taken in another order: equal to rounding
            torch.testing.assert_close(released[name].B, solutions[name].B, rtol=1e-5, atol=1e-7)
        for name, solution in solutions.items():
            assert solution.info["eigensolver"] == "chebyshev" and solution.info["residual"] <= cfg.eigensolver_tol
            assert 1 <= solution.info["iterations"] <= eigensolvers.CHEBYSHEV_MAX_CYCLES
            exact = solve_layer(stats.gradient(name), stats.input_factor(name), stats.output_factor(name), 4,
                                LoraDAConfig(variance_weight=0.03, population_size=100, eigensolver="eigh"))
            update, exact_update = solution.B @ solution.A, exact.B @ exact.A
            assert float((update - exact_update).norm() / exact_update.norm()) < 1e-3

    def test_a_batch_of_same_shaped_layers_solves_each_as_alone(self, monkeypatch):
        layers = {"q": (48, 96, "x"), "o": (48, 96, "o"), "k": (24, 96, "x")}
        stats = _statistics(layers, seed=5)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=100, eigensolver="chebyshev", show_progress=False)
        sizes = []
        original = solver.form_dense

        def spy(g, *args, **kwargs):
            sizes.append(g.shape[0])
            return original(g, *args, **kwargs)

        monkeypatch.setattr(solver, "form_dense", spy)
        together = solve_all(stats, 4, cfg)
        assert sorted(sizes) == [1, 2]  # q and o (two input factors) formed in one batch, k alone
        for name in layers:
            alone = solve_layer(stats.gradient(name), stats.input_factor(name), stats.output_factor(name), 4, cfg,
                                layer=name)
            torch.testing.assert_close(together[name].B @ together[name].A, alone.B @ alone.A, rtol=1e-5, atol=1e-8)
            for key in ("sigma", "eigenvalues", "eigengap", "variance_bias_ratio", "variance_bias_ratio_on_subspace",
                        "median_y_over_damping"):
                assert alone.info[key] is not None
                assert together[name].info[key] == pytest.approx(alone.info[key], rel=1e-6)

    def test_wide_layers_are_formed_and_filtered(self, monkeypatch):
        monkeypatch.setattr(solver, "DENSE_MAX_SIZE", 256)
        monkeypatch.setattr(input_factor, "DENSE_MAX_SIZE", 256)
        g, z, y = wide_problem(m=120, n=300, tokens=100, seed=12)
        cfg = LoraDAConfig(variance_weight=0.03, population_size=1000, eigensolver="chebyshev")
        solution = solve_layer(g, z, y, 4, cfg)
        assert solution.info["eigensolver"] == "chebyshev" and solution.info["residual"] <= cfg.eigensolver_tol
        davidson = solve_layer(g, z, y, 4, LoraDAConfig(variance_weight=0.03, population_size=1000))
        assert davidson.info["eigensolver"] == "davidson"
        update, reference_update = solution.B @ solution.A, davidson.B @ davidson.A
        assert float((update - reference_update).norm() / reference_update.norm()) < 1e-3
        # the memory plan counts the formed n x n matrices of such a layer, and a narrow layer's chunk
        assert solver.solve_working_bytes(120, 300, "chebyshev") > solver.solve_working_bytes(120, 300)
        assert solver.solve_working_bytes(120, 200, "chebyshev") == solver.CHUNK_BYTES
        # from CHEBYSHEV_MAX_SIZE inputs on (70B's 28672: 52 GiB formed) block Davidson, and its memory
        monkeypatch.setattr(solver, "CHEBYSHEV_MAX_SIZE", 300)
        assert solve_layer(g, z, y, 4, cfg).A.equal(davidson.A)
        assert solver.solve_working_bytes(120, 300, "chebyshev") == solver.solve_working_bytes(120, 300)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    def test_cuda_matches_cpu(self):
        """Chebyshev on a CPU against the GPU's default ("auto", which is chebyshev there)."""
        layers = {"q": (48, 96, "x"), "k": (24, 96, "x"), "o": (48, 96, "o"), "down": (96, 120, "d")}
        cfg = LoraDAConfig(variance_weight=0.03, population_size=100, eigensolver="chebyshev", show_progress=False)
        on_cpu = solve_all(_statistics(layers, seed=4), 4, cfg)
        stats = _statistics(layers, seed=4)
        for sums in (stats.gradient_sums, stats.output_sq_sums, stats.input_sums):
            sums.update({key: value.cuda() for key, value in sums.items()})
        on_gpu = solve_all(stats, 4, LoraDAConfig(variance_weight=0.03, population_size=100, show_progress=False))
        for name in layers:
            assert on_gpu[name].info["eigensolver"] == "chebyshev"
            update, cpu_update = (on_gpu[name].B @ on_gpu[name].A).cpu(), on_cpu[name].B @ on_cpu[name].A
            assert float((update - cpu_update).norm() / cpu_update.norm()) < 1e-3
