"""Column-blocked float32 (or better) reductions over the ``(m, D)`` per-objective gradient rows.

The rows are kept in the gradients' own dtype (bf16 stays bf16). Every reduction that matters
for the solve (the Gram ``H = G G^T``, RACO Algorithm 1) and the combination ``sum_i a_i g_i`` is
accumulated in float32 or better, one chunk of columns at a time, so the only extra memory is a
chunk (:func:`chunk_columns`: about 1/16 of a row, at most ``CHUNK`` columns) and never a float32
copy of the whole buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import GRAM_BLOCK, gram_of_block, reduction_dtype

__all__ = ["CHUNK", "blocked_gram", "chunk_columns", "gather_columns", "row_sumsq"]

#: Most columns per chunk: a chunk of low-precision rows is upcast to float32 (``m * CHUNK * 4`` bytes).
CHUNK = 1 << 20


def chunk_columns(m: int, n: int, upcast: bool) -> int:
    """Columns per chunk for ``m`` rows of ``n`` columns.

    A chunk's transient is ``(m + 1) * columns * 4`` bytes when half-precision rows are upcast to
    float32, else one chunk of the result. Either way it stays near 1/16 of a float32 row (so small models
    pay no fixed multi-MiB buffer), at most :data:`CHUNK` columns and at least one Gram block (2**16
    columns without an upcast), so large ones take few Python iterations.
    """
    columns = n // (16 * (m + 1)) if upcast else n // 16
    return max(GRAM_BLOCK if upcast else 1 << 16, min(CHUNK, columns // GRAM_BLOCK * GRAM_BLOCK))


def gather_columns(m: int, n: int, itemsize: int) -> int:
    """Columns per gathered ``(m, columns)`` float32 block of ``m`` objectives over ``n`` parameters
    of ``itemsize`` bytes each.

    The block (``m * columns * 4`` bytes) is about 1/16 of the parameters' bytes: ``n * itemsize /
    (64 m)`` columns, at least one Gram block and at most :data:`CHUNK` columns.
    """
    return max(GRAM_BLOCK, min(CHUNK, n * itemsize // (64 * m) // GRAM_BLOCK * GRAM_BLOCK))


def blocked_gram(rows: Tensor, columns: int) -> Tensor:
    """``H = G G^T`` over the first ``columns`` columns of ``rows`` (``(m, D)``), in float32 or better.

    float32/float64 rows are reduced in place (no copy); half-precision rows chunk by chunk, each
    chunk upcast once. The blocking keeps each float32 dot-product chain to ``GRAM_BLOCK`` terms.
    """
    acc = reduction_dtype(rows.dtype)
    if rows.dtype == acc:
        return gram_of_block(rows[:, :columns])
    m = rows.shape[0]
    step = chunk_columns(m, rows.shape[1], upcast=True)
    if columns == 0:
        return torch.zeros((m, m), dtype=acc, device=rows.device)
    parts = [gram_of_block(rows[:, start : min(columns, start + step)].to(acc)) for start in range(0, columns, step)]
    return torch.stack(parts).sum(0)  # the chunk sums added pairwise, not in one float32 chain


def row_sumsq(rows: Tensor, start: int) -> Tensor:
    """``sum_j rows[i, j]^2`` over the columns from ``start`` on, per row, in float32 or better."""
    acc = reduction_dtype(rows.dtype)
    tail = rows[:, start:]
    if tail.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=acc, device=rows.device)
    return torch.linalg.vector_norm(tail, dim=1, dtype=acc).square()
