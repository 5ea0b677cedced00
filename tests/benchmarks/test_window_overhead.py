"""The window-overhead benchmark runs and reports the fingerprint pass against the step it guards."""

from __future__ import annotations

from benchmarks.window_overhead import row


def test_a_row_reports_the_passes_share_of_the_accumulation():
    cells = [c.strip() for c in row(width=32, m=2, repeats=1).strip("|").split("|")]
    assert cells[0] == "32" and cells[2] == "2"
    step_ms, accumulate_ms, pass_ms = (float(c) for c in cells[3:6])
    share = float(cells[6].rstrip("%")) / 100
    assert min(step_ms, accumulate_ms, pass_ms) > 0
    assert abs(share - 4 * pass_ms / accumulate_ms) < 5e-3  # the share is computed from the printed times
