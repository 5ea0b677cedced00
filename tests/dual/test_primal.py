"""The direction against CAGrad's primal problem, solved here independently (issue 15, item 18).

Without the clip, CAGrad's direction is the solution of the primal problem

    max_d  min_i <g_i, d>   subject to   ||d - g0|| <= c ||g0||,

whose Lagrangian dual is the dual ``F`` the library solves. Where the dual optimum is a kink
(``G p* = 0``: the gradients are Pareto-stationary, ``0`` is in their convex hull, and the trust
region reaches a conflict-free direction) Algorithm 1's correction ``s G p / ||G p||`` is undefined;
the library then returns the primal solution nearest the anchor ``g0`` (``docs/algorithm.md``,
"Pareto-stationary inputs"), with or without the clip. The reference below solves the primal
itself (a second-order cone program) with scipy's SLSQP from several starts, in float64; it shares
no code with ``cagrad_clip._dual`` or ``tests.reference`` (cvxpy is not a dependency).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cagrad_clip._dual import solve_cagrad
from tests.dual.helpers import SOLVERS

# The achieved primal value min_i <g_i, d> may fall short of the reference optimum by at most
# PRIMAL_TOL * max_i ||g_i||^2, and d may leave the trust region by at most TRUST_TOL * ||g0||.
PRIMAL_TOL = 1e-7
TRUST_TOL = 1e-9


def primal_reference(G: np.ndarray, w: np.ndarray, c: float, seed: int = 0) -> tuple[float, np.ndarray]:
    """``(t*, d*)``: ``max t`` s.t. ``G^T d >= t``, ``||d - g0||^2 <= (c ||g0||)^2`` (SLSQP, multi-start).

    Variables ``x = (d, t)``; the problem is scaled by the longest gradient (SLSQP's tolerances are
    absolute). Starts: ``g0``, ``0`` when it is feasible (``c >= 1``) and random points of the ball.
    Every end point is pulled back into the ball exactly and scored by its true ``min_i <g_i, d>``;
    the best wins. Cross-checked against the dual (weak duality) in
    :func:`test_primal_reference_meets_the_dual_reference`.
    """
    dim, m = G.shape
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    scale = float(np.linalg.norm(G, axis=0).max())
    if scale == 0.0:
        return 0.0, np.zeros(dim)
    Gs = G / scale
    g0 = Gs @ w
    s = c * float(np.linalg.norm(g0))
    constraints = [
        {"type": "ineq", "fun": lambda x: Gs.T @ x[:-1] - x[-1], "jac": lambda x: np.hstack([Gs.T, -np.ones((m, 1))])},
        {
            "type": "ineq",
            "fun": lambda x: np.array([s * s - float(np.sum((x[:-1] - g0) ** 2))]),
            "jac": lambda x: np.append(-2.0 * (x[:-1] - g0), 0.0)[None, :],
        },
    ]
    rng = np.random.default_rng(seed)
    starts = [g0.copy()] + ([np.zeros(dim)] if s >= np.linalg.norm(g0) else [])
    for _ in range(8):
        u = rng.normal(size=dim)
        starts.append(g0 + s * rng.uniform(0.0, 1.0) * u / np.linalg.norm(u))
    best_t, best_d = -np.inf, g0
    for d0 in starts:
        x0 = np.append(d0, float((Gs.T @ d0).min()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = minimize(
                lambda x: -x[-1],
                x0,
                jac=lambda x: np.append(np.zeros(dim), -1.0),
                constraints=constraints,
                method="SLSQP",
                options={"ftol": 1e-16, "maxiter": 2000},
            )
        d = res.x[:-1]
        r = float(np.linalg.norm(d - g0))
        if r > s:
            d = g0 + (d - g0) * (s / r) if r > 0 else g0
        t = float((Gs.T @ d).min())
        if t > best_t:
            best_t, best_d = t, d
    return best_t * scale * scale, best_d * scale


def _direction(G: np.ndarray, w: np.ndarray, c: float, clip: bool, solver: str) -> np.ndarray:
    """``d = G a`` for the library's coefficients (``rescale=None``)."""
    a = solve_cagrad(torch.tensor(G.T @ G), torch.tensor(w), c=c, clip=clip, solver=solver).coefficients.numpy()
    return G @ a


