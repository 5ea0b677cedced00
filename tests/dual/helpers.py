"""Shared helpers of the dual-solver tests: instances, a numpy front end per solver, hypothesis settings."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cagrad_clip._dual import SOLVERS as REGISTERED
from cagrad_clip._dual import combination_coefficients, solve_cagrad
from tests.properties import Solve, Solved
from tests.reference import coefficients_from_dual, dual_value, problem_data, solve_dual_reference

RESCALES = [None, "1+c", "1+c^2"]
SOLVERS = list(REGISTERED)  # every registered solver gets the property suite
DIVISOR = {None: lambda c: 1.0, "1+c": lambda c: 1.0 + c, "1+c^2": lambda c: 1.0 + c * c}

# The default run (CI) is derandomized: the same examples per property every time, so a red CI means
# a change broke something, not that the dice found an old corner. Exploration is a separate, random
# soak: CAGRAD_HYPOTHESIS_EXAMPLES=2000 python -m pytest tests/dual (every corner it finds becomes a
# named regression test, e.g. test_frank_wolfe.py::test_kink_inside_an_edge_does_not_trap_the_solver).
_SOAK_EXAMPLES = os.environ.get("CAGRAD_HYPOTHESIS_EXAMPLES")
PROPERTY = settings(
    max_examples=int(_SOAK_EXAMPLES or "40"),
    derandomize=_SOAK_EXAMPLES is None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def random_gradients(rng: np.random.Generator, m: int, dim: int) -> np.ndarray:
    """``dim x m`` gradient matrix: shared component (agreement) + noise (conflict), mixed norms."""
    mu = rng.normal(size=dim) * rng.uniform(0.0, 2.0)
    G = mu[:, None] + rng.normal(size=(dim, m))
    return G * np.exp(rng.normal(size=m))


def coeffs(H: np.ndarray, w, c: float = 0.4, clip: bool = True, rescale=None, **kw) -> np.ndarray:
    """``combination_coefficients`` with numpy in and out."""
    w_t = None if w is None else torch.as_tensor(np.asarray(w, dtype=np.float64))
    return combination_coefficients(torch.as_tensor(H), w_t, c=c, clip=clip, rescale=rescale, **kw).numpy()


def normalised(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


def numpy_solver(solver: str) -> Solve:
    """``solve(H, w, c, clip) -> Solved`` through :func:`solve_cagrad` with ``solver``, in float64."""

    def solve(H: np.ndarray, w: np.ndarray, c: float, clip: bool) -> Solved:
        sol = solve_cagrad(torch.tensor(H), torch.tensor(np.asarray(w, dtype=np.float64)), c=c, clip=clip, solver=solver)
        return Solved(sol.coefficients.numpy(), sol.dual.numpy(), sol.clipped_dual.numpy(), float(sol.dual_value), sol.weights.numpy())

    return solve


@st.composite
def instances(draw, min_m: int = 1, max_m: int = 6):
    """``(G, w, c)``: a random gradient matrix (``dim x m``), raw weights and a radius in ``[0, 0.95]``."""
    m = draw(st.integers(min_m, max_m))
    dim = draw(st.integers(1, 8))
    elements = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, width=64)
    G = draw(arrays(np.float64, (dim, m), elements=elements))
    # The Gram must be representable: if every |G_ij| < 1e-154, G^T G is subnormal and has lost
    # digits before the solver sees it (hypothesis found G = [[1.07e-159]]: H carries 5 digits).
    largest = np.abs(G).max()
    assume(largest == 0.0 or largest**2 >= 1e-290)
    w = draw(arrays(np.float64, (m,), elements=st.floats(0.0, 1.0, width=64)))
    assume(w.sum() > 1e-3)
    c = draw(st.floats(0.0, 0.95))
    return G, w, c


@st.composite
def instances_with_duplicates(draw):
    """``(G, w, c, distinct)``: ``k`` random gradients, some repeated, shuffled; ``distinct`` maps columns to the ``k``."""
    k = draw(st.integers(1, 4))
    dim = draw(st.integers(1, 6))
    elements = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, width=64)
    base = draw(arrays(np.float64, (dim, k), elements=elements))
    largest = np.abs(base).max()
    assume(largest == 0.0 or largest**2 >= 1e-290)
    extra = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=3))
    distinct = np.array(list(range(k)) + extra)
    order = np.array(draw(st.permutations(range(distinct.size))))
    distinct = distinct[order]
    w = draw(arrays(np.float64, (distinct.size,), elements=st.floats(0.0, 1.0, width=64)))
    assume(w.sum() > 1e-3)
    c = draw(st.floats(0.0, 0.95))
    return base[:, distinct], w, c, distinct


def check_against_reference(solver: str, m: int, dim_kind: str, n: int = 3) -> None:
    """``n`` random problems: ``p``, ``F``, ``||g0||``, the FW gap and every clip/rescale combination's
    direction against ``tests.reference`` (SLSQP multi-start + KKT polish)."""
    dim = {"rank1": 1, "deficient": max(1, m // 2), "square": m, "tall": 2 * m}[dim_kind]
    rng = np.random.default_rng(1000 * m + len(dim_kind))
    for _ in range(n):
        G = random_gradients(rng, m, dim)
        H = G.T @ G
        w = rng.dirichlet(np.ones(m))
        c = float(rng.uniform(0.05, 0.95))
        ref = solve_dual_reference(H, w, c)
        Hs, b, s = problem_data(H, w, c)
        g0_sq = float(w @ H @ w)
        scale = max(abs(ref.value), g0_sq)
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, solver=solver)
        p = sol.dual.numpy()
        assert p.min() >= 0.0 and abs(p.sum() - 1.0) <= 1e-12
        assert dual_value(Hs, b, s, p) <= ref.value + 1e-12 * scale
        assert abs(float(sol.dual_value) - ref.value) <= 1e-11 * scale
        assert abs(float(sol.anchor_norm) - math.sqrt(g0_sq)) <= 1e-12 * math.sqrt(g0_sq)
        assert 0.0 <= float(sol.fw_gap) <= 1e-10 * scale
        for clip in (True, False):
            for rescale in RESCALES:
                a = coeffs(H, w, c, clip, rescale, solver=solver)
                a_ref = coefficients_from_dual(H, w, c, ref.p, clip, rescale)
                err_d = np.linalg.norm(G @ (a - a_ref)) / math.sqrt(g0_sq)  # the direction's error relative to ||g0||
                assert err_d <= 1e-7, (clip, rescale, err_d)
                np.testing.assert_allclose(a, a_ref, rtol=1e-6, atol=1e-6 * np.abs(a_ref).max())
