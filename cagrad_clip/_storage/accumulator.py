"""Per-objective gradients of parameters whose rows need a wider (or common) dtype: the accumulator store.

Used when ``accumulate_dtype=torch.float32`` asks for float32 sums of low-precision gradients, or
when the trainable parameters have mixed dtypes (otherwise :mod:`.direct` keeps the rows at the
memory floor). Each objective's gradient is taken with ``loss_i.backward()`` (hooks fire, reentrant
checkpointing works, leaves outside the optimizer get the plain sum of the objectives' gradients),
lands in a fresh ``.grad``, is added into its wider row and dropped; the combination is written
parameter by parameter in the parameters' dtype. Parameters that no objective reached keep
``.grad = None``; whatever ``.grad`` held when the window began is kept and the combination added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._distributed import reached_on_any_rank
from .._numerics import reduction_dtype
from .base import GradientStore

__all__ = ["AccumulatorStore", "ReachRecorder"]


class ReachRecorder:
    """Which parameters a backward pass accumulated into, read off ``.grad`` after the pass.

    A pass reached a parameter iff autograd changed its ``.grad``: set a new tensor where there was
    ``None`` or another tensor, or added into the one there in place (its version moved). The
    check is against what ``.grad`` holds, not a hook's record: a post-accumulate-grad hook per
    parameter and pass made autograd re-enter Python ``m x P`` times a step (variant (c0) of
    ``python -m benchmarks.speed --sections step`` measures the passes against the floor).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.reached = [False] * len(self.params)

    def backward(self, loss: Tensor, retain_graph: bool) -> None:
        """``loss.backward()``, recording what it reaches; a clear error for DDP's reducer firing inside
        the passes."""
        before = [p.grad for p in self.params]
        versions = [-1 if g is None else g._version for g in before]
        try:
            loss.backward(retain_graph=retain_graph)
        except RuntimeError as error:
            if "mark a variable ready only once" in str(error):
                raise RuntimeError(
                    "DistributedDataParallel's gradient sync ran during the per-objective backward passes: run the "
                    "forward under model.no_sync() (ConflictAverseOptimizer averages every objective's gradient across "
                    "ranks itself; see docs/distributed.md)"
                ) from error
            raise
        # a loss that reaches no parameter (an objective constant on this batch) has a zero gradient,
        # as it has in sum(losses).backward()
        for j, (p, g, version) in enumerate(zip(self.params, before, versions)):
            grad = p.grad
            if grad is not g or (grad is not None and grad._version != version):
                self.reached[j] = True


class AccumulatorStore(GradientStore):
    """Rows in a wider dtype than (some of) the parameters' (see the module doc)."""

    def __init__(self, params: Sequence[Tensor], shared_count: int, dtype: torch.dtype | None = None) -> None:
        if dtype is None:  # mixed dtypes (make_store): float64 if any is, else float32
            dtype = reduction_dtype(*{p.dtype for p in params})
        super().__init__(params, shared_count, [p.shape for p in params], dtype)
        self.recorder = ReachRecorder(self.params)

    # ------------------------------------------------------------------ window
    def start_window(self, m: int, home: int) -> None:
        # what .grad holds (zeros of zero_grad(set_to_none=False) included) is kept and receives the
        # combination in place: views of a flat buffer stay the user's .grad
        self.external = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        rows = self.allocate(m, reusable=True)  # the rows are never handed out as .grad
        rows.zero_()
        self.home = home
        self.coefficients = None
        self.recorder.reached = [False] * len(self.params)

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        assert self.rows is not None
        m = len(losses)
        order = [i for i in range(m) if i != self.home] + [self.home]
        try:
            for n, i in enumerate(order):
                self._backward_into_row(losses[i], i, retain_graph=n < m - 1, keep=n == m - 1)
        except BaseException:
            self._restore_external()
            raise
        self._settle()

    def _backward_into_row(self, loss: Tensor, i: int, retain_graph: bool, keep: bool) -> None:
        assert self.rows is not None
        for p in self.params:
            p.grad = None
        self.recorder.backward(loss, retain_graph)
        self._fold_grads_into_row(i, keep)

    def _fold_grads_into_row(self, i: int, keep: bool) -> None:
        """Add each fresh ``.grad`` into the wider row ``i`` and drop it (``keep``: leave it in ``.grad``)."""
        assert self.rows is not None
        views, grads = [], []
        for p, view in zip(self.params, self.views(self.rows[i])):
            if p.grad is not None:
                views.append(view)
                grads.append(p.grad.to(self.dtype))
                if not keep:
                    p.grad = None
        if views:
            torch._foreach_add_(views, grads)

    def _settle(self) -> None:
        """After the passes: ``.grad`` is what it held when the window began where it held something,
        else the last pass's gradient (an intermediate the guard fingerprints, so that a tool editing
        ``.grad`` before the combination, e.g. ``GradScaler.unscale_``, is caught rather than ignored;
        it is dropped by the next pass)."""
        for p, e in zip(self.params, self.external):
            if e is not None:
                p.grad = e
        self.guard.record(self.params)

    def _restore_external(self) -> None:
        for p, e in zip(self.params, self.external):
            p.grad = e

    def average(self, group: Any, world_size: int) -> None:
        """Average the rows over the ranks; a parameter some rank reached gets a gradient on every rank."""
        self.recorder.reached = reached_on_any_rank(self.recorder.reached, group, self.device)
        super().average(group, world_size)

    # ------------------------------------------------------------------ combination
    def write(self, coefficients: Tensor) -> Tensor:
        assert self.rows is not None
        self.coefficients = coefficients
        grads = self._combination_per_parameter(coefficients)
        finite = self._add_to_external(grads)
        self.guard.record(self.params)
        return finite

    def _combination_per_parameter(self, coefficients: Tensor) -> list[Tensor]:
        """Accumulator mode: ``sum_i a_i g_i`` of each parameter, in the rows' dtype, cast to the parameter's."""
        assert self.rows is not None
        a = coefficients.to(self.dtype)
        out, start = [], 0
        for p, n in zip(self.params, self.numels):
            out.append((a @ self.rows[:, start : start + n]).view(p.shape).to(p.dtype))
            start += n
        return out

    def _add_to_external(self, combination: list[Tensor]) -> Tensor:
        """``.grad = kept + combination`` where ``.grad`` held something when the window began and an
        objective reached the parameter (an unreached one's kept ``.grad`` stays as it was, as with
        ``sum(losses).backward()``, even when the direction is NaN)."""
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        kept, added = [], []
        for p, e, d, reached in zip(self.params, self.external, combination, self.recorder.reached):
            if e is not None:
                if reached:
                    kept.append(e)
                    added.append(d)
                p.grad = e
            elif reached:
                p.grad = d
                finite = finite & torch.isfinite(d).all()
            else:
                p.grad = None
        return self.add_to_kept(kept, added, finite)

    def unwrite(self) -> None:
        """Before more accumulation: kept ``.grad`` loses the combination (the rows are untouched)."""
        assert self.rows is not None and self.coefficients is not None
        combination = self._combination_per_parameter(self.coefficients)
        kept = [(e, d) for e, d, reached in zip(self.external, combination, self.recorder.reached) if e is not None and reached]
        if kept:
            torch._foreach_sub_([e for e, _ in kept], [d for _, d in kept])
        for p, e in zip(self.params, self.external):
            if e is not None:
                p.grad = None
        self.coefficients = None
