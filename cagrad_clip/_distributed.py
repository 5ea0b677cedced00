"""Data-parallel glue: average every objective's gradient across ranks before the Gram.

With ``torch.distributed`` initialised and a world size above one, each rank holds the
per-objective gradients of its own micro-batch (wherever its gradient store keeps them). Averaging
them over the ranks (all-reduces of ``m * D`` numbers in all, :func:`average_across_ranks`) gives
every rank the gradients of the full batch, so every rank forms the same Gram, solves the same dual, gets the same coefficients and
writes the same direction: the update equals one process on the concatenated batch (for losses
that are means over equally sized per-rank batches).

A multi-GPU path that skips this averaging (as RACO's authors' did) combines un-averaged per-rank
gradients: each rank gets its own coefficients, and DDP then averages directions that were
combined with different weights.

The collective is asynchronous on accelerators (NCCL) and never reads a value on the host.
See ``docs/distributed.md`` for DDP (``no_sync()``).

Sharded parameters (FSDP2 ``fully_shard``, DTensor ``Shard`` on a 1-D mesh): each rank holds only
its shard of every objective's gradient, already averaged over the ranks by FSDP's reduce-scatter.
The Gram of the full gradients is then the SUM over ranks of the shard Grams (the rows' inner
products decompose over disjoint coordinate slices): one all-reduce of ``m * m`` numbers
(:func:`sum_across_ranks`). :func:`sharded_layout` validates the parameters (host-side, at
construction) and returns the mesh's process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from ._torch_version import FSDP2_MIN_TORCH, torch_at_least

__all__ = [
    "active_group",
    "average_across_ranks",
    "check_distributed",
    "check_same_count",
    "reached_on_any_rank",
    "sharded_layout",
    "sum_across_ranks",
]


def check_distributed(distributed: Any, process_group: Any) -> None:
    """Validate the ``distributed`` / ``process_group`` constructor arguments, or raise naming the problem."""
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if process_group is not None:
        if not distributed:
            raise ValueError("process_group was given but distributed=False; drop one of them")
        if not dist.is_available():
            raise ValueError("process_group was given but this torch build has no torch.distributed")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")


def active_group(distributed: bool, process_group: Any) -> tuple[Any, int]:
    """``(group, world_size)`` to average over now, or ``(None, 1)`` when there is nothing to do.

    Decided at every combination (``torch.distributed`` may be initialised after the optimizer is
    built); a pure host-side check, no collective and no device sync.
    """
    if not distributed or not dist.is_available() or not dist.is_initialized():
        return None, 1
    world = dist.get_world_size(process_group)
    if world <= 1:
        return None, 1
    return process_group, world


def average_across_ranks(tensor: Tensor, group: Any, world_size: int) -> Tensor:
    """Average ``tensor`` in place over ``group`` (all-reduce SUM, then divide; gloo has no AVG).

    Averaging is idempotent on a tensor that is already identical on every rank, so averaging a
    buffer again after more local gradients were added to an averaged one is still exact (it
    averages only the new part); with power-of-two world sizes it is bit-exact.
    """
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    tensor.div_(world_size)
    return tensor


def _dtensor_types() -> tuple[Any, Any] | None:
    """``(DTensor, Shard)``, or ``None`` when this torch build has no ``torch.distributed.tensor``."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch 2.4 keeps DTensor in a private module
        try:
            from torch.distributed._tensor import DTensor, Shard
        except ImportError:  # builds without DTensor
            return None
    return DTensor, Shard


def sharded_layout(params: Sequence[Tensor]) -> Any:
    """The process group to sum shard Grams over if ``params`` are DTensors, else ``None``.

    Supported: every parameter a DTensor placed ``Shard(dim)`` on one and the same 1-D device
    mesh, as FSDP2's ``fully_shard`` makes them. Raises naming the problem for a mix of DTensor
    and plain parameters, several meshes, a multi-dimensional mesh (HSDP) or a ``Replicate``
    placement (those would need the Gram reduced over a sub-group; not implemented). Host-side only.
    """
    types = _dtensor_types()
    if types is None:
        return None
    dtensor, shard = types
    flags = [isinstance(p, dtensor) for p in params]
    if not any(flags):
        return None
    if not torch_at_least(FSDP2_MIN_TORCH):
        floor = ".".join(map(str, FSDP2_MIN_TORCH))
        raise NotImplementedError(
            f"the parameters are DTensors (FSDP2 fully_shard), which cagrad-clip supports from torch {floor} (the "
            f"oldest release its FSDP2 tests run on); torch {torch.__version__} is installed: upgrade torch, or "
            "train without fully_shard"
        )
    if not all(flags):
        plain = flags.index(False)
        raise ValueError(
            f"parameter {plain} (shape {tuple(params[plain].shape)}) is a plain tensor but others are DTensors "
            "(FSDP2 fully_shard): shard every trainable parameter the optimizer updates, or none"
        )
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    for i, p in enumerate(params):
        if p.device_mesh is not mesh and p.device_mesh != mesh:  # type: ignore[attr-defined]
            raise NotImplementedError(f"parameter {i} lives on a different device mesh; one mesh for all parameters is supported")
        if mesh.ndim != 1 or len(p.placements) != 1 or not isinstance(p.placements[0], shard):  # type: ignore[attr-defined]
            placements = tuple(p.placements)  # type: ignore[attr-defined]
            raise NotImplementedError(
                f"parameter {i} has placements {placements} on a {mesh.ndim}-D mesh; only Shard(dim) on a "
                "1-D mesh (FSDP2 fully_shard) is supported (HSDP / Replicate placements are not implemented)"
            )
    return mesh.get_group()


def sum_across_ranks(tensor: Tensor, group: Any) -> Tensor:
    """Sum ``tensor`` in place over ``group`` (all-reduce SUM); asynchronous on NCCL, no host read."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reached_on_any_rank(reached: Sequence[bool], group: Any, device: torch.device) -> list[bool]:
    """Which parameters some rank's backward reached: one all-reduce (MAX) of an int per parameter
    and a host read (which parameters keep ``.grad = None`` is a host-side decision). Only under
    ``torch.distributed`` with several ranks."""
    mask = torch.tensor([1 if r else 0 for r in reached], dtype=torch.int32, device=device)
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in mask.tolist()]


class _CountMemory(Protocol):
    ranks_agree_on: int | None


def check_same_count(agreed: _CountMemory, m: int, group: Any, device: torch.device) -> None:
    """Raise on every rank if the ranks pass different numbers of losses (instead of a hang or an abort).

    One tiny all-reduce (MAX of ``m`` and of ``-m``) and a host read, only when ``m`` differs from
    the count last confirmed (``agreed.ranks_agree_on``): not per step.
    """
    if agreed.ranks_agree_on == m:
        return
    counts = torch.tensor([m, -m], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = int(counts[0]), -int(counts[1])
    if largest != m or smallest != m:
        raise ValueError(
            f"the ranks passed different numbers of losses (this rank {m}, others between {smallest} and {largest}); "
            "every rank must pass one loss per objective, in the same order"
        )
    agreed.ranks_agree_on = m
