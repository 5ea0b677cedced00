"""The one training loop every method goes through, batched over methods and runs.

Parameters live in a tensor ``X`` of shape ``(M, R, d)`` (M methods, R runs: starts x weights x
seeds). One forward gives losses ``(M, R, m)``; ``m`` autograd calls give per-run gradients
(losses of different runs do not interact, so the gradient of the summed loss is per-run
exact); one batched matmul gives the Grams ``(M, R, m, m)``. The only Python loops in the step
are over steps, objectives and methods -- never over runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .methods import Method

LossFn = Callable[[Tensor], Tensor]
"""Maps parameters ``(M, R, d)`` to losses ``(M, R, m)``; runs must not interact."""
MetricFn = Callable[[Tensor], dict[str, Tensor]]
"""Maps parameters ``(M, R, d)`` to named metrics of shape ``(M, R)``."""


@dataclass
class RunResult:
    """What :func:`run` records. Logged tensors have a leading axis over ``log_steps``."""

    x0: Tensor
    final: Tensor
    log_steps: list[int]
    logs: dict[str, Tensor]
    trajectory: Tensor | None
    first_hit: Tensor | None
    seconds: float
    clip_active: Tensor | None = None
    """``(M, R)``: the fraction of steps where RACO's clip changed the direction (NaN: not a CAGrad method)."""
    clip_change: Tensor | None = None
    """``(M, R)``: the mean over steps of ``||d(p~) - d(p)|| / ||g0||`` (what the clip changes, or would)."""


class BatchedAdam:
    """Adam on one tensor; elementwise, so exactly per-run for a batch of runs."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.t = 0
        self.m1: Tensor | None = None
        self.m2: Tensor | None = None

    def step(self, x: Tensor, d: Tensor) -> Tensor:
        if self.m1 is None:
            self.m1, self.m2 = torch.zeros_like(x), torch.zeros_like(x)
        assert self.m2 is not None
        self.t += 1
        self.m1.mul_(self.b1).add_(d, alpha=1 - self.b1)
        self.m2.mul_(self.b2).addcmul_(d, d, value=1 - self.b2)
        bc1 = 1 - self.b1**self.t
        bc2 = 1 - self.b2**self.t
        denom = (self.m2 / bc2).sqrt_().add_(self.eps)
        return x - (self.lr / bc1) * self.m1 / denom


class BatchedSGD:
    """Plain gradient descent ``x <- x - lr d``."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, x: Tensor, d: Tensor) -> Tensor:
        return x - self.lr * d


def make_optimizer(name: str, lr: float) -> BatchedAdam | BatchedSGD:
    if name == "adam":
        return BatchedAdam(lr)
    if name == "sgd":
        return BatchedSGD(lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam' or 'sgd'")


def per_objective_grads(loss_fn: LossFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """Losses ``(M, R, m)`` and gradients ``(M, R, m, d)`` at ``x`` of shape ``(M, R, d)``."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        losses = loss_fn(xr)
        m = losses.shape[-1]
        grads = [torch.autograd.grad(losses[..., i].sum(), xr, retain_graph=i < m - 1)[0] for i in range(m)]
    return losses.detach(), torch.stack(grads, -2)


def run(
    loss_fn: LossFn,
    x0: Tensor,
    weights: Tensor,
    methods: list[Method],
    steps: int,
    optimizer: str = "adam",
    lr: float = 1e-3,
    log_points: int = 100,
    metric_fn: MetricFn | None = None,
    hit_fn: Callable[[Tensor], Tensor] | None = None,
    record_trajectory: bool = False,
    seed: int = 0,
    desc: str = "",
    progress: bool = True,
) -> RunResult:
    """Run every method from the same starts ``x0 (R, d)`` with user weights ``weights (R, m)``.

    ``hit_fn(X) -> bool (M, R)`` marks runs inside a target set; ``first_hit`` is the first
    step count after which it held (``-1`` if never). Metrics and (optionally) the trajectory
    are logged at ``log_points`` evenly spaced steps, including step 0 and the last step.
    """
    import time

    M = len(methods)
    R, d = x0.shape
    x = x0.unsqueeze(0).expand(M, R, d).clone()
    opt = make_optimizer(optimizer, lr)
    gen = torch.Generator().manual_seed(seed)
    log_every = max(1, steps // max(1, log_points))
    log_steps: list[int] = []
    logs: dict[str, list[Tensor]] = {}
    traj: list[Tensor] = []
    first_hit = torch.full((M, R), -1, dtype=torch.long) if hit_fn is not None else None
    clip_active = torch.zeros(M, R, dtype=torch.float64)
    clip_change = torch.zeros(M, R, dtype=torch.float64)

    def log(t: int) -> None:
        log_steps.append(t)
        if metric_fn is not None:
            for k, v in metric_fn(x).items():
                logs.setdefault(k, []).append(v.detach().clone())
        if record_trajectory:
            traj.append(x.detach().clone())

    start = time.perf_counter()
    log(0)
    for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        _, G = per_objective_grads(loss_fn, x)
        H = G @ G.mT
        directions = []
        for k, meth in enumerate(methods):
            if meth.reports_clip:
                d, change, active = meth.direction_and_clip(G[k], H[k], weights, gen)
                clip_active[k] += active.to(clip_active.dtype)
                clip_change[k] += change.to(clip_change.dtype)
            else:
                d = meth.direction(G[k], H[k], weights, gen)
            directions.append(d)
        D = torch.stack(directions)
        x = opt.step(x, D)
        if first_hit is not None and hit_fn is not None:
            first_hit = torch.where((first_hit < 0) & hit_fn(x), torch.full_like(first_hit, t + 1), first_hit)
        if (t + 1) % log_every == 0 or t + 1 == steps:
            if not log_steps or log_steps[-1] != t + 1:
                log(t + 1)
    seconds = time.perf_counter() - start
    reports = torch.tensor([meth.reports_clip for meth in methods]).unsqueeze(-1)
    nan = torch.full_like(clip_active, float("nan"))
    return RunResult(
        x0=x0,
        final=x.detach(),
        log_steps=log_steps,
        logs={k: torch.stack(v) for k, v in logs.items()},
        trajectory=torch.stack(traj) if record_trajectory else None,
        first_hit=first_hit,
        seconds=seconds,
        clip_active=torch.where(reports, clip_active / max(steps, 1), nan),
        clip_change=torch.where(reports, clip_change / max(steps, 1), nan),
    )
