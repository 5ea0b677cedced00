"""The solve proper, for checked inputs: normalise, anchor, solve the dual, clip, correct.

One step of RACO's Algorithm 1 (CAGrad-Clip, arXiv 2602.02495) on Gram matrices
``H[..., i, j] = <g_i, g_j>`` with normalised user weights ``w``:

* anchor ``g0 = sum_i w_i g_i``, ``b = H w`` and radius ``s = c ||g0||``;
* dual (the CAGrad dual of RACO Algorithm 1) ``p = argmin_{p in simplex} F(p) = b^T p + s sqrt(p^T H p)``;
* clip ``p~ = min(p, w)`` (``clip=True``) or ``p~ = p`` (``clip=False``, CAGrad);
* coefficients ``a = w + (s / ||G p~||) p~`` (``a = w`` if ``G p~`` is zero), direction ``sum_i a_i g_i``.

No ``.item()``, ``.cpu()``, ``.tolist()`` or Python branch on a tensor value: the kernel can be
captured by ``torch.compile(fullgraph=True)`` or a CUDA graph and runs on the input's device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .exact import solve_by_supports
from .frank_wolfe import solve_frank_wolfe
from .line_search import solve_edge
from .objective import dual_gradient, quad_form

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


class _Problem(NamedTuple):
    """One batch of duals, normalised by ``scale = max_i H_ii`` so that every number is O(1)."""

    H: Tensor  # (*B, m, m) symmetrised, not normalised (for the non-finite check)
    Hn: Tensor  # H / scale
    diag_n: Tensor  # diagonal of Hn, clamped at 0
    scale: Tensor  # (*B,) max_i H_ii (1 where that is 0)
    w: Tensor  # (*B, m)
    b: Tensor  # Hn w
    anchor_n: Tensor  # ||g0|| / sqrt(scale)
    s: Tensor  # c ||g0|| / sqrt(scale)


def _normalise(gram: Tensor, weights: Tensor, c: float) -> _Problem:
    """Broadcast, symmetrise and divide by the largest diagonal entry (``p`` is scale invariant)."""
    m = gram.shape[-1]
    batch = torch.broadcast_shapes(gram.shape[:-2], weights.shape[:-1])
    H = gram.expand(*batch, m, m)
    w = weights.expand(*batch, m)
    H = 0.5 * (H + H.mT)
    diag = H.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    scale = diag.amax(-1)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Hn = H / safe_scale[..., None, None]
    b = (Hn @ w.unsqueeze(-1)).squeeze(-1)
    anchor_n = (w * b).sum(-1).clamp_min(0.0).sqrt()
    return _Problem(H, Hn, diag / safe_scale[..., None], scale, w, b, anchor_n, c * anchor_n)


def _dual_solution(problem: _Problem, *, max_iter: int, solver: str, kink_tol: float) -> Tensor:
    """``p``: the exact edge search for ``m = 2``, else the chosen solver (``m = 1`` and ``max_iter = 0``: the FW start)."""
    Hn, b, s = problem.Hn, problem.b, problem.s
    m = Hn.shape[-1]
    if m == 2 and max_iter > 0:
        return solve_edge(Hn, b, s)
    if m > 2 and solver == "exact":
        return solve_by_supports(Hn, b, s)[0]
    return solve_frank_wolfe(Hn, b, s, problem.diag_n, max_iter, kink_tol)


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
    same = ((pair - 2.0 * problem.Hn <= tie_tol * pair) | eye).to(p.dtype)
    for _ in range(max(0, math.ceil(math.log2(m)))):  # transitive closure by squaring (shapes only)
        same = ((same @ same) > 0).to(p.dtype)
    group_mass = (same @ p.unsqueeze(-1)).squeeze(-1)
    group_weight = (same @ problem.w.unsqueeze(-1)).squeeze(-1)
    count = same.sum(-1)
    weighted = group_weight > 0
    shared = torch.where(
        weighted, problem.w * group_mass / torch.where(weighted, group_weight, torch.ones_like(group_weight)), group_mass / count
    )
    return torch.where(count > 1, shared, p)


def _coefficients(problem: _Problem, p_clipped: Tensor, zero_tol: float) -> Tensor:
    """``a = w + (s / ||G p~||) p~``, or ``a = w`` where ``||G p~||`` is zero at rounding level.

    The zero test is relative to the combination's own scale: ``||G p~||^2 <= zero_tol
    (sum_i p~_i ||g_i||)^2`` (the triangle-inequality bound on ``||G p~||``, which also bounds the
    rounding error of ``p~^T H p~``), not to the largest gradient, so a correction along a short
    gradient is kept.
    """
    # The correction s G p~ / ||G p~|| is invariant to the mass of p~: normalise it first, so a tiny
    # p~ (a weight of 1e-158) does not square into a subnormal ||G p~||^2 and lose digits.
    mass = p_clipped.sum(-1, keepdim=True)
    direction = p_clipped / torch.where(mass > 0, mass, torch.ones_like(mass))
    n2 = quad_form(problem.Hn, direction).clamp_min(0.0)
    own_scale = (direction * problem.diag_n.sqrt()).sum(-1).square()
    usable = (mass.squeeze(-1) > 0) & (n2 > zero_tol * own_scale)
    ratio = problem.s / torch.where(usable, n2, torch.ones_like(n2)).sqrt()
    ratio = torch.where(usable, ratio, torch.zeros_like(ratio))
    return problem.w + ratio.unsqueeze(-1) * direction


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
    p = share_ties(problem, _dual_solution(problem, max_iter=max_iter, solver=solver, kink_tol=kink_tol), tie_tol)

    grad, _, quad = dual_gradient(problem.Hn, problem.b, problem.s.unsqueeze(-1), p, kink_tol)
    fw_gap_n = ((grad * p).sum(-1) - grad.amin(-1)).clamp_min(0.0)
    dual_n = (problem.b * p).sum(-1) + problem.s * quad.clamp_min(0.0).sqrt()
    p_clipped = torch.minimum(p, problem.w) if clip else p
    coefficients = _coefficients(problem, p_clipped, zero_tol)
    if divisor != 1.0:
        coefficients = coefficients / divisor
    return _poisoned(problem, coefficients, p, p_clipped, dual_n, fw_gap_n)


def _poisoned(problem: _Problem, coefficients: Tensor, p: Tensor, p_clipped: Tensor, dual_n: Tensor, fw_gap_n: Tensor) -> CAGradSolution:
    """The solution in the input's units, with every output of a problem with a non-finite Gram set to NaN.

    A non-finite entry must not pass silently: the masks of the solve (``usable`` is False for NaN)
    would otherwise return ``a = w``.
    """
    finite = torch.isfinite(problem.H).flatten(-2).all(-1)
    nan = torch.full_like(problem.scale, torch.nan)

    def poison(x: Tensor) -> Tensor:
        if x.dim() > finite.dim():
            return torch.where(finite.unsqueeze(-1), x, nan.unsqueeze(-1))
        return torch.where(finite, x, nan)

    return CAGradSolution(
        coefficients=poison(coefficients),
        dual=poison(p),
        clipped_dual=poison(p_clipped),
        weights=problem.w,
        anchor_norm=poison(problem.anchor_n * problem.scale.sqrt()),
        dual_value=poison(dual_n * problem.scale),
        fw_gap=poison(fw_gap_n * problem.scale),
    )
