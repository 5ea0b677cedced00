"""The CAGrad dual objective ``F(p) = b^T p + s sqrt(p^T H p)`` and its gradient (RACO Algorithm 1; the CAGrad dual, arXiv 2110.14048).

Shared by every solver. All functions are batched over the leading dimensions and sync-free. The
solve runs on tiny tensors, so its cost is the number of ops it dispatches: per-problem scalars
keep a trailing dimension of 1 where they multiply vectors (no ``unsqueeze`` / ``squeeze`` pairs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Numbers", "dual_gradient", "dual_value", "matvec", "numbers", "quad_form"]


class Numbers(NamedTuple):
    """The numbers of the formulas as 0-d tensors of the solve's dtype and device (:func:`numbers`)."""

    zero: Tensor
    one: Tensor
    half: Tensor
    minus_half: Tensor
    quarter: Tensor
    four: Tensor
    inf: Tensor


_NUMBERS_CACHE: dict[tuple[torch.dtype, torch.device], Numbers] = {}


def numbers(like: Tensor) -> Numbers:
    """The constants of the formulas as 0-d tensors of ``like``'s dtype and device.

    An op between a float32 tensor and a Python number wraps the number in a float64 tensor and
    converts it first: a hidden copy that makes it about 2.5x as slow as the op between two
    tensors. A 0-d tensor of the tensor's dtype gives the same result (the number is rounded to
    that dtype either way) without the copy. Cached outside ``torch.compile`` (inside, they are
    traced as constants).
    """
    key = (like.dtype, like.device)
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else _NUMBERS_CACHE.get(key)
    if cached is not None:
        return cached
    values = (0.0, 1.0, 0.5, -0.5, 0.25, 4.0, math.inf)
    made = Numbers(*(torch.tensor(x, dtype=like.dtype, device=like.device) for x in values))
    if not compiling:
        _NUMBERS_CACHE[key] = made
    return made


def matvec(H: Tensor, x: Tensor) -> Tensor:
    """``H x`` for ``H`` of shape ``(..., m, m)`` and ``x`` of shape ``(..., m)``.

    One ``mv`` for a single problem (the optimizer's case), else a batched matmul of ``x`` as a
    column (the branch is on shapes only).
    """
    if H.dim() == 2 and x.dim() == 1:
        return H @ x
    return (H @ x.unsqueeze(-1)).squeeze(-1)


def quad_form(H: Tensor, x: Tensor, keepdim: bool = False) -> Tensor:
    """``x^T H x`` for ``H`` of shape ``(..., m, m)`` and ``x`` of shape ``(..., m)`` (``(..., 1)`` with ``keepdim``)."""
    return (x * matvec(H, x)).sum(-1, keepdim=keepdim)


def dual_value(H: Tensor, b: Tensor, s: Tensor, p: Tensor) -> Tensor:
    """``F(p) = b^T p + s sqrt(p^T H p)`` (the quadratic form clamped at 0 against rounding)."""
    return (b * p).sum(-1) + s * quad_form(H, p).clamp_min(0.0).sqrt()


def dual_gradient(H: Tensor, b: Tensor, s: Tensor, p: Tensor, kink_tol: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad F(p), H p, p^T H p)``, with ``grad F(p) = b + s H p / sqrt(p^T H p)``.

    Where ``p^T H p <= kink_tol`` (the kink ``G p = 0``, where ``F`` is not differentiable) the
    gradient is ``b``. ``s`` and the returned ``p^T H p`` have shape ``(..., 1)``.
    """
    Hp = matvec(H, p)
    quad = (p * Hp).sum(-1, keepdim=True)
    step = torch.where(quad > kink_tol, s * quad.rsqrt(), numbers(quad).zero)  # rsqrt of the masked-out entries is discarded
    return b + step * Hp, Hp, quad
