"""The public API of ``cagrad_clip._dual`` (``api.py``): names, validation and bad input, solver choice,
and ``solve_with_settings``, the optimizer's entry point."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cagrad_clip._dual as dual
from cagrad_clip._dual import (
    AUTO_EXACT_MAX_M,
    EXACT_MAX_M,
    auto_solver,
    combination_coefficients,
    default_max_iter,
    resolve_solver,
    solve_cagrad,
    solve_with_settings,
)
from cagrad_clip._settings import CAGradSettings
from tests.dual.helpers import random_gradients
from tests.reference import reference_coefficients

H3 = torch.eye(3, dtype=torch.float64)


def test_public_names() -> None:
    assert set(dual.__all__) >= {
        "CAGradSolution",
        "solve_cagrad",
        "combination_coefficients",
        "solve_with_settings",
        "auto_solver",
        "default_max_iter",
        "resolve_solver",
        "AUTO_EXACT_MAX_M",
        "EXACT_MAX_M",
        "RESCALE_OPTIONS",
        "SOLVER_OPTIONS",
        "exact_line_search",
    }
    assert all(hasattr(dual, name) for name in dual.__all__)
    assert AUTO_EXACT_MAX_M <= EXACT_MAX_M == 12


@pytest.mark.parametrize(
    ("gram", "error", "match"),
    [
        ([[1.0]], TypeError, "torch.Tensor"),
        (torch.ones(3), ValueError, "shape"),
        (torch.ones(3, 2), ValueError, "square"),
        (torch.ones(2, 0, 0), ValueError, "zero objectives"),
        (torch.eye(3, dtype=torch.int64), TypeError, "floating-point"),
    ],
)
def test_bad_gram(gram, error, match) -> None:
    with pytest.raises(error, match=match):
        solve_cagrad(gram)
    with pytest.raises(error, match=match):
        solve_with_settings(gram, torch.ones(3, dtype=torch.float64) / 3, CAGradSettings())


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        ([0.5, -0.1, 0.6], ValueError, ">= 0"),
        ([0.5, float("nan"), 0.5], ValueError, "finite"),
        ([0.5, float("inf"), 0.5], ValueError, "finite"),
        ([0.0, 0.0, 0.0], ValueError, "positive sum"),
        ([0.5, 0.5], ValueError, "2 weights for 3 objectives"),
        (torch.ones(3, 2), ValueError, "2 weights for 3 objectives"),
        (torch.tensor(1.0), ValueError, "shape"),
        ("abc", TypeError, "string"),
    ],
)
def test_bad_weights(weights, error, match) -> None:
    with pytest.raises(error, match=match):
        solve_cagrad(H3, weights)


def test_bad_weights_without_validation_still_check_shape() -> None:
    with pytest.raises(ValueError, match="weights must have shape"):
        solve_cagrad(H3, torch.ones(2, dtype=torch.float64), validate=False)


@pytest.mark.parametrize(
    ("c", "error", "match"),
    [
        (-0.1, ValueError, "c must be finite and >= 0"),
        (float("nan"), ValueError, "c must be finite and >= 0"),
        (float("inf"), ValueError, "c must be finite and >= 0"),
        (True, TypeError, "c must be a real number"),
        ("0.4", TypeError, "c must be a real number"),
        (None, TypeError, "c must be a real number"),
    ],
)
def test_bad_c(c, error, match) -> None:
    with pytest.raises(error, match=match):
        solve_cagrad(H3, c=c)


def test_bad_rescale_and_clip() -> None:
    with pytest.raises(ValueError, match="unknown rescale='1\\+c\\^3'"):
        solve_cagrad(H3, rescale="1+c^3")
    with pytest.raises(TypeError, match="clip must be True or False"):
        solve_cagrad(H3, clip=1)


@pytest.mark.parametrize("max_iter", [-1, 2.0, True, "5"])
def test_bad_max_iter(max_iter) -> None:
    with pytest.raises(ValueError, match="max_iter must be None or an int >= 0"):
        solve_cagrad(H3, max_iter=max_iter)


def test_bad_solver() -> None:
    with pytest.raises(ValueError, match="unknown solver='newton'"):
        solve_cagrad(H3, solver="newton")
    with pytest.raises(ValueError, match="limited to m <= 12 objectives, got m = 13"):
        solve_cagrad(torch.eye(13, dtype=torch.float64), solver="exact")
    with pytest.raises(ValueError, match="limited to m <= 12 objectives, got m = 13"):
        solve_with_settings(
            torch.eye(13, dtype=torch.float64), torch.full((13,), 1 / 13, dtype=torch.float64), CAGradSettings(solver="exact")
        )
    assert resolve_solver("auto", 40) == "auto" and resolve_solver("exact", 12) == "exact"


def test_default_max_iter() -> None:
    assert [default_max_iter(m) for m in (1, 2, 3, 16, 64)] == [0, 1, 3, 16, 64]


def test_auto_solver_picks_by_shape() -> None:
    assert [auto_solver(m) for m in (3, 8, 12, 13)] == ["exact", "exact", "exact", "frank_wolfe"]
    assert [auto_solver(4, 1024), auto_solver(8, 64), auto_solver(6, 1024), auto_solver(7, 64)] == ["exact"] + ["frank_wolfe"] * 3
    rng = np.random.default_rng(21)
    for m, batch in ((3, ()), (8, ()), (13, ()), (7, (64,))):
        G = random_gradients(rng, m, m + 2)
        H = torch.tensor(G.T @ G).expand(*batch, m, m)
        auto = solve_cagrad(H, c=0.5)
        chosen = solve_cagrad(H, c=0.5, solver=auto_solver(m, math.prod(batch)))
        assert torch.equal(auto.coefficients, chosen.coefficients)


def test_solve_with_settings_matches_the_reference_and_ignores_settings_weights() -> None:
    """Weights come from the ``weights`` argument (already normalised); ``settings.weights`` is not read."""
    rng = np.random.default_rng(23)
    G = random_gradients(rng, 4, 6)
    H = G.T @ G
    w = rng.dirichlet(np.ones(4))
    settings = CAGradSettings(weights=(1.0, 0.0, 0.0, 0.0), c=0.6, rescale="1+c", max_iter=None)
    sol = solve_with_settings(torch.tensor(H), torch.tensor(w), settings)
    np.testing.assert_allclose(sol.coefficients.numpy(), reference_coefficients(H, w, 0.6, True, "1+c"), rtol=1e-9)
    np.testing.assert_array_equal(sol.weights.numpy(), w)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        solve_with_settings(torch.tensor(H), torch.tensor(w[:3]), settings)


def test_solve_with_settings_float32_and_half() -> None:
    H = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    w = torch.tensor([0.2, 0.8])
    for gram in (H, H.half()):
        a = solve_with_settings(gram, w, CAGradSettings()).coefficients
        assert a.dtype == torch.float32
        np.testing.assert_allclose(a.double().numpy(), reference_coefficients(gram.double().numpy(), np.array([0.2, 0.8]), 0.4), rtol=1e-5)


def test_auto_solver_budget_boundaries_are_inclusive() -> None:
    """``batch x (2^m - 1)`` faces within the budget (``2^15`` up to m = 6, ``2^12`` above) is enumerated,
    one more problem is not: m = 1 fills the small budget exactly, m = 6 (63 faces) fits 520 problems
    (32 760 faces) and not 521, m = 7 (127 faces) fits 32 (4 064) and not 33."""
    assert [auto_solver(1, 1 << 15), auto_solver(1, (1 << 15) + 1)] == ["exact", "frank_wolfe"]
    assert [auto_solver(6, 520), auto_solver(6, 521)] == ["exact", "frank_wolfe"]
    assert [auto_solver(7, 32), auto_solver(7, 33)] == ["exact", "frank_wolfe"]


def test_combination_coefficients_forwards_every_setting_to_solve_cagrad() -> None:
    """The shorthand is ``solve_cagrad(...).coefficients`` with the same defaults (``clip=True``) and every
    argument passed on: on a problem where the clip, the solver and its iteration budget each change the
    answer, each choice gives solve_cagrad's coefficients for that choice."""
    rng = np.random.default_rng(7)
    G = random_gradients(rng, 8, 12)
    H = torch.tensor(G.T @ G)
    w = [1 / 8] * 8
    cases = [dict(c=2.0), dict(c=2.0, clip=False), dict(c=2.0, solver="frank_wolfe", max_iter=1), dict(c=2.0, solver="frank_wolfe")]
    got = [combination_coefficients(H, w, **kw) for kw in cases]
    want = [solve_cagrad(H, w, **{"clip": True, **kw}).coefficients for kw in cases]
    for g, x in zip(got, want):
        assert torch.equal(g, x)
    # each choice matters here: the clip, the solver at one iteration, the iteration budget
    assert all(not torch.allclose(got[i], got[j]) for i, j in ((0, 1), (0, 2), (2, 3)))
