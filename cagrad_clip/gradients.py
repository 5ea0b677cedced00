"""Per-objective gradients in one flat ``(m, D)`` buffer: accumulate, Gram, write back.

The buffer holds row ``i`` = the gradient of objective ``i`` with respect to every trainable
parameter, flattened and concatenated (shared parameters first, so the shared block is the
column slice ``[:, :shared_numel]``). The Gram is one matmul on that slice and the combined
direction ``sum_i a_i g_i`` is one vector-matrix product, written into ``.grad`` through views.

Sharded parameters (DTensors from FSDP2 ``fully_shard``): the buffer holds this rank's *local
shards* only, ``(m, D_r)``. ``torch.autograd.grad`` cannot reach them (FSDP's forward runs on
all-gathered unsharded parameters), so each objective gets ``loss_i.backward()`` and FSDP's own
hooks reduce-scatter (and average over ranks) into the sharded ``.grad``, which is copied into row
``i`` and reset; ``.grad`` as it was before is restored afterwards. The Gram of the shard is local;
the caller sums it over the ranks (``distributed.sum_across_ranks``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .distributed import sharded_layout

__all__ = ["GRAM_BLOCK", "ObjectiveGradients", "check_losses"]

#: Columns per block of the blocked Gram (see :meth:`ObjectiveGradients.gram`).
GRAM_BLOCK = 1 << 14


def check_losses(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Return ``losses`` as a list of scalar tensors that require grad, or raise naming the problem."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                "losses must be a sequence of scalar tensors (one per objective) or a 1-D tensor of them, "
                f"got a tensor of shape {tuple(losses.shape)}"
            )
        losses = list(losses.unbind())
    elif not isinstance(losses, Sequence) or isinstance(losses, (str, bytes)):
        raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
    losses = list(losses)
    if len(losses) == 0:
        raise ValueError("losses is empty: pass one scalar loss per objective")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {i} is a {type(loss).__name__}, not a torch.Tensor")
        if loss.numel() != 1:
            raise ValueError(
                f"loss {i} has shape {tuple(loss.shape)}; each objective's loss must be a scalar (reduce it, e.g. .mean())"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"loss {i} does not require grad: it was computed without autograd (torch.no_grad(), .detach(), "
                "or from parameters with requires_grad=False)"
            )
        if not loss.is_floating_point():
            raise TypeError(f"loss {i} has dtype {loss.dtype}; losses must be floating point")
    return losses


class ObjectiveGradients:
    """The per-objective gradients of a fixed list of parameters, accumulated over backward calls.

    Args:
        params: trainable parameters, shared ones first; all on one device.
        shared_count: how many of ``params`` (from the front) are shared: the Gram is measured there.
        dtype: the buffer's dtype; at least float32 so reductions never run in half precision.
    """

    def __init__(self, params: Sequence[Tensor], shared_count: int, dtype: torch.dtype) -> None:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"all trainable parameters must be on one device to share a gradient buffer, found {sorted(map(str, devices))}"
            )
        self.params = list(params)
        self.device = params[0].device
        self.dtype = dtype
        #: process group of the shards (DTensor parameters) or ``None`` (plain parameters).
        self.shard_group = sharded_layout(self.params)
        self.sharded = self.shard_group is not None
        self.shapes = [p.to_local().shape if self.sharded else p.shape for p in self.params]
        self.numels = [s.numel() for s in self.shapes]
        self.shared_numel = sum(self.numels[:shared_count])
        self.numel = sum(self.numels)
        self.buffer: Tensor | None = None
        self.accumulated = False
        # The combined direction is written into one persistent (D,) buffer whose views become .grad:
        # a fresh 36 MB tensor per step costs page faults (m = 2: 19.9 ms against 4.2 ms reused, `python -m
        # benchmarks.speed --sections levers`).
        # It is reused only once every .grad view of it has been freed (weak references tell).
        self._direction: Tensor | None = None
        self._direction_users: list[weakref.ref] = []

    @property
    def num_objectives(self) -> int | None:
        """``m`` of the current accumulation, or ``None`` when nothing is accumulated."""
        return self.buffer.shape[0] if (self.buffer is not None and self.accumulated) else None

    def reset(self) -> None:
        """Forget what was accumulated; the next :meth:`accumulate` overwrites the buffer."""
        self.accumulated = False

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    def _sharded_backward(self, loss: Tensor, retain_graph: bool) -> list[Tensor | None]:
        """This rank's shard of ``d loss / d params`` (averaged over ranks by FSDP), via ``.backward()``.

        Expects every ``.grad`` to be ``None`` (the caller stashes them) and leaves them ``None``.
        """
        loss.backward(retain_graph=retain_graph)
        grads: list[Tensor | None] = []
        for i, p in enumerate(self.params):
            g = p.grad
            p.grad = None
            if g is not None and getattr(g, "placements", None) != p.placements:
                raise RuntimeError(
                    f"parameter {i}'s .grad after backward has placements {getattr(g, 'placements', 'none (a plain tensor)')}, "
                    f"not the parameter's {p.placements}: FSDP did not reduce-scatter it. Keep gradient sync on "
                    "(do not call set_requires_gradient_sync(False)) while this optimizer accumulates"
                )
            grads.append(None if g is None else g.to_local())
        return grads

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        """Add ``d loss_i / d params`` to row ``i`` for every objective (m backward passes).

        The graph is retained for all but the last objective, so it is freed as soon as possible.
        Parameters an objective does not reach get a zero gradient for it; an objective that
        reaches no parameter raises ``ValueError``.
        """
        m = len(losses)
        if self.accumulated and self.buffer is not None and self.buffer.shape[0] != m:
            raise ValueError(
                f"got {m} losses, but {self.buffer.shape[0]} objectives were accumulated since the last zero_grad(); "
                "pass the same objectives in every micro-batch"
            )
        fresh = not self.accumulated
        if self.buffer is None or self.buffer.shape[0] != m:
            self.buffer = torch.empty((m, self.numel), dtype=self.dtype, device=self.device)
        stashed = [p.grad for p in self.params] if self.sharded else []
        if self.sharded:
            for p in self.params:
                p.grad = None
        try:
            self._accumulate_rows(losses, fresh)
        finally:
            for p, g in zip(self.params, stashed):
                p.grad = g
        self.accumulated = True

    def _accumulate_rows(self, losses: Sequence[Tensor], fresh: bool) -> None:
        assert self.buffer is not None
        m = len(losses)
        for i, loss in enumerate(losses):
            if self.sharded:
                grads = self._sharded_backward(loss, retain_graph=i < m - 1)
            else:
                grads = torch.autograd.grad(loss, self.params, retain_graph=i < m - 1, allow_unused=True)
            if all(g is None for g in grads):
                raise ValueError(
                    f"loss {i} does not depend on any trainable parameter of the optimizer; check that it is "
                    "computed from the model the optimizer updates"
                    + (" (and, under FSDP, that gradient sync is on: set_requires_gradient_sync(True))" if self.sharded else "")
                )
            views = self._views(self.buffer[i])
            present = [(v, g) for v, g in zip(views, grads) if g is not None]
            if fresh:
                torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
                absent = [v for v, g in zip(views, grads) if g is None]
                if absent:
                    torch._foreach_zero_(absent)
            else:
                torch._foreach_add_([v for v, _ in present], [g for _, g in present])

    def gram(self) -> Tensor:
        """``H = G_shared G_shared^T`` in the buffer's dtype (at least float32), blocked over columns.

        One batched matmul of ``(m, GRAM_BLOCK)`` column blocks, then a sum over the blocks, plus the
        remainder columns. Against one ``(m, D) x (D, m)`` GEMM this is both faster (each block
        stays in cache: 46 ms vs 88 ms at m = 8, D = 8.9 M on this CPU) and far more accurate: the
        GEMM sums D products in a single float32 chain (relative error 1.6e-3 against float64 at
        D = 8.9 M), the blocks sum 16 K products each and the block sums are added pairwise (1.3e-7).
        Measured by ``python -m benchmarks.speed --sections levers``.
        For sharded parameters this is the Gram of this rank's shard; sum it over ``shard_group``.
        """
        assert self.buffer is not None
        shared = self.buffer[:, : self.shared_numel]
        blocks = shared.shape[1] // GRAM_BLOCK
        if blocks < 2:
            return shared @ shared.T
        tiled = shared[:, : blocks * GRAM_BLOCK].view(shared.shape[0], blocks, GRAM_BLOCK).transpose(0, 1)
        gram = torch.bmm(tiled, tiled.transpose(1, 2)).sum(0)
        rest = shared[:, blocks * GRAM_BLOCK :]
        return gram.addmm_(rest, rest.T)

    def _direction_buffer(self) -> Tensor:
        """The persistent ``(D,)`` direction buffer, or a fresh one while a view of it is still alive."""
        if self._direction is None or any(user() is not None for user in self._direction_users):
            self._direction = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self._direction_users = []
        assert self._direction is not None
        return self._direction

    def add_combination_to_grads(self, coefficients: Tensor, alpha: float = 1.0) -> None:
        """``p.grad += alpha * sum_i a_i g_i`` for every parameter (``.grad`` created if ``None``)."""
        assert self.buffer is not None
        direction = self._direction_buffer()
        scaled = coefficients.to(self.dtype) if alpha == 1.0 else coefficients.to(self.dtype) * alpha
        torch.mv(self.buffer.T, scaled, out=direction)  # one pass over the buffer, into reused memory
        existing_grads, existing_views = [], []
        for view, p in zip(self._views(direction), self.params):
            if p.grad is None:
                local = view.to(p.dtype) if p.dtype != self.dtype else view
                if self.sharded:  # this rank's shard of the direction, as a DTensor laid out like p
                    local = type(p).from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if p.dtype == self.dtype:  # a view of the buffer: it may not be overwritten while alive
                    self._direction_users.append(weakref.ref(local))
                p.grad = local
            else:
                existing_grads.append(p.grad.to_local() if self.sharded else p.grad)
                existing_views.append(view)
        if existing_grads:
            torch._foreach_add_(existing_grads, existing_views)
