"""Gaps that mutation testing found in the dual solver's tests (``cagrad_clip/_dual``), each pinned against
an independent reference: a minimiser solved by hand (closed forms of small problems), the SLSQP
reference of :mod:`tests.reference`, the root of the stationarity condition in 60-digit decimal
arithmetic, or, for the solver dispatch, which registered solver runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import brentq

from cagrad_clip._dual import exact_line_search, solve_cagrad
from cagrad_clip._dual.objective import matvec, numbers
from cagrad_clip._dual.registry import SOLVERS, DualSolver
from tests.dual.helpers import PROPERTY
from tests.reference import reference_coefficients


def _line_search(beta1: float, s: float, q0: float, q1: float, q2: float, gamma_max: float) -> float:
    return float(exact_line_search(*(torch.tensor(x, dtype=torch.float64) for x in (beta1, s, q0, q1, q2, gamma_max))))


@pytest.mark.parametrize(("q2", "gamma_max", "minimiser"), [(1.0, 2.0, 1.0), (2.0, 1.0, 0.5)])
def test_line_search_finds_the_far_root_when_the_near_one_is_zero(q2: float, gamma_max: float, minimiser: float) -> None:
    """``h(g) = -g / 2 + sqrt(q2 g^2 - g + 1)``: ``h'(g) = 0`` at ``g = 1 / q2`` (``(2 q2 g - 1) = sqrt(Q(g))``,
    so ``Q(g) = 1``), inside ``[0, gamma_max]``. The squared stationarity condition has the roots 0 and
    ``1 / q2`` (constant term ``beta1^2 q0 - s^2 q1^2 / 4 = 0``): the quadratic formula must not take the far
    root as the difference ``qb - root`` (exactly 0 here), or the search ends at the kink or an end. Every
    number is a dyadic rational, so the root comes out exact."""
    assert _line_search(-0.5, 1.0, 1.0, -1.0, q2, gamma_max) == minimiser


def test_line_search_near_root_keeps_its_digits() -> None:
    """``h(g) = beta1 g + sqrt(g^2 + g + 1)`` with ``beta1 = -(1/2 + 2^-20)``: ``h'(0) = -2^-20`` and the
    minimiser is the small root ``g* ~ 1.27e-6`` of ``g^2 + g + (1 - 4 beta1^2) / (4 - 4 beta1^2) = 0``
    (``h'(g) = 0`` squared), here in 60-digit decimals. The coefficients are exact in float64, so the
    cancellation-free quadratic formula gives ``g*`` to a few ulps; taking the small root as
    ``(|qb| - root) / (2 qa)`` loses about 5 of its 16 digits."""
    beta1 = -(0.5 + 2.0**-20)
    with localcontext() as context:
        context.prec = 60
        b2 = Decimal(beta1) * Decimal(beta1)
        constant = (1 - 4 * b2) / (4 - 4 * b2)
        expected = float((-1 + (1 - 4 * constant).sqrt()) / 2)
    assert _line_search(beta1, 1.0, 1.0, 1.0, 1.0, 1.0) == pytest.approx(expected, rel=1e-14, abs=0.0)


def test_a_tiny_clipped_mass_keeps_its_correction() -> None:
    """``g_1 = -g_2`` (unit norms) and ``w = (1, 1e-158)``: ``g0 = g_1``, ``s = c``, and on the edge
    ``p = (1 - t, t)`` the dual is ``F = (1 - 2 t) (1 + c sign(1 - 2 t))``, minimised at the vertex
    ``p = e_2``. The clip leaves ``p~ = (0, 1e-158)``, and Algorithm 1's correction
    ``s G p~ / ||G p~|| = c g_2`` does not depend on the mass of ``p~``: ``a = (1, c + 1e-158) = (1, c)``
    in float64, exactly. Scaling ``p~`` by its mass (``p~ * 1e-158`` instead of ``p~ / 1e-158``) squares
    ``||G p~||^2`` into underflow, 0, and drops the correction (``a = w``)."""
    H = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    sol = solve_cagrad(H, torch.tensor([1.0, 1e-158], dtype=torch.float64), c=0.4)
    assert sol.dual.tolist() == [0.0, 1.0]
    assert sol.clipped_dual.tolist() == [0.0, 1e-158]
    assert sol.coefficients.tolist() == [1.0, 0.4]


def _stationary_and_conflicting() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two ``m = 3`` problems in the plane (gradients as the columns of ``G``), for ``c = 0.4``:

    * A, Pareto-stationary: ``g = (1, 0), (-1, 0), (0, 1)``, ``w = (0.35, 0.25, 0.4)``, so ``g0 = (0.1, 0.4)``
      conflicts with ``g_2``. The conflict-free directions are ``(0, y)``, ``y >= 0``; the nearest,
      ``d = (0, 0.4)``, lies ``0.1 < s = 0.4 ||g0|| ~ 0.165`` from ``g0``, and ``min F = 0`` (for
      ``p = (p_1, p_2, p_3)``, ``F >= 0.4 p_3 >= 0``, 0 at ``(1/2, 1/2, 0)``): the direction is ``d``.
      Algorithm 1's correction (``p~ = (0.35, 0.25, 0)``) gives ``(0.265, 0.4)`` instead.
    * B, not conflict-free within the trust region: ``g = (1, 0), (-2, 1), (0, 1)``, uniform ``w``, so
      ``g0 = (-1/3, 2/3)``; the nearest conflict-free direction ``(0, 2/3)`` is ``1/3`` away, beyond
      ``s = 0.4 ||g0|| ~ 0.298``.
    """
    GA = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    GB = np.array([[1.0, -2.0, 0.0], [0.0, 1.0, 1.0]])
    return GA, np.array([0.35, 0.25, 0.4]), GB, np.full(3, 1.0 / 3.0)


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_a_stationary_problem_keeps_its_direction_beside_a_conflicting_one(solver: str) -> None:
    """The Pareto-stationarity certificate is per problem: batched with B (whose nearest conflict-free
    direction lies outside its trust region), A still gets its closed-form direction ``(0, 0.4)``
    (:func:`_stationary_and_conflicting`), and B gets Algorithm 1's coefficients from the SLSQP
    reference dual of :mod:`tests.reference`. A certificate taken over the whole batch would drop A
    to Algorithm 1's ``(0.265, 0.4)``."""
    GA, wA, GB, wB = _stationary_and_conflicting()
    HB = GB.T @ GB
    gram = torch.tensor(np.stack([GA.T @ GA, HB]))
    sol = solve_cagrad(gram, torch.tensor(np.stack([wA, wB])), c=0.4, solver=solver)
    a = sol.coefficients.numpy()
    np.testing.assert_allclose(GA @ a[0], [0.0, 0.4], rtol=0.0, atol=1e-9)
    np.testing.assert_allclose(a[1], reference_coefficients(HB, wB, 0.4), rtol=1e-7, atol=1e-9)


def test_a_two_level_batch_solves_each_problem() -> None:
    """A batch of shape ``(1, 2)`` of ``m = 3`` problems (the number of objectives is the last
    dimension, not the second): A of :func:`_stationary_and_conflicting` gets its direction ``(0, 0.4)``,
    and three orthogonal unit gradients with uniform weights get ``a = (1 + c) / 3`` each (by symmetry
    ``p = w``, so ``p~ = p``, ``||G p~|| = ||g0|| = 1 / sqrt(3)`` and the correction is ``c w``)."""
    GA, wA, _, _ = _stationary_and_conflicting()
    gram = torch.tensor(np.stack([GA.T @ GA, np.eye(3)]))[None]
    weights = torch.tensor(np.stack([wA, np.full(3, 1.0 / 3.0)]))[None]
    a = solve_cagrad(gram, weights, c=0.4).coefficients.numpy()
    assert a.shape == (1, 2, 3)
    np.testing.assert_allclose(GA @ a[0, 0], [0.0, 0.4], rtol=0.0, atol=1e-9)
    np.testing.assert_allclose(a[0, 1], np.full(3, 1.4 / 3.0), rtol=1e-12, atol=0.0)


def test_a_stationary_optimum_at_a_zero_gradient_is_certified() -> None:
    """``g_1 = 0``, ``g_2 = (1, 0) = -g_3``, ``w = (0.2, 0.5, 0.3)`` and ``c = 1.5``: ``g0 = (0.2, 0)``, the
    conflict-free directions are orthogonal to ``g_2``, the nearest, ``0``, lies within ``s = 0.3`` of ``g0``, and
    ``F(p) = 0.2 (p_2 - p_3) + 0.3 |p_2 - p_3| >= 0``, so the direction is 0. The exact solver returns the
    zero gradient's vertex ``p = e_1``, where both sides of the certificate ``F(p) <= tol ||g0|| sum_i p_i
    ||g_i||`` are exactly 0: it must hold there (``<=``, not ``<``), or Algorithm 1's ``a = w`` (``G p~ = 0``)
    keeps ``g0``."""
    G = np.array([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    a = solve_cagrad(torch.tensor(G.T @ G), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), c=1.5, solver="exact").coefficients
    np.testing.assert_allclose(G @ a.numpy(), [0.0, 0.0], rtol=0.0, atol=1e-12)


def test_the_stationarity_threshold_is_each_problems_own() -> None:
    """C: ``g = (1, 0), (-1, e), (0, 1)`` with ``e = 1e-5`` and ``w = (0.3, 0.3, 0.4)``, so ``g0 = (0, 0.4 + 0.3 e)``
    is conflict-free but not stationary: ``min F ~ 2.8e-6`` (at ``p = (1/2, 1/2, 0)``), 19 times its
    certificate's bound ``tol ||g0|| sum_i p_i ||g_i|| ~ 1.4e-7``. Algorithm 1's clip gives
    ``p~ = (0.3, 0.3, 0)``, ``G p~ = (0, 0.3 e)``, so ``a = w + (s / e) (1, 1, 0)`` with ``s = 0.4 ||g0||``.
    Batched with 39 orthogonal problems (``a = (1 + c) / 3`` each, as in
    :func:`test_a_two_level_batch_solves_each_problem`), whose bounds add up to ``8e-6 > min F``, C must
    still be judged against its own bound (a = w if it were certified)."""
    e, c = 1e-5, 0.4
    GC = np.array([[1.0, -1.0, 0.0], [0.0, e, 1.0]])
    wC = np.array([0.3, 0.3, 0.4])
    gram = torch.tensor(np.stack([GC.T @ GC] + [np.eye(3)] * 39))
    weights = torch.tensor(np.stack([wC] + [np.full(3, 1.0 / 3.0)] * 39))
    for solver in ("exact", "frank_wolfe"):
        a = solve_cagrad(gram, weights, c=c, solver=solver).coefficients.numpy()
        s = c * np.linalg.norm(GC @ wC)
        np.testing.assert_allclose(a[0], wC + (s / e) * np.array([1.0, 1.0, 0.0]), rtol=1e-6, atol=0.0)
        np.testing.assert_allclose(a[1:], np.full((39, 3), (1.0 + c) / 3.0), rtol=1e-12, atol=0.0)


def _orthogonal_clip_change(delta: float, c: float) -> float:
    """RACO's clip change ``||d(p~) - d(p)|| / ||g0||`` for ``H = I`` (``m = 2``) and ``w = (1/2 + delta, 1/2 - delta)``,
    in closed form. On the edge ``p = (1 - t, t)``, ``F' = 0`` gives ``u = 2 t - 1 = k / sqrt(2 - k^2)`` with
    ``k = (w_1 - w_2) / s``; ``t > 1/2 > w_2``, so ``p~ = (1 - t, w_2)``. ``d(q) = g0 + s G q / ||G q||``, so the
    change is ``c`` times the chord between the unit vectors of ``(1 - t, t)`` and ``(1 - t, w_2)``
    (about ``(1 + c) delta``)."""
    w1, w2 = 0.5 + delta, 0.5 - delta
    k = (w1 - w2) / (c * math.hypot(w1, w2))
    u = k / math.sqrt(2.0 - k * k)
    x, t = (1.0 - u) / 2.0, (1.0 + u) / 2.0
    angle = math.atan2(x * (u / 2.0 + delta), x * x + w2 * t)  # the cross and dot products: no cancellation
    return 2.0 * c * math.sin(angle / 2.0)


def test_clip_active_switches_at_the_documented_tolerance() -> None:
    """``clip_active`` is ``clip_change > sqrt(100 m eps) (1 + c)``: two orthogonal unit gradients with
    ``w = (1/2 + delta, 1/2 - delta)`` (:func:`_orthogonal_clip_change`), ``delta`` solved (scipy's brentq on
    the closed form) for a clip change 0.2 % below and 0.2 % above that bound, in one batch of shape ``(2, 1)``
    (``m`` is the last dimension): the first is inactive, the second active. The solver's ``clip_change``
    matches the closed form to 1e-4 (the rounding of ``a`` with and without the clip, ~1e-7 apart)."""
    c = 0.4
    tol = math.sqrt(100.0 * 2 * torch.finfo(torch.float64).eps) * (1.0 + c)
    deltas = [brentq(lambda d, r=r: _orthogonal_clip_change(d, c) - r * tol, 1e-8, 1e-6, xtol=1e-22, rtol=1e-15) for r in (0.998, 1.002)]
    weights = torch.tensor([[[0.5 + d, 0.5 - d]] for d in deltas], dtype=torch.float64)
    sol = solve_cagrad(torch.eye(2, dtype=torch.float64).expand(2, 1, 2, 2), weights, c=c)
    np.testing.assert_allclose(sol.clip_change[:, 0].numpy(), [0.998 * tol, 1.002 * tol], rtol=1e-4, atol=0.0)
    assert sol.clip_active[:, 0].tolist() == [False, True]


def test_the_start_of_two_exactly_opposite_gradients_is_their_kink() -> None:
    """``max_iter = 0`` solves ``m = 2`` by Frank-Wolfe's start, the enumeration of the faces, whose
    candidate on the edge is the kink itself (the min-norm point of the edge, ``sigma = 0``). Here
    ``g_1 = 1`` and ``g_2 = -1/128`` (one dimension), ``w = (0.7, 0.3)`` and ``c = 3``: every conflict-free
    direction is orthogonal to ``g_1``, so the nearest to ``g0`` is 0, which lies in the trust region
    (``c >= 1``), and ``F(p) >= (s - ||g0||) ||G p|| >= 0``: the optimum is Pareto-stationary and the
    direction is exactly 0 (up to rounding), with or without the clip."""
    G = np.array([[1.0, -1.0 / 128.0]])
    for clip in (True, False):
        a = solve_cagrad(torch.tensor(G.T @ G), torch.tensor([0.7, 0.3], dtype=torch.float64), c=3.0, clip=clip, max_iter=0).coefficients
        np.testing.assert_allclose(G @ a.numpy(), [0.0], rtol=0.0, atol=1e-12)


def test_a_negative_zero_weight_stays_negative_zero() -> None:
    """The outputs are the solve's numbers bit for bit, the sign of a zero included. ``g_1 = (1, 0)``,
    ``g_2 = (0, 1)``, ``g_3 = g_1`` and ``w = (1/2, 1/2, -0.0)``: the tie rule merges ``g_1`` and ``g_3`` into
    one objective of weight 1/2, two orthogonal unit gradients with equal weights, so ``p = (1/2, 1/2)``
    and ``a = (1 + c) / 2`` each; the group's mass is split in proportion to ``w``, ``p_3 = w_3 P / W =
    -0.0``, so ``p~_3 = min(-0.0, -0.0) = -0.0`` and ``a_3 = -0.0 + (s / ||G p~||) (-0.0) = -0.0``. With
    ``c = 0`` the coefficients are exactly the normalised weights, ``-0.0`` included."""
    G = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.5, -0.0], dtype=torch.float64)
    for solver in ("exact", "frank_wolfe"):
        sol = solve_cagrad(G.T @ G, w, c=0.4, solver=solver)
        for field, expected in (("coefficients", [0.7, 0.7, -0.0]), ("dual", [0.5, 0.5, -0.0]), ("clipped_dual", [0.5, 0.5, -0.0])):
            got = getattr(sol, field)
            torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0.0, msg=field)
            assert torch.signbit(got).tolist() == [False, False, True], field
        a = solve_cagrad(G.T @ G, w, c=0.0, solver=solver).coefficients
        assert torch.equal(a, w) and torch.equal(torch.signbit(a), torch.signbit(w))


