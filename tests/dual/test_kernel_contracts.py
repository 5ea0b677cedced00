"""Contracts of the solve's outputs (``cagrad_clip._dual.kernel`` through ``api.py``): the shape of every
field, batched solves equal to one-by-one solves field by field, every reported number consistent
with the returned ``p`` (recomputed here in float64 numpy from its definition), dual mass on
zero-weight objectives, the dtype the weights are solved in, and ``validate`` passed through.

Expected values come from the definitions (``tests.reference``: ``F``, its gradient and the
Frank-Wolfe gap written from the papers' formulas) or from closed forms derived here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cagrad_clip._dual import combination_coefficients, solve_cagrad, solve_with_settings
from cagrad_clip._settings import CAGradSettings
from tests.dual.helpers import random_gradients
from tests.reference import dual_value, fw_gap, problem_data, solve_dual_reference

VECTOR_FIELDS = ("coefficients", "dual", "clipped_dual", "weights")
SCALAR_FIELDS = ("anchor_norm", "dual_value", "fw_gap")


def _grams(rng: np.random.Generator, batch: tuple[int, ...], m: int) -> np.ndarray:
    Hs = np.empty(batch + (m, m))
    for idx in np.ndindex(batch):
        G = random_gradients(rng, m, int(rng.integers(1, 2 * m + 1)))
        Hs[idx] = G.T @ G
    return Hs


def _assert_consistent_with_p(sol, H: np.ndarray, w: np.ndarray, c: float, clip: bool) -> None:
    """Every reported number of one problem against its definition at the returned ``p`` (float64 numpy)."""
    Hs, b, s = problem_data(H, w, c)
    w_n = w / w.sum()
    p = sol.dual.numpy()
    scale = float(np.diag(Hs).max())
    assert p.min() >= 0.0 and abs(p.sum() - 1.0) <= 1e-12
    np.testing.assert_allclose(sol.weights.numpy(), w_n, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(sol.clipped_dual.numpy(), np.minimum(p, sol.weights.numpy()) if clip else p)
    assert float(sol.anchor_norm) == pytest.approx(math.sqrt(w_n @ Hs @ w_n), rel=1e-13)
    assert float(sol.dual_value) == pytest.approx(dual_value(Hs, b, s, p), rel=1e-11, abs=1e-13 * scale)
    # the Frank-Wolfe gap grad F(p)^T p - min_j grad F(p)_j, clamped at 0 against rounding
    assert float(sol.fw_gap) == pytest.approx(max(fw_gap(Hs, b, s, p), 0.0), rel=1e-9, abs=1e-12 * scale)


# ----------------------------------------------------------------------------------------------
# shapes and batching
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_one_problem_gives_vectors_of_m_and_zero_dimensional_numbers(m: int) -> None:
    """An unbatched Gram ``(m, m)`` gives ``(m,)`` vectors and 0-d numbers: the batch shape is ``()``."""
    rng = np.random.default_rng(m)
    H = _grams(rng, (), m)
    w = rng.dirichlet(np.ones(m))
    for solver in ("exact", "frank_wolfe"):
        for clip in (True, False):
            sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.5, clip=clip, solver=solver)
            for field in VECTOR_FIELDS:
                assert getattr(sol, field).shape == (m,), field
            for field in SCALAR_FIELDS:
                assert getattr(sol, field).shape == (), field
            _assert_consistent_with_p(sol, H, w, 0.5, clip)


@pytest.mark.parametrize(
    ("m", "solver", "max_iter"),
    [(1, "exact", None), (2, "exact", None), (3, "exact", None), (3, "frank_wolfe", None), (4, "frank_wolfe", 0)],
)
def test_every_field_of_a_batched_solve_is_the_solve_of_its_problem(m: int, solver: str, max_iter) -> None:
    """A ``(2, 1, 3)`` batch (Grams and weights batched, or either one broadcast against the other's batch):
    every field has the batch shape (``(2, 1, 3, m)`` vectors, ``(2, 1, 3)`` numbers; the size-1 dimension
    stays) and equals the field of that problem solved on its own; each problem's numbers match their
    definitions at its ``p``."""
    rng = np.random.default_rng(100 + m)
    B = (2, 1, 3)
    Hs = _grams(rng, B, m)
    Ws = rng.dirichlet(np.ones(m), size=B)
    cases = [
        (Hs, Ws, lambda idx: (Hs[idx], Ws[idx]), True),
        (Hs[0, 0, 1], Ws, lambda idx: (Hs[0, 0, 1], Ws[idx]), False),  # one Gram, a batch of weights
        (Hs, Ws[1, 0, 2], lambda idx: (Hs[idx], Ws[1, 0, 2]), True),  # a batch of Grams, one weight vector
    ]
    for H_in, W_in, problem, clip in cases:
        sol = solve_cagrad(torch.tensor(H_in), torch.tensor(W_in), c=0.7, clip=clip, solver=solver, max_iter=max_iter)
        for field in VECTOR_FIELDS:
            assert getattr(sol, field).shape == B + (m,), field
        for field in SCALAR_FIELDS:
            assert getattr(sol, field).shape == B, field
        for idx in np.ndindex(B):
            H, w = problem(idx)
            single = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.7, clip=clip, solver=solver, max_iter=max_iter)
            for field in VECTOR_FIELDS + SCALAR_FIELDS:
                torch.testing.assert_close(getattr(sol, field)[idx], getattr(single, field), rtol=1e-12, atol=1e-14, msg=field)
            _assert_consistent_with_p(single, H, w, 0.7, clip)


def _early_stop_problems() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three problems (``m = 8``) where Frank-Wolfe's start (``max_iter = 0``) is not optimal:
    its gap exceeds ``1e-4 max_i H_ii`` against the reference's optimum."""
    rng = np.random.default_rng(5)
    found = []
    for _ in range(40):
        G = random_gradients(rng, 8, 16)
        H = G.T @ G
        w = rng.dirichlet(np.ones(8))
        p = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.5, solver="frank_wolfe", max_iter=0).dual.numpy()
        Hs, b, s = problem_data(H, w, 0.5)
        if fw_gap(Hs, b, s, p) > 1e-4 * H.max():
            found.append((H, w))
        if len(found) == 3:
            return found
    raise AssertionError(f"only {len(found)} early-stop problems found")


