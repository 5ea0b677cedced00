"""Pareto-stationary inputs: the kink of the dual and the nearest conflict-free direction.

Where ``0`` lies in the convex hull of the gradients, ``F(p) = <g0, G p> + s ||G p||`` is 0 at every
kink ``G p = 0``, and the kink is the optimum whenever ``F >= 0`` elsewhere (always for ``c >= 1``,
since ``F(p) >= (s - ||g0||) ||G p||``). Two sync-free, batched active-set iterations serve that case:

* Wolfe's algorithm: the min-norm point of the convex hull (MGDA),
  ``argmin_{q in simplex} q^T H q``. A quadratic is smooth, so the min-norm point of a face's affine
  hull is one linear solve away, where Frank-Wolfe on the non-smooth ``F`` needs many steps to close
  in on a kink (issue 15, item 17). If ``0`` is in the hull, the min-norm point is a kink, ``F = 0``.
* Lawson-Hanson (and :func:`vertex_conflict_free` for one vertex): the non-negative least
  squares ``lambda = argmin_{lambda >= 0} ||g0 + G lambda||^2``, in Gram form
  ``b^T lambda + lambda^T H lambda / 2`` with ``b = H w``. ``d = g0 + G lambda`` is the projection of
  ``g0`` onto the cone ``{d : <g_i, d> >= 0 for all i}`` (Moreau): the conflict-free direction
  nearest the anchor. At a kink optimum it solves CAGrad's primal ``max_d min_i <g_i, d>`` s.t.
  ``||d - g0|| <= s`` (whose Lagrangian dual is ``F``: the CAGrad lemma, arXiv 2110.14048) whenever
  it lies in the trust region (item 18; :mod:`.kernel` checks that).

Both iterate the same way, stacked so that one set of ops runs both (:func:`stationary_step`): a
vertex joins the face where the iterate is optimal on its face, then the iterate moves towards the
minimiser on the face (a ridged linear solve, ``linalg.solve_ex`` without an error check) until it
arrives or an entry reaches zero, which then leaves the face. Every step keeps a fixed shape and
masks the problems it does not move: no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .objective import numbers

__all__ = ["StationaryProblems", "stationary_problems", "stationary_step", "vertex_conflict_free"]

#: Ridge (times eps, ``H`` normalised to a largest diagonal of 1) of the face systems: Gram faces can be singular.
RIDGE_EPS = 1e3


def _on_face(Hn: Tensor, face: Tensor, rhs: Tensor, ridge: Tensor, decouple: Tensor) -> Tensor:
    """``z`` with ``(H_FF + ridge I) z_F = rhs_F`` on the face ``F`` and ``z = 0`` off it; singular: 0.

    ``face`` and ``rhs`` are ``(..., 2, m)`` (the stacked problems), ``Hn`` ``(..., m, m)``.
    """
    on = face.to(Hn.dtype)
    # a huge diagonal off the face decouples those unknowns (their coupling to the face is ~eps^2): two
    # ops on the (..., 2, m, m) systems instead of masking rows and columns
    system = Hn.unsqueeze(-3) + torch.diag_embed(torch.addcmul(ridge, decouple, numbers(Hn).one - on))
    z = torch.linalg.solve_ex(system, rhs * on)[0]
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0) * on


def _towards(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``x + gamma (target - x)`` with the largest ``gamma <= 1`` that keeps ``x >= 0``; ``(x_next, arrived)``.

    On a convex quadratic with ``target`` its minimiser on the face, the objective decreases all
    the way to ``gamma = 1``. The entries that block the step (``gamma < 1``) are set to an exact
    zero and leave the face (a joining entry with a negative target, possible only at rounding
    level, blocks at ``gamma = 0``: no move).
    """
    k = numbers(x)
    d = target - x
    ratio = torch.where(d < k.zero, x / -d, k.inf)  # the masked-out quotients are discarded
    gamma = ratio.amin(-1, keepdim=True).clamp_max(1.0)
    x_next = torch.where(ratio <= gamma, k.zero, (x + gamma * d).clamp_min(0.0))
    return x_next, gamma >= k.one


