"""Exact line search for the CAGrad dual along a segment, and the exact ``m = 2`` solve built on it.

Along ``p + gamma d`` the dual ``F(p) = b^T p + s sqrt(p^T H p)`` is, up to a constant,
``h(gamma) = beta1 gamma + s sqrt(q2 gamma^2 + q1 gamma + q0)`` with ``beta1 = b^T d``,
``q0 = p^T H p``, ``q1 = 2 d^T H p`` and ``q2 = d^T H d``: the one-dimensional problem that RACO
solves in closed form for two objectives.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["exact_line_search", "solve_edge"]


def exact_line_search(beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, gamma_max: Tensor) -> Tensor:
    """Minimiser on ``[0, gamma_max]`` of ``h(g) = beta1 g + s sqrt(q2 g^2 + q1 g + q0)``, elementwise.

    All arguments are tensors of one broadcastable shape; ``q2 g^2 + q1 g + q0 >= 0`` on the
    segment (a squared norm) and ``s >= 0``. ``h`` is convex, and its minimiser is an endpoint,
    a real root of ``(beta1^2 q2 - s^2 q2^2) g^2 + (beta1^2 q1 - s^2 q1 q2) g + beta1^2 q0 - s^2 q1^2 / 4``
    (``h'(g) = 0`` squared) or the kink ``g = -q1 / (2 q2)`` where the segment passes through
    ``G p = 0`` and ``h`` is not differentiable. Squaring adds spurious roots, so ``h`` is
    evaluated at every candidate and the smallest wins (ties go to ``g = 0``: no move).
    Sync-free: no host synchronisation and no Python branch on tensor values.
    """
    candidates = _candidates(beta1, s, q0, q1, q2, gamma_max)
    values = _change(beta1, s, q0, q1, q2, candidates)
    return candidates.gather(-1, values.argmin(-1, keepdim=True)).squeeze(-1)


def _candidates(beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, gamma_max: Tensor) -> Tensor:
    """``(..., 5)``: both endpoints, both roots of the squared stationarity condition, the kink; in range."""
    beta_sq, s_sq = beta1 * beta1, s * s
    qa = beta_sq * q2 - s_sq * q2 * q2
    qb = beta_sq * q1 - s_sq * q1 * q2
    qc = beta_sq * q0 - 0.25 * s_sq * q1 * q1
    root = (qb * qb - 4.0 * qa * qc).clamp_min(0.0).sqrt()
    half = -0.5 * (qb + torch.where(qb >= 0, root, -root))  # cancellation-free quadratic formula
    kink = -0.5 * q1 / q2
    candidates = torch.stack([torch.zeros_like(gamma_max), gamma_max, half / qa, qc / half, kink], dim=-1)
    candidates = torch.nan_to_num(candidates, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.minimum(candidates.clamp_min(0.0), gamma_max.unsqueeze(-1))


def _change(beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, g: Tensor) -> Tensor:
    """``h(g) - h(0) = beta1 g + s (Q(g) - q0) / (sqrt(Q(g)) + sqrt(q0))`` with ``Q(g) - q0 = g (q1 + q2 g)``.

    Free of the cancellation in ``sqrt(Q(g)) - sqrt(q0)``, so improvements far below ``eps |F|``
    (the last digits of ``p`` near the optimum) are still seen instead of tying with ``g = 0``.
    """
    increase = g * (q1.unsqueeze(-1) + g * q2.unsqueeze(-1))
    quad = (q0.unsqueeze(-1) + increase).clamp_min(0.0)
    denominator = quad.sqrt() + q0.clamp_min(0.0).sqrt().unsqueeze(-1)
    positive = denominator > 0
    safe = torch.where(positive, denominator, torch.ones_like(denominator))
    root_change = torch.where(positive, increase / safe, torch.zeros_like(denominator))
    return beta1.unsqueeze(-1) * g + s.unsqueeze(-1) * root_change


def solve_edge(Hn: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """The exact dual solution for ``m = 2``: one line search over the whole edge from ``e_1`` to ``e_2``.

    It compares both vertices, every stationary point and the kink, so zero or opposite
    gradients need no special care. Returns ``p`` of shape ``(..., 2)``.
    """
    h11, h22, h12 = Hn[..., 0, 0].clamp_min(0.0), Hn[..., 1, 1].clamp_min(0.0), Hn[..., 0, 1]
    gamma = exact_line_search(
        b[..., 1] - b[..., 0],
        s,
        h11,
        2.0 * (h12 - h11),
        (h11 + h22 - 2.0 * h12).clamp_min(0.0),
        torch.ones_like(s),
    )
    return torch.stack([1.0 - gamma, gamma], dim=-1)
