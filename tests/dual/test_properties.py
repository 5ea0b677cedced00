"""Properties of the clipped CAGrad direction that hold for every solver (``tests/properties.py``).

Random Grams come from random gradient matrices (hypothesis, derandomized in CI; see
``tests/dual/helpers.py`` for the soak). The oracle for the optimal value is ``tests.reference``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.dual.helpers import PROPERTY, SOLVERS, instances, instances_with_duplicates, numpy_solver
from tests.properties import (
    assert_c_zero_gives_weights,
    assert_clip_below_weights,
    assert_descent_and_trust_region,
    assert_permutation_equivariant,
    assert_positively_homogeneous,
    assert_power_of_two_invariant,
    assert_strong_duality,
)
from tests.reference import solve_dual_reference


def _direction_unique(G: np.ndarray, w: np.ndarray, c: float, independent: np.ndarray) -> bool:
    """The coefficients are unique when the distinct gradients are linearly independent and ``G p*``
    is away from the kink ``G p = 0`` (then ``G p*`` fixes each group's dual mass)."""
    ref = solve_dual_reference(G.T @ G, w, c)
    g_max = np.linalg.norm(G, axis=0).max()
    full_rank = independent.shape[1] > 0 and np.linalg.matrix_rank(independent) == independent.shape[1]
    return bool(full_rank and np.linalg.norm(G @ ref.p) > 1e-3 * g_max)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances(), st.booleans())
def test_trust_region_and_descent(solver: str, inst, clip: bool) -> None:
    G, w, c = inst
    assert_descent_and_trust_region(numpy_solver(solver), G, w, c, clip)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances())
def test_clip_below_weights(solver: str, inst) -> None:
    G, w, c = inst
    assert_clip_below_weights(numpy_solver(solver), G.T @ G, w, c)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances(), st.booleans())
def test_c_zero_gives_weights_exactly(solver: str, inst, clip: bool) -> None:
    G, _, _ = inst
    k = np.arange(1, G.shape[1] + 1, dtype=np.float64)
    assert_c_zero_gives_weights(numpy_solver(solver), G.T @ G, k, clip)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances(min_m=2))
def test_strong_duality_without_clip(solver: str, inst) -> None:
    G, w, c = inst
    ref = solve_dual_reference(G.T @ G, w, c)
    assert_strong_duality(numpy_solver(solver), G, w, c, ref.value, ref.p)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances(min_m=2), st.randoms(use_true_random=False), st.booleans())
def test_permutation_equivariance(solver: str, inst, rand, clip: bool) -> None:
    G, w, c = inst
    perm = np.array(rand.sample(range(G.shape[1]), G.shape[1]))
    assert_permutation_equivariant(numpy_solver(solver), G.T @ G, w, c, perm, clip, _direction_unique(G, w, c, G))


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances_with_duplicates(), st.randoms(use_true_random=False), st.booleans())
def test_permutation_equivariance_with_duplicated_gradients(solver: str, inst, rand, clip: bool) -> None:
    """Identical gradients make ``p`` non-unique; the tie rule (shares in proportion to ``w``) makes
    the solution permute with the objectives all the same."""
    G, w, c, distinct = inst
    m = G.shape[1]
    perm = np.array(rand.sample(range(m), m))
    unique = _direction_unique(G, w, c, G[:, np.unique(distinct)])
    assert_permutation_equivariant(numpy_solver(solver), G.T @ G, w, c, perm, clip, unique)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances(), st.integers(-30, 30), st.booleans())
def test_positive_homogeneity_power_of_two_exact(solver: str, inst, k: int, clip: bool) -> None:
    G, w, c = inst
    assert_power_of_two_invariant(numpy_solver(solver), G.T @ G, w, c, k, clip)


@pytest.mark.parametrize("solver", SOLVERS)
@PROPERTY
@given(instances(), st.floats(1e-6, 1e6))
def test_positive_homogeneity(solver: str, inst, lam: float) -> None:
    """With the clip and several optimal ``p`` (a degenerate Gram) RACO's direction is defined only up
    to that choice, so the direction is compared without the clip, where it is unique if ``G p* != 0``."""
    G, w, c = inst
    ref = solve_dual_reference(G.T @ G, w, c)
    unique = bool(np.linalg.norm(G @ ref.p) > 1e-3 * np.linalg.norm(G, axis=0).max())
    assert_positively_homogeneous(numpy_solver(solver), G, w, c, lam, unique)
