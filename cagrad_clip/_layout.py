"""Where the per-objective gradients live: the options fixed at construction that decide it
(:class:`GradientFlow`), and the gradient store built for the parameters that are trainable now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._accumulation import WrapperState
from ._distributed import check_distributed
from ._low_memory import AutogramEngine
from ._storage import GradientStore, make_store

__all__ = ["GradientFlow", "current_store", "trainable_params"]


@dataclass(frozen=True)
class GradientFlow:
    """How gradients flow (``memory``, ``engine``, ``accumulate_dtype``, ``distributed``,
    ``process_group``, the ``shared`` parameters asked for): validated here, fixed for the optimizer's
    life (a different flow is a new optimizer over the same base optimizer)."""

    memory: str = "default"
    engine: AutogramEngine | None = None
    accumulate_dtype: torch.dtype | None = None
    distributed: bool = True
    process_group: Any = None
    shared: list[Tensor] | None = None

    def __post_init__(self) -> None:
        check_distributed(self.distributed, self.process_group)
        if self.accumulate_dtype is not None and self.accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate_dtype must be None, torch.float32 or torch.float64, got {self.accumulate_dtype!r}")
        if self.memory not in ("default", "low"):
            raise ValueError(f"unknown memory={self.memory!r}; choose 'default' or 'low'")
        if self.engine is not None and (self.memory != "low" or not isinstance(self.engine, AutogramEngine)):
            raise ValueError("engine= is an AutogramEngine for memory='low'; pass it with memory='low' only")
        if self.memory == "low" and self.accumulate_dtype is not None:
            raise ValueError("memory='low' keeps no per-objective gradients, so accumulate_dtype does not apply")


def trainable_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The base optimizer's parameters that require grad, each once, in group order."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    return list({id(p): p for p in params}.values())


def current_store(state: WrapperState, optimizer: torch.optim.Optimizer, flow: GradientFlow) -> GradientStore:
    """The gradient store for the parameters that require grad *now*, rebuilt (host-side, validated
    first) when they changed since the last call; shared parameters come first in its rows."""
    trainable = trainable_params(optimizer)
    key = tuple(id(p) for p in trainable)
    if state.store is not None and key == state.layout_key:
        return state.store
    if state.window.open and state.store is not None and state.store.grads_intact():
        raise RuntimeError("the trainable parameters changed during gradient accumulation; call zero_grad() first")
    if not trainable:
        raise ValueError("the base optimizer has no parameter with requires_grad=True; nothing to train")
    for j, p in enumerate(trainable):
        if p.is_complex():
            raise TypeError(f"parameter {j} (shape {tuple(p.shape)}) is complex; complex parameters are not supported")
        if p.layout != torch.strided:
            raise TypeError(f"parameter {j} has layout {p.layout}; only dense (strided) parameters are supported")
    if flow.shared is None:
        shared_ids = set(key)
    else:
        shared_ids = {id(p) for p in flow.shared if p.requires_grad}
        if not shared_ids:
            raise ValueError("shared contains no parameter with requires_grad=True; the Gram would be empty")
    ordered = [p for p in trainable if id(p) in shared_ids] + [p for p in trainable if id(p) not in shared_ids]
    store = make_store(
        ordered,
        sum(id(p) in shared_ids for p in trainable),
        accumulate_dtype=flow.accumulate_dtype,
        memory=flow.memory,
        engine=flow.engine,
        distributed=flow.distributed,
        process_group=flow.process_group,
    )
    state.store, state.layout_key = store, key
    state.window.reset()
    return store
