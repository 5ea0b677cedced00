"""Where the per-objective gradients live during an accumulation window, chosen once per layout.

:func:`make_store` picks :class:`~.dense.DenseStore` for ordinary parameters and
:class:`~.sharded.ShardedStore` for FSDP2 shards; both implement :class:`~.base.GradientStore`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..distributed import sharded_layout
from .base import GradientStore
from .blocks import CHUNK, GRAM_BLOCK
from .dense import DenseStore
from .direct import DirectStore
from .sharded import ShardedStore

__all__ = ["CHUNK", "GRAM_BLOCK", "DenseStore", "DirectStore", "GradientStore", "ShardedStore", "make_store"]


def make_store(params: Sequence[Tensor], shared_count: int, accumulate_dtype: torch.dtype | None = None) -> GradientStore:
    """The store for ``params`` (shared first): sharded for DTensor shards, dense otherwise."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device to share a gradient buffer, found {sorted(map(str, devices))}")
    group = sharded_layout(params)
    if group is not None:
        return ShardedStore(params, shared_count, group, accumulate_dtype)
    if accumulate_dtype is None and len({p.dtype for p in params}) == 1:
        return DirectStore(params, shared_count)
    return DenseStore(params, shared_count, accumulate_dtype)
