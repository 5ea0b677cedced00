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

The same solves give every face's candidate for the non-negative least squares of
:mod:`.stationary` (the conflict-free direction nearest ``g0``): ``H_SS lambda_S = -b_S`` is solved by
``lambda_S = p1 - (b_S^T p0 / p0^T H p0) p0`` (``H p0 = -t0 1``, ``H p1 = -b - t1 1`` with
``t1 = -b^T p0``). Its optimum lies on a face of linearly independent gradients (Caratheodory), where
the candidate is exact and non-negative; the smallest ``b^T lambda`` (twice its objective there) wins.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .objective import numbers
from .registry import DualSolver, register

#: ``solver="exact"`` refuses larger problems: 2^m - 1 linear systems of size m + 1 per Gram.
EXACT_MAX_M = 12

__all__ = ["face_frame", "solve_by_supports", "solve_exact"]

# Linear systems per chunk of the support enumeration: bounds its memory to a few MiB per chunk.
_SYSTEMS_PER_CHUNK = 1 << 15
# A face of k gradients counts as independent where p0^T H p0 > TOL k eps (sum_i |p0_i| ||g_i||)^2 (the zero rule of .kernel).
_INDEPENDENT_TOL_EPS = 100.0


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best point of the faces of at most ``max_support`` vertices (all faces: the exact dual solution).

    ``Hn`` is ``(..., m, m)``, ``b`` ``(..., m)`` and ``s`` ``(...)``. Returns ``(p, F(p), p_off, lam)``:
    the best candidate, its value, the best candidate off the kink (``p^T H p > kink_tol``; where
    there is none, the first candidate), a start for Frank-Wolfe, and the best non-negative least
    squares candidate ``lam`` of those faces (0 where none decreases it; optimal on its face).
    Ties go to the first (smallest) face. The chunk loop runs over shapes only: no host sync.
    """
    p, value, lam, p_off = _solve(Hn, b, s, max_support, kink_tol)
    return p, value.reshape(Hn.shape[:-2]), p_off, lam


def solve_exact(Hn: Tensor, b: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The exact dual solution ``p`` ``(..., m)`` and the exact non-negative least squares ``lam`` (:mod:`.stationary`).

    :func:`solve_by_supports` over all faces, without the start point. ``s`` may be ``(...)`` or ``(..., 1)``.
    """
    p, _, lam = _solve(Hn, b, s, None, None)
    return p, lam


