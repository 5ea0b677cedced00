"""Validation of the per-objective losses passed to the optimizer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["check_losses"]


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
            raise ValueError(f"loss {i} has shape {tuple(loss.shape)}; each objective's loss must be a scalar (reduce it, e.g. .mean())")
        if not loss.requires_grad:
            raise ValueError(
                f"loss {i} does not require grad: it was computed without autograd (torch.no_grad(), .detach(), "
                "or from parameters with requires_grad=False)"
            )
        if not loss.is_floating_point():
            raise TypeError(f"loss {i} has dtype {loss.dtype}; losses must be floating point")
    return losses
