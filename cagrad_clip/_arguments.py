"""Checks of ``ConflictAverseOptimizer``'s arguments and of assignments to its read-only attributes
(host-side; each raises naming what is wrong and how to fix it, before anything changes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._optim_base import WrappedOptimizer

__all__ = [
    "check_base_optimizer",
    "check_no_step_in_backward",
    "check_shared",
    "fixed",
    "read_only",
    "shared_list",
    "split_step_arguments",
]


def check_no_step_in_backward(params: Sequence[Tensor]) -> None:
    """Refuse optimizer-in-backward hooks: they consume each gradient as it is accumulated, before the
    other objectives' gradients exist (host-side attribute reads; nothing changes)."""
    for j, p in enumerate(params):
        if getattr(p, "_post_accumulate_grad_hooks", None):
            raise RuntimeError(
                f"parameter {j} (shape {tuple(p.shape)}) has a post-accumulate-grad hook (register_post_accumulate_grad_hook, "
                "e.g. an optimizer step in backward): it would consume each objective's gradient as it is accumulated, "
                "before the conflict-averse direction exists. Remove the hook and step this optimizer after backward"
            )


def fixed(name: str) -> None:
    raise AttributeError(
        f"{name} is fixed at construction (it decides where the per-objective gradients live): build a new "
        f"ConflictAverseOptimizer(..., {name}=...) over the same base optimizer to change it"
    )


def read_only(name: str) -> None:
    raise AttributeError(
        f"{name} is read-only: call opt.configure({name}=...) to change it (validated; it takes effect at the next combination)"
    )


def check_base_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, WrappedOptimizer):
        raise TypeError("optimizer is already a ConflictAverseOptimizer; wrap the base optimizer once")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS re-evaluates its closure several times per step, but ConflictAverseOptimizer combines one set of "
            "losses per step; wrap a first-order optimizer (SGD, Adam, AdamW, ...)"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(
            "SparseAdam needs sparse gradients, but the combined direction is dense; wrap Adam/AdamW, or keep the sparse "
            "embedding in its own SparseAdam outside this optimizer"
        )


def shared_list(shared: Any) -> list[Any]:
    """``shared`` as a list: a module's parameters, a single parameter, or an iterable of parameters."""
    if isinstance(shared, torch.nn.Module):
        return list(shared.parameters())
    if isinstance(shared, Tensor):
        return [shared]
    try:
        return list(shared)
    except TypeError:
        raise TypeError(f"shared must be a module, a parameter or an iterable of parameters, got {type(shared).__name__}") from None


def check_shared(shared: list[Any], optimizer: torch.optim.Optimizer) -> list[Tensor]:
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for i, p in enumerate(shared):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared[{i}] is a {type(p).__name__}, not a parameter tensor")
        if id(p) not in known:
            raise ValueError(f"shared[{i}] (shape {tuple(p.shape)}) is not a parameter of the base optimizer")
    if not any(p.requires_grad for p in shared):
        raise ValueError("shared contains no parameter with requires_grad=True; the Gram would be empty")
    return shared


def split_step_arguments(losses: Any, closure: Callable[[], Any] | None) -> tuple[Any, Callable[[], Any] | None]:
    """``step(losses)``, ``step(closure)`` and ``step(closure=closure)`` as ``(losses, closure)``, at most
    one of them set."""
    if callable(losses) and not isinstance(losses, Tensor):
        if closure is not None:
            raise ValueError("pass either losses or closure, not both")
        return None, losses
    if closure is not None and losses is not None:
        raise ValueError("pass either losses or closure, not both")
    return losses, closure
