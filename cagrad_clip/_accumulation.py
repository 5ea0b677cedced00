"""The accumulation window's work, on the optimizer's state (plain data): add each objective's gradient,
solve the dual on their Gram (RACO Algorithm 1) and write the direction into ``.grad``.

:class:`~cagrad_clip.ConflictAverseOptimizer` validates its arguments, builds the gradient store and
steps the base optimizer; everything between the first ``backward`` of a window and the step is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import StepDiagnostics, step_diagnostics
from ._dual import solve_with_settings
from ._nonfinite import NonfinitePolicy
from ._numerics import no_autocast
from ._settings import CAGradSettings
from ._storage import GradientStore
from ._window import WindowState

__all__ = ["WrapperState", "accumulate", "combine_window", "device_weights", "home_objective", "host_weights"]


@dataclass
class WrapperState:
    """The optimizer's mutable state (see ``ConflictAverseOptimizer._state``)."""

    settings: CAGradSettings
    nonfinite: NonfinitePolicy
    window: WindowState = field(default_factory=WindowState)
    store: GradientStore | None = None
    layout_key: tuple[int, ...] = ()
    device_weights: dict[tuple[torch.device, torch.dtype, int], Tensor] = field(default_factory=dict)
    last: StepDiagnostics | None = None
    skipped_steps: int = 0


def host_weights(settings: CAGradSettings, m: int) -> list[float]:
    """The weights of ``m`` objectives as host floats (uniform when unset; only their order and zeros
    are read, so unnormalised is fine): no tensor is made or read."""
    return [1.0] * m if settings.weights is None else list(settings.weights)


def home_objective(settings: CAGradSettings, m: int) -> int:
    """The objective whose gradient stays in ``.grad``: the largest weight (the last of ties)."""
    w = host_weights(settings, m)
    return max(range(m), key=lambda i: (w[i], i))


def device_weights(state: WrapperState, m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The normalised weights on ``device`` in ``dtype``, copied once per ``(device, dtype, m)`` (cleared by configure)."""
    key = (device, dtype, m)
    w = state.device_weights.get(key)
    if w is None:
        w = state.settings.weights_tensor(m).to(device=device, dtype=dtype)
        state.device_weights[key] = w
    return w


def accumulate(
    state: WrapperState, store: GradientStore, losses: list[Tensor], *, combine: bool, seal: bool, ranks: tuple[Any, int]
) -> None:
    """Add every objective's gradient of ``losses`` (validated) to the window held by ``store`` (the current one).

    ``.grad`` replaced: a new window. A combined direction written in place (clipped, zeroed by
    ``zero_grad(set_to_none=False)``): a new window that keeps it and adds its own direction. Values of
    an uncombined window (or a combined one, without a version bump) are checked on the device.
    ``ranks``: ``(group, world size)`` of the data-parallel average. With ``combine`` the window is
    combined (``seal``: its direction fingerprinted); else the waiting gradients are fingerprinted.
    """
    m = len(losses)
    window = state.window
    continuing = window.open and store.grads_intact() and (window.phase == "accumulating" or store.guard.intact(store.params))
    if continuing and window.num_objectives != m:
        raise ValueError(
            f"got {m} losses, but {window.num_objectives} objectives were accumulated in this window; pass the same "
            "objectives in every micro-batch (or call zero_grad() to start over)"
        )
    store.check_backward(combine, continuing, ranks[1])
    # validated: from here on the window changes
    if not continuing:
        store.start_window(m, home_objective(state.settings, m))
        window.begin(m)
    else:
        window.note_edited(store.guard.edited(store.params, store.device))
        if window.phase == "combined":
            store.unwrite()
            window.reopen()
    try:
        store.accumulate(losses)
    except BaseException:
        store.discard_window()
        window.reset()
        raise
    if combine:
        combine_window(state, seal=seal, ranks=ranks)
    else:
        store.guard.seal(store.params)


@torch.no_grad()
def combine_window(state: WrapperState, *, seal: bool, ranks: tuple[Any, int]) -> StepDiagnostics:
    """Solve the dual on the window's gradients and write the direction into ``.grad`` (idempotent).

    ``seal``: fingerprint the written direction, for a later ``backward`` that continues the window.
    """
    window = state.window
    if window.phase == "combined":
        assert state.last is not None
        return state.last
    store = state.store
    if window.phase != "accumulating" or store is None:
        raise RuntimeError("no per-objective gradients are accumulated: call backward(losses) or step(losses) after zero_grad()")
    if not store.grads_intact():
        store.discard_window()
        window.reset()
        raise RuntimeError(
            ".grad was replaced (zero_grad, set_to_none or an assignment) after backward(..., combine=False), so the "
            "accumulated gradients are lost; run backward(losses) again"
        )
    assert window.num_objectives is not None
    edited = window.note_edited(store.guard.edited(store.params, store.device))
    with no_autocast(store.device):
        last = state.last = _combine(state, store, window.num_objectives, edited, ranks)
    if seal:
        store.guard.seal(store.params)
    window.combined()
    return last


def _combine(state: WrapperState, store: GradientStore, m: int, edited: Tensor, ranks: tuple[Any, int]) -> StepDiagnostics:
    group, world_size = ranks
    gram = store.gram_over_ranks(state.window, group, world_size)
    solution = solve_with_settings(gram, device_weights(state, m, gram.device, gram.dtype), state.settings)
    intact = ~edited.to(gram.device)
    # an edited window writes NaN, never a mix (step() refuses it with the reason)
    solution = solution._replace(coefficients=torch.where(intact, solution.coefficients, torch.nan))
    diag = gram.diagonal()
    finite = torch.isfinite(diag)
    written_finite = store.write(solution.coefficients)
    if state.nonfinite.checks:
        unshared = store.unshared_sumsq()
        finite = finite & torch.isfinite(unshared)
        # |d_j| <= sum_i |a_i| ||g_i||: finite gradients and coefficients give a finite float32
        # direction unless this bound overflows (float16 rows check what they wrote themselves)
        norms = (diag.clamp_min(0.0) + unshared.to(diag.dtype)).sqrt()
        written_finite = written_finite & torch.isfinite((solution.coefficients.abs() * norms).sum())
    return step_diagnostics(gram, solution, finite, written_finite, intact)
