"""A pytest plugin loaded only by mutation runs (``[tool.mutmut] pytest_add_cli_args``).

A mutant's tests run with ``-x``: the first failure ends them. Running them fastest first (by the
durations mutmut recorded in ``mutmut-stats.json``) ends a detected mutant sooner; a surviving
mutant runs them all either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/
    if not stats.exists():
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: duration.get(item.nodeid, 0.0))
