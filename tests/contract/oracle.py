"""An independent float64 oracle for the contract suite, and the suite's tolerances (in one place).

For a :class:`Problem` it builds a float64 copy of the suite's model (from the very values the
dtype under test holds), takes every objective's gradient with ``torch.autograd.grad`` (summed over
the problem's ``terms``: the rows of the batch, each with its scale), forms the Gram on the shared
parameters, solves the clipped CAGrad dual with the scipy reference of ``tests/reference.py``
(which shares no code with the library), combines ``d = sum_i a_i g_i`` and applies the base
optimizer's update in float64 (SGD with lr = 1: ``p - d``; AdamW: ``torch.optim.AdamW`` on the
float64 copy). It shares nothing with ``cagrad_clip`` but the model definition.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tests.reference import reference_coefficients

from .cases import ADAMW, BATCH, SGD_LR, TRUST_RADIUS, WEIGHTS, losses_of, make_data, make_model

__all__ = ["Expected", "Problem", "RTOL", "UNIT_ROUNDOFF", "expected", "tolerance"]

# --------------------------------------------------------------------------- tolerances (the one place)
#: Norm-wise relative tolerance of a result computed in a dtype against the float64 oracle: the
#: forward and backward passes run in that dtype (bf16: 8-bit mantissa, a few roundings deep).
RTOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
#: The unit roundoff of each parameter dtype: storing a value in it (a parameter after the step, or
#: the direction written into ``.grad``) may move it by this much, relative to its own size.
UNIT_ROUNDOFF: dict[torch.dtype, float] = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def tolerance(dtypes: set[torch.dtype]) -> float:
    """The relative tolerance of a model whose parameters have ``dtypes`` (the loosest one)."""
    return max(RTOL[d] for d in dtypes)


@dataclass(frozen=True)
class Problem:
    """What one step computes. ``terms``: ``(start, stop, scale, extra)`` rows of the batch whose losses'
    gradients are added with ``scale`` (``extra``: those rows also add the ``extra`` head's term);
    ``exclude``: parameters outside the optimizer; ``shared``: ``"all"`` or ``"trunk"``."""

    m: int
    trunk_dtype: torch.dtype
    head_dtype: torch.dtype
    terms: tuple[tuple[int, int, float, bool], ...] = ((0, BATCH, 1.0, False),)
    shared: str = "all"
    unused: bool = False
    extra: bool = False
    exclude: tuple[str, ...] = ()
    constant: str | None = None
    optimizer: str = "sgd"
    max_norm: float | None = None


@dataclass
class Expected:
    names: list[str]  # the optimizer's parameters
    dtypes: dict[str, torch.dtype]  # every parameter's dtype under test
    initial: dict[str, Tensor]  # every parameter, float64
    objective_grads: list[dict[str, Tensor | None]]  # g_i (None: objective i reaches no part of it)
    gram: np.ndarray
    weights: np.ndarray
    coefficients: np.ndarray
    direction: dict[str, Tensor | None]  # d = sum_i a_i g_i, None where no objective reaches
    step_direction: dict[str, Tensor | None]  # what the base optimizer receives (d, clipped to max_norm)
    params: dict[str, Tensor]  # every parameter after the base optimizer's step

    @property
    def direction_norm(self) -> float:
        return math.sqrt(sum(float(d.pow(2).sum()) for d in self.direction.values() if d is not None))

    @property
    def update_norm(self) -> float:
        return math.sqrt(sum(float((self.params[n] - self.initial[n]).pow(2).sum()) for n in self.params))

    @property
    def tolerance(self) -> float:
        return tolerance(set(self.dtypes.values()))


@functools.cache
def expected(problem: Problem) -> Expected:
    model = make_model(problem.m, problem.trunk_dtype, problem.head_dtype, unused=problem.unused, extra=problem.extra)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    model.cast(torch.float64, torch.float64, torch.float64)  # exact: every value is representable
    x, y = make_data(problem.m, (problem.trunk_dtype, problem.head_dtype))
    x, y = x.double(), y.double()
    named = dict(model.named_parameters())
    initial = {n: p.detach().clone() for n, p in named.items()}
    names = [n for n in named if n not in problem.exclude]
    params = [named[n] for n in names]

    sums: list[dict[str, Tensor | None]] = [dict.fromkeys(names) for _ in range(problem.m)]
    for start, stop, scale, extra in problem.terms:
        losses = losses_of(model, x[start:stop], y[start:stop], extra=extra, constant=problem.constant)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    acc = sums[i][n]
                    sums[i][n] = scale * g if acc is None else acc + scale * g

    shared = names if problem.shared == "all" else [n for n in names if n.startswith("trunk.")]
    flat = torch.stack(
        [
            torch.cat([(g if (g := sums[i][n]) is not None else torch.zeros_like(named[n])).reshape(-1) for n in shared])
            for i in range(problem.m)
        ]
    )
    gram = (flat @ flat.T).numpy()
    w = np.asarray(WEIGHTS[problem.m], dtype=np.float64)
    w = w / w.sum()
    a = reference_coefficients(gram, w, TRUST_RADIUS)

    direction: dict[str, Tensor | None] = {}
    for n in names:
        parts = [(a[i], sums[i][n]) for i in range(problem.m) if sums[i][n] is not None]
        direction[n] = sum(float(ai) * g for ai, g in parts) if parts else None  # type: ignore[misc]
    step_direction = dict(direction)
    if problem.max_norm is not None:  # torch.nn.utils.clip_grad_norm_'s formula
        total = math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values() if d is not None))
        coef = min(1.0, problem.max_norm / (total + 1e-6))
        step_direction = {n: None if d is None else d * coef for n, d in direction.items()}

    with torch.no_grad():
        for n in names:
            named[n].grad = step_direction[n]
        if problem.optimizer == "sgd":
            torch.optim.SGD(params, lr=SGD_LR).step()
        else:
            torch.optim.AdamW(params, **ADAMW).step()
    after = {n: p.detach().clone() for n, p in named.items()}
    return Expected(names, dtypes, initial, sums, gram, w, a, direction, step_direction, after)
