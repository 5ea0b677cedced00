"""Public entry points of the dual solver: input checks, option resolution, and the two solve functions.

:func:`solve_cagrad` is the convenience API (weights as a list, a tensor or ``None``; options as
keywords, validated through :class:`~cagrad_clip.CAGradSettings`).
:func:`solve_with_settings` is the hot path: weights already normalised on the device, settings
already validated, no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._numerics import reduction_dtype
from .._settings import CAGradSettings, Rescale, Solver, check_solver, normalize_weights
from .exact import EXACT_MAX_M
from .kernel import CAGradSolution, solve_kernel
from .registry import SOLVERS

__all__ = [
    "AUTO_EXACT_MAX_M",
    "EXACT_MAX_M",
    "auto_solver",
    "combination_coefficients",
    "default_max_iter",
    "resolve_solver",
    "solve_cagrad",
    "solve_with_settings",
]

#: ``solver="auto"`` enumerates supports up to this many objectives (``python -m benchmarks.speed`` times both).
AUTO_EXACT_MAX_M = 12
# ... and while the batch has at most this many faces (batch x (2^m - 1)) in all; the crossovers with
# Frank-Wolfe that set these budgets are measured by ``python -m benchmarks.speed`` (docs/performance.md).
_AUTO_EXACT_MAX_FACES_SMALL_M = 1 << 15
_AUTO_EXACT_MAX_FACES_LARGE_M = 1 << 12


def default_max_iter(m: int) -> int:
    """Frank-Wolfe iteration budget used when ``max_iter`` is ``None``: ``m`` (0 for ``m = 1``, 1 for ``m = 2``).

    ``m = 1`` needs no iteration and ``m = 2`` is solved exactly by one exact line search. Each
    further iteration is a pairwise Frank-Wolfe step (finds the face) and a Newton step on the face
    (converges on it), plus two steps of Wolfe's min-norm-point and Lawson-Hanson's algorithms for
    optima at a kink (Pareto-stationary inputs, :mod:`.stationary`: they reach those within ``m``
    iterations where Frank-Wolfe alone stopped ``1e-4 max_i H_ii`` short).
    ``python -m benchmarks.solver_accuracy`` (table (b)) measures the accuracy per budget;
    ``docs/solver_accuracy.md`` has the numbers.
    """
    if m <= 1:
        return 0
    if m == 2:
        return 1
    return m


def auto_solver(m: int, batch_size: int = 1) -> Solver:
    """The solver ``"auto"`` picks for ``batch_size`` problems with ``m`` objectives (shapes only, no sync).

    Support enumeration costs ``batch x (2^m - 1)`` small solves, Frank-Wolfe a fixed ``m``
    iterations of a few dozen ops: enumeration wins for few objectives and small batches.
    """
    if m > AUTO_EXACT_MAX_M:
        return "frank_wolfe"
    budget = _AUTO_EXACT_MAX_FACES_SMALL_M if m <= 6 else _AUTO_EXACT_MAX_FACES_LARGE_M
    return "exact" if batch_size * ((1 << m) - 1) <= budget else "frank_wolfe"


def resolve_solver(solver: str, m: int) -> Solver:
    """Check ``solver`` (a key of :data:`~cagrad_clip.SOLVER_OPTIONS`) for ``m`` objectives.

    ``"exact"`` with ``m > EXACT_MAX_M`` raises ``ValueError``. ``"auto"`` stays ``"auto"``: the
    solve resolves it with :func:`auto_solver` once the batch size is known.
    """
    checked = check_solver(solver)
    limit = SOLVERS[checked].max_m if checked in SOLVERS else None
    if limit is not None and m > limit:
        raise ValueError(f"solver={checked!r} is limited to m <= {limit} objectives, got m = {m}; use solver='frank_wolfe' (or 'auto')")
    return checked


def check_gram(gram: Tensor) -> None:
    """Raise unless ``gram`` is a floating-point tensor of shape ``(..., m, m)`` with ``m >= 1`` (shapes only)."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor of shape (..., m, m), got {type(gram).__name__}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must have shape (..., m, m) with square last two dimensions, got {tuple(gram.shape)}")
    if gram.shape[-1] < 1:
        raise ValueError("gram describes zero objectives (m = 0); pass at least one objective")
    if not gram.is_floating_point():
        raise TypeError(f"gram must be a floating-point tensor, got dtype {gram.dtype}")


