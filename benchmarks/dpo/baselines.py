"""MGDA and PCGrad as optimizer-shaped baselines the multi-objective trainer can drive.

:class:`GramRuleOptimizer` takes the per-objective gradients the way
:class:`~cagrad_clip.ConflictAverseOptimizer` does (``backward(losses, combine=)``, ``combine()``,
``step()``, ``last.coefficients`` / ``last.cosines``) but combines them with a rule on the Gram
matrix taken from the Pareto benchmarks (:func:`benchmarks.pareto.methods.min_norm_coefficients`,
:func:`benchmarks.pareto.methods.pcgrad_coefficients`). It stores the gradients as plain flat
vectors: simple and fine for the tiny models here, not meant to be fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from benchmarks.pareto.methods import min_norm_coefficients, pcgrad_coefficients
from cagrad_clip._optim_base import WrappedOptimizer

Rule = Callable[[Tensor, Tensor], Tensor]
"""``(gram (m, m) float64, weights (m,) float64) -> coefficients (m,)``."""


class Diagnostics(NamedTuple):
    coefficients: Tensor
    cosines: Tensor
    gram: Tensor


def mgda_rule(gram: Tensor, weights: Tensor) -> Tensor:
    """MGDA: the min-norm point of the convex hull of the gradients (ignores ``weights``)."""
    return min_norm_coefficients(gram)


def pcgrad_rule(seed: int) -> Rule:
    """PCGrad with a seeded random projection order; the ``w``-weighted sum of projected gradients."""
    generator = torch.Generator().manual_seed(seed)

    def rule(gram: Tensor, weights: Tensor) -> Tensor:
        return pcgrad_coefficients(gram.unsqueeze(0), weights.unsqueeze(0), generator)[0]

    return rule


class GramRuleOptimizer(WrappedOptimizer):
    """Wraps a base optimizer; the update direction is ``sum_i a_i g_i`` with ``a = rule(G G^T, w)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, rule: Rule, weights: Sequence[float]) -> None:
        super().__init__(optimizer)
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        self.weights = w / w.sum()
        self.rule = rule
        self.last: Diagnostics | None = None
        self._acc: Tensor | None = None
        self._combined = False
        self._stepped = False

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._acc, self._combined, self._stepped = None, False, False

    def backward(self, losses: Sequence[Tensor], combine: bool = True) -> None:
        if self._stepped:  # the trainer calls model.zero_grad(), not ours: a new window starts here
            self._acc, self._combined, self._stepped = None, False, False
        params = self._params()
        rows = []
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, grads)]))
        G = torch.stack(rows)
        self._acc = G if self._acc is None else self._acc + G
        self._combined = False
        if combine:
            self.combine()

    @torch.no_grad()
    def combine(self) -> Diagnostics:
        if self._acc is None:
            raise RuntimeError("no per-objective gradients accumulated")
        if self._combined and self.last is not None:
            return self.last
        G = self._acc.double()
        gram = G @ G.T
        a = self.rule(gram, self.weights.to(gram.dtype))
        direction = (a @ G).float()
        offset = 0
        for p in self._params():
            n = p.numel()
            p.grad = direction[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        norms = gram.diagonal().clamp_min(0).sqrt()
        outer = norms[:, None] * norms[None, :]
        cosines = torch.where(outer > 0, gram / outer.clamp_min(1e-300), torch.zeros_like(gram))
        self.last = Diagnostics(a.float(), cosines.float(), gram.float())
        self._combined = True
        return self.last

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if not self._combined:
            self.combine()
        self.optimizer.step()
        self._stepped = True
