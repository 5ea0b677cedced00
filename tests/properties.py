"""Reusable property checks for any solver of the (clipped) CAGrad dual of RACO's Algorithm 1.

Each check takes a ``solve(H, w, c, clip) -> Solved`` callable (numpy in, numpy out), so the same
assertions run against every solver. Expected values come from the mathematics of the method
(stated at each check) or from ``tests.reference``, never from the solver under test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from tests.reference import primal_value

__all__ = [
    "Solve",
    "Solved",
    "assert_c_zero_gives_weights",
    "assert_clip_below_weights",
    "assert_descent_and_trust_region",
    "assert_permutation_equivariant",
    "assert_positively_homogeneous",
    "assert_power_of_two_invariant",
    "assert_strong_duality",
]


class Solved(NamedTuple):
    """One solve in numpy float64: coefficients ``a``, dual ``p``, clipped dual ``p~``, ``F(p)`` and the
    normalised weights ``w`` the solver used."""

    a: np.ndarray
    p: np.ndarray
    p_clipped: np.ndarray
    value: float
    weights: np.ndarray


Solve = Callable[[np.ndarray, np.ndarray, float, bool], Solved]


def assert_c_zero_gives_weights(solve: Solve, H: np.ndarray, k: np.ndarray, clip: bool) -> None:
    """``c = 0`` (no trust region) gives ``a = w`` exactly. ``k`` are integer weights: ``k / sum(k)`` is rounded once."""
    np.testing.assert_array_equal(solve(H, k, 0.0, clip).a, k / k.sum())


def assert_descent_and_trust_region(solve: Solve, G: np.ndarray, w: np.ndarray, c: float, clip: bool) -> None:
    """``||d - g0|| <= c ||g0||`` and ``<g0, d> >= (1 - c) ||g0||^2`` for ``d = G a`` (the trust region of RACO Algorithm 1)."""
    a = solve(G.T @ G, w, c, clip).a
    assert np.all(np.isfinite(a))
    g0 = G @ (w / w.sum())
    d = G @ a
    g0_norm = float(np.linalg.norm(g0))
    tol = 1e-9 * g0_norm + 1e-12 * float(np.abs(G).max())
    assert np.linalg.norm(d - g0) <= c * g0_norm + tol
    assert g0 @ d >= (1.0 - c) * g0_norm**2 - tol * (g0_norm + float(np.abs(G).max()))


def assert_clip_below_weights(solve: Solve, H: np.ndarray, w: np.ndarray, c: float) -> None:
    """``p`` on the simplex; ``p~ = min(p, w) <= w`` with the clip, ``p~ = p`` without."""
    clipped = solve(H, w, c, True)
    np.testing.assert_allclose(clipped.weights, w / w.sum(), rtol=1e-15, atol=0)
    assert clipped.p.min() >= 0.0 and abs(clipped.p.sum() - 1.0) <= 1e-12
    assert np.all(clipped.p_clipped <= clipped.weights)
    np.testing.assert_array_equal(clipped.p_clipped, np.minimum(clipped.p, clipped.weights))
    free = solve(H, w, c, False)
    np.testing.assert_array_equal(free.p_clipped, free.p)


def assert_strong_duality(solve: Solve, G: np.ndarray, w: np.ndarray, c: float, reference_value: float, reference_p: np.ndarray) -> None:
    """Without the clip ``d`` is primal feasible, so ``min_i <g_i, d> <= F*`` (weak duality), with
    equality when ``G p*`` is away from 0 (the CAGrad lemma)."""
    a = solve(G.T @ G, w, c, False).a
    d = G @ a
    g0 = G @ (w / w.sum())
    g_max = float(np.linalg.norm(G, axis=0).max())
    # F(p_ref) from ||G p_ref||, not sqrt(p^T H p): near a kink p^T H p is below its own rounding
    # error, its square root is off by ~sqrt(eps) ||g|| and the bound would be wrong by that much
    G_p = G @ reference_p
    reference_value = float(g0 @ G_p + c * np.linalg.norm(g0) * np.linalg.norm(G_p))
    unit = max(float(g0 @ g0), abs(reference_value), 1e-300)
    assert primal_value(G, d) <= reference_value + 1e-8 * unit + 1e-12 * g_max**2
    if np.linalg.norm(G @ reference_p) > 1e-3 * g_max:
        assert primal_value(G, d) >= reference_value - 1e-6 * unit


def assert_permutation_equivariant(
    solve: Solve, H: np.ndarray, w: np.ndarray, c: float, perm: np.ndarray, clip: bool, coefficients_unique: bool
) -> None:
    """Permuting the objectives permutes the solution: ``F`` always (the optimal value is unique);
    ``a`` and ``p`` too where the coefficients are unique (``coefficients_unique``, decided by the caller)."""
    base = solve(H, w, c, clip)
    permuted = solve(H[np.ix_(perm, perm)], w[perm], c, clip)
    scale = float(np.abs(H).max()) + 1e-300
    assert abs(permuted.value - base.value) <= 1e-9 * scale
    if coefficients_unique:
        np.testing.assert_allclose(permuted.a, base.a[perm], rtol=1e-7, atol=1e-7 * float(np.abs(base.a).max()))


def assert_power_of_two_invariant(solve: Solve, H: np.ndarray, w: np.ndarray, c: float, k: int, clip: bool) -> None:
    """Scaling every ``g_i`` by ``2^k`` (``H`` by ``4^k``) leaves ``a`` unchanged bit for bit (the scaling is exact)."""
    np.testing.assert_array_equal(solve(H * 4.0**k, w, c, clip).a, solve(H, w, c, clip).a)


def assert_positively_homogeneous(solve: Solve, G: np.ndarray, w: np.ndarray, c: float, lam: float, direction_unique: bool) -> None:
    """Scaling every ``g_i`` by ``lam > 0`` scales ``min F`` by ``lam^2`` and leaves the direction
    ``d = G a`` unchanged where it is unique (decided by the caller)."""
    H = G.T @ G
    g_max = float(np.linalg.norm(G, axis=0).max())
    unit = g_max**2 + 1e-300
    base, scaled = solve(H, w, c, False), solve(H * lam**2, w, c, False)
    assert abs(scaled.value / lam**2 - base.value) <= 1e-9 * unit
    if direction_unique:
        np.testing.assert_allclose(G @ scaled.a, G @ base.a, rtol=0, atol=1e-7 * g_max + 1e-300)
