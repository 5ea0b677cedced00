"""Single steps of the dual solvers against hand computations and independent numpy/scipy references.

* :func:`~cagrad_clip._dual.stationary.stationary_step`: Wolfe's min-norm point and Lawson-Hanson's
  least squares, step by step on instances solved by hand;
* :func:`~cagrad_clip._dual.frank_wolfe.move`, :func:`~cagrad_clip._dual.frank_wolfe.pairwise_fw_step`
  and :func:`~cagrad_clip._dual.frank_wolfe.face_newton_step`: the Newton direction and the exact line
  search written from their definitions in numpy (bisection on the convex line's derivative);
* :func:`~cagrad_clip._dual.exact.solve_by_supports`: every output against a brute force over the faces
  (numpy least squares per face, ``scipy.optimize.nnls``, the SLSQP reference of ``tests.reference``).
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from cagrad_clip._dual.exact import solve_by_supports, solve_exact
from cagrad_clip._dual.frank_wolfe import face_newton_step, move, pairwise_fw_step, solve_frank_wolfe, start_support_size
from cagrad_clip._dual.stationary import stationary_problems, stationary_step, vertex_conflict_free
from tests.reference import dual_value, solve_dual_reference

F64 = dict(dtype=torch.float64)


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# numpy references written from the formulas
# ---------------------------------------------------------------------------------------------
def line_minimiser(H: np.ndarray, b: np.ndarray, s: float, p: np.ndarray, d: np.ndarray, gamma_max: float) -> float:
    """``argmin_{0 <= g <= gamma_max} F(p + g d)`` by bisection on the derivative of the convex ``F`` along the line."""

    def slope(g: float) -> float:
        x = p + g * d
        n = math.sqrt(max(float(x @ H @ x), 0.0))
        return float(b @ d) + (s * float(d @ H @ x) / n if n > 0 else -s * math.sqrt(max(float(d @ H @ d), 0.0)))

    if slope(0.0) >= 0.0:
        return 0.0
    if slope(gamma_max) <= 0.0:
        return gamma_max
    lo, hi = 0.0, gamma_max
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0.0 else (lo, mid)
    return 0.5 * (lo + hi)


def newton_direction(H: np.ndarray, b: np.ndarray, s: float, p: np.ndarray) -> np.ndarray:
    """The equality-constrained Newton direction of ``F`` on the face of ``p``'s positive entries."""
    act = np.flatnonzero(p > 0)
    Hp = H @ p
    n = math.sqrt(float(p @ Hp))
    grad = b + s * Hp / n
    hess = (s / n) * (H - np.outer(Hp, Hp) / n**2)
    k = act.size
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = hess[np.ix_(act, act)]
    kkt[:k, k] = kkt[k, :k] = 1.0
    sol = np.linalg.solve(kkt, np.append(-grad[act], 0.0))
    d = np.zeros_like(p)
    d[act] = sol[:k]
    return d


def face_newton_reference(H, b, s, p) -> np.ndarray:
    """Newton direction on the face, then the exact line search up to the first entry reaching 0 (set to exactly 0)."""
    d = newton_direction(H, b, s, p)
    shrinking = d < 0
    gamma_max = float(np.min(p[shrinking] / -d[shrinking])) if shrinking.any() else 1e300
    gamma = line_minimiser(H, b, s, p, d, gamma_max)
    out = np.maximum(p + gamma * d, 0.0)
    if gamma >= gamma_max:
        out[np.flatnonzero(shrinking)[np.argmin(p[shrinking] / -d[shrinking])]] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# stationary_step: Wolfe (min-norm point) and Lawson-Hanson (least squares), stacked
# ---------------------------------------------------------------------------------------------
def run_stationary(H, b, x_rows, steps: int, add_tol=0.0):
    """``steps`` calls of :func:`stationary_step` from ``x_rows`` (min-norm row, least-squares row), every
    iterate optimal on its face at the start; returns every ``(x, optimal)``."""
    Hn, b = t(H), t(b)
    x = t(x_rows)
    optimal = torch.ones(2, 1, dtype=torch.bool)
    problems = stationary_problems(b, torch.full_like(b, add_tol))
    idx = torch.arange(Hn.shape[-1])
    out = []
    for _ in range(steps):
        x, optimal = stationary_step(Hn, x, optimal, problems, idx)
        out.append((x.numpy().copy(), optimal.numpy().copy()))
    return out


def test_stationary_step_joins_the_steepest_vertex_and_moves_to_the_face_solution():
    """``H = I``, ``b = (-1, -2, .5)``. Min-norm row from ``e_0``: the gradient ``H q - q^T H q`` is
    ``(0, -1, -1)``; vertex 1 joins (the first of the tie), the target is the midpoint of the edge, reached;
    then vertex 2 joins and the iterate reaches the barycentre, the min-norm point, where it stays.
    Least-squares row from 0: the gradient ``b + lam`` is ``b``; vertex 1 (the most negative) joins and
    ``lam_1 = 2``; then vertex 0 joins and ``lam = (1, 2, 0) = max(0, -b)``; vertex 2 (positive gradient)
    never joins."""
    steps = run_stationary(np.eye(3), [-1.0, -2.0, 0.5], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 4)
    expected = [
        [[0.5, 0.5, 0.0], [0.0, 2.0, 0.0]],
        [[1 / 3, 1 / 3, 1 / 3], [1.0, 2.0, 0.0]],
        [[1 / 3, 1 / 3, 1 / 3], [1.0, 2.0, 0.0]],
        [[1 / 3, 1 / 3, 1 / 3], [1.0, 2.0, 0.0]],
    ]
    for (x, arrived), want in zip(steps, expected):
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-12)
        assert arrived.shape == (2, 1) and arrived.all()
    x, _ = steps[0]
    assert x[0, 2] == 0.0 and x[1, 0] == 0.0 and x[1, 2] == 0.0  # vertices off the face stay exact zeros
    assert steps[-1][0][1, 2] == 0.0


