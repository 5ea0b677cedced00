"""A pytest plugin loaded only by mutation runs (``[tool.mutmut] pytest_add_cli_args``).

A mutant's tests run with ``-x``: the first failure ends them, so they run cheapest first and a
detected mutant stops sooner (a surviving mutant runs them all either way). A test's cost is what
running it first would take: its own setup, call and teardown plus the setup of any module- or
session-scoped fixture it needs (a fixture that spawns two ranks takes seconds; the tests behind it
take milliseconds once it exists). mutmut records only the call's duration, so this plugin records
the rest itself while mutmut collects its stats (``mutation-durations.json``).

Each mutant's test session also appends one line to ``mutation-times.jsonl``: its name, wall
seconds, pytest's exit status and the number of tests selected, which ``tools/mutation.py --times``
sums per module (where a run's time goes).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

DURATIONS = Path("mutation-durations.json")  # mutmut runs the tests from inside mutants/
TIMES = Path("mutation-times.jsonl")
EXPENSIVE_SETUP_S = 0.5  # a setup this long is blamed on the shared fixtures it built

_start = time.perf_counter()
_selected = 0
_failed: str | None = None  # the first test that failed in this session (the one that detected the mutant)
_phases: defaultdict[str, float] = defaultdict(float)
_slow_setups: dict[str, tuple[float, list[str]]] = {}


def _mutant() -> str:
    return os.environ.get("MUTANT_UNDER_TEST", "")


def _shared_fixtures(item: pytest.Item) -> list[str]:
    """The fixtures of ``item`` that outlive one test (module, class, package or session scope)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [name for name, defs in info.name2fixturedefs.items() if defs and defs[-1].scope != "function"]


def cost_key(durations: dict) -> Callable[[pytest.Item], float]:
    """A test's cost if it ran first: its own phases plus the setups of the shared fixtures it needs."""
    tests, fixtures = durations.get("tests", {}), durations.get("fixtures", {})

    def cost(item: pytest.Item) -> float:
        return tests.get(item.nodeid, 0.0) + sum(fixtures.get(name, 0.0) for name in _shared_fixtures(item))

    return cost


def function_of(mutant: str) -> str:
    """``pkg.mod.x_f__mutmut_12`` → ``pkg.mod.x_f``: the mutated function."""
    return mutant.rsplit("__mutmut_", 1)[0]


def killers(lines: list[str], function: str) -> set[str]:
    """The tests that detected earlier mutants of ``function`` (the ``failed`` of their ``TIMES`` lines).

    A test that caught one mutation of a function is the likeliest to catch the next: the mutants of
    one function differ by one operator or constant each. A line being written by another worker (not
    yet whole) is skipped."""
    found: set[str] = set()
    for text in lines:
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if line.get("failed") and function_of(line.get("mutant", "")) == function:
            found.add(line["failed"])
    return found


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    global _selected
    _selected = len(items)
    if DURATIONS.exists():
        cost = cost_key(json.loads(DURATIONS.read_text()))
    elif Path("mutmut-stats.json").exists():  # mutmut's own record: the calls only
        duration = json.loads(Path("mutmut-stats.json").read_text()).get("duration_by_test", {})
        cost = lambda item: duration.get(item.nodeid, 0.0)  # noqa: E731
    else:
        return
    first = killers(TIMES.read_text().splitlines(), function_of(_mutant())) if "__mutmut_" in _mutant() and TIMES.exists() else set()
    # the order decides only how soon a detected mutant stops (-x): a survivor runs every test either way
    items.sort(key=lambda item: (item.nodeid not in first, cost(item)))


def pytest_configure(config: pytest.Config) -> None:
    global _start, _failed
    _start, _failed = time.perf_counter(), None  # per session: a worker is forked from a server that ran pytest before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    global _failed
    outcome = yield
    if _mutant() != "stats":
        if _failed is None and outcome.get_result().failed:
            _failed = item.nodeid
        return
    report = outcome.get_result()
    _phases[item.nodeid] += report.duration
    if report.when == "setup" and report.duration > EXPENSIVE_SETUP_S:
        _slow_setups[item.nodeid] = (report.duration, _shared_fixtures(item))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    mutant = _mutant()
    if mutant == "stats":
        fixtures: dict[str, float] = {}
        for seconds, names in _slow_setups.values():
            for name in names:
                fixtures[name] = max(fixtures.get(name, 0.0), seconds)
        old = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {"tests": {}, "fixtures": {}}
        old["tests"].update(_phases)  # mutmut reruns the stats of new tests only: keep the others'
        old["fixtures"].update(fixtures)
        DURATIONS.write_text(json.dumps(old, indent=1))
    elif "__mutmut_" in mutant:  # not the clean run nor the forced failure
        line = {"mutant": mutant, "seconds": round(time.perf_counter() - _start, 3), "exit": int(exitstatus), "tests": _selected}
        if _failed is not None:
            line["failed"] = _failed
        with TIMES.open("a") as out:  # one short append per mutant: atomic for the workers
            out.write(json.dumps(line) + "\n")
