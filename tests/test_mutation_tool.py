"""The mutation driver (``tools/mutation.py``) and its pytest plugin (``tests/mutmut_plugin.py``), without a run.

A full mutation run takes hours and is not in CI; what decides which tests a mutant runs, in which
order, and how the time and score are counted is checked here on small hand-made inputs.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("mutmut", reason="the mutation driver needs mutmut (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parent.parent


def _load_driver():
    spec = importlib.util.spec_from_file_location("mutation_driver", ROOT / "tools" / "mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_driver"] = module
    spec.loader.exec_module(module)
    return module


mutation = _load_driver()


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("cagrad_clip._dual.kernel.x_solve_kernel", "cagrad_clip/_dual/kernel.py"),
        ("cagrad_clip._optimizer.xǁConflictAverseOptimizerǁstep", "cagrad_clip/_optimizer.py"),
        ("cagrad_clip.integrations.x_shared_parameters", "cagrad_clip/integrations/__init__.py"),
        ("cagrad_clip.integrations.trl.dpo.xǁMultiObjectiveDPOTrainerǁ__init__", "cagrad_clip/integrations/trl/dpo.py"),
    ],
)
def test_a_mangled_function_name_maps_to_its_module_file(name: str, path: str) -> None:
    assert mutation.module_path(name) == path
    assert (ROOT / path).is_file()


def test_every_module_of_the_package_has_a_focus_entry_and_every_focus_glob_matches_a_test_file() -> None:
    """A module without an entry stops a run after the stats (minutes in); a stale glob silently focuses on nothing."""
    focus = mutation.focus_map()
    modules = [str(p.relative_to(ROOT)) for p in (ROOT / "cagrad_clip").rglob("*.py")]
    assert modules
    for module in modules:
        assert any(fnmatch.fnmatch(module, pattern) for pattern in focus), module
    test_files = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")]
    for pattern, globs in focus.items():
        for glob in globs:
            assert any(fnmatch.fnmatch(f, glob) for f in test_files), f"{pattern}: {glob} matches no test file"


def test_the_first_matching_focus_entry_wins() -> None:
    focus = {"pkg/special.py": ["tests/a.py"], "pkg/*": ["tests/b.py"]}
    tests = ["tests/a.py::t1", "tests/b.py::t2", "tests/c.py::t3"]
    assert mutation.focused_tests("pkg/special.py", tests, focus) == ["tests/a.py::t1"]
    assert mutation.focused_tests("pkg/other.py", tests, focus) == ["tests/b.py::t2"]
    with pytest.raises(SystemExit, match="no entry"):
        mutation.focused_tests("elsewhere/x.py", tests, focus)


def test_narrowing_keeps_the_focus_tests_and_takes_the_plugins_full_durations(tmp_path: Path, monkeypatch) -> None:
    stats = {
        "tests_by_mangled_function_name": {
            "cagrad_clip._dual.kernel.x_solve_kernel": ["tests/dual/test_kernel.py::a", "tests/test_optimizer.py::b"],
        },
        "duration_by_test": {"tests/dual/test_kernel.py::a": 0.5, "tests/test_optimizer.py::b": 0.25},
    }
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "durations.json").write_text(json.dumps({"tests": {"tests/dual/test_kernel.py::a": 7.0}, "fixtures": {}}))
    monkeypatch.setattr(mutation, "STATS", tmp_path / "stats.json")
    monkeypatch.setattr(mutation, "DURATIONS", tmp_path / "durations.json")
    assert mutation.narrow_stats() == (2, 1)
    out = json.loads((tmp_path / "stats.json").read_text())
    assert out["tests_by_mangled_function_name"] == {"cagrad_clip._dual.kernel.x_solve_kernel": ["tests/dual/test_kernel.py::a"]}
    # setup included where the plugin recorded more; mutmut's own figure where it did not
    assert out["duration_by_test"] == {"tests/dual/test_kernel.py::a": 7.0, "tests/test_optimizer.py::b": 0.25}


def test_times_counts_each_mutants_last_session_per_module(tmp_path: Path, monkeypatch, capsys) -> None:
    lines = [
        {"mutant": "cagrad_clip._numerics.x_f__mutmut_1", "seconds": 1.0, "exit": 1, "tests": 3},
        {"mutant": "cagrad_clip._numerics.x_f__mutmut_2", "seconds": 4.0, "exit": 0, "tests": 3},
        {"mutant": "cagrad_clip._numerics.x_f__mutmut_2", "seconds": 5.0, "exit": 0, "tests": 3},  # rerun: the last counts
        {"mutant": "cagrad_clip._window.x_g__mutmut_1", "seconds": 0.5, "exit": 2, "tests": 1},
    ]
    (tmp_path / "times.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(mutation, "TIMES", tmp_path / "times.jsonl")
    assert mutation.times() == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["cagrad_clip/_numerics.py"] == ["2", "1", "1", "5", "3.00"]  # mutants, survived, detected s, survived s, s/mutant
    assert rows["cagrad_clip/_window.py"] == ["1", "0", "0", "0", "0.50"]
    assert rows["all"] == ["3", "1", "2", "5", "2.17"]


def test_a_smaller_sample_with_the_same_seed_is_a_subset(monkeypatch) -> None:
    codes = {f"cagrad_clip._numerics.x_f__mutmut_{k}": None for k in range(400)}
    monkeypatch.setattr(mutation, "results", lambda: {"cagrad_clip/_numerics.py": codes, "cagrad_clip/_window.py": {"w__mutmut_1": None}})
    small, large = mutation.sampled(0.05, seed=3), mutation.sampled(0.2, seed=3)
    assert set(small["cagrad_clip/_numerics.py"]) < set(large["cagrad_clip/_numerics.py"])
    assert 0.1 * 400 < len(large["cagrad_clip/_numerics.py"]) < 0.3 * 400
    assert small["cagrad_clip/_window.py"] == ["w__mutmut_1"]  # at least one per module
    assert mutation.sampled(0.05, seed=4) != small


def _item(nodeid: str, shared: dict[str, str]) -> SimpleNamespace:
    defs = {name: [SimpleNamespace(scope=scope)] for name, scope in shared.items()}
    return SimpleNamespace(nodeid=nodeid, _fixtureinfo=SimpleNamespace(name2fixturedefs=defs))


def test_the_plugin_orders_tests_by_their_cost_with_the_shared_fixtures_they_need() -> None:
    from tests import mutmut_plugin

    durations = {"tests": {"a": 0.2, "b": 0.01, "c": 0.05}, "fixtures": {"ranks": 6.0}}
    items = [
        _item("a", {"tmp_path": "function"}),
        _item("b", {"ranks": "module"}),  # cheap call, but running it first pays for the spawn
        _item("c", {"ranks": "function"}),  # a function-scoped fixture's setup is in the test's own time
        _item("new", {}),
    ]
    cost = mutmut_plugin.cost_key(durations)
    assert [item.nodeid for item in sorted(items, key=cost)] == ["new", "c", "a", "b"]
    assert cost(items[1]) == pytest.approx(6.01)


def test_rerun_undetected_lists_survivors_no_tests_and_suspicious_only():
    """``--rerun-undetected`` names exactly the mutants the report counts as undetected: not the killed,
    timed-out or not-yet-run ones."""
    code = {status: c for c, status in mutation.status_by_exit_code.items()}
    by_module = {
        "cagrad_clip/a.py": {"a.x_f__mutmut_1": code["survived"], "a.x_f__mutmut_2": code["killed"], "a.x_f__mutmut_3": None},
        "cagrad_clip/b.py": {
            "b.x_g__mutmut_1": code["no tests"],
            "b.x_g__mutmut_2": code["timeout"],
            "b.x_g__mutmut_3": code["suspicious"],
        },
    }
    assert mutation.undetected(by_module) == ["a.x_f__mutmut_1", "b.x_g__mutmut_1", "b.x_g__mutmut_3"]


def _meta(path: Path, codes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": {}, "estimated_durations_by_key": {}}))


def test_mutants_judged_equivalent_are_skipped_only_while_their_verdict_names_their_mutation(tmp_path: Path, monkeypatch) -> None:
    """A skipped mutant is not run; a verdict that lapsed (or was deleted) gives its mutant back to the run,
    a result already recorded is left alone, gaps are always run, and ``--run-equivalent`` runs them all."""
    meta = tmp_path / "cagrad_clip" / "a.py.meta"
    codes = {
        "a.x_f__mutmut_1": None,  # equivalent, verdict current: skipped
        "a.x_f__mutmut_2": None,  # equivalent, but the function changed: run
        "a.x_f__mutmut_3": mutation.SKIPPED,  # skipped last time, verdict since removed: run
        "a.x_f__mutmut_4": 0,  # equivalent, already run (survived): left alone
        "a.x_f__mutmut_5": None,  # a gap: run (a test may kill it)
    }
    _meta(meta, codes)
    verdict = {"original": "x = 1", "mutant": "x = 2", "why": "w"}
    judged = {
        "a.x_f__mutmut_1": {**verdict, "verdict": "equivalent"},
        "a.x_f__mutmut_2": {**verdict, "verdict": "equivalent"},
        "a.x_f__mutmut_4": {**verdict, "verdict": "equivalent"},
        "a.x_f__mutmut_5": {**verdict, "verdict": "gap"},
    }
    monkeypatch.setattr(mutation, "MUTANTS", tmp_path)
    monkeypatch.setattr(mutation, "verdicts", lambda: judged)
    lines = {"a.x_f__mutmut_2": ("x = 1", "x = 3")}
    monkeypatch.setattr(mutation, "changed_lines", lambda name, module: lines.get(name, ("x = 1", "x = 2")))

    assert mutation.skip_judged_equivalent() == 1
    after = json.loads(meta.read_text())["exit_code_by_key"]
    assert after == {**codes, "a.x_f__mutmut_1": mutation.SKIPPED, "a.x_f__mutmut_3": None}
    assert set(json.loads(meta.read_text())) == {"exit_code_by_key", "durations_by_key", "estimated_durations_by_key"}

    assert mutation.skip_judged_equivalent(run_them=True) == 0
    assert json.loads(meta.read_text())["exit_code_by_key"] == {**codes, "a.x_f__mutmut_3": None}


def test_a_skipped_equivalent_mutant_is_scored_as_equivalent_and_a_skipped_unjudged_one_as_not_run(capsys) -> None:
    code = {status: c for c, status in mutation.status_by_exit_code.items()}
    by_module = {
        "cagrad_clip/a.py": {
            "a.x_f__mutmut_1": code["killed"],
            "a.x_f__mutmut_2": code["survived"],
            "a.x_f__mutmut_3": mutation.SKIPPED,
            "a.x_f__mutmut_4": mutation.SKIPPED,
        }
    }
    judged = {"a.x_f__mutmut_3": {"verdict": "equivalent"}}
    mutation.summary(by_module, judged)
    out = capsys.readouterr().out
    row = next(line.split()[1:] for line in out.splitlines() if line.startswith("cagrad_clip/a.py"))
    assert row == ["4", "1", "1", "1", "50.0", "1"]  # mutants, detected, undetected, equivalent, score, not run
    assert "1 of the equivalent mutants were not run" in out


def test_the_tests_that_detected_a_functions_earlier_mutants_are_its_next_mutants_first() -> None:
    """Only the same function's lines count; a half-written line (another worker appending) is skipped."""
    from tests import mutmut_plugin

    lines = [
        json.dumps({"mutant": "m.x_f__mutmut_1", "exit": 1, "failed": "t::a"}),
        json.dumps({"mutant": "m.x_f__mutmut_2", "exit": 0}),  # survived: no failed test
        json.dumps({"mutant": "m.x_f__mutmut_3", "exit": 1, "failed": "t::b"}),
        json.dumps({"mutant": "m.x_fg__mutmut_1", "exit": 1, "failed": "t::c"}),  # another function
        '{"mutant": "m.x_f__mutmut_4", "exit": 1, "fai',
    ]
    assert mutmut_plugin.function_of("m.xǁCǁf__mutmut_12") == "m.xǁCǁf"
    assert mutmut_plugin.killers(lines, "m.x_f") == {"t::a", "t::b"}