def test_wolfe_step_drops_a_vertex_whose_weight_reaches_zero():
    """``g0 = (1, 1)``, ``g1 = (-1, 1)``, ``g2 = (3, -1)`` (Gram scaled by 1/10). From ``e_0`` (the shortest
    gradient): vertex 1 joins, the edge's min-norm point ``(.5, .5, 0)`` (``G q = (0, 1)``). Then vertex 2
    joins (gradient ``-2``); the affine hull of the three is the plane, whose min-norm point ``0`` has the
    barycentric coordinates ``(-.5, 1, .5)``: the step stops where vertex 0 reaches zero, at
    ``(0, .75, .25)``, vertex 0 exactly 0, not arrived. Then (no join while not optimal) the min-norm point
    of the edge ``g1 g2``, ``t = .3``: ``(0, .7, .3)``, arrived, and it stays there (``<g_0, q> > |q|^2``)."""
    G = np.array([[1.0, -1.0, 3.0], [1.0, 1.0, -1.0]])
    H = G.T @ G / 10.0
    w = np.array([0.0, 0.0, 1.0])
    steps = run_stationary(H, H @ w, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 4)
    (x1, a1), (x2, a2), (x3, a3), (x4, a4) = steps
    np.testing.assert_allclose(x1[0], [0.5, 0.5, 0.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(x2[0], [0.0, 0.75, 0.25], rtol=0, atol=1e-12)
    assert x2[0, 0] == 0.0 and not a2[0, 0] and a1[0, 0]
    np.testing.assert_allclose(x3[0], [0.0, 0.7, 0.3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(x4[0], [0.0, 0.7, 0.3], rtol=0, atol=1e-12)
    assert a3[0, 0] and a4[0, 0] and x3[0, 0] == 0.0 and x4[0, 0] == 0.0
    # the least squares of g0 = g2 = (3, -1): lam = (0, 2, 0) (g2 + 2 g1 = (1, 1), conflict-free), in one step
    for x, arrived in steps:
        np.testing.assert_allclose(x[1], [0.0, 2.0, 0.0], rtol=0, atol=1e-11)  # the ridge: ~1e-12 in the first step
        assert arrived[1, 0]


def test_least_squares_ignores_gradients_above_minus_add_tol():
    """``H = I``, ``b = (-1, -.001, .5)``: with ``add_tol = .01`` vertex 1's gradient ``-.001`` does not count
    as negative, so only vertex 0 joins: ``lam = (1, 0, 0)``; with ``add_tol = 0`` it does: ``(1, .001, 0)``."""
    b = [-1.0, -0.001, 0.5]
    start = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    tolerant = run_stationary(np.eye(3), b, start, 3, add_tol=0.01)[-1][0][1]
    strict = run_stationary(np.eye(3), b, start, 3, add_tol=0.0)[-1][0][1]
    np.testing.assert_allclose(tolerant, [1.0, 0.0, 0.0], rtol=0, atol=1e-12)
    assert tolerant[1] == 0.0
    np.testing.assert_allclose(strict, [1.0, 0.001, 0.0], rtol=0, atol=1e-12)


def test_stationary_step_converges_to_the_min_norm_point_and_to_nnls():
    """Random problems (batched): enough steps reach the min-norm point of the convex hull (SLSQP on
    ``q^T H q`` over the simplex, value compared) and the non-negative least squares ``min ||g0 + G lam||``
    (``scipy.optimize.nnls``, full column rank: unique)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(5)
    m, dim, n = 5, 8, 4
    Gs = rng.normal(size=(n, dim, m)) * np.exp(rng.normal(size=(n, 1, m)) * 0.5)
    Hs = np.einsum("ndi,ndj->nij", Gs, Gs)
    scale = Hs.diagonal(axis1=1, axis2=2).max(-1)
    Hs = Hs / scale[:, None, None]
    Gs = Gs / np.sqrt(scale)[:, None, None]
    W = rng.dirichlet(np.ones(m), size=n)
    B = np.einsum("nij,nj->ni", Hs, W)
    Hn, b = t(Hs), t(B)
    x = torch.zeros(n, 2, m, **F64)
    x[:, 0] = torch.nn.functional.one_hot(Hn.diagonal(dim1=-2, dim2=-1).argmin(-1), m).to(torch.float64)
    optimal = torch.ones(n, 2, 1, dtype=torch.bool)
    problems = stationary_problems(b, torch.zeros_like(b))
    for _ in range(4 * m):
        x, optimal = stationary_step(Hn, x, optimal, problems, torch.arange(m))
    for k in range(n):
        q, lam = x[k, 0].numpy(), x[k, 1].numpy()
        assert q.min() >= 0.0 and abs(q.sum() - 1.0) <= 1e-12 and lam.min() >= 0.0
        ref = minimize(
            lambda v, H=Hs[k]: v @ H @ v,
            np.full(m, 1.0 / m),
            jac=lambda v, H=Hs[k]: 2 * H @ v,
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        assert q @ Hs[k] @ q <= ref.fun + 1e-10
        lam_ref, _ = nnls(Gs[k], -(Gs[k] @ W[k]))
        np.testing.assert_allclose(lam, lam_ref, rtol=1e-9, atol=1e-10)


def test_towards_stops_where_the_first_entry_reaches_zero_and_zeroes_it_exactly():
    """``x + gamma (target - x)`` with the largest ``gamma <= 1`` keeping ``x >= 0``, per row of a ``(2, 2, m)``
    batch. ``(.9, .1) -> (-.3, 1.3)``: entry 0 blocks at ``gamma = .75``, where ``.9 - .75 * 1.2`` is
    ``1.1e-16`` in floating point: it is set to an exact 0, and the row has not arrived. ``(.2, .8) -> (.5, .5)``
    arrives. ``(.5, .5) -> (1, 0)``: entry 1 reaches zero exactly at ``gamma = 1``: arrived, exact 0."""
    from cagrad_clip._dual.stationary import _towards

    x = t([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.9, 0.1]]])
    target = t([[[-0.3, 1.3], [0.5, 0.5]], [[1.0, 0.0], [-0.3, 1.3]]])
    assert 0.9 + 0.75 * (-0.3 - 0.9) != 0.0  # the rounding dust the exact zero removes
    x_next, arrived = _towards(x, target)
    np.testing.assert_array_equal(arrived.numpy(), [[[False], [True]], [[True], [False]]])
    np.testing.assert_allclose(x_next.numpy(), [[[0.0, 1.0], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]], rtol=0, atol=1e-15)
    assert x_next[0, 0, 0] == 0.0 and x_next[1, 1, 0] == 0.0 and x_next[1, 0, 1] == 0.0


def test_stationary_step_of_a_batch_equals_its_problems_one_by_one():
    """The two hand-solved instances above (identity Gram; the Wolfe drop) in one ``(2, 2, 3)`` batch: every
    step equals the step of each problem alone."""
    G = np.array([[1.0, -1.0, 3.0], [1.0, 1.0, -1.0]])
    H2 = G.T @ G / 10.0
    Hs = [np.eye(3), H2]
    bs = [np.array([-1.0, -2.0, 0.5]), H2 @ np.array([0.0, 0.0, 1.0])]
    starts = [[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    alone = [run_stationary(H, b, x0, 4) for H, b, x0 in zip(Hs, bs, starts)]
    Hn, b = t(np.stack(Hs)), t(np.stack(bs))
    x, optimal = t(np.stack(starts)), torch.ones(2, 2, 1, dtype=torch.bool)
    problems = stationary_problems(b, torch.zeros_like(b))
    for k in range(4):
        x, optimal = stationary_step(Hn, x, optimal, problems, torch.arange(3))
        for i in range(2):
            np.testing.assert_allclose(x[i].numpy(), alone[i][k][0], rtol=0, atol=1e-15)
            np.testing.assert_array_equal(optimal[i].numpy(), alone[i][k][1])


def test_a_vertex_joins_only_with_a_gradient_strictly_below_the_threshold():
    """``g0 = (1, 0)``, ``g1 = g2 = (0, 1)`` (a duplicate). Wolfe from ``e_0`` reaches ``(.5, .5, 0)``; there the
    duplicate's gradient ``<g2, G q> - |G q|^2`` is exactly 0, not below 0: it does not join and the iterate
    stays (joining would split vertex 1's mass with it). The least squares with ``b = (-1, 0, 0)``: vertex 0
    joins, ``lam = (1, 0, 0)``, and the duplicates (gradients exactly 0) stay at 0."""
    G = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    H = G.T @ G
    steps = run_stationary(H, [-1.0, 0.0, 0.0], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 3)
    for x, arrived in steps[1:]:
        np.testing.assert_array_equal(x[0], [0.5, 0.5, 0.0])
        assert arrived.all()
    for x, _ in steps:
        np.testing.assert_allclose(x[1], [1.0, 0.0, 0.0], rtol=0, atol=1e-12)
        assert x[1, 1] == 0.0 and x[1, 2] == 0.0


def test_vertex_conflict_free_is_max_zero_minus_b_over_the_diagonal():
    b = t([-1.0, 2.0, -3.0, -1.0, 0.0])
    diag = t([2.0, 1.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(vertex_conflict_free(b, diag).numpy(), [0.5, 0.0, 0.0, 2.0, 0.0])


# ---------------------------------------------------------------------------------------------
# move, pairwise_fw_step, face_newton_step
# ---------------------------------------------------------------------------------------------
def call_move(H, b, s, p, d, gamma_max, frozen=False, blocking=None):
    H, b, p, d = t(H)[None], t(b)[None], t(p)[None], t(d)[None]
    Hp = (H @ p.unsqueeze(-1)).squeeze(-1)
    q0 = (p * Hp).sum(-1)
    m = p.shape[-1]
    blocking = torch.zeros(1, m, dtype=torch.bool) if blocking is None else torch.tensor([blocking])
    return move(H, b, t([s]), p, Hp, q0, d, t([gamma_max]), torch.tensor([frozen]), blocking)[0].numpy()


def test_move_takes_the_exact_line_search_step():
    """``p + g* d`` with ``g*`` the minimiser of ``F`` along the segment (bisection reference), for an
    interior minimiser and for one beyond ``gamma_max`` (then the step stops at ``gamma_max``)."""
    rng = np.random.default_rng(3)
    G = rng.normal(size=(4, 4))
    H = G.T @ G
    H /= H.diagonal().max()
    b = H @ np.array([0.1, 0.2, 0.3, 0.4])
    s = 0.7
    p = np.array([0.25, 0.25, 0.25, 0.25])
    d = np.array([1.0, -1.0, 0.5, -0.5])
    for gamma_max in (0.25, 0.05, 0.01):
        gamma = line_minimiser(H, b, s, p, d, gamma_max)
        np.testing.assert_allclose(call_move(H, b, s, p, d, gamma_max), p + gamma * d, rtol=0, atol=1e-12)
    assert 0.0 < line_minimiser(H, b, s, p, d, 0.25) < 0.25 and line_minimiser(H, b, s, p, d, 0.01) == 0.01
    # a frozen problem does not move at all; the same step backwards (uphill) does not move either
    np.testing.assert_array_equal(call_move(H, b, s, p, d, 0.25, frozen=True), p)
    back = call_move(H, b, s, p, -d, 0.25)
    np.testing.assert_array_equal(back, p)


def test_move_sets_the_blocking_vertex_to_an_exact_zero_only_at_a_full_step():
    """``H = I``, ``b = (0, 1)``, ``s = .1``: along ``e_0 - e_1`` from ``p = (.7, .3)`` the dual falls all the
    way (slope ``<= -1 + 2 s``), so the step is ``gamma_max`` and the blocking vertex 1 becomes an exact 0,
    where ``p_1 - gamma_max`` leaves rounding dust (the mass is given as ``0.1 * 3``, the step as ``0.3``).
    An interior minimiser (``b = (0, .2)``, ``s = 1``, ``p = (.5, .5)``: ``g* = sqrt(.5 / 98)``) keeps the
    blocking vertex's remaining mass."""
    m1 = 0.1 * 3  # 0.30000000000000004
    p = np.array([1.0 - m1, m1])
    full = call_move(np.eye(2), [0.0, 1.0], 0.1, p, [1.0, -1.0], 0.3, blocking=[False, True])
    assert full[1] == 0.0 and full[0] == pytest.approx(1.0, abs=1e-15)
    # without the blocking mark the dust remains: the clamp alone does not give exactly 0 here
    dusty = call_move(np.eye(2), [0.0, 1.0], 0.1, p, [1.0, -1.0], 0.3, blocking=[False, False])
    assert dusty[1] == m1 - 0.3 and dusty[1] > 0.0
    g = math.sqrt(0.5 / 98.0)
    partial = call_move(np.eye(2), [0.0, 0.2], 1.0, [0.5, 0.5], [1.0, -1.0], 0.5, blocking=[False, True])
    np.testing.assert_allclose(partial, [0.5 + g, 0.5 - g], rtol=0, atol=1e-13)


def fw_step(H, b, s, p, excluded=None, kink_tol=0.0):
    m = len(p)
    ex = torch.zeros(1, m, dtype=torch.bool) if excluded is None else torch.tensor([excluded])
    return pairwise_fw_step(t(H)[None], t(b)[None], t([s]), t(p)[None], kink_tol, torch.arange(m), ex)[0].numpy()


def test_pairwise_fw_step_never_aims_at_an_excluded_vertex():
    """``H = diag(1, 0, 1)`` (vertex 1 a zero gradient), ``b = (.5, 0, 1)``, ``s = 1``, ``p = (.5, 0, .5)``: the
    gradient is ``(.5 + s/sqrt 2, 0, 1 + s/sqrt 2)``, smallest at vertex 1. Excluded, the best vertex is 0:
    along ``e_0 - e_2`` the dual is ``const - .5 g + sqrt(.5 + 2 g^2)``, minimal at ``g = sqrt(.5 / 14)``.
    Not excluded, the mass goes from 2 to 1 instead."""
    H, b, p = np.diag([1.0, 0.0, 1.0]), [0.5, 0.0, 1.0], [0.5, 0.0, 0.5]
    g = math.sqrt(0.5 / 14.0)
    np.testing.assert_allclose(fw_step(H, b, 1.0, p, excluded=[False, True, False]), [0.5 + g, 0.0, 0.5 - g], rtol=0, atol=1e-12)
    free = fw_step(H, b, 1.0, p)
    gamma = line_minimiser(H, np.array(b), 1.0, np.array(p), np.array([0.0, 1.0, -1.0]), 0.5)
    np.testing.assert_allclose(free, [0.5, gamma, 0.5 - gamma], rtol=0, atol=1e-12)
    assert gamma > 0.0


def test_pairwise_fw_step_brings_in_an_inactive_vertex_with_a_negative_gradient():
    """``H = I``, ``b = (.5, 1, -1)``, ``s = .1``, ``p = (.5, .5, 0)``: the gradient ``b + s p / |p|`` is
    ``(.57, 1.07, -1)``; the best vertex is the inactive vertex 2, the away vertex 1. Along ``e_2 - e_1`` the
    dual falls with slope ``<= -2 + 2 s``: the whole mass of vertex 1 moves, ``p = (.5, 0, .5)``."""
    np.testing.assert_array_equal(fw_step(np.eye(3), [0.5, 1.0, -1.0], 0.1, [0.5, 0.5, 0.0]), [0.5, 0.0, 0.5])


def test_pairwise_fw_step_uses_b_as_the_gradient_at_the_kink():
    """``g0 = (1, 0)``, ``g1 = (-1, 0)``, ``g2 = (0, 1)``, ``p = (.5, .5, 0)``: ``G p = 0``, the kink, where the
    gradient is ``b = (.3, -.3, .4)``: the best vertex is 1, the away vertex 0 (``b_0 > b_1``). Along ``e_1 - e_0``
    from the kink ``F = g (-.6 + 2 s)`` (``|G d| = 2``): with ``s = .1`` the whole mass of vertex 0 moves
    (``p = e_1``), with ``s = .5`` nothing moves."""
    G = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    H = G.T @ G
    b = np.array([0.3, -0.3, 0.4])
    p = np.array([0.5, 0.5, 0.0])
    np.testing.assert_array_equal(fw_step(H, b, 0.1, p), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(fw_step(H, b, 0.5, p), p)


def test_pairwise_fw_step_moves_each_problem_of_a_batch_by_its_own_data():
    """Three problems in one call (each its own ``H``, ``b``, ``s``, ``p``) equal three calls of one problem."""
    rng = np.random.default_rng(8)
    m = 4
    Gs = rng.normal(size=(3, 5, m))
    Hs = np.einsum("ndi,ndj->nij", Gs, Gs)
    Hs /= Hs.diagonal(axis1=1, axis2=2).max(-1)[:, None, None]
    B = np.einsum("nij,nj->ni", Hs, rng.dirichlet(np.ones(m), size=3))
    S = np.array([0.2, 0.6, 1.1])
    P = rng.dirichlet(np.ones(m), size=3)
    P[1, 2] = 0.0
    P[1] /= P[1].sum()
    batch = pairwise_fw_step(t(Hs), t(B), t(S), t(P), 0.0, torch.arange(m), torch.zeros(3, m, dtype=torch.bool)).numpy()
    newton = face_newton_step(t(Hs), t(B), t(S), t(P), 0.0).numpy()
    for k in range(3):
        np.testing.assert_allclose(batch[k], fw_step(Hs[k], B[k], S[k], P[k]), rtol=0, atol=1e-15)
        np.testing.assert_allclose(newton[k], face_newton_reference(Hs[k], B[k], S[k], P[k]), rtol=0, atol=1e-9)


def test_steps_freeze_each_problem_by_its_own_gap():
    """A batch of two: problem A far below zero (``H = I``, ``b = -10``, ``F(p) ~ -10``), problem B a random one
    away from its optimum. Each problem's Frank-Wolfe gap decides its own freezing: B moves exactly as it
    does alone, for both steps (A's large negative ``grad^T p`` must not enter B's gap)."""
    rng = np.random.default_rng(12)
    m = 3
    G = rng.normal(size=(4, m))
    HB = G.T @ G
    HB /= HB.diagonal().max()
    bB = HB @ np.array([0.6, 0.3, 0.1])
    pB = np.array([0.2, 0.3, 0.5])
    Hs = t(np.stack([np.eye(m), HB]))
    bs = t(np.stack([np.full(m, -10.0), bB]))
    ss = t([0.1, 0.4])
    ps = t(np.stack([[0.2, 0.3, 0.5], pB]))
    fw = pairwise_fw_step(Hs, bs, ss, ps, 0.0, torch.arange(m), torch.zeros(2, m, dtype=torch.bool))[1].numpy()
    np.testing.assert_allclose(fw, fw_step(HB, bB, 0.4, pB), rtol=0, atol=1e-15)
    newton = face_newton_step(Hs, bs, ss, ps, 0.0)[1].numpy()
    np.testing.assert_allclose(newton, face_newton_reference(HB, bB, 0.4, pB), rtol=0, atol=1e-9)
    assert np.abs(fw - pB).max() > 1e-3 and np.abs(newton - pB).max() > 1e-3


def test_face_newton_step_at_a_kink_inside_a_face_takes_the_projected_steepest_descent():
    """``g0 = (1, 0)``, ``g1 = (0, 1)``, ``g2 = (-1, -1)``, ``g3 = (0, 2)``: at ``p = (1/3, 1/3, 1/3, 0)``, ``G p = 0``
    exactly and ``p^T H p = 0 <= kink_tol = 0``: the kink, where ``F`` has no curvature term; the Newton
    direction is ``-b`` projected on the face (the ridge's system), then the exact line search to the face's
    boundary. Reference in numpy: ``d = -(b_A - mean(b_A))``, bisection along it."""
    G = np.array([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, -1.0, 2.0]])
    H = G.T @ G
    w = np.array([0.1, 0.2, 0.3, 0.4])
    b = H @ w
    s = 0.05 * math.sqrt(w @ H @ w)
    p = np.array([1.0, 1.0, 1.0, 0.0]) / 3.0
    assert p @ H @ p == 0.0
    d = -(b - b[:3].mean())
    d[3] = 0.0
    gamma_max = float(np.min(p[d < 0] / -d[d < 0]))
    gamma = line_minimiser(H, b, s, p, d, gamma_max)
    want = np.maximum(p + gamma * d, 0.0)
    if gamma >= gamma_max:
        want[np.argmin(np.where(d < 0, p / np.where(d < 0, -d, 1.0), np.inf))] = 0.0
    got = face_newton_step(t(H)[None], t(b)[None], t([s]), t(p)[None], 0.0)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert dual_value(H, b, s, got) < 0.0


@pytest.mark.parametrize("seed", range(6))
def test_face_newton_step_is_the_newton_step_on_the_face_with_the_exact_line_search(seed: int):
    """Random ``H``, ``b = H w``, ``s`` and a point on a face of 3 of 4 vertices: the step equals the
    equality-constrained Newton direction of ``F`` restricted to the face (numpy, from the Hessian
    ``(s / n) (H - H p p^T H / n^2)``), followed by the exact line search up to the face's boundary; the
    inactive vertex stays an exact 0, and a vertex that the step empties is an exact 0."""
    rng = np.random.default_rng(100 + seed)
    m = 4
    G = rng.normal(size=(5, m)) * np.exp(rng.normal(size=m) * 0.5)
    H = G.T @ G
    H /= H.diagonal().max()
    w = rng.dirichlet(np.ones(m))
    b = H @ w
    s = float(rng.uniform(0.2, 0.9)) * math.sqrt(w @ H @ w)
    p = np.append(rng.dirichlet(np.ones(3) * 3.0), 0.0)[rng.permutation(m)]
    got = face_newton_step(t(H)[None], t(b)[None], t([s]), t(p)[None], 0.0)[0].numpy()
    want = face_newton_reference(H, b, s, p)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert np.all(got[want == 0.0] == 0.0)
    assert abs(got.sum() - 1.0) <= 1e-14
    assert dual_value(H, b, s, got) <= dual_value(H, b, s, p)


@pytest.mark.parametrize("seed", [1039, 1118, 1134, 1151, 1174, 1194])
def test_face_newton_step_empties_the_blocking_vertex_exactly(seed: int):
    """Instances (drawn as above) where the exact line search runs to the face's boundary: the vertex that
    blocks gets an exact 0 (``p_j + gamma_max d_j`` alone leaves rounding dust here), the others follow the
    numpy reference."""
    rng = np.random.default_rng(seed)
    m = 4
    G = rng.normal(size=(5, m)) * np.exp(rng.normal(size=m) * 0.5)
    H = G.T @ G
    H /= H.diagonal().max()
    w = rng.dirichlet(np.ones(m))
    b = H @ w
    s = float(rng.uniform(0.2, 0.9)) * math.sqrt(w @ H @ w)
    p = np.append(rng.dirichlet(np.ones(3) * 3.0), 0.0)[rng.permutation(m)]
    d = newton_direction(H, b, s, p)
    ratio = np.where(d < 0, p / np.where(d < 0, -d, 1.0), np.inf)
    j = int(np.argmin(ratio))
    assert line_minimiser(H, b, s, p, d, ratio[j]) == ratio[j]  # the step is blocked by vertex j
    got = face_newton_step(t(H)[None], t(b)[None], t([s]), t(p)[None], 0.0)[0].numpy()
    assert got[j] == 0.0
    np.testing.assert_allclose(got, face_newton_reference(H, b, s, p), rtol=0, atol=1e-9)


def test_face_newton_step_reaches_the_optimum_on_an_edge():
    """On a face of two vertices the face is a segment: one step (Newton direction along it, exact line
    search) lands on the minimiser of ``F`` on the edge. ``H = I``, ``b = (0, .2, 5)``, ``s = 1``: on
    ``(1 - g, g, 0)`` the dual is ``.2 g + sqrt((1 - g)^2 + g^2)``, minimal where
    ``.2 sqrt(...) = 1 - 2 g``, i.e. ``g = (1 - sqrt(.04 / (2 - .04) ... ))`` (bisection reference)."""
    H, b, s = np.eye(3), np.array([0.0, 0.2, 5.0]), 1.0
    p = np.array([0.9, 0.1, 0.0])
    got = face_newton_step(t(H)[None], t(b)[None], t([s]), t(p)[None], 0.0)[0].numpy()
    # minimiser along the edge from e_0 to e_1 (closed form: .2 r = 1 - 2 g with r^2 = (1-g)^2 + g^2)
    # .04 (2 g^2 - 2 g + 1) = (1 - 2 g)^2  ->  u = 1 - 2 g: .04 (u^2 + 1) / 2 = u^2  ->  u^2 = .02 / .98
    g = (1.0 - math.sqrt(0.02 / 0.98)) / 2.0
    np.testing.assert_allclose(got, [1.0 - g, g, 0.0], rtol=0, atol=1e-13)
    assert got[2] == 0.0
    # an inactive vertex with a negative gradient (b_2 = -1, not on the face) does not freeze the face's step
    got = face_newton_step(t(H)[None], t([0.0, 0.2, -1.0])[None], t([s]), t(p)[None], 0.0)[0].numpy()
    np.testing.assert_allclose(got, [1.0 - g, g, 0.0], rtol=0, atol=1e-13)
    # from the other side of the minimiser too
    got = face_newton_step(t(H)[None], t(b)[None], t([s]), t([0.2, 0.8, 0.0])[None], 0.0)[0].numpy()
    np.testing.assert_allclose(got, [1.0 - g, g, 0.0], rtol=0, atol=1e-13)


def test_face_newton_step_at_the_kink_descends_along_minus_b_on_the_face():
    """At the kink (``G p = 0``: ``g1 = -g0``, ``p = (.5, .5, 0)``) the curvature term vanishes and the
    direction is ``-b`` projected on the face: ``b = (.3, -.3, .4)`` gives ``d ~ (-1, 1, 0)``, along which
    ``F = g (-.6 + 2 s)``. With ``s = .1`` the step goes to the face's end, ``e_1`` (vertex 0 exactly 0);
    with ``s = .5`` (uphill) there is no move."""
    G = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    H = G.T @ G
    b = t([0.3, -0.3, 0.4])[None]
    p = t([0.5, 0.5, 0.0])[None]
    np.testing.assert_array_equal(face_newton_step(t(H)[None], b, t([0.1]), p, 1e-30)[0].numpy(), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(face_newton_step(t(H)[None], b, t([0.5]), p, 1e-30)[0].numpy(), [0.5, 0.5, 0.0])


def test_face_newton_step_does_not_move_an_optimal_point():
    """At a vertex that is the optimum (``F``'s gradient smallest there: FW gap <= 0) the step is frozen:
    ``p`` comes back bit for bit."""
    H, b = np.eye(3), np.array([-1.0, 0.5, 0.5])
    p = np.array([1.0, 0.0, 0.0])
    np.testing.assert_array_equal(face_newton_step(t(H)[None], t(b)[None], t([0.2]), t(p)[None], 0.0)[0].numpy(), p)


# ---------------------------------------------------------------------------------------------
# solve_by_supports / solve_exact against a brute force over the faces
# ---------------------------------------------------------------------------------------------
def faces(m: int, k: int):
    return [S for size in range(1, k + 1) for S in combinations(range(m), size)]


def brute_force_least_squares(G: np.ndarray, g0: np.ndarray, k: int) -> np.ndarray:
    """The best non-negative unconstrained least-squares solution ``min ||g0 + G_S lam_S||`` over the faces of
    at most ``k`` vertices (0 where none beats ``lam = 0``)."""
    best, best_val = np.zeros(G.shape[1]), float(g0 @ g0)
    for S in faces(G.shape[1], k):
        lam_S = np.linalg.lstsq(G[:, S], -g0, rcond=None)[0]
        if lam_S.min() < 0:
            continue
        lam = np.zeros(G.shape[1])
        lam[list(S)] = lam_S
        val = float(np.sum((g0 + G @ lam) ** 2))
        if val < best_val - 1e-12:
            best, best_val = lam, val
    return best


def normalised_problem(G: np.ndarray, w: np.ndarray, c: float):
    H = G.T @ G
    scale = H.diagonal().max()
    Hn = H / scale
    b = Hn @ w
    return Hn, b, c * math.sqrt(w @ b), G / math.sqrt(scale)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_solve_by_supports_least_squares_is_the_best_face_solution(k: int):
    """``lam`` (the 4th output) is the best non-negative least squares over the faces of at most ``k``
    vertices (numpy, face by face); with every face it is ``scipy.optimize.nnls``. Several problems with
    conflicting gradients, full column rank, in one batch."""
    rng = np.random.default_rng(44)
    m, n = 5, 4
    Gs = [rng.normal(size=(7, m)) * np.exp(rng.normal(size=m) * 0.5) for _ in range(n)]
    for G in Gs:  # gradients 2..4 lean away from the anchor, mostly the mean of gradients 0 and 1
        G[:, 2:] -= 0.7 * G[:, :2].sum(1, keepdims=True)
    W = np.array([[0.35, 0.35, 0.1, 0.1, 0.1]] * n)
    probs = [normalised_problem(G, w, 0.5) for G, w in zip(Gs, W)]
    Hn = t(np.stack([pr[0] for pr in probs]))
    b = t(np.stack([pr[1] for pr in probs]))
    s = t([pr[2] for pr in probs])
    _, _, _, lam = solve_by_supports(Hn, b, s, k, 0.0)
    assert lam.shape == (n, m)
    hits = 0
    for i, (_, _, _, Gn) in enumerate(probs):
        g0 = Gn @ W[i]
        want = brute_force_least_squares(Gn, g0, k)
        np.testing.assert_allclose(lam[i].numpy(), want, rtol=1e-9, atol=1e-12)
        hits += int(want.any())
        if k == m:
            np.testing.assert_allclose(lam[i].numpy(), nnls(Gn, -g0)[0], rtol=1e-9, atol=1e-12)
    assert hits == n  # every instance needs a correction
    p_all, lam_all = solve_exact(Hn, b, s)
    p_all2, lam_all2 = solve_exact(Hn, b, s[:, None])
    np.testing.assert_array_equal(p_all.numpy(), p_all2.numpy())
    np.testing.assert_array_equal(lam_all.numpy(), lam_all2.numpy())
    if k == m:
        np.testing.assert_allclose(lam_all.numpy(), lam.numpy(), rtol=1e-12, atol=1e-14)


def test_solve_by_supports_dual_outputs_match_brute_force_and_reference():
    """``p`` and ``F(p)`` over all faces: ``F(p)`` is the dual value at ``p`` (numpy), ``p`` is on the
    simplex, and equals the SLSQP reference's optimum; with ``max_support = 2``, ``F(p)`` is no worse than
    every edge's minimiser (bisection along every edge) and no better than the best of them. The batch
    (2 x 3 problems) equals one-by-one solves; ``solve_exact`` gives the same ``p``."""
    rng = np.random.default_rng(77)
    m = 5
    probs, ws = [], []
    for _ in range(6):
        G = rng.normal(size=(3, m)) * np.exp(rng.normal(size=m) * 0.5) + rng.normal(size=(3, 1))
        w = rng.dirichlet(np.ones(m))
        probs.append(normalised_problem(G, w, float(rng.uniform(0.2, 0.9))))
        ws.append(w)
    Hn = t(np.stack([pr[0] for pr in probs])).reshape(2, 3, m, m)
    b = t(np.stack([pr[1] for pr in probs])).reshape(2, 3, m)
    s = t([pr[2] for pr in probs]).reshape(2, 3)
    p, value, p_off, lam = solve_by_supports(Hn, b, s, None, 0.0)
    assert p.shape == (2, 3, m) and value.shape == (2, 3) and p_off.shape == (2, 3, m) and lam.shape == (2, 3, m)
    p_exact, lam_exact = solve_exact(Hn, b, s)
    np.testing.assert_array_equal(p_exact.numpy(), p.numpy())
    np.testing.assert_array_equal(lam_exact.numpy(), lam.numpy())
    p2, value2, _, _ = solve_by_supports(Hn, b, s, 2, 0.0)
    for i in range(6):
        H_i, b_i, s_i, _ = probs[i]
        pi, vi = p.reshape(6, m)[i].numpy(), float(value.reshape(6)[i])
        assert pi.min() >= 0.0 and abs(pi.sum() - 1.0) <= 1e-14
        assert vi == pytest.approx(dual_value(H_i, b_i, s_i, pi), abs=1e-14)
        ref = solve_dual_reference(H_i, ws[i], probs[i][2] / math.sqrt(ws[i] @ H_i @ ws[i]))
        assert vi <= ref.value + 1e-12 and vi == pytest.approx(ref.value, abs=1e-11)
        edges = []
        for a, c in combinations(range(m), 2):
            e_a, e_c = np.eye(m)[a], np.eye(m)[c]
            g = line_minimiser(H_i, b_i, s_i, e_a, e_c - e_a, 1.0)
            edges.append(dual_value(H_i, b_i, s_i, e_a + g * (e_c - e_a)))
        v2 = float(value2.reshape(6)[i])
        assert v2 == pytest.approx(min(edges), abs=1e-12)
        assert v2 == pytest.approx(dual_value(H_i, b_i, s_i, p2.reshape(6, m)[i].numpy()), abs=1e-14)
        one = solve_by_supports(t(H_i), t(b_i), t(s_i), None, 0.0)
        for got, alone in zip((p, p_off, lam), (one[0], one[2], one[3])):
            np.testing.assert_allclose(got.reshape(6, m)[i].numpy(), alone.numpy(), rtol=0, atol=1e-15)


def test_least_squares_keeps_the_multiplier_of_a_short_gradient():
    """A gradient ``10^4`` times shorter than the anchor ``g0 = (1, 0)``: ``g1 = 10^-4 (-1, .5)``, ``g2 = (.3, 1)``.
    The least squares ``min ||g0 + lam_1 g1 + lam_2 g2||`` over ``lam >= 0`` is ``lam = (0, 8000, 0)`` (nnls); its
    one-vertex face is independent (``p0^T H p0 = |g1|^2``, far above rounding relative to ``|g1|^2``), so the
    exact solver (every face, and the vertices only) returns it."""
    G = np.array([[1.0, -1e-4, 0.3], [0.0, 0.5e-4, 1.0]])
    w = np.array([1.0, 0.0, 0.0])
    Hn, b, s, Gn = normalised_problem(G, w, 0.5)
    want = nnls(Gn, -(Gn @ w))[0]
    np.testing.assert_allclose(want, [0.0, 8000.0, 0.0], rtol=1e-9)
    _, lam = solve_exact(t(Hn), t(b), t(s))
    np.testing.assert_allclose(lam.numpy(), want, rtol=1e-9, atol=1e-9)
    _, _, _, lam1 = solve_by_supports(t(Hn), t(b), t(s), 1, 0.0)
    np.testing.assert_allclose(lam1.numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 0.1, 3.0])
def test_least_squares_ignores_faces_of_dependent_gradients(scale: float):
    """Gradients with an exactly opposite pair (``g2 = -2 g1``) and a duplicate (``g4 = g3``): the faces that
    hold both of a pair are dependent (their affine hull passes through 0, ``p0^T H p0`` at rounding
    level), so their least-squares formula (a division by ``p0^T H p0``) is no candidate. The returned
    ``lam`` is non-negative and its residual ``g0 + G lam`` is scipy's ``nnls`` residual (unique; ``lam``
    is not)."""
    g1 = np.array([1.0, 0.3, -0.2]) * scale
    g3 = np.array([-0.4, 1.0, 0.1])
    G = np.stack([np.array([0.5, 0.5, 1.0]), g1, -2.0 * g1, g3, g3], axis=1)
    w = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    Hn, b, s, Gn = normalised_problem(G, w, 0.5)
    g0 = Gn @ w
    want = g0 + Gn @ nnls(Gn, -g0)[0]
    _, lam = solve_exact(t(Hn), t(b), t(s))
    lam = lam.numpy()
    assert lam.min() >= 0.0 and np.all(np.isfinite(lam))
    np.testing.assert_allclose(g0 + Gn @ lam, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("s", [0.0, 1e-160, 1e-3])
def test_solve_by_supports_with_a_vanishing_radius_gives_the_vertex_of_smallest_b(s: float):
    """``F(p) = b^T p + s ||G p||`` with ``s -> 0`` is linear: its minimum is the vertex with the smallest
    ``b_j`` (here by a margin of ``.1`` over the others, so ``s = 1e-3`` does not change it). At
    ``s = 1e-160``, ``s^2`` is denormal and a vertex's ``sigma^2 = H_jj / s^2`` overflows: that vertex must
    still be a candidate (its point is the vertex itself)."""
    H = np.diag([1.0, 0.25, 0.25, 0.25])  # orthogonal gradients, the best vertex the longest: no other face's
    b = np.array([-0.2, 0.3, 0.1, -0.1])  # candidate (min-norm points, weights 1 / H_ii) is that vertex
    p, value, p_off, _ = solve_by_supports(t(H), t(b), t(s), None, 0.0)
    np.testing.assert_array_equal(p.numpy(), [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(p_off.numpy(), [1.0, 0.0, 0.0, 0.0])
    assert float(value) == pytest.approx(-0.2 + s, abs=1e-15)


def test_exact_solver_chunks_keep_every_problem_at_the_chunk_boundaries():
    """130 problems at ``m = 9`` (511 faces: 64 problems per chunk, so three chunks): the problems at both
    sides of each chunk boundary and the last one equal their solves alone (``p`` and ``lam``)."""
    m, n = 9, 130
    rng = np.random.default_rng(13)
    G = rng.normal(size=(n, 6, m))
    H = np.einsum("ndi,ndj->nij", G, G)
    H /= H.diagonal(axis1=1, axis2=2).max(-1)[:, None, None]
    W = rng.dirichlet(np.ones(m), size=n)
    B = np.einsum("nij,nj->ni", H, W)
    S = 0.5 * np.sqrt(np.einsum("ni,ni->n", W, B))
    p, lam = solve_exact(t(H), t(B), t(S))
    _, _, p_off, _ = solve_by_supports(t(H), t(B), t(S), None, 0.0)
    assert p.shape == (n, m) and lam.shape == (n, m) and p_off.shape == (n, m)
    for i in (0, 63, 64, 127, 128, 129):
        p_i, lam_i = solve_exact(t(H[i]), t(B[i]), t(S[i]))
        np.testing.assert_allclose(p_off[i].numpy(), solve_by_supports(t(H[i]), t(B[i]), t(S[i]), None, 0.0)[2].numpy(), rtol=0, atol=1e-13)
        np.testing.assert_allclose(p[i].numpy(), p_i.numpy(), rtol=0, atol=1e-13)
        np.testing.assert_allclose(lam[i].numpy(), lam_i.numpy(), rtol=0, atol=1e-13)


def test_solve_by_supports_start_point_is_the_best_candidate_off_the_kink():
    """``g0 = 0``, ``g1 = (1, 0)``, ``g2 = (0, 1)``, ``w = (0, .5, .5)``: ``b = (0, .5, .5) >= 0``, so the
    optimum is the zero gradient's vertex ``e_0`` (``F = 0``, the kink) and the least squares is 0. Off the
    kink (``p^T H p > kink_tol``) the best point is the middle of the edge ``g1 g2``, ``F = .5 + s / sqrt 2``
    (every face with vertex 0 has its candidate at ``e_0``). With a ``kink_tol`` above every candidate there
    is none off the kink: the first candidate, ``e_0``."""
    G = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    H, b, s = t(G.T @ G), t([0.0, 0.5, 0.5]), t(0.3)
    p, value, p_off, lam = solve_by_supports(H, b, s)  # the default kink_tol, 0: p^T H p > 0 is off the kink
    np.testing.assert_array_equal(p.numpy(), [1.0, 0.0, 0.0])
    assert float(value) == 0.0
    np.testing.assert_allclose(p_off.numpy(), [0.0, 0.5, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(lam.numpy(), [0.0, 0.0, 0.0])
    _, _, p_none, _ = solve_by_supports(H, b, s, None, 10.0)
    np.testing.assert_array_equal(p_none.numpy(), [1.0, 0.0, 0.0])
    _, _, p_small, _ = solve_by_supports(H, b, s, 1, 0.0)
    np.testing.assert_array_equal(p_small.numpy(), [0.0, 1.0, 0.0])  # vertices only: the first of the tie e_1, e_2


def test_solve_by_supports_breaks_ties_by_the_first_face():
    """``g1 = g2 = (1, 0)``, ``g0 = (0, 1)``, ``w = e_0``: ``b = (1, 0, 0)``, ``s = .5``. The optimum
    ``F = s`` is at ``e_1`` and at ``e_2`` (and on their edge, a singular face); the first face, ``{1}``, wins:
    ``p = e_1`` exactly. The least squares of ``g0 = (0, 1)``: ``b >= 0``, ``lam = 0``."""
    G = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    p, value, _, lam = solve_by_supports(t(G.T @ G), t([1.0, 0.0, 0.0]), t(0.5), None, 0.0)
    np.testing.assert_array_equal(p.numpy(), [0.0, 1.0, 0.0])
    assert float(value) == 0.5
    np.testing.assert_array_equal(lam.numpy(), [0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# solve_frank_wolfe: the best of its three candidates
# ---------------------------------------------------------------------------------------------
def test_start_support_size_thresholds():
    assert [start_support_size(m) for m in (1, 12, 13, 32, 33, 100)] == [3, 3, 2, 2, 1, 1]


def test_solve_frank_wolfe_without_iterations_returns_the_best_small_face_point():
    """``max_iter = 0``: no step; the result is the best of the small-face solution (faces of at most 3
    vertices, here every face of 3 objectives: the exact optimum), the start off the kink and the
    shortest gradient's vertex; and ``lam`` is the small faces' least squares (here all faces: nnls)."""
    rng = np.random.default_rng(21)
    G = rng.normal(size=(4, 3))
    w = np.array([0.2, 0.3, 0.5])
    Hn, b, s, Gn = normalised_problem(G, w, 0.6)
    diag = t(Hn.diagonal().clip(0.0))
    p, lam = solve_frank_wolfe(t(Hn)[None], t(b)[None], t([s]), diag[None], 0, 0.0, torch.zeros(1, 3, **F64))
    ref = solve_dual_reference(Hn, w, 0.6)
    assert dual_value(Hn, b, s, p[0].numpy()) == pytest.approx(ref.value, abs=1e-12)
    np.testing.assert_allclose(lam[0].numpy(), nnls(Gn, -(Gn @ w))[0], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the face frame (the layout of every face's bordered system) and devices / dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "max_support"), [(3, 2), (4, 4), (5, 3), (2, 7)])
def test_face_frame_gathers_every_bordered_kkt_system(m: int, max_support: int):
    """For a Gram with distinct entries, the frame's gather builds, for the ``j``-th face ``S`` (by size, then
    lexicographic), ``[[H_SS, 1], [1^T, 0]]`` padded with the identity (numpy, face by face), and the
    right-hand side ``[b_S, 0, ..., 0]``; ``unit`` is ``e_k``."""
    from cagrad_clip._dual.exact import face_frame

    k = min(m, max_support)
    frame = face_frame(m, max_support, torch.device("cpu"), torch.float64)
    H = np.arange(1.0, m * m + 1.0).reshape(m, m) * 1.5
    b = np.arange(1.0, m + 1.0) * -2.5
    K = len(faces(m, k))
    bordered = (t(H).reshape(-1)[frame.gram_index].view(K, k + 1, k + 1) * frame.gram_mask + frame.constant).numpy()
    linear = (t(b)[frame.b_index].view(K, k + 1) * frame.b_mask).numpy()
    for j, S in enumerate(faces(m, k)):
        want = np.eye(k + 1)
        size = len(S)
        want[:size, :size] = H[np.ix_(S, S)]
        want[:size, k] = want[k, :size] = 1.0
        want[k, k] = 0.0
        np.testing.assert_array_equal(bordered[j], want)
        np.testing.assert_array_equal(linear[j], np.concatenate([b[list(S)], np.zeros(k + 1 - size)]))
        np.testing.assert_array_equal(frame.support[j].numpy(), [1.0] * size + [0.0] * (k - size))
        assert tuple(frame.vertices[j, :size].tolist()) == S
    np.testing.assert_array_equal(frame.unit.numpy(), np.eye(k + 1)[k])


def test_face_frame_is_built_on_the_device_and_dtype_asked_for_and_cached_per_pair():
    """Every float tensor of the frame has the requested dtype and every tensor the requested device
    (``meta`` here: no data, but device propagation is checked); the cache keeps one frame per
    ``(m, k, device, dtype)`` and gives the same object back."""
    from cagrad_clip._dual.exact import face_frame

    for device, dtype in [
        (torch.device("meta"), torch.float64),
        (torch.device("cpu"), torch.float32),
        (torch.device("cpu"), torch.float64),
    ]:
        frame = face_frame(4, 3, device, dtype)
        for name, x in frame._asdict().items():
            assert x.device == device, name
            assert x.dtype == (torch.int64 if name in ("vertices", "gram_index", "b_index") else dtype), name
        assert face_frame(4, 3, device, dtype) is frame
    assert face_frame(4, 9, torch.device("cpu"), torch.float64) is face_frame(4, 4, torch.device("cpu"), torch.float64)
    assert face_frame(4, 2, torch.device("cpu"), torch.float64).vertices.shape == (10, 2)


def test_solvers_keep_every_tensor_on_the_input_device_and_dtype():
    """On the ``meta`` device (shapes and devices, no data) every solver runs and returns ``meta`` tensors of
    the input's dtype: no constant is made on the host. Float32 on the CPU gives float32."""
    for device, dtype in [("meta", torch.float64), ("cpu", torch.float32)]:
        kw = dict(device=device, dtype=dtype)
        m = 4
        H = torch.eye(m, **kw).expand(2, m, m)
        b = torch.full((2, m), -0.25, **kw)
        s = torch.full((2,), 0.5, **kw)
        outs = list(solve_exact(H, b, s)) + list(solve_by_supports(H, b, s, 2, 0.0))
        outs += list(solve_frank_wolfe(H, b, s, torch.ones(2, m, **kw), 2, 0.0, torch.zeros(2, m, **kw)))
        problems = stationary_problems(b, torch.zeros(2, m, **kw))
        outs += [problems.rhs, problems.neg_tol, problems.ridge, problems.decouple]
        outs += list(
            stationary_step(
                H,
                torch.zeros(2, 2, m, **kw),
                torch.ones(2, 2, 1, dtype=torch.bool, device=device),
                problems,
                torch.arange(m, device=device),
            )
        )
        outs.append(problems.simplex)
        outs.append(vertex_conflict_free(b, torch.ones(2, m, **kw)))
        p = torch.full((2, m), 0.25, **kw)
        outs.append(face_newton_step(H, b, s, p, 0.0))
        outs.append(pairwise_fw_step(H, b, s, p, 0.0, torch.arange(m, device=device), torch.zeros(2, m, dtype=torch.bool, device=device)))
        for x in outs:
            assert x.device.type == device
            assert x.dtype in (dtype, torch.bool)
        if device == "cpu":  # the values too: -b = .25 > 0 on every vertex, H = I: lam = .25 on each, p uniform
            np.testing.assert_allclose(outs[1].numpy(), np.full((2, m), 0.25), rtol=1e-6)
            np.testing.assert_allclose(outs[0].numpy(), np.full((2, m), 0.25), rtol=1e-6)


def frank_wolfe(Hn, b, s, max_iter: int, kink_tol: float = 0.0):
    """:func:`solve_frank_wolfe` with numpy in, ``add_tol = 0``."""
    Hn, b, s = t(Hn), t(b), t(s)
    diag = Hn.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    p, lam = solve_frank_wolfe(Hn, b, s, diag, max_iter, kink_tol, torch.zeros_like(b))
    return p.numpy(), lam.numpy()


def test_solve_frank_wolfe_of_a_batch_equals_its_problems_one_by_one():
    """A ``(2, 2)`` batch of problems of 6 objectives (different Grams, anchors and radii; the start solves
    faces of at most 3 vertices), for 0, 2 and 6 iterations: every problem's ``p`` and ``lam`` equal its solve
    alone (a single problem, no batch dimension); ``p`` is on the simplex, and after 6 iterations it is the
    optimum (SLSQP reference)."""
    rng = np.random.default_rng(61)
    m = 6
    probs = [
        normalised_problem(rng.normal(size=(4, m)) + rng.normal(size=(4, 1)), w, c)
        for w, c in zip(rng.dirichlet(np.ones(m), size=4), (0.3, 0.5, 0.7, 0.9))
    ]
    Hn = np.stack([pr[0] for pr in probs]).reshape(2, 2, m, m)
    b = np.stack([pr[1] for pr in probs]).reshape(2, 2, m)
    s = np.array([pr[2] for pr in probs]).reshape(2, 2)
    for max_iter in (0, 2, 6):
        p, lam = frank_wolfe(Hn, b, s, max_iter)
        assert p.shape == (2, 2, m) and lam.shape == (2, 2, m)
        for i in range(4):
            H_i, b_i, s_i, _ = probs[i]
            p_i, lam_i = frank_wolfe(H_i, b_i, s_i, max_iter)
            np.testing.assert_allclose(p.reshape(4, m)[i], p_i, rtol=0, atol=1e-14)
            np.testing.assert_allclose(lam.reshape(4, m)[i], lam_i, rtol=0, atol=1e-14)
            assert p_i.min() >= 0.0 and abs(p_i.sum() - 1.0) <= 1e-14
            if max_iter == 6:
                assert dual_value(H_i, b_i, s_i, p_i) == pytest.approx(minimise_on_face(H_i, b_i, s_i, list(range(m))), abs=1e-10)


def minimise_on_face(H, b, s, S) -> float:
    """``min F`` over the face ``S`` of the simplex: SLSQP from the face's vertices and barycentre."""
    from scipy.optimize import minimize

    HS, bS = H[np.ix_(S, S)], b[S]
    k = len(S)
    best = np.inf
    for x0 in list(np.eye(k)) + [np.full(k, 1.0 / k)]:
        res = minimize(
            lambda v: dual_value(HS, bS, s, v),
            x0,
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        v = np.clip(res.x, 0.0, None)
        best = min(best, dual_value(HS, bS, s, v / v.sum()))
    return best


def test_solve_frank_wolfe_without_iterations_is_the_best_point_of_the_small_faces():
    """``max_iter = 0`` at ``m = 5``: the start solves the faces of at most 3 vertices exactly, and nothing
    else runs: ``F(p)`` is the minimum of ``F`` over those faces (SLSQP face by face), strictly above the
    optimum, which needs all 5 objectives (5 gradients in general position in 4 dimensions, ``w`` near
    uniform, ``c = .9``); ``p`` is on the simplex. With ``2 m`` iterations the optimum."""
    rng = np.random.default_rng(4)
    m = 5
    Hn, b, s, _ = normalised_problem(rng.normal(size=(4, m)), np.full(m, 1.0 / m), 0.9)
    opt = minimise_on_face(Hn, b, s, list(range(m)))
    small = min(minimise_on_face(Hn, b, s, list(S)) for S in combinations(range(m), 3))  # closed faces: their edges too
    assert small > opt + 1e-3
    p, _ = frank_wolfe(Hn, b, s, 0)
    assert p.min() >= 0.0 and abs(p.sum() - 1.0) <= 1e-14
    assert dual_value(Hn, b, s, p) == pytest.approx(small, abs=1e-10)
    assert np.count_nonzero(p) <= 3
    p, _ = frank_wolfe(Hn, b, s, 2 * m)
    assert dual_value(Hn, b, s, p) == pytest.approx(opt, abs=1e-10)


def test_solve_frank_wolfe_reaches_an_optimum_beyond_its_start_faces():
    """Three problems of 6 objectives (8-dimensional random gradients, ``c = .9``) whose optimum mixes 4 or 5
    objectives and lies ``> .01`` below the best point of the faces of at most 3 (the start): ``m``
    iterations, batched, reach the optimum (SLSQP reference) to ``1e-10``. The optimum is positive, so no
    kink exists (``G p != 0``) and only the Frank-Wolfe and Newton steps can get there."""
    m = 6
    probs = []
    for seed in (291, 26, 17):
        rng = np.random.default_rng(seed)
        G = rng.normal(size=(8, m))
        w = rng.dirichlet(np.ones(m) * 3)
        probs.append(normalised_problem(G, w, 0.9))
    Hn, b, s = (np.stack([pr[i] for pr in probs]) for i in range(3))
    p, _ = frank_wolfe(Hn, b, s, m)
    _, start, _, _ = solve_by_supports(t(Hn), t(b), t(s), 3, 0.0)
    for i, (H_i, b_i, s_i, _) in enumerate(probs):
        opt = minimise_on_face(H_i, b_i, s_i, list(range(m)))
        assert opt > 0.0 and float(start[i]) > opt + 0.01
        assert p[i].min() >= 0.0 and abs(p[i].sum() - 1.0) <= 1e-14
        assert dual_value(H_i, b_i, s_i, p[i]) == pytest.approx(opt, abs=1e-10)


def test_solve_frank_wolfe_without_iterations_starts_wolfe_at_the_shortest_vertex():
    """``g0 = (.1, .5)`` (the shortest, the anchor), ``g1 = (1, -1)``, ``g2 = (-1, -1)``, ``c = .5``: ``F < 0`` on the
    edge ``g1 g2``. With no iteration the result is the best point of the faces of at most 3 vertices (here
    all: the optimum, SLSQP reference) and on the simplex: Wolfe's candidate is the vertex ``e_0``, a point
    of the simplex (a point off it, e.g. ``(0, 1, 1)``, would have ``F = 2 F((0, .5, .5)) < F*``)."""
    G = np.array([[0.1, 1.0, -1.0], [0.5, -1.0, -1.0]])
    w = np.array([1.0, 0.0, 0.0])
    Hn, b, s, _ = normalised_problem(G, w, 0.5)
    p, _ = frank_wolfe(Hn, b, s, 0)
    assert p.min() >= 0.0 and abs(p.sum() - 1.0) <= 1e-14
    opt = minimise_on_face(Hn, b, s, [0, 1, 2])
    assert opt < 0.0 and 2.0 * dual_value(Hn, b, s, np.array([0.0, 0.5, 0.5])) < opt
    assert dual_value(Hn, b, s, p) == pytest.approx(opt, abs=1e-10)


def test_solve_frank_wolfe_tracks_the_kink_optimum_and_the_least_squares():
    """Pareto-stationary gradients (``0`` is in their convex hull by construction: 6 objectives, the last
    cancels a mix of the others; 8 dimensions, rank 5), ``c = 2``: ``F >= (s - ||g0||) ||G p|| >= 0`` and
    ``F = 0`` at the kink, so ``F* = 0``. Within the default budget (``m`` iterations) ``F(p) <= 1e-7``;
    ``lam`` solves the non-negative least squares ``min ||g0 + G lam||``: its residual equals scipy's
    ``nnls`` residual (a projection onto a convex cone is unique, ``lam`` need not be)."""
    rng = np.random.default_rng(23)
    m = 6
    for _ in range(2):
        G = rng.normal(size=(8, m)) * np.exp(rng.normal(size=m) * 0.3)
        cert = rng.dirichlet(np.ones(m - 1))
        G[:, m - 1] = -(G[:, : m - 1] @ cert) / 0.5
        w = rng.dirichlet(np.ones(m))
        Hn, b, s, Gn = normalised_problem(G, w, 2.0)
        p, lam = frank_wolfe(Hn, b, s, m)
        assert p.min() >= 0.0 and abs(p.sum() - 1.0) <= 1e-14
        assert abs(dual_value(Hn, b, s, p)) <= 1e-7  # F near a kink: the rounding of sqrt(p^T H p) and b^T p, ~1e-9
        g0 = Gn @ w
        lam_ref, _ = nnls(Gn, -g0)
        assert lam.min() >= 0.0
        np.testing.assert_allclose(g0 + Gn @ lam, g0 + Gn @ lam_ref, rtol=0, atol=1e-9)
        assert np.linalg.norm(g0 + Gn @ lam_ref) < 0.99 * np.linalg.norm(g0)  # a real correction
