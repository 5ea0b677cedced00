"""CPU-side logic of ``python -m benchmarks.gpu_check``: options, the no-CUDA exit, the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


def test_parse_args_and_report_path() -> None:
    args = gpu_check.parse_args(["--checks", "sync,memory", "--memory-ms", "2,3,4"])
    assert args.checks == ["sync", "memory"] and args.memory_ms == [2, 3, 4] and args.timing_ms == [2, 4, 8]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--checks", "bogus"])
    assert gpu_check.report_path(None, {"OUT": "/tmp/x"}) == Path("/tmp/x/gpu_check.md")
    assert gpu_check.report_path(None, {}) == Path("results/gpu_check.md")
    assert gpu_check.report_path(Path("r.md"), {"OUT": "/tmp/x"}) == Path("r.md")


def test_without_cuda_nothing_is_checked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA


def test_render_summarises_and_tabulates() -> None:
    results = [
        gpu_check.CheckResult("a. sync", True, "ok", ["step", "result"], [["ours", "no sync"]]),
        gpu_check.CheckResult("c. memory", False, "x | y", ["m", "ours"], [["2", "3.00x"]]),
        gpu_check.CheckResult("d. timing", None, "info"),
    ]
    text = gpu_check.render(results, "H100", "python -m benchmarks.gpu_check")
    assert "| a. sync | PASS | ok |" in text and "| c. memory | **FAIL** | x / y |" in text and "| d. timing | info | info |" in text
    assert "| 2 | 3.00x |" in text and "**Overall: FAIL (c. memory)**" in text
    assert "**Overall: PASS**" in gpu_check.render(results[:1], "H100", "cmd")


def test_a_crashing_check_is_a_failure_not_a_crash() -> None:
    def boom() -> gpu_check.CheckResult:
        raise RuntimeError("device lost")

    result = gpu_check._run("b. graph", boom)
    assert result.passed is False and "device lost" in result.detail
