"""Exact line search for the CAGrad dual along a segment, and the exact ``m = 2`` solve built on it.

Along ``p + gamma d`` the dual ``F(p) = b^T p + s sqrt(p^T H p)`` is, up to a constant,
``h(gamma) = beta1 gamma + s sqrt(q2 gamma^2 + q1 gamma + q0)`` with ``beta1 = b^T d``,
``q0 = p^T H p``, ``q1 = 2 d^T H p`` and ``q2 = d^T H d``: the one-dimensional problem that RACO
solves in closed form for two objectives.

Internally every per-problem scalar keeps a trailing dimension of 1, so the five candidates of a
segment are one ``(..., 5)`` tensor that the scalars broadcast against without reshapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .objective import Numbers, numbers

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
    beta1, s, q0, q1, q2, gamma_max = (x.unsqueeze(-1) for x in (beta1, s, q0, q1, q2, gamma_max))
    return _line_search(beta1, s, q0, q1, q2, gamma_max).squeeze(-1)


def _line_search(
    beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, gamma_max: Tensor, quad: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """:func:`exact_line_search` for arguments of shape ``(..., 1)``; returns ``(..., 1)``.

    ``quad`` (optional) evaluates ``Q(g) = ||G (p + g d)||^2`` more accurately than ``q0 + g (q1 + q2 g)``
    (see :func:`solve_edge`); the candidates are the same either way.
    """
    k = numbers(s)
    candidates = _candidates(beta1, s, q0, q1, q2, gamma_max, k)
    values = _change(beta1, s, q0, q1, q2, candidates, k, None if quad is None else quad(candidates))
    return candidates.gather(-1, values.argmin(-1, keepdim=True))


def _candidates(beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, gamma_max: Tensor, k: Numbers) -> Tensor:
    """``(..., 5)``: both endpoints, both roots of the squared stationarity condition, the kink; in range."""
    beta_sq, s_sq = beta1 * beta1, s * s
    qa = beta_sq * q2 - s_sq * q2 * q2
    qb = beta_sq * q1 - s_sq * q1 * q2
    qc = beta_sq * q0 - k.quarter * s_sq * q1 * q1
    root = (qb * qb - k.four * qa * qc).clamp_min(0.0).sqrt()
    half = k.minus_half * (qb + torch.where(qb >= k.zero, root, -root))  # cancellation-free quadratic formula
    kink = k.minus_half * q1 / q2
    candidates = torch.cat([torch.zeros_like(gamma_max), gamma_max, half / qa, qc / half, kink], dim=-1)
    candidates = torch.nan_to_num(candidates, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.minimum(candidates.clamp_min(0.0), gamma_max)


def _change(beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, g: Tensor, k: Numbers, quad_at_g: Tensor | None = None) -> Tensor:
    """``h(g) - h(0) = beta1 g + s (Q(g) - q0) / (sqrt(Q(g)) + sqrt(q0))`` with ``Q(g) - q0 = g (q1 + q2 g)``.

    Free of the cancellation in ``sqrt(Q(g)) - sqrt(q0)``, so improvements far below ``eps |F|``
    (the last digits of ``p`` near the optimum) are still seen instead of tying with ``g = 0``.
    ``g`` is ``(..., n)``, the other arguments ``(..., 1)``; ``quad_at_g`` (``(..., n)``, optional) is
    ``Q(g)`` computed by the caller, else ``q0 + (Q(g) - q0)``.
    """
    increase = g * (q1 + g * q2)
    quad = (q0 + increase if quad_at_g is None else quad_at_g).clamp_min(0.0)
    denominator = quad.sqrt() + q0.clamp_min(0.0).sqrt()
    root_change = torch.where(denominator > k.zero, increase / denominator, k.zero)  # the masked-out quotients are discarded
    return beta1 * g + s * root_change


def solve_edge(Hn: Tensor, b: Tensor, s: Tensor, diag: Tensor) -> Tensor:
    """The exact dual solution for ``m = 2``: one line search over the whole edge from ``e_1`` to ``e_2``.

    It compares both vertices, every stationary point and the kink, so zero or opposite
    gradients need no special care. ``s`` has shape ``(..., 1)`` and ``diag`` is the diagonal of
    ``Hn`` clamped at 0. Returns ``p`` of shape ``(..., 2)``.

    ``||G p||^2`` at ``p = (1 - g, g)`` is evaluated as ``(1 - g)^2 H_11 + 2 g (1 - g) H_12 + g^2 H_22``,
    whose rounding is relative to the point's own scale ``((1 - g) ||g_1|| + g ||g_2||)^2``, not as
    ``H_11 + g (q1 + q2 g)``, whose rounding is relative to ``H_11``. Near the kink of two opposite
    gradients (``G p = 0``) the second form's ``eps H_11`` of noise is a ``sqrt(eps)`` error in
    ``||G p||``: points ``1e-8`` off the kink then look better than the kink itself, and a
    Pareto-stationary problem gets the sign of that noise as its direction.
    """
    h11, h22, h12 = diag[..., :1], diag[..., 1:], Hn[..., 0, 1:]
    d12 = h12 - h11
    one = numbers(s).one

    def quad(g: Tensor) -> Tensor:
        rest = one - g
        return rest * rest * h11 + (g + g) * rest * h12 + g * g * h22

    # x + x is 2 x exactly: a tensor op instead of a (slower) op with a Python scalar
    gamma = _line_search(b[..., 1:] - b[..., :1], s, h11, d12 + d12, (h11 + h22 - (h12 + h12)).clamp_min(0.0), torch.ones_like(s), quad)
    return torch.cat([one - gamma, gamma], dim=-1)