@pytest.mark.parametrize("rescale", ["1+c", "1+c^2"])
def test_rescale_divides_at_c_one(rescale: str) -> None:
    """``c = 1`` makes both rescale factors 2: three orthogonal unit gradients with uniform weights have
    ``a = (1 + c) / 3`` (:func:`test_a_two_level_batch_solves_each_problem`), so the rescaled
    coefficients are ``1/3`` each."""
    sol = solve_cagrad(torch.eye(3, dtype=torch.float64), c=1.0, rescale=rescale)
    torch.testing.assert_close(sol.coefficients, torch.full((3,), 1.0 / 3.0, dtype=torch.float64), rtol=1e-15, atol=0.0)


def test_auto_counts_the_broadcast_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``solver="auto"`` enumerates supports while ``batch x (2^m - 1)`` faces fit the budget (``2^12`` for
    ``m = 7``: 32 problems, not 33), with the batch the broadcast of the Gram's and the weights' batch
    shapes. Each registered solver is wrapped to record its calls: a Gram batch ``(11, 1)`` against weights
    ``(3, 7)`` is 33 problems (Frank-Wolfe), ``(8, 1)`` against ``(4, 7)`` is 32 (exact); 33 either way round."""
    calls: list[str] = []
    for name, registered in list(SOLVERS.items()):

        def spy(problem: Any, *, _name: str = name, _solve: Callable[..., Any] = registered.solve, **options: Any) -> Any:
            calls.append(_name)
            return _solve(problem, **options)

        monkeypatch.setitem(SOLVERS, name, DualSolver(name, registered.description, spy, registered.max_m))
    eye = torch.eye(7, dtype=torch.float64)
    w = torch.full((7,), 1.0 / 7.0, dtype=torch.float64)
    cases = [
        (eye.expand(11, 1, 7, 7), w.expand(3, 7), "frank_wolfe"),
        (eye.expand(8, 1, 7, 7), w.expand(4, 7), "exact"),
        (eye.expand(33, 7, 7), w, "frank_wolfe"),
        (eye, w.expand(33, 7), "frank_wolfe"),
        (eye, w.expand(32, 7), "exact"),
    ]
    for gram, weights, expected in cases:
        calls.clear()
        solve_cagrad(gram, weights, c=0.4)
        assert calls == [expected], (tuple(gram.shape), tuple(weights.shape))


def test_one_side_of_the_batch_broadcasts_against_the_other() -> None:
    """The batch is the broadcast of the Gram's and the weights' batch shapes, whichever side is larger, also
    when a batch shape happens to equal the other's leading dimensions (``m = 3``): one Gram against a
    ``(3, 3)`` batch of weights, and a batch of 3 Grams against one weight vector. Three orthogonal unit
    gradients with uniform weights have ``a = (1 + c) / 3`` each
    (:func:`test_a_two_level_batch_solves_each_problem`); ``weights`` is returned broadcast to ``(*B, m)``."""
    eye = torch.eye(3, dtype=torch.float64)
    uniform = torch.full((3,), 1.0 / 3.0, dtype=torch.float64)
    sol = solve_cagrad(eye, uniform.expand(3, 3, 3), c=0.4)
    torch.testing.assert_close(sol.coefficients, torch.full((3, 3, 3), 1.4 / 3.0, dtype=torch.float64), rtol=1e-12, atol=0.0)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    sol = solve_cagrad(eye.expand(3, 3, 3), w, c=0.4)
    assert sol.coefficients.shape == (3, 3)
    assert torch.equal(sol.weights, w.expand(3, 3))


def test_zero_gradients_share_their_mass_by_weight() -> None:
    """Two zero gradients are identical, so the tie rule splits their group's mass in proportion to ``w``.
    ``g_1 = g_2 = 0``, ``g_3 = (1, 1/2)`` and ``w = (0.2, 0.6, 0.2)``: ``F(e_3) > 0`` while ``F = 0`` on the
    whole face of the zero gradients, so that face holds all the mass and ``p = (0.2, 0.6, 0) / 0.8``;
    ``G p~ = 0`` and ``g0`` is conflict-free, so ``a = w``."""
    G = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    w = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    for solver in ("exact", "frank_wolfe"):
        sol = solve_cagrad(G.T @ G, w, c=0.4, solver=solver)
        torch.testing.assert_close(sol.dual, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64), rtol=1e-15, atol=1e-16)
        torch.testing.assert_close(sol.coefficients, w, rtol=1e-15, atol=0.0)


def test_short_distinct_gradients_are_not_tied() -> None:
    """The tie test is relative to the pair's own norms: ``g_1 = e e_1`` and ``g_2 = e e_2`` (``e = 1e-5``) are
    orthogonal, not identical, however short beside ``g_3 = e_3``. With ``w = (0.1, 0.4, 0.5)`` the optimum is
    on the edge ``p = (t, 1 - t, 0)`` (``b = (0.1 e^2, 0.4 e^2, 0.5)``, and ``H p`` has no third entry), where
    ``F = e^2 (0.1 t + 0.4 (1 - t)) + s e sqrt(t^2 + (1 - t)^2)``: ``F' = 0`` gives ``u = 2 t - 1 =
    k / sqrt(2 - k^2)`` with ``k = 0.3 e / s``, so ``p`` is ``1e-5`` from ``(1/2, 1/2, 0)``, and without the
    clip ``a = w + s p / ||G p||``. Tying ``g_1`` and ``g_2`` would split the mass as ``w``: ``(0.2, 0.8, 0)``."""
    e, c = 1e-5, 0.4
    G = torch.diag(torch.tensor([e, e, 1.0], dtype=torch.float64))
    w = torch.tensor([0.1, 0.4, 0.5], dtype=torch.float64)
    s = c * math.sqrt((0.1 * e) ** 2 + (0.4 * e) ** 2 + 0.25)
    k = 0.3 * e / s
    u = k / math.sqrt(2.0 - k * k)
    p = torch.tensor([(1.0 + u) / 2.0, (1.0 - u) / 2.0, 0.0], dtype=torch.float64)
    expected = w + s * p / (e * torch.linalg.vector_norm(p))
    for solver in ("exact", "frank_wolfe"):
        sol = solve_cagrad(G.T @ G, w, c=c, clip=False, solver=solver)
        torch.testing.assert_close(sol.dual, p, rtol=0.0, atol=1e-12)
        torch.testing.assert_close(sol.coefficients, expected, rtol=1e-9, atol=0.0)


def test_a_subnormal_weight_keeps_its_dual_mass() -> None:
    """An objective in no tie group keeps its dual mass bit for bit, whatever its weight (the tie rule's
    ``w_i P_K / W_K`` would round it through ``w_i``). Two orthogonal unit gradients with ``w = (1, 1e-320)``
    (a subnormal weight) and ``c = 2``: on the edge ``p = (1 - t, t)``, ``F' = 0`` gives ``u = 2 t - 1 =
    k / sqrt(2 - k^2)`` with ``k = (w_1 - w_2) / s = 1/2``, as in :func:`_orthogonal_clip_change`; through
    ``1e-320 t / 1e-320``, ``t`` keeps only about 11 bits."""
    u = 0.5 / math.sqrt(1.75)
    for solver in ("exact", "frank_wolfe"):
        sol = solve_cagrad(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 1e-320], dtype=torch.float64), c=2.0, solver=solver)
        torch.testing.assert_close(sol.dual, torch.tensor([(1.0 - u) / 2.0, (1.0 + u) / 2.0], dtype=torch.float64), rtol=1e-14, atol=0.0)


def test_an_empty_batch_is_not_zero_objectives() -> None:
    """``m`` is the size of the last two dimensions, whatever the batch: a batch of shape ``(2, 0)`` of
    ``m = 3`` problems solves to empty outputs of shape ``(2, 0, 3)`` and ``(2, 0)``, while ``(2, 3)`` problems
    with ``m = 0`` are refused."""
    sol = solve_cagrad(torch.zeros(2, 0, 3, 3, dtype=torch.float64))
    assert sol.coefficients.shape == (2, 0, 3) and sol.dual_value.shape == (2, 0)
    with pytest.raises(ValueError, match="zero objectives"):
        solve_cagrad(torch.zeros(2, 3, 0, 0, dtype=torch.float64))


def test_matvec_of_one_problem_is_one_mv() -> None:
    """``matvec`` runs a single problem (``H`` of shape ``(m, m)``, the optimizer's case) as one ``mv``: the
    solve's cost is its number of dispatched ops (a few us each on CPU, a kernel launch each on CUDA), and
    the batched path would add an ``unsqueeze`` and a ``squeeze`` around a matrix product. A batch takes
    one batched product. The values are ``H x`` either way (numpy's, to rounding)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    H = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with Record() as record:
        y = matvec(H, x)
    assert record.ops == ["mv"]
    np.testing.assert_allclose(y.numpy(), H.numpy() @ x.numpy(), rtol=1e-14, atol=1e-14)
    with Record() as record:
        y = matvec(H.expand(3, 4, 4), x.expand(3, 4))
    assert "mv" not in record.ops and y.shape == (3, 4)
    np.testing.assert_allclose(y.numpy(), np.tile(H.numpy() @ x.numpy(), (3, 1)), rtol=1e-14, atol=1e-14)


def test_the_constants_live_on_the_solves_device() -> None:
    """``numbers(like)`` gives 0-d tensors of ``like``'s dtype *and device*: on an accelerator a constant on
    the host would be a host operand in every op of the solve. The ``meta`` device stands in for one (a
    CPU machine has no other device): each constant is a 0-d meta tensor of the dtype asked for."""
    for dtype in (torch.float32, torch.float64):
        made = numbers(torch.empty(2, device="meta", dtype=dtype))
        assert all(x.device.type == "meta" and x.dtype == dtype and x.dim() == 0 for x in made)


@pytest.mark.parametrize("clip", [True, False])
def test_two_exactly_opposite_gradients_at_c_above_one_give_the_zero_direction(clip: bool) -> None:
    """``g = (1, -1/128)`` (one dimension, opposite), ``w = (0.7, 0.3)``, ``c = 3``: every direction but 0
    lowers one objective's inner product below 0, and ``d = 0`` lies in the ball ``||d - g0|| <= c ||g0||``
    (``c >= 1``), so the optimum is Pareto-stationary and the direction is 0 (``max_iter=0``, the face
    enumeration, gives it). The edge search used to evaluate ``||G p||^2`` as ``H_11 + g (q1 + q2 g)``,
    whose ``eps H_11`` of rounding hid the kink: it stopped ``1e-8`` off it, just above the stationarity
    bound, and returned Algorithm 1's coefficients for the noise's sign: ``d = 2.79`` with the clip."""
    G = torch.tensor([[1.0, -1.0 / 128]], dtype=torch.float64)
    for max_iter in (0, None):
        a = solve_cagrad(G.T @ G, [0.7, 0.3], c=3.0, clip=clip, max_iter=max_iter).coefficients
        assert abs((G @ a).item()) <= 1e-12, max_iter


@PROPERTY
@given(
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
    st.floats(-3.0, 3.0),
    st.floats(0.01, 0.99),
    st.floats(1.0, 10.0),
    st.sampled_from([torch.float64, torch.float32]),
    st.booleans(),
)
def test_two_opposite_gradients_at_c_from_one_give_the_zero_direction(
    dim: int, seed: int, log_ratio: float, w1: float, c: float, dtype: torch.dtype, clip: bool
) -> None:
    """Any two opposite gradients ``g_2 = -t g_1`` with ``c >= 1``: ``d = 0`` is conflict-free and inside the
    trust region, every other conflict-free direction is orthogonal to ``g_1`` and so farther from ``g0``:
    the direction is 0, to the dtype's rounding of the weighted gradients (``sum_i w_i ||g_i||``, not
    ``||g0||``, which cancels when ``w_1 ||g_1|| = w_2 ||g_2||``). Before the edge search's fix, 86 of
    4 000 such float64 solves got a direction up to 11 ``sum_i w_i ||g_i||`` long
    (``python -m benchmarks.opposite_pairs``)."""
    g1 = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    G = torch.stack([g1, -(10.0**log_ratio) * g1], 1)
    w = torch.tensor([w1, 1.0 - w1], dtype=torch.float64)
    a = solve_cagrad((G.T @ G).to(dtype), w.to(dtype), c=c, clip=clip).coefficients.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert (G @ a).norm() <= tol * (w * G.norm(dim=0)).sum()
