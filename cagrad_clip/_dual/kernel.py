"""The solve proper, for checked inputs: normalise, anchor, solve the dual, clip, correct.

One step of RACO's Algorithm 1 (CAGrad-Clip, arXiv 2602.02495) on Gram matrices
``H[..., i, j] = <g_i, g_j>`` with normalised user weights ``w``:

* anchor ``g0 = sum_i w_i g_i``, ``b = H w`` and radius ``s = c ||g0||``;
* dual (the CAGrad dual of RACO Algorithm 1) ``p = argmin_{p in simplex} F(p) = b^T p + s sqrt(p^T H p)``;
* clip ``p~ = min(p, w)`` (``clip=True``) or ``p~ = p`` (``clip=False``, CAGrad);
* coefficients ``a = w + (s / ||G p~||) p~`` (``a = w`` if ``G p~`` is zero), direction ``sum_i a_i g_i``;
* except at a Pareto-stationary optimum (``min F = 0`` and a conflict-free direction within the
  trust region): there ``a = w + lambda``, the primal solution nearest ``g0`` (:mod:`.stationary`).

No ``.item()``, ``.cpu()``, ``.tolist()`` or Python branch on a tensor value: the kernel can be
captured by ``torch.compile(fullgraph=True)`` or a CUDA graph and runs on the input's device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import exact, frank_wolfe  # noqa: F401  (each registers its solver)
from .line_search import solve_edge
from .objective import dual_gradient, matvec, numbers, quad_form
from .registry import SOLVERS
from .stationary import vertex_conflict_free

__all__ = ["CAGradSolution", "share_ties", "solve_kernel"]


#: Gradients with ``||g_i - g_j||^2 <= TIE_TOL_EPS eps (H_ii + H_jj)`` count as identical (the tie rule).
TIE_TOL_EPS = 16.0


class CAGradSolution(NamedTuple):
    """Everything one solve produces; all tensors stay on the input's device.

    Shapes use ``B`` for the broadcast batch shape of ``gram`` and ``weights``.
    """

    coefficients: Tensor
    """``a`` of shape ``(*B, m)``: the direction is ``sum_i a_i g_i``."""
    dual: Tensor
    """``p`` of shape ``(*B, m)``: the dual solution on the simplex."""
    clipped_dual: Tensor
    """``p~ = min(p, w)`` with ``clip=True``, else ``p``; shape ``(*B, m)``."""
    weights: Tensor
    """The normalised user weights ``w``, broadcast to ``(*B, m)``."""
    anchor_norm: Tensor
    """``||g0|| = sqrt(w^T H w)``, shape ``B``."""
    dual_value: Tensor
    """``F(p) = b^T p + c ||g0|| sqrt(p^T H p)``, shape ``B``."""
    fw_gap: Tensor
    """Frank-Wolfe gap at ``p``: an upper bound on ``F(p) - min F``, shape ``B``."""
    clip_change: Tensor
    """How much RACO's clip changes the direction, ``||d(p~) - d(p)|| / ||g0||`` with ``p~ = min(p, w)``,
    shape ``B`` (0 when ``g0 = 0``): from the same dual solve, whether or not ``clip`` is on (with
    ``clip=False`` it is what the clip *would* change)."""
    clip_active: Tensor
    """Bool, shape ``B``: ``clip`` is on and it changed the direction beyond rounding (``clip_change``
    above the solver's stationarity tolerance, ``sqrt(100 m eps) (1 + c)``)."""


class _Problem(NamedTuple):
    """One batch of duals, normalised by ``scale = max_i H_ii`` so that every number is O(1).

    Per-problem scalars keep a trailing dimension of 1, so they broadcast against ``(*B, m)``
    without reshapes (the solve's cost is its number of ops).
    """

    H: Tensor  # (*B, m, m) symmetrised, not normalised (for the non-finite check)
    Hn: Tensor  # H / scale
    diag_n: Tensor  # diagonal of Hn, clamped at 0
    norms_n: Tensor  # sqrt(diag_n): ||g_i|| / sqrt(scale)
    scale: Tensor  # (*B, 1) max_i H_ii clamped at 0 (the division uses 1 where it is 0)
    w: Tensor  # (*B, m)
    b: Tensor  # Hn w
    anchor_n: Tensor  # (*B, 1) ||g0|| / sqrt(scale)
    s: Tensor  # (*B, 1) c ||g0|| / sqrt(scale)


def _normalise(gram: Tensor, weights: Tensor, c: float) -> _Problem:
    """Broadcast, symmetrise and divide by the largest diagonal entry (``p`` is scale invariant)."""
    m = gram.shape[-1]
    batch = torch.broadcast_shapes(gram.shape[:-2], weights.shape[:-1])
    H = gram if gram.shape[:-2] == batch else gram.expand(*batch, m, m)  # shapes only
    w = weights if weights.shape[:-1] == batch else weights.expand(*batch, m)
    num = numbers(gram)
    H = num.half * (H + H.mT)
    diag = H.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    scale = diag.amax(-1, keepdim=True)
    safe_scale = torch.where(scale > num.zero, scale, num.one)
    Hn = H / safe_scale.unsqueeze(-1)
    b = matvec(Hn, w)
    anchor_n = (w * b).sum(-1, keepdim=True).clamp_min(0.0).sqrt()
    diag_n = diag / safe_scale
    return _Problem(H, Hn, diag_n, diag_n.sqrt(), scale, w, b, anchor_n, c * anchor_n)


def _dual_solution(problem: _Problem, *, max_iter: int, solver: str, kink_tol: float, zero_tol: float) -> tuple[Tensor, Tensor]:
    """``(p, lam)``: the dual solution and the least squares of :mod:`.stationary`.

    ``m = 2``: the exact edge search and the best one-vertex least squares (exact for two
    objectives); else the chosen solver (``m = 1`` and ``max_iter = 0``: the FW start).
    """
    Hn, b, s = problem.Hn, problem.b, problem.s
    m = Hn.shape[-1]
    if m == 2 and max_iter > 0:
        return solve_edge(Hn, b, s, problem.diag_n), vertex_conflict_free(b, problem.diag_n)
    # m = 1 and max_iter = 0: Frank-Wolfe's start (the best point of the small faces) for any solver
    chosen = SOLVERS[solver] if m > 2 else SOLVERS["frank_wolfe"]
    return chosen.solve(problem, max_iter=max_iter, kink_tol=kink_tol, zero_tol=zero_tol)


def closure_steps(m: int) -> int:
    """Squarings that close the tie relation of ``m`` objectives transitively: a path within a group has at most ``m - 1`` edges."""
    k = 0  # the smallest k with 2^k >= m - 1 (a loop, not int.bit_length, which Dynamo traces only from torch 2.5)
    while (1 << k) < m - 1:
        k += 1
    return k


def share_ties(problem: _Problem, p: Tensor, tie_tol: float) -> Tensor:
    """The tie rule: objectives with identical gradients share their group's dual mass in proportion to ``w``.

    ``F`` depends on ``p`` only through ``G p``, so the mass of ``p`` within a group ``K`` of equal
    gradients (``||g_i - g_j||^2 <= tie_tol (H_ii + H_jj)``, closed transitively) is arbitrary; only
    the group's total ``P_K`` is determined. Splitting it as ``p_i = w_i P_K / W_K`` (``W_K`` the
    group's weight; evenly where ``W_K = 0``) is symmetric, so permuting the objectives permutes
    ``p``, and gives the clipped direction of the problem with the group merged into one objective
    of weight ``W_K``. Singleton groups keep ``p`` bit for bit.
    """
    m = p.shape[-1]
    diag = problem.diag_n
    pair = diag.unsqueeze(-1) + diag.unsqueeze(-2)
    eye = torch.eye(m, dtype=torch.bool, device=p.device)
    same = ((pair - (problem.Hn + problem.Hn) <= tie_tol * pair) | eye).to(p.dtype)  # Hn + Hn: 2 Hn exactly, without a scalar op
    for _ in range(closure_steps(m)):  # transitive closure by squaring (shapes only)
        same = (same @ same).clamp_max(1.0)  # path counts (exact small integers) back to 0 / 1
    group_mass = matvec(same, p)
    group_weight = matvec(same, problem.w)
    count = same.sum(-1)
    num = numbers(p)
    weighted = group_weight > num.zero
    shared = torch.where(weighted, problem.w * group_mass / group_weight, group_mass / count)  # masked-out quotients are discarded
    return torch.where(count > num.one, shared, p)


def _coefficients(problem: _Problem, p_clipped: Tensor, zero_tol: float) -> Tensor:
    """``a = w + (s / ||G p~||) p~``, or ``a = w`` where ``||G p~||`` is zero at rounding level.

    The zero test is relative to the combination's own scale: ``||G p~||^2 <= zero_tol
    (sum_i p~_i ||g_i||)^2`` (the triangle-inequality bound on ``||G p~||``, which also bounds the
    rounding error of ``p~^T H p~``), not to the largest gradient, so a correction along a short
    gradient is kept.
    """
    # The correction s G p~ / ||G p~|| is invariant to the mass of p~: normalise it first, so a tiny
    # p~ (a weight of 1e-158) does not square into a subnormal ||G p~||^2 and lose digits.
    num = numbers(p_clipped)
    mass = p_clipped.sum(-1, keepdim=True)
    positive = mass > num.zero
    direction = p_clipped / torch.where(positive, mass, num.one)
    n2 = quad_form(problem.Hn, direction, keepdim=True).clamp_min(0.0)
    own_scale = (direction * problem.norms_n).sum(-1, keepdim=True).square()
    usable = positive & (n2 > zero_tol * own_scale)
    ratio = torch.where(usable, problem.s / n2.sqrt(), num.zero)  # the masked-out quotients are discarded
    return problem.w + ratio * direction


def _at_stationary(problem: _Problem, lam: Tensor, p: Tensor, dual_n: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """``(stationary, w + lambda)``: where the optimum is Pareto-stationary, ``a = w + lambda`` replaces
    Algorithm 1's coefficients (``stationary`` is the ``(*B, 1)`` mask).

    ``d = g0 + G lambda`` is the conflict-free direction nearest ``g0`` (:mod:`.stationary`), pulled
    into the trust region (``||G lambda|| <= s``). It is used where it certifies itself, each
    quantity against its own scale (so short gradients count as much as long ones):

    * ``d`` is conflict-free: ``<g_i, d> >= -tol ||g_i|| ||g0||`` for every ``i``;
    * ``F(p) <= tol ||g0|| sum_i p_i ||g_i||``: the dual optimum is (at most) 0.

    ``min_i <g_i, d>`` is a lower bound on ``min F`` and ``F(p)`` an upper bound (weak duality), so
    then ``min F = 0`` up to ``tol`` and ``d`` solves CAGrad's primal ``max_d min_i <g_i, d>`` s.t.
    ``||d - g0|| <= s``, however ``lambda`` was found. There Algorithm 1's correction
    ``s G p / ||G p||`` is undefined (``G p = 0``) or one optimal direction among many; the clip caps
    the shares of that correction, so with or without it the direction is ``d``.
    """
    num = numbers(lam)
    # a zero gradient's lambda is free (it moves nothing): the least squares can leave any value there
    lam = torch.where(problem.diag_n > num.zero, lam, num.zero)
    H_lam = matvec(problem.Hn, lam)
    # s / ||G lambda|| capped at 1 (NaN only for s = ||G lambda|| = 0, rejected below: a = w then anyway)
    shrink = torch.minimum(num.one, problem.s * (lam * H_lam).sum(-1, keepdim=True).clamp_min(0.0).rsqrt())
    slack = (tol * problem.anchor_n) * problem.norms_n
    conflict_free = (problem.b + shrink * H_lam + slack).amin(-1, keepdim=True) >= num.zero
    stationary = conflict_free & (dual_n <= (slack * p).sum(-1, keepdim=True))
    return stationary, problem.w + shrink * lam


def solve_kernel(*, gram: Tensor, weights: Tensor, c: float, clip: bool, divisor: float, max_iter: int, solver: str) -> CAGradSolution:
    """Solve checked problems: ``gram`` ``(..., m, m)`` and normalised ``weights`` ``(..., m)`` of one float dtype.

    ``solver`` is ``"exact"`` or ``"frank_wolfe"`` (ignored for ``m <= 2``), ``max_iter`` the
    Frank-Wolfe budget, ``divisor`` the rescale factor. A non-finite Gram entry poisons (NaN) every
    output of its problem only.
    """
    problem = _normalise(gram, weights, c)
    m = gram.shape[-1]
    eps = torch.finfo(gram.dtype).eps
    zero_tol = 100.0 * m * eps  # ||G p~||^2 below this, relative to its own scale, is noise: no correction
    tie_tol = TIE_TOL_EPS * eps  # ||g_i - g_j||^2 below this relative to ||g_i||^2 + ||g_j||^2: identical gradients
    # F is smooth wherever G p != 0: only exact-ish zeros (p^T H p <= eps^2, normalised) are the kink.
    # A looser threshold (100 m eps) costs dual accuracy in float32; 0 lets Frank-Wolfe start on a
    # rounding-level kink point and stop there (docs/algorithm.md).
    kink_tol = eps * eps
    p, lam = _dual_solution(problem, max_iter=max_iter, solver=solver, kink_tol=kink_tol, zero_tol=zero_tol)
    p = share_ties(problem, p, tie_tol)

    grad, _, quad = dual_gradient(problem.Hn, problem.b, problem.s, p, kink_tol)
    fw_gap_n = ((grad * p).sum(-1, keepdim=True) - grad.amin(-1, keepdim=True)).clamp_min(0.0)
    dual_n = (problem.b * p).sum(-1, keepdim=True) + problem.s * quad.clamp_min(0.0).sqrt()
    # tol: F within the zero rule's distance of a kink, sqrt(zero_tol) (s + ||g0||) (sum_i p_i ||g_i||)
    tol = math.sqrt(zero_tol) * (1.0 + c)
    stationary, at_stationary = _at_stationary(problem, lam, p, dual_n, tol)
    # Both directions from the one solve: the chosen one, and the other for the clip's diagnostics (RACO's
    # clip is p~ = min(p, w); CAGrad with a weighted anchor uses p). Where the optimum is stationary both
    # are w + lambda, so the clip changes nothing there.
    clipped = torch.minimum(p, problem.w)
    with_clip, without = _coefficients(problem, clipped, zero_tol), _coefficients(problem, p, zero_tol)
    coefficients, p_clipped = torch.where(stationary, at_stationary, with_clip if clip else without), clipped if clip else p
    num = numbers(p)
    has_anchor = problem.anchor_n > num.zero
    diff = torch.where(stationary, num.zero, with_clip - without)
    change = quad_form(problem.Hn, diff, keepdim=True).clamp_min(0.0).sqrt() / torch.where(has_anchor, problem.anchor_n, num.one)
    change = torch.where(has_anchor, change, num.zero)  # the masked-out quotients are discarded
    if divisor != 1.0:
        coefficients = coefficients / divisor
        change = change / divisor
    active = (change > tol) if clip else torch.zeros_like(change, dtype=torch.bool)
    return _poisoned(problem, coefficients, p, p_clipped, dual_n, fw_gap_n, change, active)


def non_finite_mark(H: Tensor) -> Tensor:
    """``(*B, 1)``: ``+0.0``, or NaN where ``H`` ``(*B, m, m)`` has a non-finite entry.

    ``x - x`` is ``+0.0`` for finite ``x`` and NaN for ``+-inf`` and NaN, and ``amax`` propagates NaN.
    """
    return (H - H).amax(-1).amax(-1, keepdim=True)


def _poisoned(
    problem: _Problem,
    coefficients: Tensor,
    p: Tensor,
    p_clipped: Tensor,
    dual_n: Tensor,
    fw_gap_n: Tensor,
    clip_change: Tensor,
    clip_active: Tensor,
) -> CAGradSolution:
    """The solution in the input's units, with every output of a problem with a non-finite Gram set to NaN.

    A non-finite entry must not pass silently: the masks of the solve (``usable`` is False for NaN)
    would otherwise return ``a = w``. :func:`non_finite_mark` is subtracted from every output
    (directly, or through the scale): ``x - (+0.0)`` is ``x`` bit for bit, ``-0.0`` included
    (``x + 0.0`` would turn ``-0.0`` into ``+0.0``), and ``x - NaN`` is NaN.
    """
    mark = non_finite_mark(problem.H)
    scale = problem.scale - mark
    return CAGradSolution(
        coefficients=coefficients - mark,
        dual=p - mark,
        clipped_dual=p_clipped - mark,
        weights=problem.w,
        anchor_norm=(problem.anchor_n * scale.sqrt()).squeeze(-1),
        dual_value=(dual_n * scale).squeeze(-1),
        fw_gap=(fw_gap_n * scale).squeeze(-1),
        clip_change=(clip_change - mark).squeeze(-1),
        clip_active=(clip_active & (mark == 0)).squeeze(-1),
    )
