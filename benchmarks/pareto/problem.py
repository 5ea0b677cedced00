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
from .common import Config, Section, md_table
from .methods import Method


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
    #: the methods of this batch when they differ from the CLI's (e.g. another trust-region radius c)
    methods: list[Method] | None = None
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
            batch.methods or cfg.methods,
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
    section.markdown += clip_activity(cfg, runs)
    section.seconds = time.perf_counter() - start
    return section


def clip_activity(cfg: Config, runs: list[tuple[Batch, engine.RunResult]]) -> str:
    """A table of how often RACO's clip changed the direction, per batch, user weight and CAGrad-family
    method (over the runs with that weight: starts and seeds), and how much it changed it (or, for the
    unclipped methods, would have): ``||d(p~) - d(p)|| / ||g0||`` averaged over steps."""
    rows = []
    for batch, result in runs:
        assert result.clip_active is not None and result.clip_change is not None
        methods = batch.methods or cfg.methods
        family = [k for k, meth in enumerate(methods) if meth.reports_clip]
        keys = [tuple(round(float(v), 3) for v in w) for w in batch.weights]
        for weights in dict.fromkeys(keys):
            sel = [i for i, key in enumerate(keys) if key == weights]
            for k in family:
                active = result.clip_active[k, sel] * 100
                change = result.clip_change[k, sel]
                rows.append(
                    [
                        batch.desc,
                        str(list(weights)),
                        methods[k].label,
                        f"{float(active.mean()):.1f}",
                        f"{float(active.min()):.1f}-{float(active.max()):.1f}",
                        float(change.mean()),
                        float(change.max()),
                    ]
                )
    if not rows:
        return ""
    header = ["batch", "w", "method", "clip active (% of steps)", "min-max over runs", "mean change", "max change"]
    return (
        "\n<details><summary>Clip activity: how often RACO's clip changed the direction (per user weight; 'change' = "
        "||d(p~) - d(p)|| / ||g0|| averaged over steps, for the unclipped methods what the clip would have changed)"
        "</summary>\n\n" + md_table(header, rows) + "\n</details>\n"
    )
