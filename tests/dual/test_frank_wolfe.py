"""The Frank-Wolfe solver (``cagrad_clip._dual.frank_wolfe``) and the kinks ``G p = 0`` that can trap it.

Each kink instance is checked against ``tests.reference`` or a closed form derived in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cagrad_clip._dual import solve_cagrad
from tests.dual.helpers import SOLVERS, check_against_reference
from tests.reference import coefficients_from_dual, primal_value, solve_dual_reference


@pytest.mark.parametrize("m", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("dim_kind", ["rank1", "deficient", "square", "tall"])
def test_matches_reference(m: int, dim_kind: str) -> None:
    check_against_reference("frank_wolfe", m, dim_kind, n=2)


@pytest.mark.parametrize("dim_kind", ["deficient", "tall"])
def test_matches_reference_beyond_the_exact_solver(dim_kind: str) -> None:
    check_against_reference("frank_wolfe", 16, dim_kind, n=1)


@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_gradient_start_does_not_trap_the_solver(solver: str) -> None:
    """Regression (found by hypothesis): every vertex has F(e_j) >= 0, the best one is a zero
    gradient (F = 0, a kink), but a mix of g1 and g5 has F < 0. Starting at the zero gradient,
    every single-vertex direction looked uphill and the solver returned a = w."""
    G = np.array([[-1.0, 0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, -1.0]])
    H = G.T @ G
    w = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    c = 0.5
    # F on the edge p = (t, 0, 0, 0, 1 - t): u = (2 - 3t, 0, t - 1), g0 = g3 = (0, 0, 1), s = 0.5
    t = np.linspace(0.0, 1.0, 200001)
    F_edge = (t - 1.0) + 0.5 * np.sqrt((2 - 3 * t) ** 2 + (t - 1.0) ** 2)
    ref = solve_dual_reference(H, w, c)
    assert ref.value == pytest.approx(F_edge.min(), abs=1e-9) and ref.value < -0.17
    sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, clip=False, solver=solver)
    assert float(sol.dual_value) == pytest.approx(ref.value, abs=1e-12)
    d = G @ sol.coefficients.numpy()
    assert primal_value(G, d) == pytest.approx(ref.value, abs=1e-9)  # strong duality
    np.testing.assert_allclose(sol.coefficients.numpy(), coefficients_from_dual(H, w, c, ref.p, clip=False), rtol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kink_inside_an_edge_does_not_trap_the_solver(solver: str) -> None:
    """Regression (found by hypothesis in CI): g3 = -2 g4, so G p = 0 at p = (0, 0, 1/3, 2/3, 0),
    where F = 0 is a kink. Every vertex has F(e_j) >= 0 and Frank-Wolfe walked into that kink,
    where every vertex and pairwise direction looks uphill; the optimum (F < 0) is inside the
    edge between g2 and g3, which the closed form below gives independently."""
    G = np.array([[-1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 4.0, -1.0, 0.5, 0.0]])
    H = G.T @ G
    w = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    c = 0.5
    # on the edge p = (0, t, 1 - t, 0, 0): u = (t, 0, 5t - 1), g0 = g1 = (-1, 0, 0), s = 0.5
    t = np.linspace(0.0, 1.0, 400001)
    F_edge = -t + 0.5 * np.sqrt(t**2 + (5 * t - 1.0) ** 2)
    ref = solve_dual_reference(H, w, c)
    assert ref.value == pytest.approx(F_edge.min(), abs=1e-9) and ref.value < -0.1
    sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, clip=False, solver=solver)
    assert float(sol.dual_value) == pytest.approx(ref.value, abs=1e-12)
    assert primal_value(G, G @ sol.coefficients.numpy()) == pytest.approx(ref.value, abs=1e-9)  # strong duality


def test_frank_wolfe_m16_does_not_stop_on_the_kink() -> None:
    """Regression for the kink threshold: m = 16 (Frank-Wolfe, started from the best vertex or edge),
    g4 = -2 g3 (an exact opposite pair, kink G p = 0 at p = (.., 2/3, 1/3, ..)) and eleven zero
    gradients. Every vertex and edge has F >= 0 off the kink; the optimum (F < 0) mixes g3, g6 and
    g14. A rounding-level ``p^T H p > 0`` at the edge's kink point must still count as the kink:
    with the kink threshold at 0, Frank-Wolfe started there and stopped with F = 0 (coefficients
    off by 0.99)."""
    G = np.zeros((3, 16))
    G[0, 0] = 2.0
    G[2, 2], G[2, 3] = 1.5, -3.0
    G[1, 5], G[2, 5] = -1.0, -0.5
    G[:, 13] = [-2.0, 3.0, -2.0]
    H = G.T @ G
    w = np.zeros(16)
    w[0], w[5] = 1.0, 0.5
    c = 0.8
    ref = solve_dual_reference(H, w, c)
    assert ref.value < -0.1 and set(np.nonzero(ref.p > 1e-9)[0]) == {2, 5, 13}
    for clip in (True, False):
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, clip=clip, solver="frank_wolfe")
        assert float(sol.dual_value) == pytest.approx(ref.value, abs=1e-12)
        np.testing.assert_allclose(sol.coefficients.numpy(), coefficients_from_dual(H, w, c, ref.p, clip), rtol=1e-9, atol=1e-12)


def test_more_iterations_never_hurt() -> None:
    """The iterate is the better of the small-face start and the iterations: F never exceeds the start's."""
    rng = np.random.default_rng(31)
    G = rng.normal(size=(5, 14)) * np.exp(rng.normal(size=14))
    H = torch.tensor(G.T @ G)
    values = [float(solve_cagrad(H, c=0.5, max_iter=k, solver="frank_wolfe").dual_value) for k in (0, 1, 3, 14, 40)]
    ref = solve_dual_reference(G.T @ G, np.full(14, 1 / 14), 0.5).value
    assert all(b <= a + 1e-15 * abs(a) for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(ref, abs=1e-11 * abs(ref))


# ----------------------------------------------------------------------------------------------
# non-smooth optima beyond the exact solver (issue 15, item 17)
# ----------------------------------------------------------------------------------------------
KINK_TOL = 1e-7  # F(p) - F* <= KINK_TOL * max_i H_ii; the exact solver reaches ~2e-9 on such instances (m <= 12)


def _stationary_instances(rng: np.random.Generator, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` gradient matrices (padded to a common dimension) with ``0`` in their convex hull, and a
    certificate ``p`` on the simplex with ``G p = 0`` for each.

    Half: a random subset of 3..m objectives cancels (``sum_S p_i g_i = 0``, built in), the others
    are random with a shared component. Half: random gradients of rank 2..m/2 without a shared
    component; ``scipy.optimize.linprog`` finds ``p >= 0``, ``sum p = 1``, ``G p = 0`` (and the
    instance is redrawn where there is none)."""
    from scipy.optimize import linprog

    dim = m + 2
    Gs, certs = np.zeros((n, dim, m)), np.zeros((n, m))
    k = 0
    while k < n:
        if k % 2 == 0:
            d = int(rng.integers(3, dim + 1))
            mu = rng.normal(size=d) * rng.uniform(0.0, 2.0)
            G = (mu[:, None] + rng.normal(size=(d, m))) * np.exp(rng.normal(size=m))
            subset = rng.choice(m, size=int(rng.integers(3, min(m, d + 1) + 1)), replace=False)
            p = np.zeros(m)
            p[subset] = rng.dirichlet(np.ones(subset.size))
            G[:, subset[-1]] = -(G[:, subset[:-1]] @ p[subset[:-1]]) / p[subset[-1]]
        else:
            d = int(rng.integers(2, m // 2 + 1))
            G = rng.normal(size=(d, m)) * np.exp(rng.normal(size=m))
            lp = linprog(np.zeros(m), A_eq=np.vstack([G, np.ones((1, m))]), b_eq=np.append(np.zeros(d), 1.0), bounds=(0, None))
            if lp.status != 0:
                continue
            p = np.maximum(lp.x, 0.0) / np.maximum(lp.x, 0.0).sum()
        assert np.linalg.norm(G @ p) <= 1e-12 * np.linalg.norm(G, axis=0).max()
        Gs[k, :d], certs[k] = G, p
        k += 1
    return Gs, certs


@pytest.mark.parametrize("m", [13, 16, 24, 32])
def test_default_budget_reaches_a_kink_optimum_beyond_the_exact_solver(m: int) -> None:
    """Issue 15, item 17. Pareto-stationary gradients (``0`` in the convex hull) with ``c > 1``: the
    optimum of the dual is the kink ``G p = 0``, where ``F`` is not differentiable, and it can need
    many vertices. Reference, exact and independent of any solver: ``F(p) >= (s - ||g0||) ||G p|| >= 0``
    for ``c >= 1`` (Cauchy-Schwarz: ``b^T p = <g0, G p> >= -||g0|| ||G p||``), and the certificate ``p``
    built or found by ``linprog`` above has ``F = 0``: so ``F* = 0``. (An SLSQP solve of the dual
    is no sharper here: its end points sit at ``~1e-9`` above 0, the rounding of ``sqrt(p^T H p)``.)
    The default budget (``m`` iterations, ``solver="auto"``: Frank-Wolfe above 12 objectives) must
    reach ``F <= 1e-7 max_i H_ii`` for one problem and for the batch. Before the fix it stopped up to
    ``1.7e-4 max_i H_ii`` above the optimum (m = 13), walking one vertex per iteration towards the
    kink's face. The direction there must be conflict-free (the primal optimum is 0, ``test_primal.py``)."""
    rng = np.random.default_rng(m)
    Gs, certs = _stationary_instances(rng, m, 20)
    Hs = np.einsum("ndi,ndj->nij", Gs, Gs)
    W = rng.dirichlet(np.ones(m), size=len(Hs))
    scale = Hs.diagonal(axis1=1, axis2=2).max(-1)
    for c in (1.5, 2.0, 4.0):
        for k in range(len(Hs)):  # the certificate: F = <g0, G p> + s ||G p|| = 0 up to rounding (from G, not H)
            g0, u = Gs[k] @ W[k], Gs[k] @ certs[k]
            assert abs(g0 @ u + c * np.linalg.norm(g0) * np.linalg.norm(u)) <= 1e-12 * scale[k]
        sol = solve_cagrad(torch.tensor(Hs), torch.tensor(W), c=c)
        batched = sol.dual_value.numpy()
        assert np.all(batched <= KINK_TOL * scale), (c, (batched / scale).max())
        assert np.all(batched >= -KINK_TOL * scale)
        for k in range(len(Hs)):  # item 18 beyond 12 objectives: the direction is conflict-free, in the trust region
            d, g0 = Gs[k] @ sol.coefficients[k].numpy(), Gs[k] @ W[k]
            assert (Gs[k].T @ d).min() >= -KINK_TOL * scale[k]
            assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1.0 + 1e-12)
        for k in range(0, len(Hs), 3):
            single = float(solve_cagrad(torch.tensor(Hs[k]), torch.tensor(W[k]), c=c).dual_value)
            assert single <= KINK_TOL * scale[k], (c, k, single / scale[k])