def test_an_unconverged_solve_reports_the_gap_and_value_of_its_own_p() -> None:
    """``max_iter = 0`` returns Frank-Wolfe's start, not the optimum: ``F(p)`` and the Frank-Wolfe gap
    reported are those of the returned ``p`` (positive gap), ``F(p)`` exceeds the reference optimum by at
    most the gap, and a batch of such problems reports each one's own numbers. ``H -> 4 H`` scales
    ``F`` and the gap by 4 and ``||g0||`` by 2, ``p`` unchanged."""
    problems = _early_stop_problems()
    Hs = np.stack([H for H, _ in problems])
    Ws = np.stack([w for _, w in problems])
    batched = solve_cagrad(torch.tensor(Hs), torch.tensor(Ws), c=0.5, solver="frank_wolfe", max_iter=0)
    for k, (H, w) in enumerate(problems):
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.5, solver="frank_wolfe", max_iter=0)
        _assert_consistent_with_p(sol, H, w, 0.5, True)
        gap, value = float(sol.fw_gap), float(sol.dual_value)
        assert gap > 1e-4 * H.max()
        ref = solve_dual_reference(H, w, 0.5)
        assert ref.value - 1e-12 * H.max() <= value <= ref.value + gap
        for field in VECTOR_FIELDS + SCALAR_FIELDS:
            torch.testing.assert_close(getattr(batched, field)[k], getattr(sol, field), rtol=1e-12, atol=1e-14, msg=field)
        sol4 = solve_cagrad(torch.tensor(4.0 * H), torch.tensor(w), c=0.5, solver="frank_wolfe", max_iter=0)
        assert torch.equal(sol4.dual, sol.dual)
        assert float(sol4.fw_gap) == pytest.approx(4.0 * gap, rel=1e-12)
        assert float(sol4.dual_value) == pytest.approx(4.0 * value, rel=1e-12)
        assert float(sol4.anchor_norm) == pytest.approx(2.0 * float(sol.anchor_norm), rel=1e-14)


