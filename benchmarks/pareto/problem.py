"""What a Pareto problem is, and the one driver that runs any of them.

A problem is its definition (:meth:`Problem.batches`: losses, starts, user weights, budget and
metrics, one :class:`Batch` per call of the shared training loop) and its report
(:meth:`Problem.report`: tables, figures and a one-line summary from the finished runs). The loop
itself (:func:`engine.run`), the methods and the report page are shared, so a new problem is one
module with one object that satisfies :class:`Problem`, listed in ``__main__.PROBLEMS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from . import engine
from .common import Config, Section


@dataclass
class Batch:
    """One call of :func:`engine.run`: every method from the starts ``x0 (R, d)`` with the user
    weights ``weights (R, m)``; ``context`` carries what the report needs besides the runs."""

    loss_fn: engine.LossFn
    x0: Tensor
    weights: Tensor
    steps: int
    optimizer: str
    lr: float
    log_points: int
    desc: str
    metric_fn: engine.MetricFn | None = None
    hit_fn: Callable[[Tensor], Tensor] | None = None
    record_trajectory: bool = False
    context: dict[str, Any] = field(default_factory=dict)


class Problem(Protocol):
    """A synthetic multi-objective problem of the benchmark."""

    #: the name ``--problems`` takes
    name: str
    #: whether the TorchJD peers join the default methods (they aggregate one Jacobian at a time)
    peers: bool

    def batches(self, cfg: Config) -> Iterable[Batch]:
        """The runs, batched; consumed one at a time, each run before the next is built."""
        ...

    def report(self, cfg: Config, runs: list[tuple[Batch, engine.RunResult]]) -> Section:
        """The report section from every batch and its result, in the order of :meth:`batches`."""
        ...


def run_problem(problem: Problem, cfg: Config) -> Section:
    """Run every batch of ``problem`` through the shared loop, then build its report section."""
    start = time.perf_counter()
    runs = []
    for batch in problem.batches(cfg):
        result = engine.run(
            batch.loss_fn,
            batch.x0,
            batch.weights,
            cfg.methods,
            batch.steps,
            optimizer=batch.optimizer,
            lr=batch.lr,
            log_points=batch.log_points,
            metric_fn=batch.metric_fn,
            hit_fn=batch.hit_fn,
            record_trajectory=batch.record_trajectory,
            seed=cfg.seeds[0],
            desc=batch.desc,
            progress=cfg.progress,
        )
        runs.append((batch, result))
    section = problem.report(cfg, runs)
    section.seconds = time.perf_counter() - start
    return section
