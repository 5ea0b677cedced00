"""Section ``step``: training-step time against the floor, side by side in one process.

Median ms per iteration (zero_grad, forward, gradients, SGD step) over interleaved repeats of:
(a) plain summed loss, (b) **the floor**: m ``autograd.grad`` passes + base step and nothing
else, (b2) the floor plus the Gram and one combination on a contiguous float32 ``(m, D)`` block
(the arithmetic every conflict-averse step adds, in its cheapest layout: a bound), (c) ours,
``opt.step(losses)``, (c0) ours without the combination, (d) TorchJD ``backward`` /
``mtl_backward`` + ``jac_to_grad`` with CAGrad and UPGrad. Ratios are to (b). ``combine()`` alone (Gram + solve + write-back) is
timed on freshly accumulated gradients each repeat (the accumulation itself is not timed).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage.blocks import gram_of_block

from .common import C, Log, median_ms, time_interleaved
from .models import StepCase, make_step_case
from .peers import HAVE_TORCHJD, TJDCAGrad, TJDUPGrad, tjd_backward, tjd_jac_to_grad, tjd_mtl_backward

#: The issue's targets for ours / floor (model prefix -> bound); checked in the report.
TARGETS = {"transformer": 1.05, "mlp-2048": 1.20}


def _sgd(case: StepCase) -> torch.optim.SGD:
    return torch.optim.SGD(case.model.parameters(), lr=1e-6)


def plain_variant(case: StepCase) -> Callable[[], None]:
    """(a) one backward of the summed losses."""
    base = _sgd(case)

    def step() -> None:
        base.zero_grad()
        losses, _ = case.model.losses(case.x, case.y)
        torch.stack(losses).sum().backward()
        base.step()

    return step


def floor_variant(case: StepCase) -> Callable[[], None]:
    """(b) the floor: m ``autograd.grad`` passes, the last one's gradients as ``.grad``, base step."""
    base = _sgd(case)
    params = list(case.model.parameters())

    def step() -> None:
        base.zero_grad()
        losses, _ = case.model.losses(case.x, case.y)
        m = len(losses)
        grads: tuple = ()
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=i < m - 1, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        base.step()

    return step


def bound_variant(case: StepCase) -> Callable[[], None]:
    """(b2) the floor, plus the two ``m x D`` reductions of any conflict-averse step in their cheapest layout.

    After the floor's passes: the float32 Gram of one contiguous ``(m, D)`` block (``gram_of_block``,
    as ours reduces each gathered chunk) and one combination ``a @ block`` written into a ``(D,)``
    buffer. The block and the buffer are allocated once and hold arbitrary values: no gather, no
    copy, no solve, no memory limit. Ours / (b2) is what our floor-memory layout costs on top of
    the arithmetic; (b2) / floor is the least any method that forms the Gram can reach.
    """
    floor = floor_variant(case)
    numel = sum(p.numel() for p in case.shared)
    m = case.y.shape[1]  # one target column per objective
    block = torch.randn(m, numel)
    direction = torch.empty(numel)
    coefficients = torch.full((m,), 1.0 / m)

    def step() -> None:
        floor()
        gram_of_block(block)
        torch.mv(block.T, coefficients, out=direction)

    return step


def ours_variant(case: StepCase) -> tuple[Callable[[], None], ConflictAverseOptimizer]:
    """(c) ``opt.zero_grad(); opt.step(losses)`` (``nonfinite="ignore"``: no host read)."""
    opt = ConflictAverseOptimizer(_sgd(case), c=C, shared=case.shared, nonfinite="ignore")

    def step() -> None:
        opt.zero_grad()
        losses, _ = case.model.losses(case.x, case.y)
        opt.step(losses)

    return step, opt


def passes_only_variant(case: StepCase) -> Callable[[], None]:
    """(c0) ours without ``combine()``: ``opt.backward(losses, combine=False)``, then the base step on
    the home objective's gradients (what the floor steps on). Ours minus this is the combination."""
    opt = ConflictAverseOptimizer(_sgd(case), c=C, shared=case.shared, nonfinite="ignore")

    def step() -> None:
        opt.zero_grad()  # also ends the window left open by the last call
        losses, _ = case.model.losses(case.x, case.y)
        opt.backward(losses, combine=False)
        opt.optimizer.step()

    return step


def torchjd_variant(case: StepCase, aggregator: object) -> Callable[[], None]:
    """(d) TorchJD: ``backward`` (all shared) or ``mtl_backward`` (with heads), then ``jac_to_grad``."""
    base = _sgd(case)

    def step() -> None:
        base.zero_grad()
        losses, feats = case.model.losses(case.x, case.y)
        if case.heads is None:
            tjd_backward(losses, inputs=case.shared)
        else:
            tjd_mtl_backward(losses, feats, tasks_params=case.heads, shared_params=case.shared)
        tjd_jac_to_grad(case.shared, aggregator)
        base.step()

    return step


