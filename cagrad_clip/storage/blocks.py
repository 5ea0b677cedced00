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

__all__ = ["CHUNK", "GRAM_BLOCK", "accumulation_dtype", "blocked_gram", "chunk_columns", "gather_columns", "gram_of_block", "row_sumsq"]

#: Columns per block of the blocked Gram: each block's products stay in cache and are summed
#: in a short float32 chain; the block sums are added by ``sum`` over the block dimension.
GRAM_BLOCK = 1 << 14
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


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision rows, the rows' own dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def gram_of_block(rows: Tensor) -> Tensor:
    """Gram of ``rows`` (already in the accumulation dtype): ``GRAM_BLOCK``-column tiles through one ``bmm``."""
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


def blocked_gram(rows: Tensor, columns: int) -> Tensor:
    """``H = G G^T`` over the first ``columns`` columns of ``rows`` (``(m, D)``), in float32 or better.

    float32/float64 rows are reduced in place (no copy); half-precision rows chunk by chunk, each
    chunk upcast once. The blocking keeps each float32 dot-product chain to ``GRAM_BLOCK`` terms.
    """
    acc = accumulation_dtype(rows.dtype)
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
    acc = accumulation_dtype(rows.dtype)
    tail = rows[:, start:]
    if tail.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=acc, device=rows.device)
    return torch.linalg.vector_norm(tail, dim=1, dtype=acc).square()
