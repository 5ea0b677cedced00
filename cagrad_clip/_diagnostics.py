"""What one combination computed (``opt.last``), built on the device without a host sync."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["StepDiagnostics", "all_finite", "step_diagnostics"]


class StepDiagnostics(NamedTuple):
    """What the last combination computed; all on-device tensors, read them without a sync cost."""

    gram: Tensor
    """``(m, m)`` Gram of the per-objective gradients on the shared parameters (float32 or better)."""
    cosines: Tensor
    """``(m, m)`` pairwise cosine similarities of the objectives' gradients (0 for a zero gradient)."""
    dual: Tensor
    """``p``: the CAGrad dual solution on the simplex."""
    clipped_dual: Tensor
    """``p~ = min(p, w)`` (``p`` when ``clip=False``)."""
    coefficients: Tensor
    """``a``: the direction written into ``.grad`` is ``sum_i a_i g_i``."""
    anchor_norm: Tensor
    """``||g0||`` with ``g0 = sum_i w_i g_i`` on the shared parameters."""
    fw_gap: Tensor
    """Frank-Wolfe gap of the dual solve (an upper bound on its suboptimality)."""
    finite: Tensor
    """``(m,)`` bool: objective ``i``'s gradient is finite on every parameter (shared and not)."""
    written_finite: Tensor
    """0-d bool: every value written into ``.grad`` is finite in the parameters' dtype."""
    window_intact: Tensor
    """0-d bool: no tool edited ``.grad`` in place while this window's gradients waited for a later
    call (``False``: the coefficients are NaN and :meth:`ConflictAverseOptimizer.step` refuses)."""


def step_diagnostics(gram: Tensor, solution: Any, finite: Tensor, written_finite: Tensor, intact: Tensor) -> StepDiagnostics:
    """The diagnostics of one combination: the solve's fields, the cosines of the Gram (0 for a zero
    gradient) and the finiteness flags."""
    diag = gram.diagonal()
    norms = diag.clamp_min(0.0).sqrt()
    outer = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    positive = outer > 0
    cosines = torch.where(positive, gram / torch.where(positive, outer, torch.ones_like(outer)), torch.zeros_like(gram))
    return StepDiagnostics(
        gram=gram,
        cosines=cosines,
        dual=solution.dual,
        clipped_dual=solution.clipped_dual,
        coefficients=solution.coefficients,
        anchor_norm=solution.anchor_norm,
        fw_gap=solution.fw_gap,
        finite=finite,
        written_finite=written_finite,
        window_intact=intact,
    )


def all_finite(d: StepDiagnostics) -> Tensor:
    """0-d bool on the device: every gradient, the coefficients and the written direction are finite."""
    return d.finite.all() & torch.isfinite(d.coefficients).all() & d.written_finite
