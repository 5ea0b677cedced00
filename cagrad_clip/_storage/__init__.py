"""Where the per-objective gradients live during an accumulation window, chosen once per layout.

Every way gradients reach the optimizer is a :class:`~.base.GradientStore`; :func:`make_store`
picks one: :class:`~.direct.DirectStore` (the default: each gradient where autograd allocates it,
the memory floor), :class:`~.accumulator.AccumulatorStore` (``accumulate_dtype=`` or mixed dtypes: wider
rows), :class:`~.sharded.ShardedStore` (FSDP2 shards) and :class:`~.passes.PassesStore`
(``memory="low"``: none stored). The optimizer drives them all through the same calls; each owns
its Gram reduction, its refusals and its non-finite report. A new store joins the contract suite
(``tests/contract/paths.py``) by one registration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._distributed import sharded_layout
from .._low_memory import AutogramEngine
from .._numerics import GRAM_BLOCK
from .accumulator import AccumulatorStore
from .base import GradientStore
from .blocks import CHUNK
from .direct import DirectStore
from .passes import PassesStore
from .sharded import ShardedStore

__all__ = ["CHUNK", "GRAM_BLOCK", "AccumulatorStore", "DirectStore", "GradientStore", "PassesStore", "ShardedStore", "make_store"]


def make_store(
    params: Sequence[Tensor],
    shared_count: int,
    *,
    accumulate_dtype: torch.dtype | None = None,
    memory: str = "default",
    engine: AutogramEngine | None = None,
    distributed: bool = True,
    process_group: Any = None,
) -> GradientStore:
    """The store for ``params`` (shared first), or a ``ValueError`` naming why none fits.

    ``memory="low"``: :class:`PassesStore` (no stored gradient). Otherwise DTensor shards (FSDP2)
    get :class:`ShardedStore`; one dtype and no ``accumulate_dtype``, :class:`DirectStore` (the
    memory floor); else :class:`AccumulatorStore` (wider rows).
    """
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device to share a gradient buffer, found {sorted(map(str, devices))}")
    group = sharded_layout(params)
    if group is not None:
        if memory == "low":
            raise ValueError("memory='low' does not support FSDP2 (DTensor) parameters; use the default memory mode")
        if not distributed:
            raise ValueError(
                "the parameters are DTensor shards (FSDP2 fully_shard) but distributed=False: each rank would solve "
                "on the Gram of its own shard only; keep distributed=True"
            )
        if process_group is not None:
            raise ValueError(
                "process_group was given but the parameters are DTensor shards (FSDP2 fully_shard): the Gram is "
                "summed over their device mesh's group; drop process_group"
            )
        return ShardedStore(params, shared_count, group, accumulate_dtype)
    if memory == "low":
        return PassesStore(params, shared_count, engine)
    if accumulate_dtype is None and len({p.dtype for p in params}) == 1:
        return DirectStore(params, shared_count)
    return AccumulatorStore(params, shared_count, accumulate_dtype)
