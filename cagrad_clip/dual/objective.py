"""The CAGrad dual objective ``F(p) = b^T p + s sqrt(p^T H p)`` and its gradient (RACO Algorithm 1; the CAGrad dual, arXiv 2110.14048).

Shared by every solver. All functions are batched over the leading dimensions and sync-free.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dual_gradient", "dual_value", "quad_form"]


def quad_form(H: Tensor, x: Tensor) -> Tensor:
    """``x^T H x`` for ``H`` of shape ``(..., m, m)`` and ``x`` of shape ``(..., m)``."""
    return (x * (H @ x.unsqueeze(-1)).squeeze(-1)).sum(-1)


def dual_value(H: Tensor, b: Tensor, s: Tensor, p: Tensor) -> Tensor:
    """``F(p) = b^T p + s sqrt(p^T H p)`` (the quadratic form clamped at 0 against rounding)."""
    return (b * p).sum(-1) + s * quad_form(H, p).clamp_min(0.0).sqrt()


def dual_gradient(H: Tensor, b: Tensor, s: Tensor, p: Tensor, kink_tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad F(p), H p, p^T H p)``, with ``grad F(p) = b + s H p / sqrt(p^T H p)``.

    Where ``p^T H p <= kink_tol`` (the kink ``G p = 0``, where ``F`` is not differentiable) the
    gradient is ``b``. ``s`` has shape ``(..., 1)``.
    """
    Hp = (H @ p.unsqueeze(-1)).squeeze(-1)
    quad = (p * Hp).sum(-1, keepdim=True)
    positive = quad > kink_tol
    inv_norm = torch.where(positive, quad, torch.ones_like(quad)).rsqrt()
    grad = b + torch.where(positive, s * inv_norm, torch.zeros_like(inv_norm)) * Hp
    return grad, Hp, quad.squeeze(-1)
