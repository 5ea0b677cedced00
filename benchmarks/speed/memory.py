"""Section ``memory``: extra peak bytes of a training step over plain training, in parameter bytes.

Metric: the peak of CPU allocator bytes live during a full training step (forward, gradients, base
step), second of two steps, minus the same peak for plain ``sum(losses).backward(); base.step()``
training of the same model; divided by the bytes of the model's (distinct) parameters. The profiler
records every CPU allocation and free from *before the model is built*, so the peak counts the
parameters, their ``.grad``, activations, transients and whatever a method keeps between steps.
The base optimizer is SGD without momentum: it holds no state, so both sides carry the same.
Variants: the measured floor (:func:`floor_step`: m - 1 gradients kept, the last one as ``.grad``,
no combination; m - 1 plus the per-objective backward passes' activation-sized transients), the
wrapper's default path, its ``memory="low"`` mode (when the constructor accepts it),
``cagrad_clip._low_memory.low_memory_backward`` (when the module exists), the RACO
authors' recipe (:func:`raco_step`), TorchJD ``autojac`` (``backward`` + ``jac_to_grad`` with its
CAGrad aggregator) and TorchJD ``autogram`` (its ``Engine`` Gramian, CAGrad weighting, one weighted
backward: it never holds per-objective gradients, so it can go below m - 1).
The floor for a method that holds the per-objective gradients is ``m - 1``: all but one exist at once.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cagrad_clip import ConflictAverseOptimizer, solve_cagrad
from cagrad_clip._settings import CAGradSettings

from .common import C, Log
from .models import MemoryCase, make_memory_case, param_bytes
from .peers import HAVE_TORCHJD, TJDCAGrad, TJDCAGradWeighting, TJDEngine, tjd_backward, tjd_jac_to_grad

MEASURED = "measured step"
#: Column order of the memory table (the floor is computed, not measured).
VARIANTS = (
    "floor, measured",
    "plain, .grad preallocated",
    "ours default",
    'ours memory="low"',
    "low_memory_backward",
    "RACO recipe",
    "TorchJD autojac CAGrad",
    "TorchJD autogram CAGrad",
)
NOT_AVAILABLE = "n/a (not available in this build)"


@dataclass
class Peak:
    """Live CPU allocator bytes (allocated since profiling began) around the measured step."""

    before: int
    peak: int
    after: int


def profiled_peak(build: Callable[[], Callable[[], object]], steps: int = 2) -> Peak:
    """Build (inside the profiler), run ``steps`` steps and return the live bytes around the last one."""
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build()
        for _ in range(steps - 1):
            step()
        with record_function(MEASURED):
            step()
        del step
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return peak_from_trace(events)


def peak_from_trace(events: list[dict]) -> Peak:
    """Running total of the CPU ``[memory]`` events; its value before, peak within and after the marked step."""
    marks = [e for e in events if e.get("name") == MEASURED and e.get("ph") == "X"]
    if not marks:
        raise RuntimeError(f"no {MEASURED!r} range in the profiler trace")
    start, end = marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0), key=lambda e: e["ts"])
    total, before, peak, after = 0, 0, None, 0
    for e in memory:
        if e["ts"] > end:
            break
        if e["ts"] < start:
            total += e["args"]["Bytes"]
            before = total
            continue
        total += e["args"]["Bytes"]
        peak = total if peak is None else max(peak, total)
    after = total
    return Peak(before=before, peak=max(before, peak if peak is not None else before), after=after)


def _trainable(model: nn.Module) -> list[Tensor]:
    """The model's parameters that require grad, each once (tied weights counted once)."""
    return [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=1e-6)  # no momentum: no optimizer state on either side


def plain_step(case: MemoryCase) -> Callable[[], None]:
    """Plain training: one backward of the summed losses."""
    base = _sgd(case.model)

    def step() -> None:
        base.zero_grad()
        sum(case.losses()).backward()
        base.step()

    return step


def floor_step(case: MemoryCase) -> Callable[[], None]:
    """The measured floor: m ``autograd.grad`` passes, m - 1 results kept, the last one as ``.grad``; no combination."""
    base = _sgd(case.model)
    params = _trainable(case.model)

    def step() -> None:
        base.zero_grad()
        losses = case.losses()
        m = len(losses)
        kept = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses[:-1]]
        for p, g in zip(params, torch.autograd.grad(losses[-1], params, retain_graph=False, allow_unused=True)):
            p.grad = g
        assert len(kept) == m - 1
        base.step()
        del kept

    return step


