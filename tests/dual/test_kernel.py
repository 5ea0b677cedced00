"""The solve proper (``cagrad_clip._dual.kernel``): batching, the clip and correction, the zero and tie
rules, degenerate and non-finite Grams, precision and ``torch.compile``.

Expected values come from ``tests.reference`` (SLSQP multi-start + KKT polish) or from closed forms
derived here, never from ``cagrad_clip._dual``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cagrad_clip._dual import combination_coefficients, default_max_iter, solve_cagrad, solve_with_settings
from cagrad_clip._settings import CAGradSettings
from tests.dual.helpers import DIVISOR, RESCALES, SOLVERS, coeffs, normalised, random_gradients
from tests.reference import coefficients_from_dual, reference_coefficients, solve_dual_reference


# ----------------------------------------------------------------------------------------------
# batching and the clip
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_weights_match_reference(solver: str) -> None:
    rng = np.random.default_rng(7)
    m = 4
    G = random_gradients(rng, m, 6)
    H = G.T @ G
    W = rng.dirichlet(np.ones(m), size=5)
    W[0] = [0.0, 0.0, 1.0, 0.0]  # a user weight vertex
    a = coeffs(H, W, 0.5, solver=solver)
    assert a.shape == (5, m)
    for k in range(5):
        np.testing.assert_allclose(a[k], reference_coefficients(H, W[k], 0.5), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_equals_looped(solver: str) -> None:
    rng = np.random.default_rng(11)
    m, B = 5, (3, 4)
    Hs = np.empty(B + (m, m))
    Ws = rng.dirichlet(np.ones(m), size=B)
    for idx in np.ndindex(B):
        G = random_gradients(rng, m, int(rng.integers(1, 2 * m)))
        Hs[idx] = G.T @ G
    for clip in (True, False):
        batched = solve_cagrad(torch.tensor(Hs), torch.tensor(Ws), c=0.6, clip=clip, solver=solver)
        assert batched.coefficients.shape == B + (m,) and batched.dual_value.shape == B
        for idx in np.ndindex(B):
            single = solve_cagrad(torch.tensor(Hs[idx]), torch.tensor(Ws[idx]), c=0.6, clip=clip, solver=solver)
            torch.testing.assert_close(batched.coefficients[idx], single.coefficients, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(batched.dual[idx], single.dual, rtol=1e-12, atol=1e-13)
    # one Gram with a batch of weights, and a batch of Grams with one weight vector, broadcast
    batched_w = coeffs(Hs[0, 0], Ws[0], 0.3, solver=solver)
    batched_h = coeffs(Hs[1], Ws[1, 2], 0.3, solver=solver)
    for k in range(4):
        np.testing.assert_allclose(batched_w[k], coeffs(Hs[0, 0], Ws[0, k], 0.3, solver=solver), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(batched_h[k], coeffs(Hs[1, k], Ws[1, 2], 0.3, solver=solver), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("h", [1.0, 3.7e-5, 2.5e8])
@pytest.mark.parametrize("c", [0.0, 0.4, 0.99, 2.0])
def test_single_objective(h: float, c: float) -> None:
    """m = 1: d = (1 + c) g, and the rescales divide that."""
    H = torch.tensor([[h]], dtype=torch.float64)
    assert combination_coefficients(H, c=c).tolist() == [1.0 + c]
    assert combination_coefficients(H, [3.0], c=c, clip=False).tolist() == [1.0 + c]
    assert combination_coefficients(H, c=c, rescale="1+c").tolist() == [1.0]
    assert combination_coefficients(H, c=c, rescale="1+c^2").tolist() == [(1.0 + c) / (1.0 + c * c)]
    assert default_max_iter(1) == 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_clip_has_no_effect_at_a_vertex(solver: str) -> None:
    """p* = e_j: p~ = w_j e_j has the direction of g_j, so a = w + c ||g0|| / ||g_j|| e_j with or without the clip."""
    rng = np.random.default_rng(3)
    vertices = 0
    for _ in range(50):
        m = int(rng.integers(2, 6))
        G = random_gradients(rng, m, int(rng.integers(1, 2 * m)))
        H = G.T @ G
        w = rng.dirichlet(np.ones(m))
        c = float(rng.uniform(0.1, 0.95))
        ref = solve_dual_reference(H, w, c)
        if ref.p.max() < 1 - 1e-12:
            continue
        vertices += 1
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, solver=solver)
        assert float(sol.dual.max()) == 1.0  # the solver lands exactly on the vertex
        a_clip, a_free = coeffs(H, w, c, True, solver=solver), coeffs(H, w, c, False, solver=solver)
        np.testing.assert_allclose(a_clip, a_free, rtol=1e-13, atol=0)
        j = int(np.argmax(ref.p))
        expected = normalised(w) + c * math.sqrt(w @ H @ w) / math.sqrt(H[j, j]) * np.eye(m)[j]
        np.testing.assert_allclose(a_clip, expected, rtol=1e-12)
    assert vertices >= 4


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("rescale", RESCALES)
def test_rescale_divides_the_coefficients(solver: str, rescale) -> None:
    rng = np.random.default_rng(17)
    G = random_gradients(rng, 4, 5)
    H = G.T @ G
    np.testing.assert_allclose(
        coeffs(H, None, 0.7, rescale=rescale, solver=solver) * DIVISOR[rescale](0.7),
        reference_coefficients(H, np.full(4, 0.25), 0.7),
        rtol=1e-9,
    )


# ----------------------------------------------------------------------------------------------
# the zero rule and the tie rule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("ratio", [1e-6, 1e-7, 1e-8])
def test_short_gradient_keeps_its_correction(solver: str, ratio: float) -> None:
    """Regression: g3 is ``ratio`` times shorter than g1, g2 and points against g0, so p* = e3 and the
    correction s g3 / ||g3|| is well defined. Deciding "||G p~|| is zero" relative to the largest
    gradient (||G p~||^2 = ratio^2 max H_ii < 100 m eps) dropped it (a = w, direction off by 0.67);
    the decision is relative to the combination's own length now."""
    u = np.array([-0.8, -0.6, 0.0])
    G = np.stack([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], ratio * u], axis=1)
    H = G.T @ G
    w = np.array([0.5, 0.4, 0.1])
    c = 0.4
    ref = solve_dual_reference(H, w, c)
    assert ref.p[2] == 1.0
    g0 = G @ w
    d_closed = g0 + c * np.linalg.norm(g0) * u  # d = g0 + c ||g0|| g3 / ||g3||
    for clip in (True, False):
        a = coeffs(H, w, c, clip, solver=solver)
        np.testing.assert_allclose(a, coefficients_from_dual(H, w, c, ref.p, clip), rtol=1e-9)
        np.testing.assert_allclose(G @ a, d_closed, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_cancellation_gives_the_nearest_conflict_free_direction(solver: str) -> None:
    """g2 = -g1, p* = (1/2, 1/2, 0): G p* = 0 exactly, F* = 0, and Algorithm 1's correction is undefined.
    The primal optimum is 0: the conflict-free directions are {(0, y) : y >= 0} (g1, g2 = (+-1, 0),
    g3 = (0.6, 0.8)); the nearest to g0 = (0.36, 0.48) is (0, 0.48), at distance 0.36 <= s = 0.9, with or
    without the clip. Before issue 15 (item 18) the correction was dropped (a = w): d = g0 conflicts with g2."""
    G = np.array([[1.0, -1.0, 0.6], [0.0, 0.0, 0.8]])
    H = G.T @ G
    w = np.array([0.2, 0.2, 0.6])
    ref = solve_dual_reference(H, w, 1.5)
    assert abs(ref.value) <= 1e-12
    for clip in (True, False):
        sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=1.5, clip=clip, solver=solver)
        assert abs(float(sol.dual_value)) <= 1e-15
        np.testing.assert_allclose(G @ sol.coefficients.numpy(), [0.0, 0.48], rtol=0, atol=1e-15)


