"""Pairwise Frank-Wolfe with a Newton step on the active face, for the CAGrad dual on the simplex.

A fixed budget of iterations, each a pairwise Frank-Wolfe step (it finds the optimal face) and an
equality-constrained Newton step on the active face (it converges on it), both with the exact line
search of :mod:`.line_search`. Converged problems are frozen by masks: no host sync.

Kinks: ``F = 0`` wherever ``G p = 0`` (a zero gradient, exact opposites, ...) and ``F`` is not
differentiable there. From such a point every single vertex and every pairwise direction can look
uphill while a mix of several is downhill, so Frank-Wolfe would stall there. Descent never reaches
``F = 0`` from ``F < 0``, so it starts at the best point *off* the kink of the small faces (solved
exactly, :mod:`.exact`), never aims at a zero vertex, and at the end keeps the best small-face
candidate (a kink point with ``F = 0`` included) if that beats the iterate.

Kink optima: where the optimum *is* a kink (Pareto-stationary gradients with ``F >= 0`` elsewhere,
e.g. any ``c >= 1``), Frank-Wolfe closes in on it one vertex per iteration and the budget can run
out far from it (``1e-4 max_i H_ii`` at ``m = 16``). Every kink is then optimal, and so is the
min-norm point of the convex hull: two Wolfe iterations per iteration (:mod:`.stationary`) track it
as a third candidate, which reaches it within the default budget (Wolfe needs up to ~1.5 m). The
non-negative least squares of :mod:`.stationary` (the direction at such optima) runs alongside,
stacked with it, from the best small-face solution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .exact import solve_by_supports
from .line_search import exact_line_search
from .objective import dual_gradient, dual_value
from .registry import DualSolver, register
from .stationary import stationary_problems, stationary_step

__all__ = ["solve_frank_wolfe", "start_support_size"]


def start_support_size(m: int) -> int:
    """Largest faces solved exactly to start Frank-Wolfe: a few hundred candidates at most."""
    return 3 if m <= 12 else 2 if m <= 32 else 1


def solve_frank_wolfe(
    Hn: Tensor, b: Tensor, s: Tensor, diag_n: Tensor, max_iter: int, kink_tol: float, add_tol: Tensor
) -> tuple[Tensor, Tensor]:
    """``max_iter`` pairwise FW + face-Newton iterations from the best small-face point off the kink.

    ``Hn`` ``(..., m, m)`` is normalised (largest diagonal 1), ``diag_n`` its diagonal clamped at
    0, ``b = Hn w`` and ``s`` the normalised radius. ``p^T H p <= kink_tol`` counts as the kink.
    Each iteration also takes two steps of Wolfe's algorithm towards the min-norm point (a kink
    candidate) and of Lawson-Hanson's for the least squares (:mod:`.stationary`; ``add_tol``
    ``(..., m)``: gradients above ``-add_tol`` do not enter). Returns ``p`` ``(..., m)`` on the
    simplex, the best of the iterate, the min-norm candidate and the small-face start, and the
    least-squares ``lam``.
    """
    m = Hn.shape[-1]
    p_small, value_small, p, lam = solve_by_supports(Hn, b, s, start_support_size(m), kink_tol)
    zero_vertex = diag_n <= kink_tol
    zero_vertex = zero_vertex & ~zero_vertex.all(-1, keepdim=True)  # all zero: nothing to exclude
    idx = torch.arange(m, device=Hn.device)
    # Wolfe's start, the shortest gradient, and the best small-face least squares: both optimal on their faces
    x = torch.stack([(idx == diag_n.argmin(-1, keepdim=True)).to(Hn.dtype), lam], -2)
    optimal = torch.ones_like(x[..., :1], dtype=torch.bool)
    problems = stationary_problems(b, add_tol)
    for _ in range(max_iter):  # a loop over a Python int: no sync
        p = pairwise_fw_step(Hn, b, s, p, kink_tol, idx, zero_vertex)
        p = face_newton_step(Hn, b, s, p, kink_tol)
        for _ in range(2):  # Wolfe's iterations need up to ~1.5 m (measured): two per iteration
            x, optimal = stationary_step(Hn, x, optimal, problems, idx)
    q, lam = x.unbind(-2)
    value, value_q = dual_value(Hn, b, s, p), dual_value(Hn, b, s, q)
    p = torch.where((value_q < value).unsqueeze(-1), q, p)
    return torch.where((value_small < torch.minimum(value, value_q)).unsqueeze(-1), p_small, p), lam


def move(
    Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, Hp: Tensor, q0: Tensor, d: Tensor, gamma_max: Tensor, frozen: Tensor, blocking: Tensor
) -> Tensor:
    """``p + gamma d`` with the exact line-search ``gamma`` on ``[0, gamma_max]``; frozen problems stay.

    ``blocking`` (one-hot) marks the vertex whose mass reaches zero at ``gamma_max``: a step of
    full length sets it to an exact zero, so the face shrinks instead of keeping rounding dust.
    """
    Hd = (Hn @ d.unsqueeze(-1)).squeeze(-1)
    gamma = exact_line_search((b * d).sum(-1), s, q0, 2.0 * (d * Hp).sum(-1), (d * Hd).sum(-1).clamp_min(0.0), gamma_max)
    gamma = torch.where(frozen, torch.zeros_like(gamma), gamma)
    p_next = (p + gamma.unsqueeze(-1) * d).clamp_min(0.0)
    dropped = blocking & (gamma >= gamma_max).unsqueeze(-1)
    return torch.where(dropped, torch.zeros_like(p_next), p_next)


def pairwise_fw_step(Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, kink_tol: float, idx: Tensor, excluded: Tensor) -> Tensor:
    """One pairwise Frank-Wolfe step: move mass from the worst active vertex to the best vertex.

    Moving the whole mass of the away vertex (a drop step) leaves an exact zero, so the active
    set stays clean. Problems whose FW gap is at rounding level do not move. ``excluded``
    vertices (zero gradients) are never chosen as the best vertex.
    """
    grad, Hp, q0 = dual_gradient(Hn, b, s.unsqueeze(-1), p, kink_tol)
    q0 = q0.squeeze(-1)
    best = torch.where(excluded, torch.full_like(grad, torch.inf), grad).argmin(-1, keepdim=True)
    away = torch.where(p > 0, grad, torch.full_like(grad, -torch.inf)).argmax(-1, keepdim=True)
    gap = (grad * p).sum(-1) - grad.gather(-1, best).squeeze(-1)
    to_best, from_away = (idx == best).to(p.dtype), (idx == away).to(p.dtype)
    gamma_max = p.gather(-1, away).squeeze(-1)
    frozen = gap <= 4.0 * torch.finfo(p.dtype).eps
    return move(Hn, b, s, p, Hp, q0, to_best - from_away, gamma_max, frozen, idx == away)


def _face_newton_direction(Hn: Tensor, s: Tensor, p: Tensor, grad: Tensor, Hp: Tensor, q0: Tensor, kink_tol: float) -> Tensor:
    """The Newton direction on the face of the active vertices (zero off it, summing to zero on it).

    The Hessian restricted to the face is ``(s / n) (H - H p p^T H / n^2)`` with ``n^2 = p^T H p``,
    plus a small ridge for null directions; the equality-constrained system is solved with
    ``linalg.solve_ex`` (no error check, hence no sync).
    """
    m = p.shape[-1]
    act = (p > 0).to(p.dtype)
    inv_n = torch.where(q0 > kink_tol, q0, torch.ones_like(q0)).rsqrt()
    inv_n = torch.where(q0 > kink_tol, inv_n, torch.zeros_like(inv_n))
    curvature = (s * inv_n)[..., None, None] * (Hn - Hp.unsqueeze(-1) * Hp.unsqueeze(-2) * (inv_n * inv_n)[..., None, None])
    ridge = 1e3 * torch.finfo(p.dtype).eps * (1.0 + curvature.diagonal(dim1=-2, dim2=-1).abs().amax(-1))
    Q = curvature * (act.unsqueeze(-1) * act.unsqueeze(-2)) + torch.diag_embed(torch.where(p > 0, ridge.unsqueeze(-1), torch.ones_like(p)))
    kkt = torch.cat([torch.cat([Q, act.unsqueeze(-1)], -1), torch.cat([act, torch.zeros_like(act[..., :1])], -1).unsqueeze(-2)], -2)
    rhs = torch.cat([-grad * act, torch.zeros_like(act[..., :1])], -1)
    d = torch.linalg.solve_ex(kkt, rhs.unsqueeze(-1))[0].squeeze(-1)[..., :m] * act
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
    return d - act * (d.sum(-1, keepdim=True) / act.sum(-1, keepdim=True))  # stay on the face exactly


def face_newton_step(Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, kink_tol: float) -> Tensor:
    """A Newton step on the face of the simplex spanned by the active vertices, then the exact line search.

    Pairwise FW finds the face; on it the dual is smooth and Newton converges fast where FW
    zig-zags (ill-conditioned, rank-deficient Grams).
    """
    grad, Hp, q0 = dual_gradient(Hn, b, s.unsqueeze(-1), p, kink_tol)
    q0 = q0.squeeze(-1)
    d = _face_newton_direction(Hn, s, p, grad, Hp, q0, kink_tol)
    shrinking = d < 0
    ratio = torch.where(shrinking, p / torch.where(shrinking, -d, torch.ones_like(d)), torch.full_like(d, torch.inf))
    gamma_max, blocking = ratio.min(-1, keepdim=True)
    gamma_max = gamma_max.squeeze(-1).clamp_max(1.0 / torch.finfo(p.dtype).eps)
    frozen = ((grad * p).sum(-1) - grad.amin(-1)) <= 4.0 * torch.finfo(p.dtype).eps
    idx = torch.arange(p.shape[-1], device=p.device)
    return move(Hn, b, s, p, Hp, q0, d, gamma_max, frozen, idx == blocking)


def _solve_registered(problem: Any, *, max_iter: int, kink_tol: float, zero_tol: float) -> tuple[Tensor, Tensor]:
    """The registry's signature; gradients above ``-add_tol`` count as 0 (``|<g_i, d>| <= ||g_i|| ||g0||``)."""
    add_tol = zero_tol * problem.norms_n * problem.anchor_n
    return solve_frank_wolfe(problem.Hn, problem.b, problem.s.squeeze(-1), problem.diag_n, max_iter, kink_tol, add_tol)


register(DualSolver("frank_wolfe", "pairwise Frank-Wolfe + Newton on the active face, max_iter iterations", _solve_registered))