def preallocated_plain_step(case: MemoryCase) -> Callable[[], None]:
    """Plain training, but ``.grad`` is allocated (zeroed views of one flat buffer) before the backward.

    A diagnostic: against plain training (where autograd allocates each gradient as the backward
    reaches it, while activations are being freed) it shows what holding a whole gradient from the
    start of the backward costs. The default store holds all its rows from the start of the backward.
    """
    base = _sgd(case.model)
    params = _trainable(case.model)
    numels = [p.numel() for p in params]

    def step() -> None:
        base.zero_grad()
        losses = case.losses()
        flat = torch.zeros(sum(numels), dtype=params[0].dtype)
        for p, view in zip(params, flat.split(numels)):
            p.grad = view.view(p.shape)
        sum(losses).backward()
        base.step()

    return step


def ours_step(case: MemoryCase, **options: object) -> Callable[[], None]:
    """``opt.zero_grad(); opt.step(losses)`` (raises ``TypeError`` if this build rejects ``options``)."""
    opt = ConflictAverseOptimizer(_sgd(case.model), c=C, **options)  # type: ignore[arg-type]

    def step() -> None:
        opt.zero_grad()
        opt.step(case.losses())

    return step


def ours_low_step(case: MemoryCase) -> Callable[[], None]:
    """``memory="low"``; for m >= 3 with ``engine=AutogramEngine(model)`` built before the first forward."""
    if _objectives(case) <= 2:
        return ours_step(case, memory="low")
    from cagrad_clip._low_memory import AutogramEngine

    return ours_step(case, memory="low", engine=AutogramEngine(case.model))


def low_memory_step(case: MemoryCase) -> Callable[[], None]:
    """``cagrad_clip._low_memory.low_memory_backward`` (route ``auto``: hooks for m <= 2, autogram above), then the base step."""
    from cagrad_clip import _low_memory as low_memory

    base = _sgd(case.model)
    params = _trainable(case.model)
    settings = CAGradSettings(c=C)
    engine: list = []

    def step() -> None:
        base.zero_grad()
        losses = case.losses()
        m = len(losses)
        weights = torch.full((m,), 1.0 / m)
        low_memory.low_memory_backward(losses, params, len(params), weights, settings, engine=engine[0] if engine else None)
        base.step()

    if _objectives(case) > 2:
        engine.append(low_memory.AutogramEngine(case.model))  # before the first forward, as documented
    return step


def _objectives(case: MemoryCase) -> int:
    with torch.no_grad():
        return len(case.losses())


def raco_step(case: MemoryCase) -> Callable[[], None]:
    """The RACO authors' recipe: ``autograd.grad`` lists, a float32 Gram of per-parameter dots, write-back per parameter.

    Each parameter's ``m`` gradients are released as soon as its combination is in ``.grad``.
    """
    base = _sgd(case.model)
    params = _trainable(case.model)

    def step() -> None:
        base.zero_grad()
        losses = case.losses()
        m = len(losses)
        grads: list[list[Tensor | None]] = [
            list(torch.autograd.grad(loss, params, retain_graph=i < m - 1, allow_unused=True)) for i, loss in enumerate(losses)
        ]
        with torch.no_grad():
            gram = torch.zeros(m, m, device=params[0].device)
            for i in range(m):
                for j in range(i, m):
                    dot = sum(
                        torch.dot(a.flatten().float(), b.flatten().float())
                        for a, b in zip(grads[i], grads[j])
                        if a is not None and b is not None
                    )
                    gram[i, j] = gram[j, i] = dot
            coefficients = solve_cagrad(gram, c=C, validate=False).coefficients.tolist()  # one host read
            for k, p in enumerate(params):
                combined = None
                for i in range(m):
                    g = grads[i][k]
                    if g is not None:
                        combined = g * coefficients[i] if combined is None else combined.add_(g, alpha=coefficients[i])
                    grads[i][k] = None
                p.grad = combined
        base.step()

    return step


def torchjd_autojac_step(case: MemoryCase) -> Callable[[], None]:
    """TorchJD: the ``(m, D)`` Jacobian by ``autojac.backward``, aggregated by ``jac_to_grad`` (CAGrad)."""
    base = _sgd(case.model)
    params = list(case.model.parameters())
    aggregator = TJDCAGrad(C)

    def step() -> None:
        base.zero_grad()
        tjd_backward(case.losses(), inputs=params)
        tjd_jac_to_grad(params, aggregator)
        base.step()

    return step