# ----------------------------------------------------------------------------------------------
# zero weights, weight dtypes, validate
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_zero_weight_objective_can_hold_all_the_dual_mass(solver: str) -> None:
    """``w = (1/2, 1/2, 0)`` with ``g3`` against the anchor: the dual puts its mass on ``g3`` (``p* = e3``,
    hand-checked: ``F(e3) = <g0, g3> + s ||g3||`` is the smallest vertex value and the reference agrees),
    while the clip caps it at ``w3 = 0``: ``p~ = 0`` and ``a = w`` with the clip, ``a = w + s / ||g3|| e3`` without."""
    G = np.array([[1.0, 0.2, -1.0], [0.1, 1.0, -1.0]])
    H = G.T @ G
    w = np.array([0.5, 0.5, 0.0])
    c = 0.4
    ref = solve_dual_reference(H, w, c)
    assert ref.p[2] == 1.0
    g0 = G @ w
    s = c * np.linalg.norm(g0)
    clipped = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, solver=solver)
    assert clipped.dual.tolist() == [0.0, 0.0, 1.0]
    assert clipped.clipped_dual.tolist() == [0.0, 0.0, 0.0]
    assert clipped.coefficients.tolist() == [0.5, 0.5, 0.0]
    free = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, clip=False, solver=solver)
    assert free.dual.tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_allclose(free.coefficients.numpy(), [0.5, 0.5, s / np.linalg.norm(G[:, 2])], rtol=1e-14)


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_zero_weight_duplicates_split_their_mass_evenly(solver: str) -> None:
    """The tie rule where the group's weight is 0: ``g3 = g4`` (both of weight 0) carry ``p* `` jointly
    and split it evenly; ``p`` stays on the simplex, equal to the reference's group total."""
    G = np.array([[1.0, 0.2, -1.0, -1.0], [0.1, 1.0, -1.0, -1.0]])
    H = G.T @ G
    w = np.array([0.5, 0.5, 0.0, 0.0])
    ref = solve_dual_reference(H[:3, :3], w[:3], 0.4)
    assert ref.p[2] == 1.0
    sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.4, solver=solver)
    assert sol.dual.tolist() == [0.0, 0.0, 0.5, 0.5]
    assert sol.coefficients.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_weights_are_normalised_in_the_solve_dtype() -> None:
    """float32 weights for a float64 Gram are converted before they are normalised: ``c = 0`` gives
    ``w / sum(w)`` computed in float64 (``1/3`` in float64, not float32's ``1/3`` widened), on both
    entry points, with or without the host check; the whole solution is that of the float64 weights."""
    H = torch.tensor(np.array([[2.0, -0.3, 0.1], [-0.3, 1.0, 0.2], [0.1, 0.2, 0.5]]))
    ones32 = torch.ones(3, dtype=torch.float32)
    third = [1.0 / 3.0] * 3
    for validate in (True, False):
        a = solve_cagrad(H, ones32, c=0.0, validate=validate).coefficients
        assert a.dtype == torch.float64 and a.tolist() == third
        a = combination_coefficients(H, ones32, c=0.0, validate=validate)
        assert a.dtype == torch.float64 and a.tolist() == third
    w32 = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float32)
    got = solve_with_settings(H, w32, CAGradSettings(c=0.6))
    want = solve_with_settings(H, w32.double(), CAGradSettings(c=0.6))
    for field in VECTOR_FIELDS + SCALAR_FIELDS:
        value = getattr(got, field)
        assert value.dtype == torch.float64, field
        assert torch.equal(value, getattr(want, field)), field


def test_validate_false_skips_the_value_checks_of_tensor_weights() -> None:
    """``validate=False`` (the hot path) does not look at the values of tensor weights, through either
    entry point: a negative weight is normalised, not rejected (``c = 0``: ``a = w / sum(w)``)."""
    H = torch.eye(3, dtype=torch.float64)
    w = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=">= 0"):
        combination_coefficients(H, w, c=0.0)
    assert combination_coefficients(H, w, c=0.0, validate=False).tolist() == [1.0, -0.5, 0.5]
    assert solve_cagrad(H, w, c=0.0, validate=False).coefficients.tolist() == [1.0, -0.5, 0.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_weights_means_uniform_weights(dtype: torch.dtype) -> None:
    """``weights=None`` is ``w = 1/m`` in the solve's dtype: ``c = 0`` gives exactly ``1/m``, and at
    ``c = 0.5`` the whole solution equals that of the explicit uniform weights."""
    m = 3
    H = torch.tensor([[2.0, -0.3, 0.1], [-0.3, 1.0, 0.2], [0.1, 0.2, 0.5]], dtype=dtype)
    uniform = torch.full((m,), 1.0 / m, dtype=dtype)
    assert torch.equal(combination_coefficients(H, None, c=0.0), uniform)
    got, want = solve_cagrad(H, None, c=0.5), solve_cagrad(H, uniform, c=0.5)
    for field in VECTOR_FIELDS + SCALAR_FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_a_weights_tensor_of_the_wrong_shape_is_refused_naming_its_shape() -> None:
    """``solve_with_settings`` names the shape it got (or the type, for a non-tensor)."""
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\) for m = 3 objectives, got \(2,\)"):
        solve_with_settings(gram, torch.ones(2, dtype=torch.float64), CAGradSettings())
    with pytest.raises(ValueError, match=r"got list"):
        solve_with_settings(gram, [1.0, 1.0, 1.0], CAGradSettings())  # type: ignore[arg-type]


def test_the_tie_closure_takes_the_fewest_squarings_that_cover_every_path() -> None:
    """``closure_steps(m)``: the smallest ``k`` with ``2^k >= m - 1`` (a path among ``m`` objectives has at most
    ``m - 1`` edges), computed without ``int.bit_length``."""
    from cagrad_clip._dual.kernel import closure_steps

    for m in range(1, 200):
        want = max(m - 2, 0).bit_length()
        assert closure_steps(m) == want and (m <= 2 or 2 ** closure_steps(m) >= m - 1 > 2 ** (closure_steps(m) - 1))
