"""The low-memory benchmark's harness (``python -m benchmarks.low_memory``) on its smallest case."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchjd")

from benchmarks.low_memory import measure  # noqa: E402


def test_measure_reports_each_route_against_the_default_path() -> None:
    """One round on the 12.6 M-parameter encoder, m = 2: every variant measured; the default path keeps one
    extra gradient (the m - 1 floor, plus at most a fraction of a parameter copy of transients) and the
    low-memory routes far less."""
    rows = {r["variant"]: r for r in measure("encoder", torch.float32, 2, repeats=1)}
    assert set(rows) == {"plain sum backward", "default (m passes, stored)", "hooks", "autogram"}
    assert rows["default (m passes, stored)"]["time_rel"] == 1.0
    assert 0.9 <= rows["default (m passes, stored)"]["extra_P"] <= 1.3
    assert rows["hooks"]["extra_P"] < 0.7 and rows["autogram"]["extra_P"] < 0.7
    assert all(r["time_s"] > 0 and r["params_M"] > 12 for r in rows.values())
