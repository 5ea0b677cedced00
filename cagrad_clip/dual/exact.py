"""Exact dual solution by support enumeration: the KKT system of every face of the simplex in closed form.

On a face ``S`` whose gradients are affinely independent, a minimiser of the CAGrad dual
``F(p) = b^T p + s sqrt(p^T H p)`` with ``n = ||G p|| > 0`` in the face's relative interior
satisfies ``b_S + (s / n) H_SS p_S = lambda 1``, ``1^T p_S = 1``. With the bordered matrix
``M = [[H_SS, 1], [1^T, 0]]`` its solution is ``p = p0 + sigma p1`` where ``M [p0; .] = [0; 1]``
(the min-norm point of the face's affine hull), ``M [p1; .] = [-b_S; 0]`` and ``sigma = n / s``;
since ``p0^T H p1 = 0``, ``n^2 = p^T H p`` gives ``sigma^2 = p0^T H p0 / (s^2 - p1^T H p1)``.
Every candidate is clipped to the simplex, so each is feasible and ``F`` at it is at least
``min F``; the minimiser (or an equally good point) is a candidate, so the smallest ``F`` over
all ``2^m - 1`` candidates is ``min F``. Kinks (``G p = 0`` inside a face) need no care: there
``F = 0`` exactly and that face's ``p0`` (``sigma = 0``) represents them.
"""

from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

import torch
from torch import Tensor

from .objective import quad_form

__all__ = ["face_frame", "solve_by_supports"]

# Linear systems per chunk of the support enumeration: bounds its memory to a few MiB per chunk.
_SYSTEMS_PER_CHUNK = 1 << 15


class FaceFrame(NamedTuple):
    """Constant tensors that lay out every face's bordered KKT system (one per ``m, k, device, dtype``)."""

    vertices: Tensor  # (K, k) long: vertices of each face, padded with 0
    support: Tensor  # (K, k) float: 1 on the face's slots, 0 on padding
    gram_index: Tensor  # (K (k+1)^2,) long: where each bordered entry comes from in the flat (m m) Gram
    gram_mask: Tensor  # (K, k+1, k+1): 1 where that entry is a Gram entry of the face
    constant: Tensor  # (K, k+1, k+1): the border (ones), identity on padding slots, 0 corner
    b_index: Tensor  # (K (k+1),) long: where each right-hand-side entry comes from in b
    b_mask: Tensor  # (K, k+1): 1 on the face's slots
    unit: Tensor  # (k+1,): the right-hand side [0, ..., 0, 1]


_FRAME_CACHE: dict[tuple[int, int, str, torch.dtype], FaceFrame] = {}


def face_frame(m: int, max_support: int, device: torch.device, dtype: torch.dtype) -> FaceFrame:
    """The faces of the simplex with at most ``max_support`` of ``m`` vertices in ``k = min(m, max_support)`` slots.

    Also the constants that build all their bordered systems by one gather. Cached outside
    ``torch.compile`` (inside, they are traced as constants).
    """
    k = min(m, max_support)
    key = (m, k, str(device), dtype)
    cached = None if torch.compiler.is_compiling() else _FRAME_CACHE.get(key)
    if cached is not None:
        return cached
    frame = _build_frame(m, k, device, dtype)
    if not torch.compiler.is_compiling():
        _FRAME_CACHE[key] = frame
    return frame


def _build_frame(m: int, k: int, device: torch.device, dtype: torch.dtype) -> FaceFrame:
    faces = [face for size in range(1, k + 1) for face in combinations(range(m), size)]
    index = torch.tensor([list(face) + [0] * (k - len(face)) for face in faces], device=device)
    mask = torch.tensor([[True] * len(face) + [False] * (k - len(face)) for face in faces], device=device)
    support = mask.to(dtype)
    zero_col = torch.zeros(index.shape[0], 1, device=device, dtype=index.dtype)
    index_ext = torch.cat([index, zero_col], -1)  # the border slot reads vertex 0, masked out
    support_ext = torch.cat([support, zero_col.to(dtype)], -1)
    gram_index = (index_ext.unsqueeze(-1) * m + index_ext.unsqueeze(-2)).reshape(-1)
    gram_mask = support_ext.unsqueeze(-1) * support_ext.unsqueeze(-2)
    constant = torch.diag_embed(torch.cat([1.0 - support, torch.zeros_like(support[:, :1])], -1))
    constant[:, :k, k] = support
    constant[:, k, :k] = support
    unit = (torch.arange(k + 1, device=device) == k).to(dtype)
    return FaceFrame(index, support, gram_index, gram_mask, constant, index_ext.reshape(-1), support_ext, unit)


