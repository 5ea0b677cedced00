"""Exact hypervolume in 2-D and 3-D (minimisation; points dominating a reference point)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _prepare(points: ArrayLike, ref: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points, dtype=float).reshape(-1, np.asarray(ref).size)
    r = np.asarray(ref, dtype=float)
    p = p[np.all(p < r, axis=1)]  # only points strictly better than ref in every objective count
    return p, r


def hypervolume_2d(points: ArrayLike, ref: ArrayLike) -> float:
    """Area dominated by ``points`` (n, 2) and bounded by ``ref`` (minimisation). Sort and sweep."""
    p, r = _prepare(points, ref)
    if len(p) == 0:
        return 0.0
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    area, best_y = 0.0, r[1]
    for x, y in p:
        if y < best_y:
            area += (r[0] - x) * (best_y - y)
            best_y = y
    return float(area)


def hypervolume_3d(points: ArrayLike, ref: ArrayLike) -> float:
    """Volume dominated by ``points`` (n, 3) and bounded by ``ref``: 2-D sweeps over z-slabs."""
    p, r = _prepare(points, ref)
    if len(p) == 0:
        return 0.0
    p = p[np.argsort(p[:, 2], kind="stable")]
    zs = np.append(p[:, 2], r[2])
    vol = 0.0
    for k in range(len(p)):
        height = zs[k + 1] - zs[k]
        if height > 0:
            vol += hypervolume_2d(p[: k + 1, :2], r[:2]) * height
    return float(vol)


def hypervolume(points: ArrayLike, ref: ArrayLike) -> float:
    """Exact hypervolume for 2 or 3 objectives (minimisation)."""
    dim = np.asarray(ref).size
    if dim == 2:
        return hypervolume_2d(points, ref)
    if dim == 3:
        return hypervolume_3d(points, ref)
    raise ValueError(f"exact hypervolume is implemented for 2 or 3 objectives, got {dim}")