def _assert_primal_optimal(G: np.ndarray, w: np.ndarray, c: float, d: np.ndarray, t_ref: float, what: str) -> None:
    g0 = G @ (w / w.sum())
    unit = float((G * G).sum(0).max())
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) + TRUST_TOL * np.linalg.norm(g0) + 1e-300, what
    assert float((G.T @ d).min()) >= t_ref - PRIMAL_TOL * unit, (what, float((G.T @ d).min()) / unit, t_ref / unit)


def stationary_gradients(rng: np.random.Generator, m: int, dim: int, kind: str) -> np.ndarray:
    """``dim x m`` gradients with ``0`` in their convex hull (Pareto-stationary), by construction.

    ``"all"``: ``sum_i p_i g_i = 0`` with every ``p_i > 0``; ``"subset"``: a random subset of at
    least two objectives cancels, the others are random with a shared component (agreement);
    ``"opposite"``: ``g_2 = -k g_1``; ``"zero"``: one zero gradient.
    """
    mu = rng.normal(size=dim) * rng.uniform(0.0, 2.0)
    G = (mu[:, None] + rng.normal(size=(dim, m))) * np.exp(rng.normal(size=m))
    if kind == "all":
        subset = np.arange(m)
    elif kind == "subset":
        subset = rng.choice(m, size=int(rng.integers(2, m + 1)), replace=False)
    elif kind == "opposite":
        G[:, 1] = -float(np.exp(rng.normal())) * G[:, 0]
        return G
    else:
        G[:, int(rng.integers(m))] = 0.0
        return G
    p = rng.dirichlet(np.ones(subset.size))
    G[:, subset[-1]] = -(G[:, subset[:-1]] @ p[:-1]) / p[-1]
    return G


def test_primal_reference_meets_the_dual_reference() -> None:
    """The primal reference is a feasible point, so its value is a lower bound on the optimum; any
    ``p`` on the simplex gives the upper bound ``F(p)`` (weak duality). SLSQP on the dual
    (``tests.reference``) closes the gap to ``1e-8 max_i ||g_i||^2`` on generic and stationary inputs."""
    from tests.reference import solve_dual_reference

    rng = np.random.default_rng(2)
    for k in range(24):
        m, dim = int(rng.integers(2, 6)), int(rng.integers(3, 9))
        G = stationary_gradients(rng, m, dim, "subset") if k % 2 else rng.normal(size=(dim, m)) * np.exp(rng.normal(size=m))
        w = rng.dirichlet(np.ones(m))
        c = (0.4, 1.0, 2.0)[k % 3]
        t_ref, d_ref = primal_reference(G, w, c)
        g0 = G @ w
        unit = float((G * G).sum(0).max())
        assert np.linalg.norm(d_ref - g0) <= c * np.linalg.norm(g0) * (1 + 1e-12)
        assert abs(solve_dual_reference(G.T @ G, w, c).value - t_ref) <= 1e-8 * unit


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("c", [0.4, 1.0, 2.0])
def test_direction_maximises_the_primal_on_generic_inputs(solver: str, c: float) -> None:
    """Random gradients (m = 2..5, dimension 3..8), without the clip: ``d`` attains the primal optimum."""
    rng = np.random.default_rng(int(10 * c))
    for _ in range(8):
        m, dim = int(rng.integers(2, 6)), int(rng.integers(3, 9))
        G = rng.normal(size=(dim, m)) * np.exp(rng.normal(size=m)) + rng.normal(size=(dim, 1)) * rng.uniform(0.0, 1.5)
        w = rng.dirichlet(np.ones(m))
        t_ref, _ = primal_reference(G, w, c)
        _assert_primal_optimal(G, w, c, _direction(G, w, c, False, solver), t_ref, f"m={m} dim={dim}")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("c", [0.4, 1.0, 2.0])
