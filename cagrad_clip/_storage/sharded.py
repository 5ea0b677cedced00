"""Per-objective gradients of FSDP2 (``fully_shard``) parameters: this rank's shards only.

``torch.autograd.grad`` cannot reach DTensor shards (FSDP's forward runs on all-gathered unsharded
parameters), so each objective gets ``loss_i.backward()`` and FSDP's own hooks reduce-scatter (and
average over ranks) into the sharded ``.grad``; its local shard is added into row ``i`` and
``.grad`` is reset. The Gram of the shard is local; the optimizer sums it over the ranks. The
combination is written as DTensors laid out like the parameters. Whatever ``.grad`` held when the
window began is kept aside and the combination is added to it; parameters that no objective
reached keep ``.grad = None``.

With gradient sync off (``set_requires_gradient_sync(False)``) FSDP keeps each gradient unsharded on
its module and never writes the sharded ``.grad``: every row would read zero and the step would do
nothing. :func:`unsynced_parameters` finds such parameters in FSDP's own state before a backward runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._distributed import check_same_count, sum_across_ranks
from .._numerics import reduction_dtype
from .base import GradientStore

__all__ = ["ShardedStore", "unsynced_parameters"]


def _fsdp_param_groups() -> list[Any]:
    """Every live FSDP2 parameter group (``fully_shard`` registers its state per module).

    FSDP's own bookkeeping, read on the host: torch 2.9 keeps one group per module state
    (``_fsdp_param_group``), later releases a list (``_fsdp_param_groups``).
    """
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # a build without FSDP2: no DTensor parameters reach this store
        return []
    groups: list[Any] = []
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState):
            found = getattr(state, "_fsdp_param_groups", None)
            if found is None:
                one = getattr(state, "_fsdp_param_group", None)
                found = [] if one is None else [one]
            groups.extend(found)
    return groups


def unsynced_parameters(params: Sequence[Tensor]) -> list[int]:
    """Indices of ``params`` whose FSDP2 module has gradient sync off (``set_requires_gradient_sync(False)``)."""
    index = {id(p): j for j, p in enumerate(params)}
    found: set[int] = set()
    for group in _fsdp_param_groups():
        if not getattr(group, "reduce_grads", True):
            found.update(index[id(fp.sharded_param)] for fp in group.fsdp_params if id(fp.sharded_param) in index)
    return sorted(found)


class ShardedStore(GradientStore):
    """Rows of this rank's local shards, in the shards' dtype; ``shard_group`` is the mesh's group."""

    def __init__(self, params: Sequence[Tensor], shared_count: int, group: Any, dtype: torch.dtype | None = None) -> None:
        local = [p.to_local() for p in params]  # type: ignore[attr-defined]
        dtypes = {t.dtype for t in local}
        if dtype is None:
            dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
            for d in dtypes:
                dtype = torch.promote_types(dtype, d)
        super().__init__(params, shared_count, [t.shape for t in local], dtype)
        self.shard_group = group
        self.reached = [False] * len(self.params)

    def gram_over_ranks(self, counter: Any, group: Any, world_size: int) -> Tensor:
        """The shard Grams summed over the mesh's group (FSDP already averaged the gradients)."""
        m = self.num_objectives
        assert m is not None
        check_same_count(counter, m, self.shard_group, self.device)
        return sum_across_ranks(self.gram(), self.shard_group)

    def check_backward(self, combine: bool, continuing: bool, world_size: int) -> None:
        unsynced = unsynced_parameters(self.params)
        if unsynced:
            raise RuntimeError(
                f"gradient sync is off for parameter(s) {unsynced[:8]}{' ...' if len(unsynced) > 8 else ''} "
                "(set_requires_gradient_sync(False)): FSDP would keep their gradients unsharded and never write .grad, "
                "so every objective's gradient would read zero and the step would do nothing. Keep gradient sync on "
                "(model.set_requires_gradient_sync(True)) while this optimizer accumulates: its micro-batches already "
                "add up in the optimizer"
            )

    def kept_row(self, i: int) -> bool:
        return False  # a shard's row says nothing about the other ranks' shards

    def start_window(self, m: int, home: int) -> None:
        self.external = [p.grad for p in self.params]
        self.allocate(m, reusable=False).zero_()
        self.home = home
        self.reached = [False] * len(self.params)
        self.coefficients = None

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        assert self.rows is not None
        last = len(losses) - 1
        try:
            for i, loss in enumerate(losses):
                self._backward_into_row(loss, i, retain_graph=i < last, keep=i == last)
        except BaseException:
            for p, e in zip(self.params, self.external):
                p.grad = e
            raise
        # .grad: what it held when the window began, else the last pass's shard (an intermediate the
        # guard fingerprints, so a tool editing .grad before the combination is caught; see base.py)
        for p, e in zip(self.params, self.external):
            if e is not None:
                p.grad = e
        self.guard.record(self.params)

    def _backward_into_row(self, loss: Tensor, i: int, retain_graph: bool, keep: bool) -> None:
        assert self.rows is not None
        for p in self.params:
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        views, grads = [], []
        for j, (p, view) in enumerate(zip(self.params, self.views(self.rows[i]))):
            g = p.grad
            if not keep:
                p.grad = None
            if g is None:
                continue
            if getattr(g, "placements", None) != p.placements:  # type: ignore[attr-defined]
                raise RuntimeError(
                    f"parameter {j}'s .grad after backward has placements {getattr(g, 'placements', 'none (a plain tensor)')}, "
                    f"not the parameter's {p.placements}: FSDP did not reduce-scatter it. Keep gradient sync on "  # type: ignore[attr-defined]
                    "(do not call set_requires_gradient_sync(False)) while this optimizer accumulates"
                )
            views.append(view)
            grads.append(g.to_local().to(self.dtype))  # type: ignore[attr-defined]
            self.reached[j] = True
        if views:  # a loss that reaches no parameter has a zero gradient
            torch._foreach_add_(views, grads)

    def _combination(self, coefficients: Tensor) -> list[Tensor]:
        """``sum_i a_i g_i`` of each local shard in the rows' dtype (float32 accumulation for half rows)."""
        assert self.rows is not None
        acc = reduction_dtype(self.dtype)
        rows = self.rows if self.dtype == acc else self.rows.to(acc)
        return self.views((coefficients.to(acc) @ rows).to(self.dtype))

    def write(self, coefficients: Tensor) -> Tensor:
        self.coefficients = coefficients
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        kept, added = [], []
        for p, e, local, reached in zip(self.params, self.external, self._combination(coefficients), self.reached):
            local = local.to(p.dtype)
            if e is not None:
                if reached:  # an unreached parameter's kept .grad stays as it was (a NaN direction included)
                    kept.append(e.to_local())  # type: ignore[attr-defined]
                    added.append(local)
            elif reached:
                p.grad = type(p).from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())  # type: ignore[attr-defined]
                finite = finite & torch.isfinite(local).all()
        finite = self.add_to_kept(kept, added, finite)
        self.guard.record(self.params)
        return finite

    def unwrite(self) -> None:
        assert self.coefficients is not None
        kept, added = [], []
        for p, e, local, reached in zip(self.params, self.external, self._combination(self.coefficients), self.reached):
            if e is None:
                p.grad = None
            elif reached:
                kept.append(e.to_local())  # type: ignore[attr-defined]
                added.append(local.to(p.dtype))
        if kept:
            torch._foreach_sub_(kept, added)
        self.coefficients = None