def step_variants(kind: str, m: int) -> tuple[dict[str, Callable[[], None]], tuple[ConflictAverseOptimizer, StepCase]]:
    """Every variant on its own (identically seeded) model copy, and ours' optimizer and case."""
    variants = {"(a) plain sum": plain_variant(make_step_case(kind, m)), "(b) floor": floor_variant(make_step_case(kind, m))}
    variants["(b2) floor + contiguous Gram and combination (bound)"] = bound_variant(make_step_case(kind, m))
    ours_case = make_step_case(kind, m)
    variants["(c) ours"], opt = ours_variant(ours_case)
    variants["(c0) ours, gradients only"] = passes_only_variant(make_step_case(kind, m))
    if HAVE_TORCHJD:
        variants["(d) TorchJD CAGrad"] = torchjd_variant(make_step_case(kind, m), TJDCAGrad(C))
        variants["(d) TorchJD UPGrad"] = torchjd_variant(make_step_case(kind, m), TJDUPGrad())
    return variants, (opt, ours_case)


def graph_freed_after_step(opt: ConflictAverseOptimizer, case: StepCase) -> bool:
    """Whether the autograd graph is gone right after the last objective's backward pass.

    Probed after ``backward`` and before any parameter update (after the update, the in-place
    change of the parameters would make every further backward raise anyway, so a probe there could
    not tell a retained graph from a freed one).
    """
    opt.zero_grad()
    losses, _ = case.model.losses(case.x, case.y)
    opt.backward(losses)
    try:
        torch.autograd.grad(losses[-1], list(case.model.parameters()), allow_unused=True)
        freed = False
    except RuntimeError as error:
        freed = "second time" in str(error)
    opt.step()
    return freed


def accumulate(opt: ConflictAverseOptimizer, case: StepCase) -> None:
    """A fresh forward and every objective's gradient, accumulated without ``combine()``."""
    opt.zero_grad()
    losses, _ = case.model.losses(case.x, case.y)
    opt.backward(losses, combine=False)


def combine_only_ms(opt: ConflictAverseOptimizer, case: StepCase, repeats: int, warmup: int = 2) -> float:
    """Median time of ``opt.combine()`` alone, each time on freshly accumulated gradients."""
    samples = []
    for r in range(warmup + repeats):
        accumulate(opt, case)
        t0 = time.perf_counter()
        opt.combine()
        if r >= warmup:
            samples.append(time.perf_counter() - t0)
    return median_ms(samples)


def combine_profile(opt: ConflictAverseOptimizer, case: StepCase, top: int = 4) -> list[tuple[str, float]]:
    """The ``top`` torch ops by self CPU time in one ``combine()`` (profiled): ``(name, share of the total)``."""
    from torch.profiler import ProfilerActivity, profile

    accumulate(opt, case)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.combine()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def combine_op_count(opt: ConflictAverseOptimizer, case: StepCase) -> int:
    """Torch ops one ``combine()`` dispatches (views included), counted by a ``TorchDispatchMode``.

    On small models its cost is this count more than its arithmetic: a few microseconds per op on
    a CPU, one kernel launch per op on a GPU.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops += 1
            return func(*args, **(kwargs or {}))

    accumulate(opt, case)
    with Count() as count:
        opt.combine()
    return count.ops


def step_section(kinds: list[str], ms: list[int], repeats: int, log: Log) -> list[dict]:
    """Rows ``{model, m, variant, ms, ratio, combine_ms, graph_freed, combine_top_ops, combine_ops}``."""
    rows = []
    for kind in kinds:
        for m in ms:
            variants, (opt, case) = step_variants(kind, m)
            times = time_interleaved(variants, repeats)  # type: ignore[arg-type]
            freed = graph_freed_after_step(opt, case)
            combine_ms = combine_only_ms(opt, case, repeats)
            hot = combine_profile(opt, case)
            ops = combine_op_count(opt, case)
            floor = times["(b) floor"]
            for name, t in times.items():
                rows.append(
                    {
                        "model": kind,
                        "m": m,
                        "variant": name,
                        "ms": t,
                        "ratio": t / floor,
                        "combine_ms": combine_ms,
                        "graph_freed": freed,
                        "combine_top_ops": hot,
                        "combine_ops": ops,
                    }
                )
            log(f"  step {kind} m={m}: " + ", ".join(f"{k} {v:.1f} ms ({v / floor:.3f}x)" for k, v in times.items()))
            del variants, opt, case
            gc.collect()
    return rows