@pytest.mark.parametrize("kind", ["all", "subset", "opposite", "zero"])
def test_direction_maximises_the_primal_on_pareto_stationary_inputs(solver: str, c: float, kind: str) -> None:
    """Pareto-stationary gradients (m = 2..5, dimension 3..8). Without the clip ``d`` always attains the
    primal optimum. Where that optimum is 0 (the dual optimum is the kink ``G p* = 0``: always for
    ``c >= 1``) the clipped variant returns the same direction: there is no correction to clip.
    Before the fix both returned ``d = g0`` (``a = w``) there, or, with the clip, a correction
    along the excess of ``p`` over ``w`` (``d = (1 + c) g0`` for ``g_2 = -g_1``)."""
    rng = np.random.default_rng(100 + int(10 * c) + len(kind))
    kinks = 0
    for _ in range(8):
        m, dim = int(rng.integers(2, 6)), int(rng.integers(3, 9))
        G = stationary_gradients(rng, m, dim, kind)
        w = rng.dirichlet(np.ones(m))
        t_ref, _ = primal_reference(G, w, c)
        unit = float((G * G).sum(0).max())
        assert t_ref <= 1e-9 * unit  # 0 is in the convex hull: no direction improves every objective
        d = _direction(G, w, c, False, solver)
        _assert_primal_optimal(G, w, c, d, t_ref, f"{kind} m={m} dim={dim} clip=False")
        if t_ref >= -1e-9 * unit:  # the optimum is 0: the dual optimum is a kink
            kinks += 1
            d_clip = _direction(G, w, c, True, solver)
            _assert_primal_optimal(G, w, c, d_clip, t_ref, f"{kind} m={m} dim={dim} clip=True")
            np.testing.assert_allclose(d_clip, d, rtol=0, atol=1e-9 * np.sqrt(unit))
    assert c < 1.0 or kinks == 8  # c >= 1: every stationary input is a kink


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("c", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("clip", [True, False])
def test_opposite_gradients_with_a_large_radius_give_zero(solver: str, c: float, clip: bool) -> None:
    """``g_2 = -g_1``, ``w = (0.8, 0.2)``: ``g0 = 0.6 g_1`` conflicts with ``g_2``. With ``c >= 1`` the
    trust region contains ``d = 0``, the only direction that does not worsen an objective, and the
    nearest conflict-free point to ``g0`` (TorchJD's CAGrad returns 0 there too). Before the fix:
    ``d = g0`` without the clip, ``d = (1 + c) g0`` with it."""
    g = np.array([1.0, -2.0, 0.5])
    G = np.stack([g, -g], axis=1)
    w = np.array([0.8, 0.2])
    sol = solve_cagrad(torch.tensor(G.T @ G), torch.tensor(w), c=c, clip=clip, solver=solver)
    d = G @ sol.coefficients.numpy()
    np.testing.assert_allclose(d, 0.0, atol=1e-12)
    assert float(sol.dual_value) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("clip", [True, False])
def test_partially_stationary_input_with_a_small_radius(solver: str, clip: bool) -> None:
    """``g_2 = -g_1`` and a third gradient ``g_3``, ``c = 0.4 < 1``: the optimum is still the kink
    ``p* = (1/2, 1/2, 0)`` (``F >= 0`` everywhere), the primal optimum is 0 and ``d = g0`` is not
    optimal (``<g_2, g0> = -0.24``). The conflict-free directions in the trust region are
    ``{(0, y, z)}``; the nearest to ``g0 = (0.24, 0.8, 0)`` is ``(0, 0.8, 0)`` (computed by hand:
    the projection of ``g0`` onto the cone ``{d : <g_i, d> >= 0}``, at distance 0.24 <= s = 0.334)."""
    G = np.array([[1.0, -1.0, 0.3], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    w = np.array([0.1, 0.1, 0.8])
    c = 0.4
    t_ref, _ = primal_reference(G, w, c)
    assert abs(t_ref) <= 1e-12
    d = _direction(G, w, c, clip, solver)
    _assert_primal_optimal(G, w, c, d, t_ref, f"clip={clip}")
    np.testing.assert_allclose(d, [0.0, 0.8, 0.0], atol=1e-12)
