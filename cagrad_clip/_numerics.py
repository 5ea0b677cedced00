"""The numerics every reduction shares: the dtype it runs in, autocast off, the blocked dot products.

Every reduction that decides a direction (the Gram ``H = G G^T`` of RACO Algorithm 1, the squared
norms of the non-shared parameters, the dual solve, the combination ``sum_i a_i g_i``) runs in
:func:`reduction_dtype` of its inputs, outside the caller's autocast (:func:`no_autocast`), and
sums its dot products in ``GRAM_BLOCK``-long float chains whose partial sums are added pairwise
(:func:`gram_of_block`, :func:`blocked_dot`), so a bf16 model's Gram is as accurate as a float32
one's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["GRAM_BLOCK", "blocked_dot", "gram_of_block", "no_autocast", "reduction_dtype"]

#: Columns per block of a blocked dot product: each block's products are one float chain of this
#: length, kept in cache; the block sums are added pairwise.
GRAM_BLOCK = 1 << 14


def reduction_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32 (half precision is reduced in float32).

    ``torch.promote_types(float32, *dtypes)`` for floating-point dtypes, decided on the host without a
    dispatched op (the hot path counts its ops).
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Our reductions never run under the caller's autocast (a bf16 Gram would lose the correction)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def gram_of_block(rows: Tensor) -> Tensor:
    """Gram of the ``(m, n)`` ``rows`` (already in the reduction dtype): ``GRAM_BLOCK``-column tiles through one ``bmm``."""
    m, n = rows.shape
    blocks = n // GRAM_BLOCK
    if blocks < 2:
        return rows @ rows.T
    main = blocks * GRAM_BLOCK
    tiled = (rows if main == n else rows[:, :main]).view(m, blocks, GRAM_BLOCK).transpose(0, 1)
    gram = torch.bmm(tiled, tiled.transpose(1, 2)).sum(0)
    if main == n:  # whole tiles (the gathered chunks are): no remainder ops
        return gram
    rest = rows[:, main:]
    return gram.addmm_(rest, rest.T)


def blocked_dot(x: Tensor, y: Tensor) -> Tensor:
    """``<x, y>`` of two contiguous 1-D tensors, blocked as :func:`gram_of_block` blocks (no stacked copy)."""
    blocks = x.numel() // GRAM_BLOCK
    if blocks < 2:
        return torch.dot(x, y)
    main = blocks * GRAM_BLOCK
    partial = torch.bmm(x[:main].view(blocks, 1, GRAM_BLOCK), y[:main].view(blocks, GRAM_BLOCK, 1)).sum()
    return partial + torch.dot(x[main:], y[main:])
