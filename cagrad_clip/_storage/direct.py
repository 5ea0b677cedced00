"""Per-objective gradients at the memory floor: each one stays where autograd allocates it.

Used whenever every trainable parameter has one dtype (the default). Each objective's gradient is
taken with ``loss_i.backward()``, so parameter hooks fire, reentrant checkpointing works, and leaves
outside the optimizer get the plain sum of the objectives' gradients.

* Before pass ``i`` every parameter's ``.grad`` is set to what objective ``i`` has accumulated in
  this window (``None`` at the start), so autograd allocates each gradient only when the backward
  reaches it, exactly as in plain training; after the pass the
  tensors are taken out of ``.grad`` and kept as objective ``i``'s gradient, in the parameters'
  dtype. Nothing is allocated ahead of the backward and nothing is copied (a buffer allocated
  before the passes would hold a whole row during the first pass; ``python -m benchmarks.speed
  --sections memory`` measures the peak against the floor).
* The *home* objective (the largest weight) goes last; its gradients stay in ``.grad``.
* The Gram (RACO Algorithm 1's ``H``) and the combination ``sum_i a_i g_i`` are accumulated in
  float32 or better over :class:`Chunk` s: a few consecutive (pieces of) parameters gathered into
  one ``(m, L)`` block, small enough to be a transient (:func:`~.blocks.gather_columns`), large enough that a
  model with hundreds of small tensors takes few Python iterations. The combination is written
  into the home gradients in place.

Parameters that no objective reached keep ``.grad = None``. Whatever ``.grad`` held when the window
began is kept aside and the combination is added to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._distributed import average_across_ranks, reached_on_any_rank
from .._numerics import gram_of_block, reduction_dtype
from .accumulator import ReachRecorder
from .base import GradGuard, GradientStore
from .blocks import gather_columns

__all__ = ["Chunk", "DirectStore", "plan_chunks"]


def _flat(t: Tensor) -> Tensor:
    """``t``'s elements in memory order as a 1-D view (no copy).

    Autograd gives a parameter's gradient the parameter's strides when the parameter is dense and
    non-overlapping (e.g. ``channels_last``), else contiguous ones; every objective's gradient of a
    parameter then has the same layout, so their memory orders match element for element.
    """
    if t.is_contiguous():
        return t if t.dim() == 1 else t.view(-1)  # a 1-D tensor (a bias) is its own flat view
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


@dataclass(frozen=True)
class Chunk:
    """Consecutive pieces ``(parameter, start, stop)`` of flattened parameters, ``length`` columns in all."""

    pieces: tuple[tuple[int, int, int], ...]
    length: int


def plan_chunks(numels: Sequence[int], indices: Sequence[int], columns: int) -> list[Chunk]:
    """Pack the parameters ``indices`` (in order) into chunks of at most ``columns`` columns.

    A parameter larger than ``columns`` is split into pieces; small ones share a chunk. Pure host
    arithmetic on shapes (no tensor is touched).
    """
    chunks: list[Chunk] = []
    pieces: list[tuple[int, int, int]] = []
    length = 0
    for j in indices:
        start, n = 0, numels[j]
        while start < n:
            take = min(n - start, columns - length)
            pieces.append((j, start, start + take))
            length += take
            start += take
            if length == columns:
                chunks.append(Chunk(tuple(pieces), length))
                pieces, length = [], 0
    if pieces:
        chunks.append(Chunk(tuple(pieces), length))
    return chunks


class DirectStore(GradientStore):
    """Every objective's gradients as autograd allocated them; the home objective's in ``.grad``."""

    def __init__(self, params: Sequence[Tensor], shared_count: int) -> None:
        super().__init__(params, shared_count, [p.shape for p in params], params[0].dtype)
        self.acc = reduction_dtype(self.dtype)
        self.recorder = ReachRecorder(self.params)
        self.grads: list[list[Tensor | None]] = []  # grads[i][j]: objective i, parameter j (grads[home] is .grad)
        self.fresh = [False] * len(self.params)  # home gradient allocated by write() (home did not reach it)
        #: The home objective's squared norm over the non-shared parameters, taken by :meth:`write` before
        #: its gradients became the direction (``None``: not written, read them from ``grads``).
        self._home_unshared: Tensor | None = None
        self.m = 0
        self._zeroed = GradGuard()
        self._plans: dict[tuple[int, int, int], list[Chunk]] = {}
        self._zeros: Tensor | None = None
        self._buffer: Tensor | None = None

    def mark_zeroed(self) -> None:
        self._zeroed.record(self.params)

    def end_window(self) -> None:
        super().end_window()
        self.grads = []
        self.fresh = [False] * len(self.params)
        self._home_unshared = None
        self._zeros = None
        self._buffer = None

    @property
    def num_objectives(self) -> int | None:
        return self.m if self.grads else None

    @property
    def home_grads(self) -> list[Tensor | None]:
        return self.grads[self.home]

    # ------------------------------------------------------------------ chunks
    def _plan(self, indices: Sequence[int]) -> list[Chunk]:
        """Chunks over the parameters ``indices``. Cached per ``m`` for a ``range`` (all parameters, the
        shared ones), planned afresh for any other subset: which parameters a step reaches may change
        every step (conditional computation), and a cache keyed by it would grow without bound."""
        columns = gather_columns(self.m, self.numel, self.params[0].element_size())
        if not isinstance(indices, range):
            return plan_chunks(self.numels, indices, columns)
        key = (self.m, indices.start, indices.stop)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_chunks(self.numels, indices, columns)
        return plan

    def _zero_piece(self, length: int) -> Tensor:
        """A read-only run of zeros standing for a gradient an objective did not produce."""
        if self._zeros is None or self._zeros.numel() < length:
            self._zeros = torch.zeros(length, dtype=self.dtype, device=self.device)
        return self._zeros[:length]

    def _pieces(self, plan: Sequence[Chunk], objectives: Sequence[Sequence[Tensor | None]]) -> list[list[list[Tensor | None]]]:
        """``[c][i][k]``: piece ``k`` of chunk ``c`` of objective ``i``'s gradients, a 1-D view in memory
        order (``None`` where the objective has no gradient for that parameter).

        Each gradient is flattened once and, if the plan spreads it over several chunks, cut by one
        ``split``: a handful of ops per gradient, not a view and a slice per chunk it spans.
        """
        sizes: dict[int, list[int]] = {}
        for chunk in plan:
            for j, start, stop in chunk.pieces:
                sizes.setdefault(j, []).append(stop - start)
        per_objective = []
        for grads in objectives:
            cut: dict[int, Sequence[Tensor] | None] = {}
            for j, lengths in sizes.items():
                g = grads[j]
                cut[j] = None if g is None else (_flat(g),) if len(lengths) == 1 else _flat(g).split(lengths)
            taken = dict.fromkeys(sizes, 0)
            chunks = []
            for chunk in plan:
                views: list[Tensor | None] = []
                for j, _, _ in chunk.pieces:
                    parts = cut[j]
                    views.append(None if parts is None else parts[taken[j]])
                    taken[j] += 1
                chunks.append(views)
            per_objective.append(chunks)
        return [[chunks[c] for chunks in per_objective] for c in range(len(plan))]

    def _gather(self, chunk: Chunk, pieces: Sequence[Sequence[Tensor | None]]) -> Tensor:
        """The ``(len(pieces), chunk.length)`` block of the chunk in float32 or better (one copy).

        ``pieces`` are the chunk's entry of :meth:`_pieces`, one list per objective. The copy goes
        into one buffer reused by every chunk of the step (freed by :meth:`release`), so a large model
        pays its page faults once per step instead of once per chunk.
        """
        parts = [
            self._zero_piece(stop - start) if view is None else view
            for views in pieces
            for view, (_, start, stop) in zip(views, chunk.pieces)
        ]
        size = len(pieces) * chunk.length
        if self._buffer is None or self._buffer.numel() < size:
            columns = max(c.length for c in self._plan(range(len(self.params))))
            self._buffer = torch.empty(max(size, self.m * columns), dtype=self.acc, device=self.device)
        out = self._buffer if self._buffer.numel() == size else self._buffer[:size]
        return torch.cat(parts, out=out).view(len(pieces), chunk.length)

    # ------------------------------------------------------------------ window
    def start_window(self, m: int, home: int) -> None:
        # .grad holds the zeros our zero_grad(set_to_none=False) left: the home objective accumulates
        # into those very tensors (views of a flat buffer stay the user's .grad), nothing is kept aside
        zeros = self._zeroed.intact(self.params)
        self._zeroed.clear()
        self.external = [None if zeros else p.grad for p in self.params]
        home_start: list[Tensor | None] = [p.grad for p in self.params] if zeros else [None] * len(self.params)
        for p in self.params:
            p.grad = None
        self.m, self.home = m, home
        self.grads = [[None] * len(self.params) for _ in range(m)]
        self.grads[home] = home_start
        self.fresh = [False] * len(self.params)
        self.coefficients = None
        self._home_unshared = None
        self.recorder.reached = [False] * len(self.params)

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        m = len(losses)
        try:
            for n, i in enumerate([i for i in range(m) if i != self.home] + [self.home]):
                for p, g in zip(self.params, self.grads[i]):
                    p.grad = g  # autograd adds to what objective i has so far, or allocates
                self.recorder.backward(losses[i], retain_graph=n < m - 1)
                # a sparse gradient (nn.Embedding(sparse=True)) is kept and combined densely
                self.grads[i] = [None if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad for p in self.params]
        except BaseException:
            for p, e in zip(self.params, self.external):
                p.grad = e
            raise
        for p, g in zip(self.params, self.home_grads):
            p.grad = g
        self.guard.record(self.params)

    def average(self, group: Any, world_size: int) -> None:
        """Average every objective's gradient over the ranks, one all-reduce per chunk.

        Only the parameters some rank reached take part (:func:`~..distributed.reached_on_any_rank`);
        one no rank reached keeps ``.grad = None`` on every rank, as in one process.
        """
        reached = reached_on_any_rank(self.recorder.reached, group, self.device)
        for grads in self.grads:  # every rank must join every all-reduce with the same shapes
            for j, p in enumerate(self.params):
                if reached[j] and grads[j] is None:
                    grads[j] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.recorder.reached = reached
        indices: Sequence[int] = range(len(self.params)) if all(reached) else [j for j, r in enumerate(reached) if r]
        plan = self._plan(indices)
        for chunk, pieces in zip(plan, self._pieces(plan, self.grads)):
            block = average_across_ranks(self._gather(chunk, pieces), group, world_size)
            targets: list[Tensor] = [view for views in pieces for view in views]  # type: ignore[misc]
            torch._foreach_copy_(targets, list(block.view(-1).split([t.numel() for t in targets])))
        for p, g in zip(self.params, self.home_grads):
            p.grad = g
        self.guard.record(self.params)

    # ------------------------------------------------------------------ reductions
    def gram(self) -> Tensor:
        """The ``(m, m)`` Gram over the shared parameters, float32 or better, chunk by chunk."""
        plan = self._plan(range(self.shared_count))
        parts = [gram_of_block(self._gather(chunk, pieces)) for chunk, pieces in zip(plan, self._pieces(plan, self.grads))]
        if not parts:
            return torch.zeros((self.m, self.m), dtype=self.acc, device=self.device)
        return torch.stack(parts).sum(0)  # the chunk sums added pairwise, not in one float32 chain

    def _unshared_sumsq_of(self, grads: Sequence[Tensor | None]) -> Tensor:
        """One objective's squared norm over the non-shared parameters (0-d, float32 or better; no sync)."""
        present = [g for g in grads[self.shared_count :] if g is not None]
        if not present:
            return torch.zeros((), dtype=self.acc, device=self.device)
        return torch.stack(torch._foreach_norm(present, 2, dtype=self.acc)).square().sum()

    def unshared_sumsq(self) -> Tensor:
        """Each objective's squared norm over the non-shared parameters (heads): their finiteness check.

        The home objective's own gradients, not the direction written into them: a NaN in another
        objective's head reaches the direction and must not mark the home objective as well.
        """
        return torch.stack(
            [
                self._home_unshared if i == self.home and self._home_unshared is not None else self._unshared_sumsq_of(grads)
                for i, grads in enumerate(self.grads)
            ]
        )

    def kept_row(self, i: int) -> bool:
        return i != self.home  # the home objective's gradients became the direction

    def row_finite(self, i: int) -> bool:
        return all(bool(torch.isfinite(g).all()) for g in self.grads[i] if g is not None)

    # ------------------------------------------------------------------ combination
    def _combine_into_home(self, coefficients: Tensor, indices: Sequence[int]) -> Tensor:
        """``home = sum_i coefficients[i] * grads[i]`` (the home's current values included) over the
        parameters ``indices``, in float32 or better, in place; returns ``(min, max)`` pairs of what
        float16 parameters received (empty otherwise).

        float32/float64 gradients are combined in place, a fused multiply-add per objective over all
        the parameters (no copy, no chunk); half-precision ones chunk by chunk through a float32 block,
        rounded once.
        """
        home = self.home_grads
        if self.dtype == self.acc:
            scales = list(coefficients.unbind())
            homes = [g for g in (home[j] for j in indices) if g is not None]
            if homes:  # empty when no loss reaches a parameter: nothing to combine
                torch._foreach_mul_(homes, scales[self.home])
            for i, grads in enumerate(self.grads):
                if i == self.home:
                    continue
                pairs = [(h, g) for h, g in ((home[j], grads[j]) for j in indices) if h is not None and g is not None]
                if pairs:
                    torch._foreach_addcmul_([h for h, _ in pairs], [g for _, g in pairs], [scales[i]] * len(pairs))
            return torch.zeros((0, 2), dtype=self.acc, device=self.device)
        extremes = []
        plan = self._plan(indices)
        for chunk, pieces in zip(plan, self._pieces(plan, self.grads)):
            combined = coefficients @ self._gather(chunk, pieces)
            targets: list[Tensor] = pieces[self.home]  # type: ignore[assignment]
            torch._foreach_copy_(targets, list(combined.split([stop - start for _, start, stop in chunk.pieces])))
            if self.dtype == torch.float16:
                extremes.append(torch.stack(torch.aminmax(combined)))
        if not extremes:
            return torch.zeros((0, 2), dtype=self.acc, device=self.device)
        return torch.stack(extremes)

    def write(self, coefficients: Tensor) -> Tensor:
        self.coefficients = coefficients
        home = self.home_grads
        # the home gradients become the direction in place: their unshared norm is taken first (one fused
        # norm on the device; with every parameter shared there is nothing to take)
        self._home_unshared = self._unshared_sumsq_of(home) if self.shared_count < len(self.params) else None
        reached = self.recorder.reached
        written: Sequence[int] = range(len(self.params)) if all(reached) else [j for j, r in enumerate(reached) if r]
        for j in written:
            if home[j] is None:  # reached by other objectives only: the home part is zero
                home[j] = torch.zeros_like(self.params[j], memory_format=torch.preserve_format)
                self.fresh[j] = True
        extremes = self._combine_into_home(coefficients.to(self.acc), written)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        if extremes.numel():  # float16: what the rounding to the parameters' dtype gives
            finite = torch.isfinite(extremes.to(self.dtype)).all()
        kept, added = [], []
        for p, e, d in zip(self.params, self.external, home):
            if e is not None:
                if d is not None:
                    kept.append(e)
                    added.append(d)
                p.grad = e
            else:
                p.grad = d
        finite = self.add_to_kept(kept, added, finite)
        self.guard.record(self.params)
        return finite

    def unwrite(self) -> None:
        """Before more accumulation: ``g_home = (d - sum_{i != home} a_i g_i) / a_home`` back in place.

        ``a_home >= w_home / divisor > 0`` (the home objective has the largest weight); this costs one
        rounding of ``d`` in the parameters' dtype (pass ``combine=False`` to all but the last
        ``backward`` of an accumulation to avoid it).
        """
        assert self.coefficients is not None
        home = self.home_grads
        kept = [(e, d) for e, d in zip(self.external, home) if e is not None and d is not None]
        if kept:
            torch._foreach_sub_([e for e, _ in kept], [d for _, d in kept])
        a = self.coefficients.to(self.acc)
        inverse = -a / a[self.home]
        inverse[self.home] = 1.0 / a[self.home]
        for j in range(len(self.params)):
            if self.fresh[j]:
                home[j] = None
                self.fresh[j] = False
        self._combine_into_home(inverse, [j for j, g in enumerate(home) if g is not None])
        for p, g in zip(self.params, home):
            p.grad = g
        self.coefficients = None
        self._home_unshared = None