def _solve(Hn: Tensor, b: Tensor, s: Tensor, max_support: int | None, kink_tol: float | None) -> list[Tensor]:
    """``[p, F(p), lam]`` (``F(p)`` flat) and, unless ``kink_tol`` is ``None``, the best point off the kink."""
    m = Hn.shape[-1]
    batch = Hn.shape[:-2]
    frame = face_frame(m, m if max_support is None else max_support, Hn.device, Hn.dtype)
    H_flat, b_flat, s_flat = Hn.reshape(-1, m * m), b.reshape(-1, m), s.reshape(-1, 1, 1)
    n = H_flat.shape[0]
    chunk = max(1, _SYSTEMS_PER_CHUNK // frame.vertices.shape[0])
    if n <= chunk:  # one chunk (shapes only): no slices and no concatenation
        p, value, *p_off = _solve_chunk(frame, m, H_flat, b_flat, s_flat, kink_tol)
    else:
        parts = [
            _solve_chunk(frame, m, H_flat[start : start + chunk], b_flat[start : start + chunk], s_flat[start : start + chunk], kink_tol)
            for start in range(0, n, chunk)
        ]
        p, value, *p_off = (torch.cat(list(part), 0) for part in zip(*parts))
    return [p.reshape(*batch, m), value] + [x.reshape(*batch, m) for x in p_off]  # p_off = [lam] (+ [p_off])


def _face_candidates(frame: FaceFrame, H_chunk: Tensor, b_chunk: Tensor, s_chunk: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every face's KKT candidate ``(n, K, k)`` (clipped to the simplex), its ``F`` and ``p^T H p`` ``(n, K, 1)``;
    every face's least-squares candidate ``lam`` ``(n, K, k)`` and ``b^T lam`` ``(n, K, 1)``, twice its objective.

    ``s_chunk`` is ``(n, 1, 1)``. Invalid candidates (singular system, empty or non-finite) get ``F = inf``;
    least-squares candidates are valid on faces of independent gradients only (``p0^T H p0`` above
    rounding, relative to ``(sum_i |p0_i| ||g_i||)^2``) and where non-negative, else ``inf``.
    """
    n = H_chunk.shape[0]
    n_faces, k = frame.vertices.shape
    num = numbers(H_chunk)
    # every face's bordered matrix [[H_SS, 1], [1^T, 0]] (identity on padding slots) by one gather
    bordered = H_chunk.index_select(-1, frame.gram_index).view(n, n_faces, k + 1, k + 1) * frame.gram_mask + frame.constant
    linear = b_chunk.index_select(-1, frame.b_index).view(n, n_faces, k + 1) * frame.b_mask
    H_c = bordered[..., :k, :k]  # the faces' Grams (padding: identity, harmless: p is 0 there)
    b_c = linear[..., :k]
    x, info = torch.linalg.solve_ex(bordered, torch.stack([frame.unit.expand(n, n_faces, k + 1), -linear], -1))
    x = x[..., :k, :]
    p0 = x[..., 0] * frame.support
    p1 = x[..., 1] * frame.support
    H_faces = H_c.flatten(0, 1)  # (n K, k, k), a view
    c0 = _face_quad_form(H_faces, p0).clamp_min(0.0)
    room = s_chunk * s_chunk - _face_quad_form(H_faces, p1)
    ratio = c0 / room  # >= 0 where movable (masked-out quotients are discarded)
    # s^2 denormal: the ratio overflows (inf * 0 = NaN); inf / inf is NaN
    sigma = torch.where((room > num.zero) & (c0 > num.zero) & (ratio < num.inf), ratio, num.zero).sqrt()
    p = (p0 + sigma * p1).clamp_min(0.0)
    total = p.sum(-1, keepdim=True)  # >= 0, inf or NaN
    solved = info.unsqueeze(-1) == 0
    valid = solved & (total > num.zero) & (total < num.inf)
    p = p / torch.where(valid, total, num.one)
    quad = _face_quad_form(H_faces, p).clamp_min(0.0)
    value = (b_c * p).sum(-1, keepdim=True) + s_chunk * quad.sqrt()
    value = torch.where(valid & (value.abs() < num.inf), value, num.inf)
    # least squares on the face: H_SS lam = -b_S, from the same two solves (c0 = p0^T H p0 > 0: independent gradients)
    own_scale = (p0.abs() * H_c.diagonal(dim1=-2, dim2=-1).sqrt()).sum(-1, keepdim=True)  # a negative diagonal: NaN, rejected
    independent = solved & (c0 > (_INDEPENDENT_TOL_EPS * k * torch.finfo(p.dtype).eps) * own_scale.square())
    lam = p1 - ((b_c * p0).sum(-1, keepdim=True) / c0) * p0  # the masked-out candidates are discarded
    b_lam = (b_c * lam).sum(-1, keepdim=True)  # twice the objective b^T lam + lam^T H lam / 2 at the face's solution
    return p, value, quad, lam, torch.where(independent & (lam.amin(-1, keepdim=True) >= num.zero), b_lam, num.inf)


def _face_quad_form(H_faces: Tensor, x: Tensor) -> Tensor:
    """``x^T H x`` ``(n, K, 1)`` for the faces' Grams ``(n K, k, k)`` and ``x`` ``(n, K, k)``.

    :func:`~.objective.quad_form` by one ``bmm`` (``matmul`` of the 4-d tensors would add
    broadcasting views around the same ``bmm``).
    """
    Hx = torch.bmm(H_faces, x.view(-1, x.shape[-1], 1)).view(x.shape)
    return (x * Hx).sum(-1, keepdim=True)


def _solve_chunk(frame: FaceFrame, m: int, H_chunk: Tensor, b_chunk: Tensor, s_chunk: Tensor, kink_tol: float | None) -> list[Tensor]:
    """:func:`_solve` for one chunk of flattened problems ``(n, m m)``: ``[p, F(p), lam]`` (``(n, 1, m)``, ``(n, 1)``,
    ``(n, 1, m)``) [+ ``p_off``]."""
    p, value, quad, lam, b_lam = _face_candidates(frame, H_chunk, b_chunk, s_chunk)
    n, n_faces, k = p.shape
    best_value, faces = value.min(-2)
    # the least-squares candidates follow the dual's, 0 where none decreases the objective (then the best is >= 0)
    candidates = torch.cat([p, torch.where(b_lam < numbers(p).zero, lam, numbers(p).zero)], -2)
    faces = torch.cat([faces, b_lam.argmin(-2) + n_faces], -1)
    if kink_tol is not None:  # also the best face off the kink (a Python option, not a tensor value)
        faces = torch.cat([faces, torch.where(quad > kink_tol, value, torch.inf).argmin(-2)], -1)
    p_faces = candidates.gather(-2, faces.unsqueeze(-1).expand(n, faces.shape[-1], k))  # (n, F, k)
    where = frame.vertices[faces % n_faces]  # (n, F, k): vertices of the chosen faces
    chosen = torch.zeros(n, faces.shape[-1], m, device=p.device, dtype=p.dtype).scatter_add(-1, where, p_faces)
    if kink_tol is None:
        return [chosen[:, :1], best_value, chosen[:, 1:2]]
    return [chosen[:, 0], best_value, chosen[:, 1], chosen[:, 2]]


def _solve_registered(problem: Any, *, max_iter: int, kink_tol: float, zero_tol: float) -> tuple[Tensor, Tensor]:
    """The registry's signature (``max_iter`` and the tolerances are not needed: every support is solved)."""
    return solve_exact(problem.Hn, problem.b, problem.s)


register(
    DualSolver(
        "exact",
        "closed-form KKT solve on every support of the simplex (2^m - 1 of them), best one wins",
        _solve_registered,
        max_m=EXACT_MAX_M,
    )
)