def torchjd_autogram_step(case: MemoryCase) -> Callable[[], None]:
    """TorchJD's ``autogram.Engine``: the Gramian without the Jacobian, then one weighted backward.

    The weighting runs on the Gramian cast to float32 (TorchJD's CAGrad has no bfloat16 SVD on CPU).
    """
    assert TJDEngine is not None
    base = _sgd(case.model)
    engine = TJDEngine(case.model, batch_dim=None)
    weighting = TJDCAGradWeighting(C)

    def step() -> None:
        base.zero_grad()
        losses = torch.stack(case.losses())
        gramian = engine.compute_gramian(losses)
        weights = weighting(gramian.float()).to(losses.dtype)
        losses.backward(weights)
        base.step()

    return step


def _builders(kind: str, m: int, dtype: torch.dtype) -> dict[str, Callable[[], Callable[[], object]] | str]:
    """Per variant a builder of its step (called inside the profiler), or a string saying why there is none."""
    builders: dict[str, Callable[[], Callable[[], object]] | str] = {
        "plain": lambda: plain_step(make_memory_case(kind, m, dtype)),
        "floor, measured": lambda: floor_step(make_memory_case(kind, m, dtype)),
        "plain, .grad preallocated": lambda: preallocated_plain_step(make_memory_case(kind, m, dtype)),
        "ours default": lambda: ours_step(make_memory_case(kind, m, dtype)),
    }
    try:  # the low-memory mode, where this build has it
        ConflictAverseOptimizer(_sgd(nn.Linear(1, 1)), memory="low")  # type: ignore[call-arg]
        builders['ours memory="low"'] = lambda: ours_low_step(make_memory_case(kind, m, dtype))
    except TypeError:
        builders['ours memory="low"'] = NOT_AVAILABLE
    if _has_own_module("low_memory"):
        builders["low_memory_backward"] = lambda: low_memory_step(make_memory_case(kind, m, dtype))
    else:
        builders["low_memory_backward"] = NOT_AVAILABLE
    builders["RACO recipe"] = lambda: raco_step(make_memory_case(kind, m, dtype))
    if HAVE_TORCHJD:
        builders["TorchJD autojac CAGrad"] = lambda: torchjd_autojac_step(make_memory_case(kind, m, dtype))
    else:
        builders["TorchJD autojac CAGrad"] = "n/a (torchjd not installed)"
    if HAVE_TORCHJD and TJDEngine is not None:
        builders["TorchJD autogram CAGrad"] = lambda: torchjd_autogram_step(make_memory_case(kind, m, dtype))
    else:
        builders["TorchJD autogram CAGrad"] = "n/a (torchjd.autogram not installed)"
    return builders


def _has_own_module(name: str) -> bool:
    """Whether ``cagrad_clip.<name>`` exists in the imported ``cagrad_clip`` itself.

    An editable install's finder resolves a submodule missing from an older tree on ``PYTHONPATH``
    to the installed tree; that module would not be the build being measured.
    """
    import cagrad_clip

    spec = importlib.util.find_spec(f"cagrad_clip.{name}")
    package = Path(cagrad_clip.__file__).resolve().parent
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == package


def memory_section(kinds: list[str], dtypes: list[torch.dtype], ms: list[int], log: Log) -> list[dict]:
    """Rows ``{model, dtype, m, params, param_bytes, plain_peak, cells, extra_bytes}``; a cell is a ratio or a note."""
    rows = []
    for kind in kinds:
        for dtype in dtypes:
            probe = make_memory_case(kind, 1, dtype)
            nbytes, numel = param_bytes(probe.model), sum(p.numel() for p in {id(p): p for p in probe.model.parameters()}.values())
            del probe
            for m in ms:
                builders = _builders(kind, m, dtype)
                plain = builders.pop("plain")
                assert callable(plain)
                base = profiled_peak(plain)
                cells: dict[str, float | str] = {}
                extra: dict[str, int] = {}
                for name, build in builders.items():
                    if isinstance(build, str):
                        cells[name] = build
                        continue
                    try:
                        peak = profiled_peak(build)
                        extra[name] = peak.peak - base.peak
                        cells[name] = extra[name] / nbytes
                    except Exception as error:  # noqa: BLE001 - a failing peer is reported, not fatal
                        message = str(error).splitlines()[0][:160] if str(error) else ""
                        cells[name] = f"failed: {type(error).__name__}: {message}"
                rows.append(
                    {
                        "model": kind,
                        "dtype": str(dtype).removeprefix("torch."),
                        "m": m,
                        "params": numel,
                        "param_bytes": nbytes,
                        "plain_peak": base.peak,
                        "cells": cells,
                        "extra_bytes": extra,
                    }
                )
                log(
                    f"  memory {kind} {dtype} m={m}: plain peak {base.peak / 2**20:.1f} MiB; "
                    + ", ".join(f"{k} {v:.2f}x" if isinstance(v, float) else f"{k} {v}" for k, v in cells.items())
                )
                gc.collect()
    return rows