class StationaryProblems(NamedTuple):
    """Both problems stacked along dimension -2 (min-norm point, least squares): one set of ops runs both."""

    rhs: Tensor  # (..., 2, m): 1 (the affine hull's min-norm point) and -b (the least squares)
    neg_tol: Tensor  # (..., 2, m): a vertex joins where its gradient is below this (0, and -add_tol)
    simplex: Tensor  # (2, 1): True for the min-norm point (its iterate stays on the simplex)
    ridge: Tensor  # 0-d: RIDGE_EPS eps, the diagonal added on the face
    decouple: Tensor  # 0-d: 1 / eps^2, the diagonal added off the face


def stationary_problems(b: Tensor, add_tol: Tensor) -> StationaryProblems:
    """The constants of :func:`stationary_step` for ``b = H w`` ``(..., m)`` and the least squares' ``add_tol``."""
    rhs = torch.stack([torch.ones_like(b), -b], -2)
    simplex = torch.tensor([[True], [False]], device=b.device)
    eps = torch.finfo(b.dtype).eps
    ridge, decouple = (torch.tensor(x, dtype=b.dtype, device=b.device) for x in (RIDGE_EPS * eps, 1.0 / (eps * eps)))
    return StationaryProblems(rhs, torch.stack([torch.zeros_like(b), -add_tol.expand_as(b)], -2), simplex, ridge, decouple)


def stationary_step(Hn: Tensor, x: Tensor, optimal: Tensor, problems: StationaryProblems, idx: Tensor) -> tuple[Tensor, Tensor]:
    """One active-set iteration of both problems, stacked in ``x`` ``(..., 2, m)`` (min-norm point, least squares).

    * min-norm point (Wolfe): the gradient is ``H q - (q^T H q) 1`` (negative where a vertex
      descends); the face's target is the min-norm point of its affine hull, ``z / 1^T z``
      with ``H_FF z_F = 1``;
    * least squares (Lawson-Hanson): the gradient is ``b + H lambda``; the target is the face's
      minimiser, ``lambda + z`` with ``H_FF z_F = -(b + H lambda)_F``.

    Where the iterate is optimal on its face (``optimal``, ``(..., 2, 1)``) the inactive vertex with
    the most negative gradient below ``problems.neg_tol`` joins; then the iterate moves towards the
    face's target (:func:`_towards`). Returns ``(x, optimal)``.
    """
    k = numbers(x)
    Hx = x @ Hn  # H x for both rows (H symmetric): one matmul
    gradient = Hx - torch.where(problems.simplex, (x * Hx).sum(-1, keepdim=True), k.one) * problems.rhs
    eligible = (x <= k.zero) & (gradient < problems.neg_tol)
    joined = optimal & eligible & (idx == torch.where(eligible, gradient, k.inf).argmin(-1, keepdim=True))
    # min-norm point: z itself (H_FF z = 1); least squares: a Newton step (H_FF z = -gradient), refined
    # every iteration, so the ridge does not bias the solution
    z = _on_face(Hn, (x > k.zero) | joined, torch.where(problems.simplex, problems.rhs, -gradient), problems.ridge, problems.decouple)
    total = z.sum(-1, keepdim=True)
    target = torch.where(problems.simplex, torch.where(total > k.zero, z / total, x), x + z)  # the masked-out quotients are discarded
    return _towards(x, target)


def vertex_conflict_free(b: Tensor, diag_n: Tensor) -> Tensor:
    """``lambda_j = max(0, -b_j) / H_jj``: every one-vertex solution of the least squares at once.

    The least squares of every kink of two objectives: a zero gradient (``b_j = 0``, the other
    vertex alone), or ``g_2 = -k g_1`` (``b_1 b_2 <= 0``, the vertex with ``b_j < 0`` alone). Elsewhere
    it is no solution, which the certificate of :mod:`.kernel` sees. ``diag_n`` is the diagonal of
    ``Hn`` clamped at 0.
    """
    k = numbers(b)
    return torch.where(diag_n > k.zero, (-b).clamp_min(0.0) / diag_n, k.zero)  # the masked-out quotients are discarded