def solve_by_supports(
    Hn: Tensor, b: Tensor, s: Tensor, max_support: int | None = None, kink_tol: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Best point of the faces of at most ``max_support`` vertices (all faces: the exact dual solution).

    ``Hn`` is ``(..., m, m)``, ``b`` ``(..., m)`` and ``s`` ``(...)``. Returns ``(p, F(p), p_off)``:
    the best candidate, its value, and the best candidate off the kink (``p^T H p > kink_tol``;
    where there is none, the first candidate), a start for Frank-Wolfe. Ties go to the first
    (smallest) face. The chunk loop runs over shapes only: no host sync.
    """
    m = Hn.shape[-1]
    batch = Hn.shape[:-2]
    frame = face_frame(m, m if max_support is None else max_support, Hn.device, Hn.dtype)
    H_flat, b_flat, s_flat = Hn.reshape(-1, m * m), b.reshape(-1, m), s.reshape(-1)
    chunk = max(1, _SYSTEMS_PER_CHUNK // frame.vertices.shape[0])
    parts = [
        _solve_chunk(frame, m, H_flat[start : start + chunk], b_flat[start : start + chunk], s_flat[start : start + chunk], kink_tol)
        for start in range(0, H_flat.shape[0], chunk)
    ]
    p, value, p_off = (torch.cat(list(part), 0) for part in zip(*parts))
    return p.reshape(*batch, m), value.reshape(batch), p_off.reshape(*batch, m)


def _face_candidates(frame: FaceFrame, H_chunk: Tensor, b_chunk: Tensor, s_chunk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every face's KKT candidate ``(n, K, k)`` (clipped to the simplex), its ``F`` and ``p^T H p`` ``(n, K)``.

    Invalid candidates (singular system, empty or non-finite) get ``F = inf``.
    """
    n = H_chunk.shape[0]
    n_faces, k = frame.vertices.shape
    # every face's bordered matrix [[H_SS, 1], [1^T, 0]] (identity on padding slots) by one gather
    bordered = H_chunk.index_select(-1, frame.gram_index).view(n, n_faces, k + 1, k + 1) * frame.gram_mask + frame.constant
    linear = b_chunk.index_select(-1, frame.b_index).view(n, n_faces, k + 1) * frame.b_mask
    s_c = s_chunk.unsqueeze(-1)  # (n, 1)
    H_c = bordered[..., :k, :k]  # the faces' Grams (padding: identity, harmless: p is 0 there)
    b_c = linear[..., :k]
    x, info = torch.linalg.solve_ex(bordered, torch.stack([frame.unit.expand(n, n_faces, k + 1), -linear], -1))
    p0 = x[..., :k, 0] * frame.support
    p1 = x[..., :k, 1] * frame.support
    c0 = quad_form(H_c, p0).clamp_min(0.0)
    room = s_c * s_c - quad_form(H_c, p1)
    movable = (room > 0) & (c0 > 0)
    sigma = torch.where(movable, c0 / torch.where(movable, room, torch.ones_like(room)), torch.zeros_like(room)).sqrt()
    sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))  # s^2 denormal: inf * 0 = NaN
    p = (p0 + sigma.unsqueeze(-1) * p1).clamp_min(0.0)
    total = p.sum(-1)
    valid = (info == 0) & (total > 0) & torch.isfinite(total)
    p = p / torch.where(valid, total, torch.ones_like(total)).unsqueeze(-1)
    quad = quad_form(H_c, p).clamp_min(0.0)
    value = (b_c * p).sum(-1) + s_c * quad.sqrt()
    value = torch.where(valid & torch.isfinite(value), value, torch.full_like(value, torch.inf))
    return p, value, quad


def _solve_chunk(
    frame: FaceFrame, m: int, H_chunk: Tensor, b_chunk: Tensor, s_chunk: Tensor, kink_tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`solve_by_supports` for one chunk of flattened problems ``(n, m m)``."""
    p, value, quad = _face_candidates(frame, H_chunk, b_chunk, s_chunk)
    n, _, k = p.shape
    best_value, best = value.min(-1, keepdim=True)
    best_off = torch.where(quad > kink_tol, value, torch.full_like(value, torch.inf)).argmin(-1, keepdim=True)
    chosen = []
    for face in (best, best_off):
        p_face = p.gather(-2, face.unsqueeze(-1).expand(n, 1, k)).squeeze(-2)  # (n, k)
        where = frame.vertices[face.squeeze(-1)]  # (n, k): vertices of the chosen face
        chosen.append(torch.zeros(n, m, device=p.device, dtype=p.dtype).scatter_add(-1, where, p_face))
    return chosen[0], best_value.squeeze(-1), chosen[1]
