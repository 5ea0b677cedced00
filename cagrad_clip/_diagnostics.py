"""What one combination computed (``opt.last``), built on the device without a host sync."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._dual import CAGradSolution

__all__ = ["StepDiagnostics", "all_finite", "explain_nonfinite", "step_diagnostics"]


class StepDiagnostics(NamedTuple):
    """What the last combination computed: the dual solve (:class:`~cagrad_clip.CAGradSolution`, the
    type ``solve_cagrad`` returns, under :attr:`solution` and through the same attribute names:
    ``coefficients``, ``dual``, ``clipped_dual``, ``weights``, ``anchor_norm``, ``dual_value``,
    ``fw_gap``, ``clip_change``, ``clip_active``) plus what only a step knows. All on-device tensors: read them without a sync cost."""

    gram: Tensor
    """``(m, m)`` Gram of the per-objective gradients on the shared parameters (float32 or better)."""
    cosines: Tensor
    """``(m, m)`` pairwise cosine similarities of the objectives' gradients (0 for a zero gradient)."""
    solution: CAGradSolution
    """The dual solve of this Gram (its coefficients NaN if the window was edited: see ``window_intact``)."""
    finite: Tensor
    """``(m,)`` bool: objective ``i``'s gradient is finite on every parameter (shared and not)."""
    written_finite: Tensor
    """0-d bool: every value written into ``.grad`` is finite in the parameters' dtype."""
    window_intact: Tensor
    """0-d bool: no tool edited ``.grad`` in place while this window's gradients waited for a later
    call (``False``: the coefficients are NaN and :meth:`ConflictAverseOptimizer.step` refuses)."""

    @property
    def coefficients(self) -> Tensor:
        """``a``: the direction written into ``.grad`` is ``sum_i a_i g_i``."""
        return self.solution.coefficients

    @property
    def dual(self) -> Tensor:
        """``p``: the CAGrad dual solution on the simplex."""
        return self.solution.dual

    @property
    def clipped_dual(self) -> Tensor:
        """``p~ = min(p, w)`` (``p`` when ``clip=False``)."""
        return self.solution.clipped_dual

    @property
    def weights(self) -> Tensor:
        """The normalised user weights ``w``."""
        return self.solution.weights

    @property
    def anchor_norm(self) -> Tensor:
        """``||g0||`` with ``g0 = sum_i w_i g_i`` on the shared parameters."""
        return self.solution.anchor_norm

    @property
    def dual_value(self) -> Tensor:
        """``F(p)``, the dual objective at ``p``."""
        return self.solution.dual_value

    @property
    def fw_gap(self) -> Tensor:
        """Frank-Wolfe gap of the dual solve (an upper bound on its suboptimality)."""
        return self.solution.fw_gap

    @property
    def clip_change(self) -> Tensor:
        """``||d(p~) - d(p)|| / ||g0||``: how much RACO's clip changed the direction (with ``clip=False``,
        how much it would have), from the same solve; 0-d, on the device."""
        return self.solution.clip_change

    @property
    def clip_active(self) -> Tensor:
        """0-d bool on the device: ``clip=True`` and the clip changed the direction beyond rounding."""
        return self.solution.clip_active


def step_diagnostics(gram: Tensor, solution: CAGradSolution, finite: Tensor, written_finite: Tensor, intact: Tensor) -> StepDiagnostics:
    """The diagnostics of one combination: the solve, the cosines of the Gram (0 for a zero gradient)
    and the finiteness flags."""
    diag = gram.diagonal()
    norms = diag.clamp_min(0.0).sqrt()
    outer = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    positive = outer > 0
    cosines = torch.where(positive, gram / torch.where(positive, outer, torch.ones_like(outer)), torch.zeros_like(gram))
    return StepDiagnostics(
        gram=gram, cosines=cosines, solution=solution, finite=finite, written_finite=written_finite, window_intact=intact
    )


def all_finite(d: StepDiagnostics) -> Tensor:
    """0-d bool on the device: every gradient, the coefficients and the written direction are finite."""
    return d.finite.all() & torch.isfinite(d.coefficients).all() & d.written_finite


def explain_nonfinite(d: StepDiagnostics, store: Any) -> str:
    """Name what is not finite in a combination (host reads: only on the error path); ``store`` is
    the :class:`~cagrad_clip._storage.GradientStore` that held the window, or ``None``."""
    bad = [i for i, ok in enumerate(d.finite.tolist()) if not ok]
    if bad and store is not None:
        return store.explain_nonfinite(bad, d.gram)
    if not bool(torch.isfinite(d.coefficients).all()):
        return "the combination overflowed (the Gram of finite gradients is not finite)"
    dtypes = sorted({str(p.dtype) for p in (store.params if store is not None else [])})
    return (
        f"the combined direction overflows the parameters' dtype ({', '.join(dtypes)}) although every objective's "
        "gradient is finite; scale the losses down"
    )
