"""Batched, sync-free solver of the (clipped) CAGrad dual.

Everything here works on Gram matrices ``H[..., i, j] = <g_i, g_j>`` of shape ``(..., m, m)``;
the gradients themselves never enter. One step of RACO's Algorithm 1 (CAGrad-Clip,
arXiv 2602.02495) reads, with user weights ``w`` on the simplex:

* anchor ``g0 = sum_i w_i g_i``, ``b = H w`` and radius ``s = c ||g0||``;
* dual (Eq. CAGrad-dual) ``p = argmin_{p in simplex} F(p) = b^T p + s sqrt(p^T H p)``;
* clip ``p~ = min(p, w)`` (``clip=True``) or ``p~ = p`` (``clip=False``, CAGrad);
* direction ``d = g0 + s G p~ / ||G p~||``, i.e. coefficients ``a = w + (s / ||G p~||) p~``.

Two solvers (``solver=``): ``"exact"`` solves the KKT system of every face of the simplex in
closed form (one batched ``linalg.solve_ex``) and keeps the best candidate; ``"frank_wolfe"`` runs
a fixed number of pairwise Frank-Wolfe + face-Newton iterations with an exact closed-form line
search, from the best point of the small faces, with converged problems frozen by masks.
``"auto"`` picks by shape (:func:`auto_solver`); ``m = 2`` is one exact line search. There is no ``.item()``,
``.cpu()``, ``.tolist()`` or Python branch on a tensor value, so the solve can be captured by
``torch.compile(fullgraph=True)`` or a CUDA graph and runs wholly on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RESCALE_OPTIONS",
    "SOLVER_OPTIONS",
    "CAGradSolution",
    "auto_solver",
    "combination_coefficients",
    "default_max_iter",
    "solve_cagrad",
]

#: Accepted values of ``rescale`` and the factor the direction is divided by.
RESCALE_OPTIONS: dict[str | None, str] = {
    None: "no rescaling (RACO paper, TorchJD)",
    "1+c": "divide by 1 + c (official CAGrad toy script)",
    "1+c^2": "divide by 1 + c^2 (official CAGrad code for NYUv2/Cityscapes, LibMTL)",
}

#: Accepted values of ``solver``.
SOLVER_OPTIONS: dict[str, str] = {
    "auto": "'exact' for small m and batches (auto_solver), else 'frank_wolfe'",
    "exact": "closed-form KKT solve on every support of the simplex (2^m - 1 of them), best one wins",
    "frank_wolfe": "pairwise Frank-Wolfe + Newton on the active face, max_iter iterations",
}
#: ``solver="auto"`` enumerates supports up to this many objectives (see ``python -m benchmarks.speed``).
AUTO_EXACT_MAX_M = 12
# ... and while the batch has at most this many faces (batch x (2^m - 1)) in all: measured
# crossovers with Frank-Wolfe on a 2-core CPU (exact wins at batch 1024 for m <= 5, at batch 1
# up to m = 12, where the two tie). Above m = 6 the budget admits batch 1 up to m = 12.
_AUTO_EXACT_MAX_FACES_SMALL_M = 1 << 15
_AUTO_EXACT_MAX_FACES_LARGE_M = 1 << 12
#: ``solver="exact"`` refuses larger problems: 2^m - 1 linear systems of size m + 1 per Gram.
EXACT_MAX_M = 12
# Linear systems per chunk of the support enumeration: bounds its memory to a few MiB per chunk.
_SYSTEMS_PER_CHUNK = 1 << 15


class CAGradSolution(NamedTuple):
    """Everything one solve produces; all tensors stay on the input's device.

    Shapes use ``B`` for the broadcast batch shape of ``gram`` and ``weights``.
    """

    coefficients: Tensor
    """``a`` of shape ``(*B, m)``: the direction is ``sum_i a_i g_i``."""
    dual: Tensor
    """``p`` of shape ``(*B, m)``: the dual solution on the simplex."""
    clipped_dual: Tensor
    """``p~ = min(p, w)`` with ``clip=True``, else ``p``; shape ``(*B, m)``."""
    weights: Tensor
    """The normalised user weights ``w``, broadcast to ``(*B, m)``."""
    anchor_norm: Tensor
    """``||g0|| = sqrt(w^T H w)``, shape ``B``."""
    dual_value: Tensor
    """``F(p) = b^T p + c ||g0|| sqrt(p^T H p)``, shape ``B``."""
    fw_gap: Tensor
    """Frank-Wolfe gap at ``p``: an upper bound on ``F(p) - min F``, shape ``B``."""


def default_max_iter(m: int) -> int:
    """Frank-Wolfe iteration budget used when ``max_iter`` is ``None``: ``m`` (0 for ``m = 1``, 1 for ``m = 2``).

    ``m = 1`` needs no iteration and ``m = 2`` is solved exactly by one exact line search.
    Each further iteration is a pairwise Frank-Wolfe step (finds the face) and a Newton step on
    the face (converges on it), from the best point of the small faces. ``m`` iterations reach
    float64 rounding level on every instance of ``python -m benchmarks.solver_accuracy`` table (b)
    (m = 3, 8, 16, 32; at m = 16, 12 iterations do not) and on the m = 64 problems of
    ``python -m benchmarks.speed`` (error 0 in float64).
    """
    if m <= 1:
        return 0
    if m == 2:
        return 1
    return m


def _check_gram(gram: Tensor) -> None:
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor of shape (..., m, m), got {type(gram).__name__}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must have shape (..., m, m) with square last two dimensions, got {tuple(gram.shape)}")
    if gram.shape[-1] < 1:
        raise ValueError("gram describes zero objectives (m = 0); pass at least one objective")
    if not (gram.is_floating_point()):
        raise TypeError(f"gram must be a floating-point tensor, got dtype {gram.dtype}")


def check_c(c: float) -> float:
    """Validate the trust-region radius ``c`` (finite, >= 0) and return it as a float."""
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"c must be a real number >= 0, got {type(c).__name__}")
    c = float(c)
    if not (c >= 0.0 and c < float("inf")):
        raise ValueError(f"c must be finite and >= 0, got {c}")
    return c


def rescale_divisor(rescale: str | None, c: float) -> float:
    """The factor the direction is divided by for ``rescale`` and ``c``."""
    if rescale not in RESCALE_OPTIONS:
        raise ValueError(f"unknown rescale={rescale!r}; choose one of {list(RESCALE_OPTIONS)}")
    if rescale == "1+c":
        return 1.0 + c
    if rescale == "1+c^2":
        return 1.0 + c * c
    return 1.0


def auto_solver(m: int, batch_size: int = 1) -> str:
    """The solver ``"auto"`` picks for ``batch_size`` problems with ``m`` objectives (shapes only, no sync).

    Support enumeration costs ``batch x (2^m - 1)`` small solves, Frank-Wolfe a fixed ``m``
    iterations of a few dozen ops: enumeration wins for few objectives and small batches.
    """
    if m > AUTO_EXACT_MAX_M:
        return "frank_wolfe"
    budget = _AUTO_EXACT_MAX_FACES_SMALL_M if m <= 6 else _AUTO_EXACT_MAX_FACES_LARGE_M
    return "exact" if batch_size * ((1 << m) - 1) <= budget else "frank_wolfe"


def resolve_solver(solver: str, m: int) -> str:
    """Check ``solver`` (see :data:`SOLVER_OPTIONS`) for ``m`` objectives and return it.

    ``"auto"`` stays ``"auto"``: the solve resolves it with :func:`auto_solver` once the batch
    size is known.
    """
    if solver not in SOLVER_OPTIONS:
        raise ValueError(f"unknown solver={solver!r}; choose one of {list(SOLVER_OPTIONS)}")
    if solver == "exact" and m > EXACT_MAX_M:
        raise ValueError(
            f"solver='exact' enumerates 2^m - 1 supports and is limited to m <= {EXACT_MAX_M}, got m = {m}; "
            "use solver='frank_wolfe' (or 'auto')"
        )
    return solver


def normalize_weights(weights: Sequence[float] | Tensor | None, m: int | None = None) -> Tensor:
    """Check user weights on the host and return them normalised to sum 1 (float64, CPU).

    ``weights`` must be finite and non-negative with a positive sum; ``None`` means uniform
    (then ``m`` is required). Raises ``ValueError`` naming what is wrong.
    """
    if weights is None:
        if m is None:
            raise ValueError("weights=None needs the number of objectives m")
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    if w.dim() < 1 or w.shape[-1] < 1:
        raise ValueError(f"weights must have shape (m,) or (..., m) with m >= 1, got shape {tuple(w.shape)}")
    if m is not None and w.shape[-1] != m:
        raise ValueError(f"got {w.shape[-1]} weights for {m} objectives; pass one weight per objective")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be >= 0, got {w.tolist()}")
    total = w.sum(-1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError(f"weights must have a positive sum, got {w.tolist()}")
    return w / total


def solve_cagrad(
    gram: Tensor,
    weights: Sequence[float] | Tensor | None = None,
    c: float = 0.4,
    clip: bool = True,
    rescale: str | None = None,
    max_iter: int | None = None,
    *,
    solver: str = "auto",
    validate: bool = True,
) -> CAGradSolution:
    """Solve the clipped CAGrad dual for a batch of Gram matrices (RACO Algorithm 1).

    Args:
        gram: Gram matrices ``H[..., i, j] = <g_i, g_j>`` of shape ``(..., m, m)``, symmetric PSD.
            Half-precision input is solved in float32; float64 in float64.
        weights: user weights ``w`` of shape ``(m,)`` or ``(..., m)`` (broadcast against the
            batch of ``gram``); finite, ``>= 0``, positive sum; normalised to sum 1. ``None``
            means uniform.
        c: trust-region radius, finite and ``>= 0`` (``c = 0`` gives ``a = w``).
        clip: RACO's clip ``p~ = min(p, w)``; ``False`` gives CAGrad with a weighted anchor.
        rescale: ``None``, ``"1+c"`` or ``"1+c^2"``: divide the direction by that factor.
        max_iter: pairwise Frank-Wolfe iterations; ``None`` uses :func:`default_max_iter`.
            Only the ``"frank_wolfe"`` solver iterates.
        solver: ``"auto"`` (default: ``"exact"`` for few objectives and small batches, e.g. one
            problem with up to 12 objectives, see
            :func:`auto_solver`; else ``"frank_wolfe"``),
            ``"exact"`` (closed-form KKT solve on every support, ``m <= 12``) or
            ``"frank_wolfe"``. See :data:`SOLVER_OPTIONS`.
        validate: check the values of tensor ``weights`` on the host (a device sync for CUDA
            tensors). Shapes, ``c`` and ``rescale`` are always checked. Skipped under
            ``torch.compile``. Pass ``False`` on a hot path with weights already checked.

    Returns:
        A :class:`CAGradSolution`; ``coefficients`` ``a`` give the direction ``sum_i a_i g_i``.

    Non-finite entries of ``gram`` give non-finite coefficients for that problem only.
    """
    _check_gram(gram)
    c = check_c(c)
    divisor = rescale_divisor(rescale, c)
    m = gram.shape[-1]
    if max_iter is None:
        max_iter = default_max_iter(m)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    solver = resolve_solver(solver, m)
    dtype = torch.promote_types(gram.dtype, torch.float32)
    if weights is None:
        w = torch.full((m,), 1.0 / m, dtype=dtype, device=gram.device)
    else:
        if isinstance(weights, Tensor) and (torch.compiler.is_compiling() or not validate):
            w = weights.to(device=gram.device, dtype=dtype)
            if w.dim() < 1 or w.shape[-1] != m:
                raise ValueError(f"weights must have shape (..., {m}) for m = {m} objectives, got {tuple(w.shape)}")
            w = w / w.sum(-1, keepdim=True)
        else:
            w = normalize_weights(weights, m).to(device=gram.device, dtype=dtype)
    return _solve(gram.to(dtype), w, c, clip, divisor, max_iter, solver)


def combination_coefficients(
    gram: Tensor,
    weights: Sequence[float] | Tensor | None = None,
    c: float = 0.4,
    clip: bool = True,
    rescale: str | None = None,
    max_iter: int | None = None,
    *,
    solver: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Coefficients ``a`` (shape ``(..., m)``) with direction ``d = sum_i a_i g_i``.

    Shorthand for ``solve_cagrad(...).coefficients``; see :func:`solve_cagrad` for the
    arguments. ``c = 0`` returns exactly the normalised weights.
    """
    return solve_cagrad(gram, weights, c, clip, rescale, max_iter, solver=solver, validate=validate).coefficients


