"""Gaps that mutation testing left in the dual solvers (``cagrad_clip/_dual``), each pinned against a closed form:
the minimiser of a ray search solved by hand, and kink optima ``G p* = 0`` whose exact ``p*`` is a small
integer null vector of ``G``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cagrad_clip._dual import exact_line_search, solve_cagrad


def test_line_search_along_a_ray_returns_the_finite_minimiser() -> None:
    """``gamma_max = inf`` is a search along the whole ray ``g >= 0`` (the docstring's ``[0, gamma_max]``
    does not exclude it): ``h(g) = -g + 2 sqrt(g^2 + 1)`` has ``h'(g) = -1 + 2 g / sqrt(g^2 + 1) = 0`` at
    ``g^2 = (g^2 + 1) / 4``, i.e. ``g* = 1 / sqrt(3)``, with ``h(g*) = sqrt(3) < h(0) = 2``. The infinite end
    is no candidate; turned into the largest float instead of dropped, it evaluates to NaN and wins."""
    args = (torch.tensor(x, dtype=torch.float64) for x in (-1.0, 2.0, 1.0, 0.0, 1.0, math.inf))
    assert float(exact_line_search(*args)) == pytest.approx(1.0 / math.sqrt(3.0), rel=1e-14, abs=0.0)


@pytest.mark.parametrize(
    ("G", "w", "kink"),
    [
        ([[-2, -1, 1, 1], [1, 0, -2, 1], [-1, 1, -2, 0]], [3, 2, 1, 0], [1, 9, 4, 7]),
        ([[0, -2, 1, 2, 1], [0, 1, -2, 2, 2], [-1, 1, 1, -1, 2]], [3, 0, 2, 1, 1], [15, 4, 5, 0, 3]),
    ],
)
def test_one_frank_wolfe_iteration_reaches_a_kink_optimum(G: list[list[int]], w: list[int], kink: list[int]) -> None:
    """At ``c = 2`` the dual is ``F(p) >= (s - ||g0||) ||G p|| = ||g0|| ||G p|| >= 0`` (``docs/algorithm.md``),
    and ``G kink = 0`` (integers: check by hand), so ``F* = 0`` at the kink ``p* = kink / sum(kink)``, and
    ``F(p) <= 1e-6`` forces ``||G p||`` down to ``1e-6 / ||g0||``. One iteration (``max_iter = 1``) gets there: the Newton step on the face,
    whose curvature ``(s / n) (H - H p p^T H / n^2)`` is singular along the radial direction and larger than
    1 near the kink, needs its ridge to stay positive (``1e3 eps (1 + max curvature)``); a ridge of
    ``1e3 eps (1 - max curvature) < 0`` turns the step uphill and stops ``~0.07`` above ``F*``."""
    Gm, kink_p = np.array(G, dtype=np.float64), np.array(kink, dtype=np.float64)
    assert not (Gm @ kink_p).any()  # the kink is exact
    sol = solve_cagrad(torch.tensor(Gm.T @ Gm), torch.tensor(np.array(w, dtype=np.float64)), c=2.0, solver="frank_wolfe", max_iter=1)
    p = sol.dual.numpy()
    assert float(sol.dual_value) <= 1e-6
    assert np.linalg.norm(Gm @ p) <= 1e-6
