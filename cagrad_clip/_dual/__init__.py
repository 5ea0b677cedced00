"""Batched, sync-free solver of the (clipped) CAGrad dual of RACO's Algorithm 1 (arXiv 2602.02495).

Everything works on Gram matrices ``H[..., i, j] = <g_i, g_j>`` of shape ``(..., m, m)``; the
gradients themselves never enter. With user weights ``w`` on the simplex: anchor
``g0 = sum_i w_i g_i``, ``b = H w``, radius ``s = c ||g0||``; dual
``p = argmin_{p in simplex} b^T p + s sqrt(p^T H p)``; clip ``p~ = min(p, w)``; coefficients
``a = w + (s / ||G p~||) p~``, direction ``d = sum_i a_i g_i``.

At a Pareto-stationary optimum (``min F = 0`` at ``G p = 0``, a conflict-free direction within the
trust region) ``a = w + lambda`` instead: the solution of CAGrad's primal nearest ``g0``.

Modules: :mod:`.api` (checks and the public functions), :mod:`.kernel` (the solve proper),
:mod:`.registry` (the solvers by name), :mod:`.exact` (support enumeration), :mod:`.frank_wolfe`
(pairwise Frank-Wolfe + face Newton),
:mod:`.line_search` (the exact line search), :mod:`.stationary` (the min-norm point and the least
squares of Pareto-stationary inputs), :mod:`.objective` (``F`` and its gradient).
``docs/algorithm.md`` explains the mathematics.
"""

from .._settings import RESCALE_OPTIONS
from . import exact, frank_wolfe  # noqa: F401  (each registers its solver)
from .api import (
    AUTO_EXACT_MAX_M,
    EXACT_MAX_M,
    auto_solver,
    combination_coefficients,
    default_max_iter,
    resolve_solver,
    solve_cagrad,
    solve_with_settings,
)
from .kernel import CAGradSolution
from .line_search import exact_line_search
from .registry import SOLVER_OPTIONS, SOLVERS, DualSolver, register

__all__ = [
    "AUTO_EXACT_MAX_M",
    "EXACT_MAX_M",
    "RESCALE_OPTIONS",
    "SOLVER_OPTIONS",
    "SOLVERS",
    "CAGradSolution",
    "DualSolver",
    "auto_solver",
    "combination_coefficients",
    "default_max_iter",
    "exact_line_search",
    "register",
    "resolve_solver",
    "solve_cagrad",
    "solve_with_settings",
]
