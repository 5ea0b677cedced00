"""Independent numpy/scipy reference for the (clipped) CAGrad dual of RACO's Algorithm 1.

Written from the papers' formulas (RACO arXiv 2602.02495, CAGrad arXiv 2110.14048; restated in
``docs/algorithm.md``) only; it shares no code with ``cagrad_clip._dual``.

* :func:`dual_value` / :func:`dual_gradient`: ``F(p) = b^T p + s sqrt(p^T H p)`` with ``b = H w``,
  ``s = c sqrt(w^T H w)`` and its gradient.
* :func:`solve_dual_reference`: ``argmin_{p in simplex} F(p)`` with scipy's SLSQP (analytic
  gradient, tight tolerances), started from every vertex, the barycentre and ``w``; the best
  end point wins.
* :func:`coefficients_from_dual`: the coefficients formula of Algorithm 1 (clip, ``a = w + s/n p~``,
  rescale) in numpy.
* :func:`gradients_from_gram` and :func:`primal_value`: gradient vectors ``G`` (columns ``g_i``)
  with ``G^T G = H`` from an eigendecomposition, and ``min_i <g_i, d>`` for the primal check
  (weak duality: ``min_i <g_i, d> <= F*`` for every ``d`` with ``||d - g0|| <= s``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "ReferenceSolution",
    "coefficients_from_dual",
    "dual_gradient",
    "dual_value",
    "fw_gap",
    "gradients_from_gram",
    "primal_value",
    "problem_data",
    "reference_coefficients",
    "solve_dual_reference",
]


def problem_data(H: np.ndarray, w: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetrised ``H``, normalised ``w``, ``b = H w`` and ``s = c sqrt(w^T H w)``."""
    H = np.asarray(H, dtype=np.float64)
    H = 0.5 * (H + H.T)
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    b = H @ w
    s = c * np.sqrt(max(float(w @ b), 0.0))
    return H, b, s


def dual_value(H: np.ndarray, b: np.ndarray, s: float, p: np.ndarray) -> float:
    """``F(p) = b^T p + s sqrt(p^T H p)`` (the quadratic form clamped at 0 against rounding)."""
    p = np.asarray(p, dtype=np.float64)
    return float(b @ p + s * np.sqrt(max(float(p @ H @ p), 0.0)))


def dual_gradient(H: np.ndarray, b: np.ndarray, s: float, p: np.ndarray) -> np.ndarray:
    """``grad F(p) = b + s H p / sqrt(p^T H p)``; ``b`` where ``p^T H p`` is (numerically) zero."""
    Hp = H @ p
    q = float(p @ Hp)
    if q <= 1e-300:
        return b.copy()
    return b + s * Hp / np.sqrt(q)


def fw_gap(H: np.ndarray, b: np.ndarray, s: float, p: np.ndarray) -> float:
    """Frank-Wolfe gap ``grad F(p)^T p - min_j grad F(p)_j`` (>= F(p) - F*)."""
    g = dual_gradient(H, b, s, p)
    return float(g @ p - g.min())


@dataclass
class ReferenceSolution:
    """``p`` (best point found on the simplex), ``value = F(p)`` and its Frank-Wolfe gap."""

    p: np.ndarray
    value: float
    fw_gap: float


