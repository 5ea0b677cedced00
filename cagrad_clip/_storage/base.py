"""What every gradient store shares: the parameters (shared first), the guard on ``.grad``, the calls.

A store holds, for one accumulation window (from the first ``backward`` after a step or a reset
to the ``step``), the sum of every objective's gradient over the trainable parameters, and forms
their Gram over the shared parameters. Concrete stores differ in where those sums live and how a
backward pass reaches them (:mod:`.direct`: in the tensors autograd allocates, ``m - 1`` kept aside
and the home objective's in ``.grad``; :mod:`.accumulator`: flat ``(m, D)`` rows in a wider dtype;
:mod:`.sharded`: rows of FSDP2 shards; :mod:`.passes`: none, ``memory="low"``) and in how the
combination reaches ``.grad``.

The guard: after every mutation the store remembers which tensor each ``.grad`` is; whether
``.grad`` still holds those tensors is checked against reality (:meth:`GradientStore.grads_intact`),
never assumed: ``model.zero_grad()`` or any assignment to ``.grad`` between two ``backward`` calls
starts a new window. In-place edits of the values (clipping, ``GradScaler.unscale_``, writes through
``.data``, some without a version bump) are caught by a device-side fingerprint
(:meth:`GradGuard.edited`) that the optimizer checks when it reuses the window.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._distributed import average_across_ranks, check_same_count
from .blocks import blocked_gram, row_sumsq

__all__ = ["GradientStore", "GradGuard", "fingerprint"]


def _local(grad: Tensor) -> Tensor:
    """A gradient's local values: a DTensor shard's local tensor, a sparse gradient's values, a dense
    tensor itself."""
    to_local = getattr(grad, "to_local", None)
    if to_local is not None:
        return to_local()
    return grad._values() if grad.is_sparse else grad


def fingerprint(grads: Sequence[Tensor]) -> Tensor:
    """Each tensor's 2-norm (float32 or better), one fused reduction per dtype: a device-side
    summary that changes when a tool edits the values in place, even without bumping the version
    counter (``GradScaler.unscale_``, edits through ``.data``); no host sync."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    parts = []
    for dtype, group in by_dtype.items():
        acc = torch.promote_types(dtype, torch.float32)
        norms = torch._foreach_norm(group, 2, dtype=acc) if acc != dtype else torch._foreach_norm(group, 2)
        parts.append(torch.stack(norms).to(torch.float64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device="cpu")


class GradGuard:
    """What ``.grad`` held when the store last left it: which tensors (host side) and, once
    :meth:`seal` ed, a device-side fingerprint of their values.

    Replacing ``.grad`` (``zero_grad``, ``set_to_none``, an assignment) is seen on the host and
    starts a new window; an in-place edit of the values is seen by comparing fingerprints on the
    device (:meth:`edited`), so that the optimizer can refuse the step without a host sync here.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref[Tensor] | None] = []
        self._versions: list[int] = []
        self._print: Tensor | None = None

    def record(self, params: Sequence[Tensor]) -> None:
        self._refs = [None if p.grad is None else weakref.ref(p.grad) for p in params]
        self._versions = [-1 if p.grad is None else p.grad._version for p in params]
        self._print = None

    def clear(self) -> None:
        self._refs, self._versions, self._print = [], [], None

    def same_tensors(self, params: Sequence[Tensor]) -> bool:
        """``.grad`` of every parameter is the very tensor recorded (values may have changed)."""
        if len(self._refs) != len(params):
            return False
        for p, ref in zip(params, self._refs):
            grad = p.grad
            if ref is None:
                if grad is not None:
                    return False
            elif grad is None or grad is not ref():
                return False
        return True

    def intact(self, params: Sequence[Tensor]) -> bool:
        """The very tensors recorded, none written in place since (version counters; host side)."""
        return self.same_tensors(params) and all(p.grad is None or p.grad._version == version for p, version in zip(params, self._versions))

    def seal(self, params: Sequence[Tensor]) -> None:
        """Remember the values' fingerprint (one fused norm per dtype over ``.grad``; no sync)."""
        self._print = fingerprint([_local(p.grad) for p in params if p.grad is not None])

    def edited(self, params: Sequence[Tensor], device: torch.device) -> Tensor:
        """0-d bool on ``device``: some ``.grad`` value changed since :meth:`seal` (``False`` if not sealed)."""
        if self._print is None:
            return torch.zeros((), dtype=torch.bool, device=device)
        now = fingerprint([_local(p.grad) for p in params if p.grad is not None])
        before = self._print.to(now.device)
        if now.shape != before.shape:
            return torch.ones((), dtype=torch.bool, device=device)
        differs = (now != before) & ~(now.isnan() & before.isnan())
        return differs.any().to(device)


class GradientStore:
    """Per-objective gradient rows of a fixed parameter list (shared parameters first).

    Subclasses implement :meth:`start_window`, :meth:`accumulate`, :meth:`write`, :meth:`unwrite`.
    """

    def __init__(self, params: Sequence[Tensor], shared_count: int, shapes: Sequence[torch.Size], dtype: torch.dtype) -> None:
        self.params = list(params)
        self.device = self.params[0].device
        self.dtype = dtype
        self.shapes = list(shapes)
        self.numels = [s.numel() for s in self.shapes]
        self.shared_count = shared_count
        self.shared_numel = sum(self.numels[:shared_count])
        self.numel = sum(self.numels)
        self.rows: Tensor | None = None
        self.home = 0
        self.guard = GradGuard()
        #: what ``.grad`` held when the window began (kept; the combination is added to it)
        self.external: list[Tensor | None] = [None] * len(self.params)
        #: the coefficients of the combination in ``.grad`` (``None`` until one is written)
        self.coefficients: Tensor | None = None

    # ------------------------------------------------------------------ helpers
    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` (one row, ``(D,)``) split into per-parameter views shaped like the parameters."""
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    def allocate(self, m: int, reusable: bool) -> Tensor:
        """The ``(m, D)`` rows for a new window: the last window's memory when ``reusable``, else fresh."""
        if not reusable or self.rows is None or self.rows.shape[0] != m:
            self.rows = torch.empty((m, self.numel), dtype=self.dtype, device=self.device)
        return self.rows

    @property
    def num_objectives(self) -> int | None:
        return None if self.rows is None else self.rows.shape[0]

    @staticmethod
    def add_to_kept(kept: list[Tensor], added: list[Tensor], finite: Tensor) -> Tensor:
        """``kept[k] += added[k]`` (the ``.grad`` a window began with receives the combination) in one
        fused add; returns ``finite`` and-ed with every result being finite."""
        if kept:
            torch._foreach_add_(kept, added)
            for t in kept:
                finite = finite & torch.isfinite(t).all()
        return finite

    # ------------------------------------------------------------------ reductions
    def gram(self) -> Tensor:
        """``H = G_shared G_shared^T`` of this window's rows, float32 or better (RACO Alg. 1's ``H``)."""
        assert self.rows is not None
        return blocked_gram(self.rows, self.shared_numel)

    def unshared_sumsq(self) -> Tensor:
        """Each row's squared norm over the non-shared columns (heads): their finiteness check."""
        assert self.rows is not None
        return row_sumsq(self.rows, self.shared_numel)

    def row_finite(self, i: int) -> bool:
        """Whether row ``i`` holds only finite values (a host read; for error messages only)."""
        assert self.rows is not None
        return bool(torch.isfinite(self.rows[i]).all())

    def grads_intact(self) -> bool:
        """``.grad`` holds the very tensors this store left there (checked, not remembered; their values
        are checked on the device by :meth:`GradGuard.edited`)."""
        return self.guard.same_tensors(self.params)

    # ------------------------------------------------------------------ what differs between stores
    def check_backward(self, combine: bool, continuing: bool, world_size: int) -> None:
        """Refuse, before anything changes, a ``backward`` this store cannot take (default: none)."""

    def gram_over_ranks(self, counter: Any, group: Any, world_size: int) -> Tensor:
        """The Gram of the full-batch gradients: each objective's gradient averaged over the ranks
        first when ``world_size > 1`` (``counter`` remembers the objective count the ranks agreed on)."""
        if world_size > 1:  # host-side check; the all-reduce itself never syncs
            m = self.num_objectives
            assert m is not None
            check_same_count(counter, m, group, self.device)
            self.average(group, world_size)
        return self.gram()

    def kept_row(self, i: int) -> bool:
        """Whether objective ``i``'s own gradient is still held after the combination was written."""
        return True

    def explain_nonfinite(self, bad: list[int], gram: Tensor) -> str:
        """Name what is not finite among the objectives ``bad`` (host reads: only on the error path)."""
        overflowed = [i for i in bad if self.kept_row(i) and self.row_finite(i)]
        if overflowed:
            rest = sorted(set(bad) - set(overflowed))
            return (
                f"objective(s) {overflowed} have finite gradients whose squared norm overflows {gram.dtype} (|g| is about 1e19 "
                "or more): scale those losses down" + (f"; objective(s) {rest} have a non-finite gradient (Inf/NaN)" if rest else "")
            )
        return f"objective(s) {bad} have a non-finite gradient (Inf/NaN) or one too large to square"

    # ------------------------------------------------------------------ the window (subclasses)
    def start_window(self, m: int, home: int) -> None:
        """Begin a new accumulation of ``m`` objectives; ``home`` is the objective kept in ``.grad``."""
        raise NotImplementedError

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        """Add ``d loss_i / d params`` to row ``i`` (one backward pass each, graph freed after the last)."""
        raise NotImplementedError

    def write(self, coefficients: Tensor) -> Tensor:
        """Put ``sum_i a_i g_i`` into ``.grad``; return a 0-d bool: everything written is finite."""
        raise NotImplementedError

    def unwrite(self) -> None:
        """Take the written combination back out of ``.grad`` so more gradients can be accumulated."""
        raise NotImplementedError

    def average(self, group: Any, world_size: int) -> None:
        """Average every objective's gradient over the ranks (``torch.distributed``), in place."""
        assert self.rows is not None
        average_across_ranks(self.rows, group, world_size)

    def mark_zeroed(self) -> None:
        """``zero_grad(set_to_none=False)`` just zeroed ``.grad`` in place (stores that can reuse those zeros override)."""

    def discard_window(self) -> None:
        """Forget the window (after a failed pass or a reset); ``.grad`` is left as it is."""
        self.guard.clear()
        self.end_window()

    def end_window(self) -> None:
        """Drop this window's references to gradients the user now owns (the window is over).

        Whatever ``.grad`` held before the window and the home objective's gradients belong to
        ``.grad`` after the step; a reference kept here would keep them alive after ``zero_grad()``
        (``set_to_none``) and add a whole parameter copy to the next forward's peak. The rows go too
        (the next window allocates them again; CUDA's caching allocator hands the same memory back).
        Stores that hold more per window extend this.
        """
        self.rows = None
        self.external = [None] * len(self.params)
        self.coefficients = None
