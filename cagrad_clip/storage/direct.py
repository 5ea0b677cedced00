"""Per-objective gradients at the memory floor: ``m - 1`` rows, the home objective stays in ``.grad``.

Used whenever every trainable parameter has one dtype (the default). Each objective's gradient is
taken with ``loss_i.backward()``, so parameter hooks fire, reentrant checkpointing works, and leaves
outside the optimizer get the plain sum of the objectives' gradients.

* The ``m - 1`` non-home objectives land in an ``(m - 1, D)`` buffer in the parameters' dtype:
  before pass ``i`` every parameter's ``.grad`` is pointed at its slice of row ``i``, so autograd
  accumulates straight into the row (no copy, no transient gradient).
* The *home* objective (the largest weight) goes last with ``.grad`` as autograd leaves it: each
  parameter's gradient is allocated when the backward reaches it, while activations are being
  freed, exactly as in plain training. Allocating a whole row before the backward instead cost
  about half a parameter copy more on small models (``python -m benchmarks.speed --sections memory``,
  column "plain, .grad preallocated").
* The Gram (RACO Algorithm 1's ``H``) and the combination ``sum_i a_i g_i`` are accumulated in
  float32 or better; the combination is written into the home gradients in place, parameter by
  parameter, in chunks.

Parameters that no objective reached keep ``.grad = None``. Whatever ``.grad`` held when the window
began is kept aside and the combination is added to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import average_across_ranks
from .base import GradGuard, GradientStore
from .blocks import accumulation_dtype, blocked_gram, chunk_columns, row_sumsq
from .dense import ReachRecorder

__all__ = ["DirectStore"]


def _dot_rows(rows: Tensor, vector: Tensor, acc: torch.dtype) -> Tensor:
    """``rows @ vector`` (``(k, n) x (n,)``) in ``acc``: one matrix-vector product per chunk (the
    caller's chunks keep each float32 chain at most :data:`~cagrad_clip.storage.blocks.CHUNK` long)."""
    return rows.to(acc) @ vector.to(acc)


class DirectStore(GradientStore):
    """``m - 1`` rows in the parameters' dtype plus the home objective's gradients in ``.grad``."""

    direct = True

    def __init__(self, params: Sequence[Tensor], shared_count: int) -> None:
        super().__init__(params, shared_count, [p.shape for p in params], params[0].dtype)
        self.acc = accumulation_dtype(self.dtype)
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.recorder = ReachRecorder(self.params)
        self.external: list[Tensor | None] = [None] * len(self.params)
        self.home_grads: list[Tensor | None] = [None] * len(self.params)
        self.fresh = [False] * len(self.params)  # home gradient allocated by write() (home did not reach it)
        self.coefficients: Tensor | None = None
        self.m = 0
        self._zeroed = GradGuard()
        self._order_indices: dict[tuple[int, int], Tensor] = {}

    def close(self) -> None:
        self.recorder.remove()

    def mark_zeroed(self) -> None:
        self._zeroed.record(self.params)

    def release(self) -> None:
        self.external = [None] * len(self.params)
        self.home_grads = [None] * len(self.params)
        self.fresh = [False] * len(self.params)
        self.coefficients = None

    # ------------------------------------------------------------------ layout helpers
    def _row(self, i: int) -> int:
        """Row of objective ``i`` (``i != home``) in the ``(m - 1, D)`` buffer."""
        return i if i < self.home else i - 1

    def _columns(self, j: int) -> slice:
        return slice(self.offsets[j], self.offsets[j + 1])

    def _chunks(self, j: int) -> Iterator[slice]:
        """Column chunks of parameter ``j`` (local to its flattened gradient)."""
        n = self.numels[j]
        step = chunk_columns(max(self.m - 1, 1), self.numel, upcast=self.dtype != self.acc)  # sized on the model
        for start in range(0, n, step):  # a loop over shapes only: no sync
            yield slice(start, min(n, start + step))

    @property
    def num_objectives(self) -> int | None:
        return None if self.rows is None else self.m

    def row_finite(self, i: int) -> bool:
        assert self.rows is not None
        if i == self.home:
            grads = [g for g in self.home_grads if g is not None]
            return all(bool(torch.isfinite(g).all()) for g in grads)
        return bool(torch.isfinite(self.rows[self._row(i)]).all())

    # ------------------------------------------------------------------ window
    def start_window(self, m: int, home: int) -> None:
        zeros = self._zeroed.intact(self.params)  # .grad holds the zeros our zero_grad() left
        self._zeroed.clear()
        self.external = [None if zeros else p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.m, self.home = m, home
        self.allocate(m - 1, reusable=True).zero_()  # never handed out as .grad: always reusable
        self.home_grads = [None] * len(self.params)
        self.fresh = [False] * len(self.params)
        self.coefficients = None
        self.recorder.reached = [False] * len(self.params)

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        assert self.rows is not None
        m = len(losses)
        try:
            for i in [i for i in range(m) if i != self.home]:
                row = self.views(self.rows[self._row(i)])
                for p, view in zip(self.params, row):
                    p.grad = view
                self.recorder.backward(losses[i], i, retain_graph=True)
            for p, g in zip(self.params, self.home_grads):
                p.grad = g
            self.recorder.backward(losses[self.home], self.home, retain_graph=False)
        except BaseException:
            for p, e in zip(self.params, self.external):
                p.grad = e
            raise
        # a sparse home gradient (nn.Embedding(sparse=True)) is combined densely, like the rows
        self.home_grads = [None if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad for p in self.params]
        for p, g in zip(self.params, self.home_grads):
            p.grad = g
        self.guard.record(self.params)

    def average(self, group: Any, world_size: int) -> None:
        """Average every objective's gradient over the ranks (rows in one all-reduce, home per parameter)."""
        assert self.rows is not None
        average_across_ranks(self.rows, group, world_size)
        for j, p in enumerate(self.params):
            if self.home_grads[j] is None:  # every rank must join every all-reduce
                self.home_grads[j] = torch.zeros(p.shape, dtype=self.dtype, device=self.device)
                p.grad = self.home_grads[j]
            average_across_ranks(self.home_grads[j], group, world_size)  # type: ignore[arg-type]
        self.guard.record(self.params)

    # ------------------------------------------------------------------ reductions
    def gram(self) -> Tensor:
        """The ``(m, m)`` Gram over the shared parameters, float32 or better."""
        assert self.rows is not None
        k = self.m - 1
        inner = blocked_gram(self.rows, self.shared_numel)  # (k, k)
        cross = torch.zeros(k, dtype=self.acc, device=self.device)
        own = torch.zeros((), dtype=self.acc, device=self.device)
        for j in range(self.shared_count):
            g = self.home_grads[j]
            if g is None:
                continue
            flat = g.reshape(-1)
            if k:
                block = self.rows[:, self._columns(j)]
                for cols in self._chunks(j):  # half-precision pieces are upcast one chunk at a time
                    cross = cross + _dot_rows(block[:, cols], flat[cols], self.acc)
            own = own + torch.linalg.vector_norm(flat, dtype=self.acc).square()
        top = torch.cat([inner, cross.unsqueeze(1)], 1)
        bottom = torch.cat([cross, own.reshape(1)]).unsqueeze(0)
        ordered = torch.cat([top, bottom], 0)  # objectives in the order (non-home..., home)
        index = self._order_index()
        return ordered.index_select(0, index).index_select(1, index)

    def _order_index(self) -> Tensor:
        """Position of each objective in the order (non-home..., home); cached per ``(m, home)``, since
        building it from a Python list is a host-to-device copy (a stream sync on CUDA) on the step path."""
        key = (self.m, self.home)
        index = self._order_indices.get(key)
        if index is None:
            positions = [self._row(i) if i != self.home else self.m - 1 for i in range(self.m)]
            index = self._order_indices[key] = torch.tensor(positions, device=self.device)
        return index

    def unshared_sumsq(self) -> Tensor:
        assert self.rows is not None
        rows_part = row_sumsq(self.rows, self.shared_numel)
        own = torch.zeros((), dtype=self.acc, device=self.device)
        for j in range(self.shared_count, len(self.params)):
            g = self.home_grads[j]
            if g is not None:
                own = own + torch.linalg.vector_norm(g.reshape(-1), dtype=self.acc).square()
        return torch.cat([rows_part, own.reshape(1)]).index_select(0, self._order_index())

    # ------------------------------------------------------------------ combination
    def _combine_parameter(self, j: int, a_home: Tensor, a_rows: Tensor, target: Tensor, extremes: list[Tensor]) -> None:
        """``target = a_home * target + a_rows @ rows[:, columns of j]`` in float32 chunks, in place."""
        assert self.rows is not None
        flat = target.view(-1)
        block = self.rows[:, self._columns(j)]
        for cols in self._chunks(j):
            combined = a_home * flat[cols].to(self.acc)
            if block.shape[0]:
                combined = combined + a_rows @ block[:, cols].to(self.acc)
            flat[cols].copy_(combined)
            if self.dtype == torch.float16:
                extremes.append(torch.stack(torch.aminmax(flat[cols])))

    def write(self, coefficients: Tensor) -> Tensor:
        assert self.rows is not None
        self.coefficients = coefficients
        a = coefficients.to(self.acc)
        index = self._order_index()
        a_ordered = torch.empty_like(a).index_copy_(0, index, a)
        a_rows, a_home = a_ordered[:-1], a_ordered[-1]
        extremes: list[Tensor] = []
        for j, p in enumerate(self.params):
            if not self.recorder.reached[j]:
                continue
            if self.home_grads[j] is None:  # reached by other objectives only: the home part is zero
                self.home_grads[j] = torch.zeros(p.shape, dtype=self.dtype, device=self.device)
                self.fresh[j] = True
            self._combine_parameter(j, a_home, a_rows, self.home_grads[j], extremes)  # type: ignore[arg-type]
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        if extremes:
            low, high = torch.stack(extremes).unbind(-1)
            finite = (low.amin() > -torch.inf) & (high.amax() < torch.inf)
        kept, added = [], []
        for p, e, d in zip(self.params, self.external, self.home_grads):
            if e is not None:
                if d is not None:
                    kept.append(e)
                    added.append(d)
                p.grad = e
            else:
                p.grad = d
        if kept:
            torch._foreach_add_(kept, added)
            for e in kept:
                finite = finite & torch.isfinite(e).all()
        self.guard.record(self.params)
        return finite

    def unwrite(self) -> None:
        """Before more accumulation: ``g_home = (d - sum_{i != home} a_i g_i) / a_home`` back in place.

        ``a_home >= w_home / divisor > 0`` (the home objective has the largest weight); this costs one
        rounding of ``d`` in the parameters' dtype (pass ``combine=False`` to all but the last
        ``backward`` of an accumulation to avoid it).
        """
        assert self.rows is not None and self.coefficients is not None
        kept = [(e, d) for e, d in zip(self.external, self.home_grads) if e is not None and d is not None]
        if kept:
            torch._foreach_sub_([e for e, _ in kept], [d for _, d in kept])
        a = self.coefficients.to(self.acc)
        a_ordered = torch.empty_like(a).index_copy_(0, self._order_index(), a)
        a_rows, a_home = -a_ordered[:-1] / a_ordered[-1], 1.0 / a_ordered[-1]
        unused: list[Tensor] = []
        for j, g in enumerate(self.home_grads):
            if g is None:
                continue
            if self.fresh[j]:
                self.home_grads[j] = None
                self.fresh[j] = False
                continue
            self._combine_parameter(j, a_home, a_rows, g, unused)
        for p, g in zip(self.params, self.home_grads):
            p.grad = g
        self.coefficients = None
