"""The exact line search (``cagrad_clip._dual.line_search``) and the m = 2 solve built on it.

Expected values: a dense grid of the convex 1-D function, and closed forms derived here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cagrad_clip._dual import combination_coefficients, default_max_iter, exact_line_search, solve_cagrad
from tests.dual.helpers import SOLVERS, coeffs, normalised
from tests.reference import coefficients_from_dual, dual_value, problem_data


def _h(beta1: float, s: float, q0: float, q1: float, q2: float, g: np.ndarray) -> np.ndarray:
    return beta1 * g + s * np.sqrt(np.maximum(q2 * g * g + q1 * g + q0, 0.0))


def test_minimises_random_segments() -> None:
    """Segments p + g d of random duals: the returned g is no worse than the best of a 20001-point grid."""
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(200):
        A = rng.normal(size=(3, 2)) * np.exp(rng.normal(size=2))  # G p and G d
        q0, q1, q2 = A[:, 0] @ A[:, 0], 2 * A[:, 0] @ A[:, 1], A[:, 1] @ A[:, 1]
        rows.append((rng.normal() * 2, abs(rng.normal()), q0, q1, q2, rng.uniform(0.1, 3.0)))
    data = torch.tensor(rows)
    gamma = exact_line_search(*data.unbind(-1)).numpy()
    for (beta1, s, q0, q1, q2, g_max), g in zip(rows, gamma):
        assert 0.0 <= g <= g_max
        grid = np.linspace(0.0, g_max, 20001)
        best = _h(beta1, s, q0, q1, q2, grid).min()
        assert _h(beta1, s, q0, q1, q2, np.array([g]))[0] <= best + 1e-12 * (1 + abs(best))


@pytest.mark.parametrize(("w1", "c", "k"), [(0.9, 3.0, 2.0), (0.95, 3.0, 0.5), (0.8, 3.0, 0.5), (0.95, 2.2, 0.5)])
def test_kink_candidate_decides_opposite_gradients_with_large_c(w1: float, c: float, k: float) -> None:
    """Regression: g2 = -k g1 (H = [[1, -k], [-k, k^2]]) and c > 1. Then g0 = (w1 - k w2) g1 with
    s = c |w1 - k w2| > |<g_j, g0>| / |g_j|, so along p = (1 - t, t) F = (w1 - k w2)(1 - (1 + k) t) +
    s |1 - (1 + k) t| >= 0, minimal (F = 0) only at the kink t* = 1 / (1 + k) where G p = 0. There the
    squared stationarity equation has a double root that rounding moves by ~1e-8: without the kink
    candidate -q1 / (2 q2) the search stops ~1e-8 away with F ~ 2e-8 instead of 0. At that kink the
    primal optimum is 0 and the only conflict-free direction is d = 0 (inside the trust region, c > 1):
    the coefficients give d = (a_1 - k a_2) g_1 = 0 with or without the clip (tests/dual/test_primal.py)."""
    H = np.array([[1.0, -k], [-k, k * k]])
    w = np.array([w1, 1.0 - w1])
    b = H @ w
    s = c * math.sqrt(w @ b)
    args = (b[1] - b[0], s, H[0, 0], 2.0 * (H[0, 1] - H[0, 0]), H[0, 0] + H[1, 1] - 2.0 * H[0, 1], 1.0)
    t = float(exact_line_search(*(torch.tensor(x, dtype=torch.float64) for x in args)))
    assert t == pytest.approx(1.0 / (1.0 + k), abs=1e-15)
    p_star = np.array([k, 1.0]) / (1.0 + k)
    for solver in SOLVERS:
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, solver=solver)
        assert abs(float(sol.dual_value)) <= 1e-15
        np.testing.assert_allclose(sol.dual.numpy(), p_star, rtol=0, atol=1e-15)
        for clip in (True, False):
            a = coeffs(H, w, c, clip, solver=solver)
            assert abs(a[0] - k * a[1]) <= 1e-15, (clip, a)


def _two_objective_closed_form(H: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """argmin over p = (t, 1 - t) by geometry, derived independently of the solver.

    u(t) = g2 + t e with e = g1 - g2. Write u = u_perp + tau e_hat, tau = <g2, e_hat> + t ||e||,
    r = ||u_perp||. Then F = const + k tau + s sqrt(r^2 + tau^2) with k = <g0, e_hat>, whose
    stationary point is tau* = -k r / sqrt(s^2 - k^2) when |k| < s (else F is monotone in tau).
    F is convex in t, so clamping the unconstrained minimiser to [0, 1] gives the answer.
    """
    w = normalised(w)
    b = H @ w
    s = c * math.sqrt(w @ b)
    e_norm = math.sqrt(H[0, 0] - 2 * H[0, 1] + H[1, 1])
    tau0 = (H[0, 1] - H[1, 1]) / e_norm  # <g2, e_hat>
    r = math.sqrt(max(H[1, 1] - tau0**2, 0.0))
    k = (b[0] - b[1]) / e_norm
    if abs(k) < s:
        tau = -k * r / math.sqrt(s * s - k * k)
        t = (tau - tau0) / e_norm
    else:
        t = 0.0 if k > 0 else 1.0  # F increases (k > 0) or decreases in tau
    t = min(max(t, 0.0), 1.0)
    return np.array([t, 1.0 - t])


def test_two_objectives_closed_form() -> None:
    rng = np.random.default_rng(2)
    interior = 0
    for _ in range(200):
        G = rng.normal(size=(int(rng.integers(2, 5)), 2)) * np.exp(rng.normal(size=2))
        H = G.T @ G
        w = rng.dirichlet(np.ones(2))
        c = float(rng.uniform(0.0, 0.99))
        p = _two_objective_closed_form(H, w, c)
        interior += bool(0 < p[0] < 1)
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c)
        np.testing.assert_allclose(sol.dual.numpy(), p, rtol=0, atol=1e-10)
        for clip in (True, False):
            a_ref = coefficients_from_dual(H, w, c, p, clip)
            np.testing.assert_allclose(coeffs(H, w, c, clip), a_ref, rtol=1e-9, atol=1e-12)
    assert interior >= 25  # the closed form's interior branch was exercised
    assert default_max_iter(2) == 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_clip_changes_an_interior_solution(solver: str) -> None:
    """m = 2 with an interior p and p_1 > w_1: the clip must shorten p_1 to w_1."""
    H = np.array([[4.0, -0.5], [-0.5, 1.0]])  # |g1| = 2, |g2| = 1, slightly conflicting
    w = np.array([0.2, 0.8])
    c = 0.4
    p = _two_objective_closed_form(H, w, c)
    assert 0.3 < p[0] < 0.4
    sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, solver=solver)
    np.testing.assert_allclose(sol.clipped_dual.numpy(), [0.2, p[1]], atol=1e-12)
    a_free = coeffs(H, w, c, clip=False, solver=solver)
    a_clip = coeffs(H, w, c, clip=True, solver=solver)
    np.testing.assert_allclose(a_clip, coefficients_from_dual(H, w, c, p, True), rtol=1e-12)
    assert np.abs(a_clip - a_free).max() > 1e-2


@pytest.mark.parametrize("solver", SOLVERS)
def test_anchor_zero(solver: str) -> None:
    """g2 = -g1, w uniform: g0 = 0, s = 0, a = w exactly."""
    H = np.array([[4.0, -4.0], [-4.0, 4.0]])
    for clip in (True, False):
        sol = solve_cagrad(torch.tensor(H), c=0.5, clip=clip, solver=solver)
        assert sol.coefficients.tolist() == [0.5, 0.5]
        assert float(sol.anchor_norm) == 0.0


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("c", [0.0, 0.3, 0.9])
def test_exactly_opposite_gradients(solver: str, c: float) -> None:
    """g2 = -g1, w = (0.8, 0.2): g0 = 0.6 g1, p* = e2, p~ = (0, 0.2), a = (0.8, 0.2 + 0.6 c)."""
    h = 2.25
    H = np.array([[h, -h], [-h, h]])
    a = coeffs(H, [0.8, 0.2], c, solver=solver)
    np.testing.assert_allclose(a, [0.8, 0.2 + 0.6 * c], rtol=1e-14)
    assert a[0] - a[1] == pytest.approx(0.6 * (1 - c), rel=1e-13)  # the correction removes c of the anchor


def test_half_precision_input_is_solved_in_float32() -> None:
    H = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float16)
    a = combination_coefficients(H, [0.2, 0.8])
    assert a.dtype == torch.float32
    p = _two_objective_closed_form(H.double().numpy(), np.array([0.2, 0.8]), 0.4)
    a_ref = coefficients_from_dual(H.double().numpy(), np.array([0.2, 0.8]), 0.4, p)
    np.testing.assert_allclose(a.double().numpy(), a_ref, rtol=1e-5)
    Hs, b, s = problem_data(H.double().numpy(), np.array([0.2, 0.8]), 0.4)
    assert dual_value(Hs, b, s, p) <= 0.0 or p.max() == 1.0


def test_degenerate_segments_move_to_an_end_or_stay() -> None:
    """Where ``h`` is linear the candidate formulas divide 0 by 0 (``q2 = 0``: ``G d = 0``; ``q0 = q1 = 0``:
    the segment starts at the kink ``G p = 0``; ``s = 0``): those candidates are dropped, and the search
    returns the end of the segment with the smaller ``h``, ``g = 0`` on a tie (a flat ``h``: no move).
    Closed forms: ``h(g) = beta1 g + s sqrt(q0)``, ``(beta1 + s sqrt(q2)) g`` and ``beta1 g``."""
    rows, expected = [], []
    for g_max in (0.5, 1.0):
        for beta1 in (-0.3, 0.0, 0.3):
            rows.append((beta1, 0.7, 2.0, 0.0, 0.0, g_max))  # G d = 0: h = beta1 g + const
            expected.append(g_max if beta1 < 0 else 0.0)
            rows.append((beta1, 0.0, 2.0, -1.5, 1.0, g_max))  # s = 0: h = beta1 g
            expected.append(g_max if beta1 < 0 else 0.0)
        for beta1, s, q2 in ((-1.0, 0.5, 1.0), (1.0, 0.5, 1.0), (-0.5, 0.5, 1.0), (-0.25, 0.5, 0.25)):
            rows.append((beta1, s, 0.0, 0.0, q2, g_max))  # from the kink: h = (beta1 + s sqrt(q2)) g
            expected.append(g_max if beta1 + s * math.sqrt(q2) < 0 else 0.0)
        rows.append((0.0, 0.0, 0.0, 0.0, 0.0, g_max))  # h = 0 everywhere
        expected.append(0.0)
    gamma = exact_line_search(*torch.tensor(rows, dtype=torch.float64).unbind(-1))
    assert gamma.tolist() == expected