@pytest.mark.parametrize("solver", SOLVERS)
def test_identical_gradients_share_mass_by_weight(solver: str) -> None:
    """The tie rule: g1 = g3, so only p1 + p3 is determined; it is split in proportion to w1 : w3,
    and the direction equals the reference direction of the problem with g1 and g3 merged into one
    objective of weight w1 + w3."""
    rng = np.random.default_rng(5)
    g, h = rng.normal(size=4), rng.normal(size=4)
    G = np.stack([g, h, g], axis=1)
    H = G.T @ G
    w = np.array([0.5, 0.3, 0.2])
    G_merged, w_merged = np.stack([g, h], axis=1), np.array([0.7, 0.3])
    for c in (0.3, 0.6, 0.9):
        for clip in (True, False):
            sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, clip=clip, solver=solver)
            p = sol.dual.numpy()
            assert p[0] == pytest.approx(2.5 * p[2], rel=1e-12)
            d_merged = G_merged @ reference_coefficients(G_merged.T @ G_merged, w_merged, c, clip)
            np.testing.assert_allclose(G @ sol.coefficients.numpy(), d_merged, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_swapping_identical_objectives_permutes_the_coefficients(solver: str) -> None:
    """Regression: with g1 = g2 the optimal p is not unique, and the clipped direction depended on the
    objectives' order (swapping them moved it by 0.9-2.0). Now a swap permutes a exactly as the
    tie rule says, whatever the order."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 5))
        base = rng.normal(size=(k + 1, k)) * np.exp(rng.normal(size=k))
        G = base[:, [0] + list(range(k))]  # objectives 0 and 1 share a gradient
        m = k + 1
        H = G.T @ G
        w = rng.dirichlet(np.ones(m))
        c = float(rng.uniform(0.1, 0.95))
        perm = np.array([1, 0] + list(range(2, m)))
        a = coeffs(H, w, c, solver=solver)
        a_swapped = coeffs(H[np.ix_(perm, perm)], w[perm], c, solver=solver)
        np.testing.assert_allclose(a_swapped, a[perm], rtol=1e-9, atol=1e-12)
        merged = np.concatenate([[w[0] + w[1]], w[2:]])
        d_ref = base @ reference_coefficients(base.T @ base, merged, c)
        np.testing.assert_allclose(G @ a, d_ref, rtol=1e-7, atol=1e-9 * np.abs(d_ref).max())


# ----------------------------------------------------------------------------------------------
# degenerate Grams
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("rescale", RESCALES)
@pytest.mark.parametrize("clip", [True, False])
def test_all_zero_gram(solver: str, clip: bool, rescale) -> None:
    w = np.array([1.0, 2.0, 5.0])
    a = coeffs(np.zeros((3, 3)), w, 0.4, clip, rescale, solver=solver)
    assert np.array_equal(a, w / 8.0 / DIVISOR[rescale](0.4))


@pytest.mark.parametrize("solver", SOLVERS)
def test_duplicated_gradients(solver: str) -> None:
    rng = np.random.default_rng(5)
    g = rng.normal(size=4)
    G = np.stack([g, g], axis=1)
    for c in (0.2, 0.7):
        for clip in (True, False):
            a = coeffs(G.T @ G, [0.3, 0.7], c, clip, solver=solver)
            assert a.sum() == pytest.approx(1.0 + c, rel=1e-13)  # d = (1 + c) g
    h = rng.normal(size=4)
    G = np.stack([g, h, g], axis=1)
    H = G.T @ G
    w = np.array([0.5, 0.3, 0.2])
    d_ref = G @ reference_coefficients(H, w, 0.6, clip=False)  # unique without the clip
    np.testing.assert_allclose(G @ coeffs(H, w, 0.6, clip=False, solver=solver), d_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_rank_one_gram(solver: str) -> None:
    """All gradients parallel: g_i = alpha_i v. With mixed signs p* is the vertex most against g0."""
    v = np.array([1.0, -2.0, 0.5])
    alpha = np.array([2.0, -1.0, 0.5, -3.0])
    G = np.outer(v, alpha)
    H = G.T @ G
    w = np.array([0.4, 0.2, 0.3, 0.1])
    c = 0.4
    g0_coef = alpha @ w  # g0 = 0.6 v; F(e_j) = alpha_j 0.6 |v|^2 + s |alpha_j| |v| is smallest for alpha_j = -3
    for clip in (True, False):
        np.testing.assert_allclose(G @ coeffs(H, w, c, clip, solver=solver), (1 - c) * g0_coef * v, rtol=1e-12)
    assert solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, solver=solver).dual.tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_zero_gradient(solver: str) -> None:
    # (a) F* = 0 at G p = 0 (p* = e3): the correction is undefined, a = w.
    G = np.array([[1.0, -1.0, 0.0], [0.0, 0.1, 0.0]])
    for clip in (True, False):
        assert np.array_equal(coeffs(G.T @ G, None, 0.4, clip, solver=solver), np.full(3, 1 / 3))
    # (b) the optimum avoids the zero gradient
    G = np.array([[1.0, -1.0, 0.0], [0.0, -1.0, 0.0]])
    H = G.T @ G
    w = np.array([0.7, 0.1, 0.2])
    ref = solve_dual_reference(H, w, 0.4)
    assert ref.value < 0 and ref.p[2] < 1e-9
    for clip in (True, False):
        np.testing.assert_allclose(
            coeffs(H, w, 0.4, clip, solver=solver), coefficients_from_dual(H, w, 0.4, ref.p, clip), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_gradient_wins_when_every_other_mix_is_uphill(solver: str) -> None:
    """min F = min(F over the non-zero gradients, 0): here F > 0 elsewhere, p* = e_zero, a = w."""
    G = np.array([[1.0, 0.0, 0.5], [0.2, 0.0, 1.0]])
    H = G.T @ G
    w = np.array([0.25, 0.25, 0.5])
    sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.4, solver=solver)
    assert sol.dual.tolist() == [0.0, 1.0, 0.0]
    assert sol.coefficients.tolist() == w.tolist()
    assert solve_dual_reference(H, w, 0.4).value == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_weight_vertex_and_zero_weights(solver: str) -> None:
    """w = e_1 (zero weight elsewhere): the clip zeroes p~ off objective 1."""
    rng = np.random.default_rng(9)
    G = random_gradients(rng, 3, 5)
    H = G.T @ G
    w = np.array([1.0, 0.0, 0.0])
    sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=0.5, solver=solver)
    assert sol.clipped_dual[1] == 0.0 and sol.clipped_dual[2] == 0.0
    np.testing.assert_allclose(sol.coefficients.numpy(), reference_coefficients(H, w, 0.5), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m", [2, 3])
def test_tiny_weight_does_not_underflow_the_correction(m: int) -> None:
    """Regression (found by the hypothesis soak): duplicated gradients, w = (1.5e-158, 1), so p~ has an
    entry 1.5e-158 and ||G p~||^2 would be subnormal. Here d = (1 + c) g exactly: sum a = 1 + c."""
    H = np.ones((m, m))
    w = np.array([1.48620138e-158, 1.0] + [0.0] * (m - 2))
    assert coeffs(H, w, 0.5).sum() == pytest.approx(1.5, rel=1e-15)


# ----------------------------------------------------------------------------------------------
# precision, non-finite input, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_accuracy(solver: str) -> None:
    rng = np.random.default_rng(4)
    worst = 0.0
    for _ in range(30):
        m = int(rng.integers(2, 9))
        G = random_gradients(rng, m, 2 * m)
        H = G.T @ G
        w = rng.dirichlet(np.ones(m))
        ref = solve_dual_reference(H, w, 0.4)
        for clip in (True, False):
            a_ref = coefficients_from_dual(H, w, 0.4, ref.p, clip)
            H32, w32 = torch.tensor(H, dtype=torch.float32), torch.tensor(w, dtype=torch.float32)
            a32 = combination_coefficients(H32, w32, c=0.4, clip=clip, solver=solver)
            assert a32.dtype == torch.float32
            worst = max(worst, np.abs(a32.double().numpy() - a_ref).max() / np.abs(a_ref).max())
    assert worst <= 1e-4


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [(0, 1), (2, 2)])
def test_non_finite_gram_poisons_only_its_problem(solver: str, bad: float, where) -> None:
    rng = np.random.default_rng(6)
    Hs = np.stack([(lambda G: G.T @ G)(random_gradients(rng, 3, 4)) for _ in range(3)])
    clean = [coeffs(Hs[k], None, solver=solver) for k in range(3)]
    Hs[1][where] = bad
    Hs[1][where[::-1]] = bad
    sol = solve_cagrad(torch.tensor(Hs), solver=solver)
    a = sol.coefficients.numpy()
    assert not np.isfinite(a[1]).any() and not math.isfinite(float(sol.dual_value[1]))
    for k in (0, 2):
        np.testing.assert_allclose(a[k], clean[k], rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(("solver", "m"), [(solver, 3) for solver in SOLVERS] + [("auto", 2)])
def test_compiled_fullgraph_agrees_with_eager(solver: str, m: int) -> None:
    """``solve_with_settings`` (the optimizer's hot path) compiles with fullgraph=True: no graph break,
    no host sync. The suite's only compiles of the solver: the exact solver (the default for one
    problem) through inductor; Frank-Wolfe, whose unrolled iterations take inductor minutes on a
    small CPU, through ``aot_eager`` (the same graph capture, without code generation); ``m = 2``'s
    edge search (every solver's path there) through ``aot_eager``."""
    torch._dynamo.reset()
    settings = CAGradSettings(c=0.4, solver=solver)
    backend = "inductor" if solver == "exact" else "aot_eager"
    compiled = torch.compile(lambda H, w: solve_with_settings(H, w, settings).coefficients, fullgraph=True, backend=backend)
    rng = np.random.default_rng(8)
    B = 8
    Hs = np.stack([(lambda G: G.T @ G)(random_gradients(rng, m, int(rng.integers(1, 5)))) for _ in range(B)])
    W = rng.dirichlet(np.ones(m), size=B)
    try:
        got = compiled(torch.tensor(Hs), torch.tensor(W))
    finally:
        # inductor's CPU kernels of some torch versions (2.4, 2.5) are built with fast-math, whose loading
        # turns on flush-to-zero for the whole process: restore IEEE subnormals for the tests after this one
        torch.set_flush_denormal(False)
    torch.testing.assert_close(got, solve_with_settings(torch.tensor(Hs), torch.tensor(W), settings).coefficients, rtol=1e-10, atol=1e-12)
    for k in range(B):
        np.testing.assert_allclose(got[k].numpy(), reference_coefficients(Hs[k], W[k], 0.4), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# the mechanisms of the op-lean kernel: the non-finite mark, the tie closure, cached constants
# ----------------------------------------------------------------------------------------------
FIELDS = ("coefficients", "dual", "clipped_dual", "weights", "anchor_norm", "dual_value", "fw_gap")


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor: equal bits means equal values, the sign of zero included."""
    return x.contiguous().view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def test_non_finite_mark_is_zero_or_nan_and_subtracting_it_keeps_every_bit() -> None:
    """The poisoning subtracts a mark: +0.0 for a finite Gram, NaN for one with a +inf, -inf or NaN entry
    (reference: torch.isfinite). x - (+0.0) is x bit for bit, -0.0 included; x + 0.0 would not be."""
    from cagrad_clip._dual.kernel import non_finite_mark

    for dtype in (torch.float32, torch.float64):
        H = torch.randn(7, 3, 3, dtype=dtype)
        H[1, 0, 2] = math.inf
        H[2, 1, 1] = -math.inf
        H[3, 2, 0] = math.nan
        H[4] = torch.finfo(dtype).max  # huge but finite
        H[5, 0, 0] = -0.0
        mark = non_finite_mark(H)
        finite = torch.isfinite(H).flatten(-2).all(-1, keepdim=True)
        assert mark.shape == (7, 1)
        assert torch.equal(torch.isnan(mark), ~finite)
        assert torch.equal(_bits(mark[finite]), _bits(torch.zeros(int(finite.sum()), dtype=dtype)))  # +0.0, not -0.0
        tiny = torch.finfo(dtype).tiny
        special = torch.tensor([-0.0, 0.0, tiny / 4, -tiny / 4, 1.5, -math.inf, math.inf], dtype=dtype)
        assert torch.equal(_bits(special - mark[0]), _bits(special))
        assert not torch.equal(_bits(special + mark[0]), _bits(special))  # why it is subtracted
        assert torch.isnan(special - mark[1]).all()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poisoning_keeps_finite_problems_bit_for_bit(solver: str, dtype: torch.dtype) -> None:
    """A batch with +inf, -inf and NaN entries (on and off the diagonal): every output of those problems
    is NaN (the weights are not poisoned), and every output of the finite problems is bit-identical to
    the solve of the same batch with the bad problems replaced by finite ones."""
    rng = np.random.default_rng(21)
    m, B = 3, 8
    Hs = torch.tensor(np.stack([(lambda G: G.T @ G)(random_gradients(rng, m, 4)) for _ in range(B)]), dtype=dtype)
    W = torch.tensor(rng.dirichlet(np.ones(m), size=B), dtype=dtype)
    bad = {1: (0, 1, math.inf), 2: (2, 2, -math.inf), 4: (1, 0, math.nan), 6: (0, 0, math.inf)}
    poisoned = Hs.clone()
    for k, (i, j, value) in bad.items():
        poisoned[k, i, j] = value
    settings = CAGradSettings(c=0.6, solver=solver)
    got, clean = solve_with_settings(poisoned, W, settings), solve_with_settings(Hs, W, settings)
    ok = [k for k in range(B) if k not in bad]
    for field in FIELDS:
        x, y = getattr(got, field), getattr(clean, field)
        assert torch.equal(_bits(x[ok]), _bits(y[ok])), field
        if field == "weights":
            assert torch.equal(x, W)
        else:
            assert torch.isnan(x[list(bad)]).all(), field


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 9, 12, 17])
def test_tie_closure_joins_a_chain_of_ties(m: int) -> None:
    """Objective i ties with i + 1 only (H_i,i+1 = 1 - 4 eps: ||g_i - g_j||^2 = 8 eps <= 32 eps; farther pairs
    1 - 64 eps: 128 eps > 32 eps), so one group only forms through the transitive closure across m - 1
    edges: every p_i becomes w_i P / W. Fewer closure squarings than closure_steps(m) fail here."""
    from cagrad_clip._dual.kernel import _normalise, closure_steps, share_ties

    eps = torch.finfo(torch.float64).eps
    idx = torch.arange(m)
    gap = (idx[:, None] - idx[None, :]).abs()
    H = torch.full((m, m), 1.0 - 64 * eps, dtype=torch.float64)
    H[gap == 1] = 1.0 - 4 * eps
    H[gap == 0] = 1.0
    w = torch.tensor(np.random.default_rng(m).dirichlet(np.ones(m)))
    p = torch.zeros(m, dtype=torch.float64)
    p[0] = 1.0  # all the mass on one end of the chain
    shared = share_ties(_normalise(H, w, 0.4), p, 16.0 * eps)
    torch.testing.assert_close(shared, w / w.sum(), rtol=4 * eps, atol=0)
    assert 2 ** closure_steps(m) >= m - 1 and (m <= 2 or 2 ** (closure_steps(m) - 1) < m - 1)


def test_cached_numbers_equal_python_scalars_bit_for_bit() -> None:
    """The 0-d constants replace Python numbers in the formulas: same results bit for bit, per dtype."""
    from cagrad_clip._dual.objective import numbers

    for dtype in (torch.float32, torch.float64):
        x = torch.randn(1000, dtype=dtype) * torch.logspace(-30, 30, 1000, dtype=dtype)
        k = numbers(x)
        assert k.half.dtype == dtype and k.half.dim() == 0 and numbers(x) is k
        assert torch.equal(_bits(k.half * x), _bits(0.5 * x)) and torch.equal(_bits(k.minus_half * x), _bits(-0.5 * x))
        assert torch.equal(_bits(k.quarter * x), _bits(0.25 * x)) and torch.equal(_bits(k.four * x), _bits(4.0 * x))
        assert torch.equal(_bits(k.one - x), _bits(1.0 - x))
        assert torch.equal(x > k.zero, x > 0) and torch.equal(x < k.inf, x < math.inf)
        assert torch.equal(_bits(torch.where(x > 0, x, k.zero)), _bits(torch.where(x > 0, x, 0.0)))
    assert numbers(torch.zeros(1, dtype=torch.float32)) is not numbers(torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize(("m", "most"), [(2, 240), (3, 280), (8, 285)])
def test_one_solve_dispatches_few_ops(m: int, most: int) -> None:
    """The solve runs on tiny tensors, so its cost is its number of dispatched ops (a few us each on CPU,
    a kernel launch each on CUDA). Before the op-lean rewrite: 217 (m = 2) and 270-273 (m = 3..8);
    after: 160 and 173-177 (torch 2.13); with the Pareto-stationary rule (the least-squares candidates
    of the faces and their certificate): 186 and 224-228; with the clip's diagnostics (the other
    direction from the same dual, its distance to the chosen one): 224 and 262-266. The bounds leave
    room for other torch versions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    g = torch.randn(m, 100, generator=torch.Generator().manual_seed(m))
    G, w, settings = g @ g.T, torch.full((m,), 1.0 / m), CAGradSettings(c=0.4)
    solve_with_settings(G, w, settings)  # warm caches (face frames, constants)
    with Count():
        solve_with_settings(G, w, settings)
    assert 0 < Count.ops <= most