def solve_with_settings(gram: Tensor, weights: Tensor, settings: CAGradSettings) -> CAGradSolution:
    """Solve the clipped CAGrad dual (RACO Algorithm 1) for a batch of Grams; the optimizer's hot path.

    Args:
        gram: ``H[..., i, j] = <g_i, g_j>`` of shape ``(..., m, m)``, float32 or float64 (half
            precision is solved in float32), on any device.
        weights: the user weights, already normalised to sum 1, broadcastable to ``(..., m)``
            (moved to ``gram``'s device and solve dtype). Their values are not checked (that would
            sync), and ``settings.weights`` is not read.
        settings: ``c``, ``clip``, ``rescale``, ``solver`` and ``max_iter`` (``None``:
            :func:`default_max_iter`). ``"auto"`` is resolved by shape (:func:`auto_solver`);
            ``"exact"`` with ``m > EXACT_MAX_M`` raises ``ValueError``.

    Shapes are checked on the host; there is no host sync, and the call can be captured by
    ``torch.compile(fullgraph=True)``. Non-finite entries of ``gram`` give NaN outputs for that
    problem only.
    """
    check_gram(gram)
    m = gram.shape[-1]
    if not isinstance(weights, Tensor) or weights.dim() < 1 or weights.shape[-1] != m:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape (..., {m}) for m = {m} objectives, got {shape}")
    batch = torch.broadcast_shapes(gram.shape[:-2], weights.shape[:-1])
    solver = resolve_solver(settings.solver, m)
    if solver == "auto":
        solver = auto_solver(m, math.prod(batch))
    max_iter = default_max_iter(m) if settings.max_iter is None else settings.max_iter
    dtype = reduction_dtype(gram.dtype)
    return solve_kernel(
        gram=gram.to(dtype),
        weights=weights.to(device=gram.device, dtype=dtype),
        c=settings.c,
        clip=settings.clip,
        divisor=settings.divisor,
        max_iter=max_iter,
        solver=solver,
    )


def _weights_tensor(weights: Sequence[float] | Tensor | None, m: int, gram: Tensor, validate: bool) -> Tensor:
    """``weights`` normalised, in the solve's dtype; values checked if ``validate``. Not moved:
    :func:`solve_with_settings` puts them on ``gram``'s device (a no-op for weights already there)."""
    dtype = reduction_dtype(gram.dtype)
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=dtype, device=gram.device)
    if isinstance(weights, Tensor) and (torch.compiler.is_compiling() or not validate):
        w = weights.to(dtype=dtype)
        if w.dim() < 1 or w.shape[-1] != m:
            raise ValueError(f"weights must have shape (..., {m}) for m = {m} objectives, got {tuple(w.shape)}")
        return w / w.sum(-1, keepdim=True)
    return normalize_weights(weights, m).to(dtype=dtype)


def solve_cagrad(
    gram: Tensor,
    weights: Sequence[float] | Tensor | None = None,
    *,
    c: float = 0.4,
    clip: bool = True,
    rescale: Rescale = None,
    solver: Solver = "auto",
    max_iter: int | None = None,
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
        solver: ``"auto"`` (default: ``"exact"`` for few objectives and small batches, e.g. one
            problem with up to 12 objectives, see :func:`auto_solver`; else ``"frank_wolfe"``),
            ``"exact"`` (closed-form KKT solve on every support, ``m <= 12``) or ``"frank_wolfe"``.
        max_iter: pairwise Frank-Wolfe iterations; ``None`` uses :func:`default_max_iter`.
            Only the ``"frank_wolfe"`` solver iterates. For ``m = 2`` every solver takes the exact edge
            search, except that ``max_iter=0`` takes Frank-Wolfe's start (every face, in closed form):
            also exact, but where several duals are optimal it may return another of them.
        validate: check the values of tensor ``weights`` on the host (a device sync for CUDA
            tensors). Shapes and the options are always checked. Skipped under ``torch.compile``.
            Pass ``False`` on a hot path with weights already checked.

    Returns:
        A :class:`CAGradSolution`; ``coefficients`` ``a`` give the direction ``sum_i a_i g_i``.

    Non-finite entries of ``gram`` give non-finite coefficients for that problem only.
    """
    check_gram(gram)
    settings = CAGradSettings(c=c, clip=clip, rescale=rescale, solver=solver, max_iter=max_iter)
    m = gram.shape[-1]
    resolve_solver(settings.solver, m)
    w = _weights_tensor(weights, m, gram, validate)
    return solve_with_settings(gram, w, settings)


def combination_coefficients(
    gram: Tensor,
    weights: Sequence[float] | Tensor | None = None,
    *,
    c: float = 0.4,
    clip: bool = True,
    rescale: Rescale = None,
    solver: Solver = "auto",
    max_iter: int | None = None,
    validate: bool = True,
) -> Tensor:
    """Coefficients ``a`` (shape ``(..., m)``) with direction ``d = sum_i a_i g_i``.

    Shorthand for ``solve_cagrad(...).coefficients``; see :func:`solve_cagrad` for the
    arguments. ``c = 0`` returns exactly the normalised weights.
    """
    return solve_cagrad(gram, weights, c=c, clip=clip, rescale=rescale, solver=solver, max_iter=max_iter, validate=validate).coefficients