def _project_simplex(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based)."""
    m = x.size
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.nonzero(u - css / np.arange(1, m + 1) > 0)[0][-1]
    tau = css[k] / (k + 1)
    return np.maximum(x - tau, 0.0)


def solve_dual_reference(H: np.ndarray, w: np.ndarray, c: float) -> ReferenceSolution:
    """``argmin`` of the dual over the simplex by multi-start SLSQP (float64).

    Starts: every vertex ``e_j``, the barycentre and ``w``. SLSQP gets the analytic gradient,
    ``ftol = 1e-15`` and a generous iteration limit; each end point is projected back onto the
    simplex and the one with the smallest ``F`` is returned. SLSQP's tolerances are absolute, so
    the problem is solved for ``H / max_i H_ii`` (``p`` is scale invariant) and ``F`` scaled back.
    """
    H = np.asarray(H, dtype=np.float64)
    scale = float(np.max(np.diag(H))) if H.size else 0.0
    if np.isfinite(scale) and scale > 0.0 and scale != 1.0:
        unit = _solve_dual_reference(H / scale, w, c)
        H_, b, s_ = problem_data(H, w, c)
        return ReferenceSolution(unit.p, dual_value(H_, b, s_, unit.p), unit.fw_gap * scale)
    return _solve_dual_reference(H, w, c)


def _solve_dual_reference(H: np.ndarray, w: np.ndarray, c: float) -> ReferenceSolution:
    H, b, s = problem_data(H, w, c)
    m = H.shape[0]
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    best_p = np.eye(m)[0]
    best_value = np.inf
    if m == 1:
        return ReferenceSolution(np.ones(1), dual_value(H, b, s, np.ones(1)), 0.0)
    starts = [np.eye(m)[j] for j in range(m)] + [np.full(m, 1.0 / m), w]
    constraints = [{"type": "eq", "fun": lambda p: p.sum() - 1.0, "jac": lambda p: np.ones_like(p)}]
    bounds = [(0.0, 1.0)] * m
    for x0 in starts:
        candidates = [x0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = minimize(
                lambda p: dual_value(H, b, s, p),
                x0,
                jac=lambda p: dual_gradient(H, b, s, p),
                method="SLSQP",
                bounds=bounds,
                constraints=constraints,
                options={"ftol": 1e-15, "maxiter": 1000},
            )
        if np.all(np.isfinite(res.x)):
            candidates.append(_project_simplex(res.x))
        for cand in candidates:
            value = dual_value(H, b, s, cand)
            if value < best_value:
                best_value, best_p = value, cand
    best_p = _polish(H, b, s, best_p)
    return ReferenceSolution(best_p, dual_value(H, b, s, best_p), fw_gap(H, b, s, best_p))


def _polish(H: np.ndarray, b: np.ndarray, s: float, p: np.ndarray) -> np.ndarray:
    """Sharpen an SLSQP end point by solving the KKT equations on its support with ``scipy.optimize.root``.

    On the face ``S = {i : p_i > 1e-9}`` the optimum satisfies ``grad F(p)_i = lam`` (i in S) and
    ``sum p = 1``. The root is accepted only if it stays in the simplex and lowers the FW gap.
    """
    from scipy.optimize import root

    support = np.nonzero(p > 1e-9)[0]
    k = support.size
    if k < 2:
        return p
    HS, bS = H[np.ix_(support, support)], b[support]

    def equations(x: np.ndarray) -> np.ndarray:
        q, lam = x[:k], x[k]
        Hq = HS @ q
        n = np.sqrt(max(float(q @ Hq), 1e-300))
        return np.concatenate([bS + s * Hq / n - lam, [q.sum() - 1.0]])

    g = dual_gradient(H, b, s, p)
    x0 = np.concatenate([p[support], [float(g[support] @ p[support])]])
    best, best_gap = p, fw_gap(H, b, s, p)
    for method in ("hybr", "lm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = root(equations, x0, method=method, options={"xtol": 1e-15} if method == "hybr" else {"xtol": 1e-15, "ftol": 1e-15})
        q = np.zeros_like(p)
        q[support] = sol.x[:k]
        if not np.all(np.isfinite(q)) or q.min() < -1e-12:
            continue
        q = np.maximum(q, 0.0)
        q /= q.sum()
        gap = fw_gap(H, b, s, q)
        if gap < best_gap and dual_value(H, b, s, q) <= dual_value(H, b, s, best) + 1e-15 * (1 + abs(dual_value(H, b, s, best))):
            best, best_gap = q, gap
    return best


def coefficients_from_dual(
    H: np.ndarray, w: np.ndarray, c: float, p: np.ndarray, clip: bool = True, rescale: str | None = None
) -> np.ndarray:
    """Algorithm 1's coefficients: ``p~ = min(p, w)``, ``a = w + s / ||G p~|| p~`` (``a = w`` if that is 0)."""
    H, _, s = problem_data(H, w, c)
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    pt = np.minimum(p, w) if clip else np.asarray(p, dtype=np.float64)
    n = np.sqrt(max(float(pt @ H @ pt), 0.0))
    a = w + (s / n) * pt if n > 0 and s > 0 else w.copy()
    divisor = {None: 1.0, "1+c": 1.0 + c, "1+c^2": 1.0 + c * c}[rescale]
    return a / divisor


def reference_coefficients(H: np.ndarray, w: np.ndarray, c: float, clip: bool = True, rescale: str | None = None) -> np.ndarray:
    """Reference solve followed by :func:`coefficients_from_dual`."""
    ref = solve_dual_reference(H, w, c)
    return coefficients_from_dual(H, w, c, ref.p, clip, rescale)


def gradients_from_gram(H: np.ndarray) -> np.ndarray:
    """A matrix ``G`` (``rank x m``, columns ``g_i``) with ``G^T G = H`` from ``H = V diag(lam) V^T``."""
    H = 0.5 * (np.asarray(H, dtype=np.float64) + np.asarray(H, dtype=np.float64).T)
    lam, V = np.linalg.eigh(H)
    keep = lam > 0
    return (V[:, keep] * np.sqrt(lam[keep])).T


def primal_value(G: np.ndarray, d: np.ndarray) -> float:
    """``min_i <g_i, d>`` for the columns ``g_i`` of ``G``."""
    return float((G.T @ d).min())