def test_a_timeout_is_confirmed_once_and_not_rerun_while_it_is_the_same_mutation(tmp_path: Path, monkeypatch) -> None:
    """The first call reruns every timed-out mutant alone and records those that time out again; a later
    call (``--resume``) reruns only a timeout whose mutation changed or that was never confirmed."""
    state = {"m.x_f__mutmut_1": -24, "m.x_f__mutmut_2": -24, "m.x_f__mutmut_3": 1}
    again = {"m.x_f__mutmut_1": -24, "m.x_f__mutmut_2": 0}  # what the lone rerun gives each
    lines = {"m.x_f__mutmut_1": ("k += 1", "k = 1"), "m.x_f__mutmut_2": ("a < b", "a <= b")}
    runs: list[list[str]] = []

    def fake_mutmut(*args: str, check: bool = True) -> None:
        names = [a for a in args if a.startswith("m.")]
        runs.append(names)
        state.update({name: again[name] for name in names})

    monkeypatch.setattr(mutation, "CONFIRMED", tmp_path / "confirmed.json")
    monkeypatch.setattr(mutation, "results", lambda: {"m.py": dict(state)})
    monkeypatch.setattr(mutation, "changed_lines", lambda name, module: lines[name])
    monkeypatch.setattr(mutation, "mutmut", fake_mutmut)

    mutation.confirm_timeouts()
    assert runs == [["m.x_f__mutmut_1", "m.x_f__mutmut_2"]]
    assert json.loads((tmp_path / "confirmed.json").read_text()) == {"m.x_f__mutmut_1": ["k += 1", "k = 1"]}

    mutation.confirm_timeouts()  # mutmut_1 is still a timeout, already confirmed: nothing runs
    assert len(runs) == 1

    lines["m.x_f__mutmut_1"] = ("k += 2", "k = 2")  # an edit gave the number to another mutation
    mutation.confirm_timeouts()
    assert runs[-1] == ["m.x_f__mutmut_1"]
