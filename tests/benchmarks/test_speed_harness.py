"""The harness of ``python -m benchmarks.speed``: CLI, the memory metric, the RACO reference, the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchjd", reason='needs the bench extra: pip install -e ".[bench]"')

from benchmarks.speed import __main__ as cli
from benchmarks.speed import memory, report
from benchmarks.speed.models import MemoryCase, make_memory_case, param_bytes
from cagrad_clip import ConflictAverseOptimizer


def _linear_case(m: int, seed: int = 0) -> MemoryCase:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, m))
    x, y = torch.randn(16, 64), torch.randn(16, m)
    return MemoryCase(model, lambda: list(((model(x) - y) ** 2).mean(0).unbind()))


def test_cli_defaults_quick_and_errors() -> None:
    args = cli.parse_args(["--sections", "memory", "--quick"])
    assert args.sections == ["memory"] and args.memory_models == ["encoder"] and args.memory_ms == [2] and args.dtypes == ["bf16"]
    args = cli.parse_args(["--sections", "memory,step", "--memory-ms", "2,3", "--dtypes", "fp32"])
    assert args.memory_ms == [2, 3] and args.dtypes == ["fp32"] and args.models == ["transformer", "mlp-2048"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--sections", "nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--dtypes", "fp8"])


def test_allocator_option() -> None:
    """``--allocator caching`` keeps freed memory like a caching allocator (glibc); ``system`` is the default."""
    import platform

    from benchmarks.speed.common import keep_freed_memory

    assert cli.parse_args([]).allocator == "system"
    assert cli.parse_args(["--allocator", "caching"]).allocator == "caching"
    with pytest.raises(SystemExit):
        cli.parse_args(["--allocator", "jemalloc"])
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert "M_MMAP_THRESHOLD" in keep_freed_memory()


def test_peak_from_trace_counts_live_bytes_around_the_marked_step() -> None:
    def mem(ts: float, nbytes: int) -> dict:
        return {"name": "[memory]", "ph": "i", "ts": ts, "args": {"Bytes": nbytes, "Device Type": 0}}

    events = [
        mem(0, 100),
        mem(1, 50),
        {"name": memory.MEASURED, "ph": "X", "ts": 2, "dur": 10},
        mem(3, 400),
        mem(4, -400),
        mem(5, 30),
        mem(20, 1000),
    ]
    assert memory.peak_from_trace(events) == memory.Peak(before=150, peak=550, after=180)


def test_profiled_peak_sees_persistent_and_transient_allocations() -> None:
    def build():
        kept = torch.ones(1 << 18)  # 1 MiB, alive across steps

        def step() -> None:
            transient = torch.empty(1 << 20)  # 4 MiB during the step
            transient.fill_(float(kept[0]))

        return step

    peak = memory.profiled_peak(build)
    assert peak.before >= 2**20 and peak.peak >= 5 * 2**20 and peak.after < peak.peak


def test_raco_recipe_writes_the_optimizers_direction() -> None:
    a, b = _linear_case(3), _linear_case(3)
    memory.raco_step(a)()
    opt = ConflictAverseOptimizer(torch.optim.SGD(b.model.parameters(), lr=1e-6), c=0.4)
    opt.zero_grad()
    opt.step(b.losses())
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p, q)


def test_memory_models_and_tied_gpt2_embeddings() -> None:
    pytest.importorskip("transformers")
    case = make_memory_case("gpt2", 2, torch.bfloat16)
    assert case.model.lm_head.weight is case.model.transformer.wte.weight
    assert param_bytes(case.model) == 2 * sum(p.numel() for p in case.model.parameters())  # tied counted once
    assert len(case.losses()) == 2
    enc = make_memory_case("encoder", 2, torch.float32)
    assert sum(p.numel() for p in enc.model.parameters()) == 3_159_040


def _row(model: str, params: int, m: int, extra: dict[str, float]) -> dict:
    nbytes = 2 * params
    cells: dict[str, float | str] = {v: e / nbytes for v, e in extra.items()}
    cells['ours memory="low"'] = memory.NOT_AVAILABLE
    cells["TorchJD autojac CAGrad"] = "failed: NotImplementedError: no bf16"
    return {
        "model": model,
        "dtype": "bfloat16",
        "m": m,
        "params": params,
        "param_bytes": nbytes,
        "plain_peak": 1,
        "cells": cells,
        "extra_bytes": dict(extra),
    }


def test_render_memory_with_notes_and_a_two_size_projection() -> None:
    mib = float(2**20)
    # ours: exactly one parameter copy plus a fixed 16 MiB; the recipe: 1.5 copies, no constant
    rows = [
        _row("encoder", 1_000_000, 2, {"ours default": 2e6 + 16 * mib, "RACO recipe": 3e6}),
        _row("encoder-512", 4_000_000, 2, {"ours default": 8e6 + 16 * mib, "RACO recipe": 12e6}),
    ]
    text = "\n".join(report.render_memory(rows, "cagrad_clip at commit abc"))
    assert "| encoder | 1.00 M | bfloat16 | 2 | 1x |  |  | 9.39x | n/a (not available in this build) |  | 1.50x | failed [1] |  |" in text
    assert "[1] NotImplementedError: no bf16" in text and "arithmetic, not measured" in text
    basis, fits = report.projection_fit(rows)
    assert "encoder-512" in basis
    slope, constant = fits[("ours default", 2)]
    assert abs(slope - 1.0) < 1e-12 and abs(constant - 16 * mib) < 1e-3
    # 8 B bf16 parameters: 16 GB of slope + 16 MiB (0.02 GB)
    assert "| 8 B | 2 | 16.0 GB | n/a | n/a | 16.0 GB | n/a | n/a | 24.0 GB | n/a | n/a |" in text


def test_memory_section_end_to_end_on_the_quick_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The section on a tiny model: ours keeps at least m - 1 gradients, the recipe's order of magnitude."""
    monkeypatch.setattr(memory, "make_memory_case", lambda kind, m, dtype: _linear_case(m))
    monkeypatch.setattr(memory, "HAVE_TORCHJD", False)
    rows = memory.memory_section(["linear"], [torch.float32], [2], log=lambda msg: None)
    cells = rows[0]["cells"]
    assert isinstance(cells["ours default"], float) and cells["ours default"] >= 1.0 - 0.05
    assert isinstance(cells["RACO recipe"], float) and 0.5 <= cells["RACO recipe"] <= 3.0
    assert cells["TorchJD autojac CAGrad"].startswith("n/a")


def test_render_step_puts_the_bound_next_to_ours_and_checks_the_target() -> None:
    def row(variant: str, ms: float) -> dict:
        return {"model": "transformer", "m": 2, "variant": variant, "ms": ms, "ratio": ms / 10.0, "combine_ms": 1.5}

    rows = [row("(b) floor", 10.0), row("(b2) floor + contiguous Gram and combination (bound)", 10.4), row("(c) ours", 12.0)]
    rows[-1].update(graph_freed=True, combine_top_ops=[("aten::mm", 0.5)], combine_ops=321)
    summary = [line for line in report.render_step(rows) if line.startswith("| transformer | 2 | 10.00 |")]
    assert summary == [
        "| transformer | 2 | 10.00 | 12.00 | 1.200 | <= 1.05 | **no** | 1.040 | 1.50 ms (15.0%) | 321 | yes | aten::mm 50% |"
    ]