def _quad_form(H: Tensor, x: Tensor) -> Tensor:
    return (x * (H @ x.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _solve(H: Tensor, w: Tensor, c: float, clip: bool, divisor: float, max_iter: int,
           solver: str = "auto") -> CAGradSolution:
    """The solver proper: inputs checked, ``w`` normalised, ``H`` and ``w`` of one float dtype.

    ``solver`` is checked already; ``"auto"`` is resolved here from the shapes. ``m <= 2`` ignores it.
    """
    m = H.shape[-1]
    batch = torch.broadcast_shapes(H.shape[:-2], w.shape[:-1])
    if solver == "auto":
        solver = auto_solver(m, math.prod(batch))
    H = H.expand(*batch, m, m)
    w = w.expand(*batch, m)
    eps = torch.finfo(H.dtype).eps
    zero_tol = 100.0 * m * eps  # ||G p~||^2 below this (relative) is noise: no correction
    # F is smooth wherever G p != 0. Treating ||G p||^2 < 100 m eps as the kink G p = 0 cost
    # up to 1e-1 relative dual gap in float32 (benchmarks/solver_accuracy.py); only exact-ish zeros are kinks.
    kink_tol = eps * eps

    # Work on H / max_i H_ii: p is scale invariant, all numbers are O(1), no overflow.
    H = 0.5 * (H + H.mT)
    diag = H.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    scale = diag.amax(-1)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Hn = H / safe_scale[..., None, None]
    diag_n = diag / safe_scale[..., None]

    b = (Hn @ w.unsqueeze(-1)).squeeze(-1)
    anchor_n = (w * b).sum(-1).clamp_min(0.0).sqrt()
    s = c * anchor_n  # the trust-region radius c ||g0||, normalised
    if m == 2 and max_iter > 0:
        # Exact: one line search over the whole edge from e_1 to e_2 (RACO's two-objective case).
        # It compares both vertices and every stationary point and kink, so zero gradients need no care.
        gamma = _exact_line_search(
            b[..., 1] - b[..., 0],
            s,
            diag_n[..., 0],
            2.0 * (Hn[..., 0, 1] - diag_n[..., 0]),
            (diag_n[..., 0] + diag_n[..., 1] - 2.0 * Hn[..., 0, 1]).clamp_min(0.0),
            torch.ones_like(s),
        )
        p = torch.stack([1.0 - gamma, gamma], dim=-1)
    elif m > 2 and solver == "exact":
        p = _solve_by_supports(Hn, b, s)[0]
    else:
        # Kinks: F = 0 wherever G p = 0 (a zero gradient, exact opposites, ...) and F is not
        # differentiable there. From such a point every single vertex (FW) and every pairwise
        # direction can look uphill while a mix of several is downhill, so FW would stall there.
        # Descent never reaches F = 0 from F < 0, so start at the best point *off* the kink among
        # the small faces (solved exactly), never aim at a zero vertex, and at the end keep the best
        # small-face candidate (a kink point, F = 0, included) if it beats the iterate.
        p_small, value_small, p = _solve_by_supports(Hn, b, s, _start_support_size(m), kink_tol)
        zero_vertex = diag_n <= kink_tol
        zero_vertex = zero_vertex & ~zero_vertex.all(-1, keepdim=True)  # all zero: nothing to exclude
        idx = torch.arange(m, device=H.device)
        for _ in range(max_iter):
            p = _pairwise_fw_step(Hn, b, s, p, kink_tol, idx, zero_vertex)
            p = _face_newton_step(Hn, b, s, p, kink_tol)
        value = (b * p).sum(-1) + s * _quad_form(Hn, p).clamp_min(0.0).sqrt()
        p = torch.where((value_small < value).unsqueeze(-1), p_small, p)

    grad, _, quad = _dual_gradient(Hn, b, s.unsqueeze(-1), p, kink_tol)
    fw_gap_n = ((grad * p).sum(-1) - grad.amin(-1)).clamp_min(0.0)
    dual_n = (b * p).sum(-1) + s * quad.clamp_min(0.0).sqrt()

    p_clipped = torch.minimum(p, w) if clip else p
    # The correction s G p~ / ||G p~|| is invariant to the mass of p~: normalise it first, so a tiny
    # p~ (a weight of 1e-158) does not square into a subnormal ||G p~||^2 and lose digits.
    mass = p_clipped.sum(-1, keepdim=True)
    direction = p_clipped / torch.where(mass > 0, mass, torch.ones_like(mass))
    n2 = _quad_form(Hn, direction).clamp_min(0.0)
    usable = (mass.squeeze(-1) > 0) & (n2 > zero_tol)
    ratio = s / torch.where(usable, n2, torch.ones_like(n2)).sqrt()
    ratio = torch.where(usable, ratio, torch.zeros_like(ratio))
    coefficients = w + ratio.unsqueeze(-1) * direction
    if divisor != 1.0:
        coefficients = coefficients / divisor
    # A non-finite Gram entry must not pass silently: the masks above (e.g. ``usable`` is False
    # for NaN) would otherwise return ``a = w``. Poison every output of that problem only.
    finite = torch.isfinite(H).flatten(-2).all(-1)
    nan = torch.full_like(scale, torch.nan)

    def poison(x: Tensor) -> Tensor:
        if x.dim() > finite.dim():
            return torch.where(finite.unsqueeze(-1), x, nan.unsqueeze(-1))
        return torch.where(finite, x, nan)

    return CAGradSolution(
        coefficients=poison(coefficients),
        dual=poison(p),
        clipped_dual=poison(p_clipped),
        weights=w,
        anchor_norm=poison(anchor_n * scale.sqrt()),
        dual_value=poison(dual_n * scale),
        fw_gap=poison(fw_gap_n * scale),
    )


def _start_support_size(m: int) -> int:
    """Largest faces solved exactly to start Frank-Wolfe: a few hundred candidates at most."""
    return 3 if m <= 12 else 2 if m <= 32 else 1


class _FaceFrame(NamedTuple):
    """Constant tensors that lay out every face's bordered KKT system (one per ``m, k, device, dtype``)."""

    index: Tensor  # (K, k) long: vertices of each face, padded with 0
    support: Tensor  # (K, k) float: 1 on the face's slots, 0 on padding
    gram_index: Tensor  # (K (k+1)^2,) long: where each bordered entry comes from in the flat (m m) Gram
    gram_mask: Tensor  # (K, k+1, k+1): 1 where that entry is a Gram entry of the face
    constant: Tensor  # (K, k+1, k+1): the border (ones), identity on padding slots, 0 corner
    b_index: Tensor  # (K (k+1),) long: where each right-hand-side entry comes from in b
    b_mask: Tensor  # (K, k+1): 1 on the face's slots
    unit: Tensor  # (k+1,): the right-hand side [0, ..., 0, 1]


_FRAME_CACHE: dict[tuple[int, int, str, torch.dtype], _FaceFrame] = {}


def _face_frame(m: int, max_support: int, device: torch.device, dtype: torch.dtype) -> _FaceFrame:
    """The faces of the simplex with at most ``max_support`` of ``m`` vertices, in a compact frame of
    ``k = min(m, max_support)`` slots, and the constants that build their bordered systems by one gather.
    Cached (outside ``torch.compile``, where they are traced as constants)."""
    k = min(m, max_support)
    key = (m, k, str(device), dtype)
    cached = None if torch.compiler.is_compiling() else _FRAME_CACHE.get(key)
    if cached is not None:
        return cached
    faces = [face for size in range(1, k + 1) for face in combinations(range(m), size)]
    index = torch.tensor([list(face) + [0] * (k - len(face)) for face in faces], device=device)
    mask = torch.tensor([[True] * len(face) + [False] * (k - len(face)) for face in faces], device=device)
    support = mask.to(dtype)
    n_faces = index.shape[0]
    zero_col = torch.zeros(n_faces, 1, device=device, dtype=index.dtype)
    index_ext = torch.cat([index, zero_col], -1)  # the border slot reads vertex 0, masked out
    support_ext = torch.cat([support, zero_col.to(dtype)], -1)
    gram_index = (index_ext.unsqueeze(-1) * m + index_ext.unsqueeze(-2)).reshape(-1)
    gram_mask = support_ext.unsqueeze(-1) * support_ext.unsqueeze(-2)
    constant = torch.diag_embed(torch.cat([1.0 - support, torch.zeros_like(support[:, :1])], -1))
    constant[:, :k, k] = support
    constant[:, k, :k] = support
    unit = (torch.arange(k + 1, device=device) == k).to(dtype)
    frame = _FaceFrame(index, support, gram_index, gram_mask, constant, index_ext.reshape(-1), support_ext, unit)
    if not torch.compiler.is_compiling():
        _FRAME_CACHE[key] = frame
    return frame


def _solve_by_supports(Hn: Tensor, b: Tensor, s: Tensor, max_support: int | None = None,
                       kink_tol: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Dual solution by enumerating the supports of ``p`` (the faces of the simplex); exact for all of them.

    On a face ``S`` whose gradients are affinely independent, a minimiser with ``n = ||G p|| > 0``
    in the face's relative interior satisfies the KKT system ``b_S + (s / n) H_SS p_S = lambda 1``,
    ``1^T p_S = 1``. With the bordered matrix ``M = [[H_SS, 1], [1^T, 0]]`` its solution is
    ``p = p0 + sigma p1`` where ``M [p0; .] = [0; 1]`` (the min-norm point of the face's affine hull),
    ``M [p1; .] = [-b_S; 0]`` and ``sigma = n / s``; since ``p0^T H p1 = 0``, ``n^2 = p^T H p``
    gives ``sigma^2 = p0^T H p0 / (s^2 - p1^T H p1)``. Every candidate is clipped to the simplex,
    so each is feasible and ``F`` at it is at least ``min F``; the minimiser (or an equally good
    point) is a candidate, so the smallest ``F`` over all ``2^m - 1`` candidates is ``min F``.
    Kinks (``G p = 0`` anywhere in the simplex) need no care: there ``F = 0`` exactly and the
    candidate ``p0`` of that face (``sigma = 0``) represents them.

    ``max_support`` limits the faces to those of at most that many vertices (then the result is the
    best point of those faces, a start for Frank-Wolfe). Returns ``(p, F(p), p_off)``: the best
    candidate, its value, and the best candidate off the kink (``p^T H p > kink_tol``; where there
    is none, the first candidate).
    """
    m = Hn.shape[-1]
    batch = Hn.shape[:-2]
    device, dtype = Hn.device, Hn.dtype
    frame = _face_frame(m, m if max_support is None else max_support, device, dtype)
    index, support = frame.index, frame.support
    n_faces, k = index.shape
    H_flat = Hn.reshape(-1, m * m)
    b_flat = b.reshape(-1, m)
    s_flat = s.reshape(-1)
    n_total = H_flat.shape[0]
    chunk = max(1, _SYSTEMS_PER_CHUNK // n_faces)
    solutions, values, off_kink = [], [], []
    for start in range(0, n_total, chunk):  # a loop over shapes only: no sync
        H_chunk = H_flat[start:start + chunk]
        n = H_chunk.shape[0]
        # every face's bordered matrix [[H_SS, 1], [1^T, 0]] (identity on padding slots) by one gather
        bordered = H_chunk.index_select(-1, frame.gram_index).view(n, n_faces, k + 1, k + 1) * frame.gram_mask + frame.constant
        linear = b_flat[start:start + chunk].index_select(-1, frame.b_index).view(n, n_faces, k + 1) * frame.b_mask
        s_c = s_flat[start:start + chunk].unsqueeze(-1)  # (n, 1)
        H_c = bordered[..., :k, :k]  # the faces' Grams (padding: identity, harmless: p is 0 there)
        b_c = linear[..., :k]
        x, info = torch.linalg.solve_ex(bordered, torch.stack([frame.unit.expand(n, n_faces, k + 1), -linear], -1))
        p0 = x[..., :k, 0] * support
        p1 = x[..., :k, 1] * support
        c0 = _quad_form(H_c, p0).clamp_min(0.0)
        room = s_c * s_c - _quad_form(H_c, p1)
        movable = (room > 0) & (c0 > 0)
        sigma = torch.where(movable, c0 / torch.where(movable, room, torch.ones_like(room)), torch.zeros_like(room)).sqrt()
        sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))  # s^2 denormal: inf * 0 = NaN
        p = (p0 + sigma.unsqueeze(-1) * p1).clamp_min(0.0)
        total = p.sum(-1)
        valid = (info == 0) & (total > 0) & torch.isfinite(total)
        p = p / torch.where(valid, total, torch.ones_like(total)).unsqueeze(-1)
        quad = _quad_form(H_c, p).clamp_min(0.0)
        value = (b_c * p).sum(-1) + s_c * quad.sqrt()
        value = torch.where(valid & torch.isfinite(value), value, torch.full_like(value, torch.inf))
        best_value, best = value.min(-1, keepdim=True)
        best_off = torch.where(quad > kink_tol, value, torch.full_like(value, torch.inf)).argmin(-1, keepdim=True)
        for chosen, out in ((best, solutions), (best_off, off_kink)):
            p_face = p.gather(-2, chosen.unsqueeze(-1).expand(n, 1, k)).squeeze(-2)  # (n, k)
            where = index[chosen.squeeze(-1)]  # (n, k): vertices of the chosen face
            out.append(torch.zeros(n, m, device=device, dtype=dtype).scatter_add(-1, where, p_face))
        values.append(best_value.squeeze(-1))
    p, value, p_off = (torch.cat(parts, 0) for parts in (solutions, values, off_kink))
    return p.reshape(*batch, m), value.reshape(batch), p_off.reshape(*batch, m)


def _dual_gradient(Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, zero_tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``grad F(p) = b + s H p / sqrt(p^T H p)`` (``b`` where ``p^T H p`` vanishes)."""
    Hp = (Hn @ p.unsqueeze(-1)).squeeze(-1)
    quad = (p * Hp).sum(-1, keepdim=True)
    positive = quad > zero_tol
    inv_norm = torch.where(positive, quad, torch.ones_like(quad)).rsqrt()
    grad = b + torch.where(positive, s * inv_norm, torch.zeros_like(inv_norm)) * Hp
    return grad, Hp, quad.squeeze(-1)


def _exact_line_search(beta1: Tensor, s: Tensor, q0: Tensor, q1: Tensor, q2: Tensor, gamma_max: Tensor) -> Tensor:
    """Minimiser on ``[0, gamma_max]`` of ``h(g) = beta1 g + s sqrt(q2 g^2 + q1 g + q0)`` (ALGORITHM.md §4).

    ``h`` is the dual objective along a segment. The minimiser is an endpoint or a real root of
    ``(beta1^2 q2 - s^2 q2^2) g^2 + (beta1^2 q1 - s^2 q1 q2) g + beta1^2 q0 - s^2 q1^2 / 4``;
    squaring adds spurious roots, so ``h(g) - h(0)`` is evaluated (cancellation-free) at every
    candidate and the smallest wins (ties go to ``g = 0``: no move). Roots come from the
    cancellation-free quadratic formula. One more candidate is the kink ``g = -q1 / (2 q2)``,
    where the segment may pass through ``G p = 0`` and ``h`` is not differentiable.
    """
    beta_sq, s_sq = beta1 * beta1, s * s
    qa = beta_sq * q2 - s_sq * q2 * q2
    qb = beta_sq * q1 - s_sq * q1 * q2
    qc = beta_sq * q0 - 0.25 * s_sq * q1 * q1
    root = (qb * qb - 4.0 * qa * qc).clamp_min(0.0).sqrt()
    half = -0.5 * (qb + torch.where(qb >= 0, root, -root))
    kink = -0.5 * q1 / q2
    candidates = torch.stack([torch.zeros_like(gamma_max), gamma_max, half / qa, qc / half, kink], dim=-1)
    candidates = torch.nan_to_num(candidates, nan=0.0, posinf=0.0, neginf=0.0)
    candidates = torch.minimum(candidates.clamp_min(0.0), gamma_max.unsqueeze(-1))
    # Compare h(g) - h(0) = beta1 g + s (Q(g) - q0) / (sqrt(Q(g)) + sqrt(q0)), Q(g) - q0 = g (q1 + q2 g):
    # free of the cancellation in sqrt(Q(g)) - sqrt(q0), so improvements far below eps |F| (the
    # last digits of p near the optimum) are still seen and taken instead of tying with g = 0.
    increase = candidates * (q1.unsqueeze(-1) + candidates * q2.unsqueeze(-1))
    quad = (q0.unsqueeze(-1) + increase).clamp_min(0.0)
    denominator = quad.sqrt() + q0.clamp_min(0.0).sqrt().unsqueeze(-1)
    positive = denominator > 0
    root_change = torch.where(positive, increase / torch.where(positive, denominator, torch.ones_like(denominator)), torch.zeros_like(denominator))
    values = beta1.unsqueeze(-1) * candidates + s.unsqueeze(-1) * root_change
    return candidates.gather(-1, values.argmin(-1, keepdim=True)).squeeze(-1)


def _move(Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, Hp: Tensor, q0: Tensor, d: Tensor, gamma_max: Tensor,
          frozen: Tensor, blocking: Tensor) -> Tensor:
    """``p + gamma d`` with the exact line-search ``gamma`` on ``[0, gamma_max]``; frozen problems stay.

    ``blocking`` (one-hot) marks the vertex whose mass reaches zero at ``gamma_max``: a step of
    full length sets it to an exact zero, so the face shrinks instead of keeping rounding dust.
    """
    Hd = (Hn @ d.unsqueeze(-1)).squeeze(-1)
    gamma = _exact_line_search((b * d).sum(-1), s, q0, 2.0 * (d * Hp).sum(-1), (d * Hd).sum(-1).clamp_min(0.0), gamma_max)
    gamma = torch.where(frozen, torch.zeros_like(gamma), gamma)
    p_next = (p + gamma.unsqueeze(-1) * d).clamp_min(0.0)
    dropped = blocking & (gamma >= gamma_max).unsqueeze(-1)
    return torch.where(dropped, torch.zeros_like(p_next), p_next)


def _pairwise_fw_step(Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, zero_tol: float, idx: Tensor,
                      excluded: Tensor) -> Tensor:
    """One pairwise Frank-Wolfe step: move mass from the worst active vertex to the best vertex.

    Moving the whole mass of the away vertex (a drop step) leaves an exact zero, so the active
    set stays clean. Problems whose FW gap is at rounding level do not move. ``excluded``
    vertices (zero gradients) are never chosen as the best vertex.
    """
    grad, Hp, q0 = _dual_gradient(Hn, b, s.unsqueeze(-1), p, zero_tol)
    best = torch.where(excluded, torch.full_like(grad, torch.inf), grad).argmin(-1, keepdim=True)
    away = torch.where(p > 0, grad, torch.full_like(grad, -torch.inf)).argmax(-1, keepdim=True)
    gap = (grad * p).sum(-1) - grad.gather(-1, best).squeeze(-1)
    to_best, from_away = (idx == best).to(p.dtype), (idx == away).to(p.dtype)
    gamma_max = p.gather(-1, away).squeeze(-1)
    frozen = gap <= 4.0 * torch.finfo(p.dtype).eps
    return _move(Hn, b, s, p, Hp, q0, to_best - from_away, gamma_max, frozen, idx == away)


def _face_newton_step(Hn: Tensor, b: Tensor, s: Tensor, p: Tensor, zero_tol: float) -> Tensor:
    """A Newton step on the face of the simplex spanned by the active vertices, then exact line search.

    Pairwise FW finds the face; on it the dual is smooth and Newton converges fast where FW
    zig-zags (ill-conditioned, rank-deficient Grams). The Hessian restricted to the face is
    ``(s / n) (H - H p p^T H / n^2)`` with ``n^2 = p^T H p``, plus a small ridge for null
    directions; the equality-constrained system is solved with ``linalg.solve_ex`` (no sync).
    """
    m = p.shape[-1]
    grad, Hp, q0 = _dual_gradient(Hn, b, s.unsqueeze(-1), p, zero_tol)
    active = p > 0
    act = active.to(p.dtype)
    both = act.unsqueeze(-1) * act.unsqueeze(-2)
    inv_n = torch.where(q0 > zero_tol, q0, torch.ones_like(q0)).rsqrt()
    inv_n = torch.where(q0 > zero_tol, inv_n, torch.zeros_like(inv_n))
    curvature = (s * inv_n)[..., None, None] * (Hn - Hp.unsqueeze(-1) * Hp.unsqueeze(-2) * (inv_n * inv_n)[..., None, None])
    ridge = 1e3 * torch.finfo(p.dtype).eps * (1.0 + curvature.diagonal(dim1=-2, dim2=-1).abs().amax(-1))
    Q = curvature * both + torch.diag_embed(torch.where(active, ridge.unsqueeze(-1), torch.ones_like(p)))
    kkt = torch.cat([torch.cat([Q, act.unsqueeze(-1)], -1), torch.cat([act, torch.zeros_like(act[..., :1])], -1).unsqueeze(-2)], -2)
    rhs = torch.cat([-grad * act, torch.zeros_like(act[..., :1])], -1)
    d = torch.linalg.solve_ex(kkt, rhs.unsqueeze(-1))[0].squeeze(-1)[..., :m] * act
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
    d = d - act * (d.sum(-1, keepdim=True) / act.sum(-1, keepdim=True))  # stay on the face exactly
    shrinking = d < 0
    ratio = torch.where(shrinking, p / torch.where(shrinking, -d, torch.ones_like(d)), torch.full_like(d, torch.inf))
    gamma_max, blocking = ratio.min(-1, keepdim=True)
    gamma_max = gamma_max.squeeze(-1).clamp_max(1.0 / torch.finfo(p.dtype).eps)
    frozen = ((grad * p).sum(-1) - grad.amin(-1)) <= 4.0 * torch.finfo(p.dtype).eps
    idx = torch.arange(m, device=p.device)
    return _move(Hn, b, s, p, Hp, q0, d, gamma_max, frozen, idx == blocking)
