"""Mutation testing of ``cagrad_clip/`` with mutmut, each module checked by its own focused tests.

    python tools/mutation.py                 # the whole package: generate, collect, run, report
    python tools/mutation.py --sample 0.03   # a seeded 3 % of every module: generate, collect, run, score
    python tools/mutation.py --report-only   # the report of the last run (no mutant is run)

mutmut plants one small bug (a mutant) at a time and runs the tests that reach the mutated function.
Left to itself it runs *every* test that reaches it: a mutant in the solver would run every step
test of the suite, so a full run takes a day on 2 cores. This driver narrows each module's tests to
the files named for it under ``[tool.cagrad_clip.mutation.focus]`` in ``pyproject.toml`` (the
module's own tests and the step tests built to catch its bugs), by filtering mutmut's recorded
test-to-function map between its stats collection and its mutant run. Everything else, including the
mutants and their results under ``mutants/``, is mutmut's own (``mutmut results``, ``mutmut show``).

The report counts a mutant as *detected* when a test failed (killed), mutmut's timeout ended it
(a mutant that makes a loop run forever), or it crashed the test process (segfault: "suspicious");
*undetected* when every selected test passed (survived) or no selected test reaches it (no tests).
The score is detected / (detected + undetected - equivalent), with the equivalent mutants and the
named gaps listed, each with a reason, in ``tools/mutation_verdicts/*.toml``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import tomllib
from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
STATS = MUTANTS / "mutmut-stats.json"
DURATIONS = MUTANTS / "mutation-durations.json"  # each test's full cost, written by tests/mutmut_plugin.py
TIMES = MUTANTS / "mutation-times.jsonl"  # one line per mutant run: its seconds (tests/mutmut_plugin.py)
CONFIRMED = MUTANTS / "confirmed-timeouts.json"  # {mutant: [original, mutant]}: timeouts seen twice
VERDICTS = ROOT / "tools" / "mutation_verdicts"  # one TOML file per area: [mutant."<name>"] verdict, why

# mutmut's statuses (``mutmut.stats.status_by_exit_code``) as this report counts them
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}
UNDETECTED = {"survived", "no tests", "suspicious"}
SKIPPED = 34  # mutmut's "skipped": a recorded result, which its run leaves alone (a judged-equivalent mutant here)


def focus_map() -> dict[str, list[str]]:
    """Module glob → test-file globs, from ``pyproject.toml``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["cagrad_clip"]["mutation"]["focus"]


def module_path(function_name: str) -> str:
    """``cagrad_clip._dual.kernel.x_solve`` or ``…optimizer.xǁClassǁmethod`` → ``cagrad_clip/_dual/kernel.py``."""
    parts = function_name.split(".")
    while parts and (parts[-1].startswith("x_") or parts[-1].startswith("xǁ")):
        parts.pop()
    path = "/".join(parts)
    return path + ("/__init__.py" if (ROOT / path).is_dir() else ".py")


def focused_tests(module: str, tests: list[str], focus: dict[str, list[str]]) -> list[str]:
    """The tests among ``tests`` in the files of the first focus pattern that ``module`` matches."""
    globs = next((files for pattern, files in focus.items() if fnmatch.fnmatch(module, pattern)), None)
    if globs is None:
        raise SystemExit(f"{module} has no entry in [tool.cagrad_clip.mutation.focus]: add one to pyproject.toml")
    return [t for t in tests if any(fnmatch.fnmatch(t.split("::")[0], g) for g in globs)]


def narrow_stats() -> tuple[int, int]:
    """Keep, for each mutated function, only the covering tests in its module's focus files."""
    stats = json.loads(STATS.read_text())
    focus = focus_map()
    before = after = 0
    narrowed = {}
    for name, tests in stats["tests_by_mangled_function_name"].items():
        kept = focused_tests(module_path(name), tests, focus)
        before, after = before + len(tests), after + len(kept)
        narrowed[name] = kept
    stats["tests_by_mangled_function_name"] = narrowed
    if DURATIONS.exists():
        # mutmut times a mutant out at a multiple of its tests' recorded duration, which it measures as
        # the calls alone: a test behind a fixture that spawns ranks then looks free, and its mutants
        # time out. The plugin's record adds the setups and teardowns.
        full = json.loads(DURATIONS.read_text())["tests"]
        stats["duration_by_test"] = {t: max(d, full.get(t, 0.0)) for t, d in stats["duration_by_test"].items()}
    STATS.write_text(json.dumps(stats, indent=1))
    return before, after


def mutmut(*args: str, check: bool = True) -> None:
    # one thread per worker: torch's thread pools would fight over the 2 cores and skew mutmut's CPU-time limit
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ mutmut " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, env=env, check=check)


def results() -> dict[str, dict[str, int | None]]:
    """Exit code of every mutant, by module path."""
    by_module: dict[str, dict[str, int | None]] = {}
    for meta in sorted(MUTANTS.glob("cagrad_clip/**/*.py.meta")):
        module = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        by_module[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return by_module


def verdicts() -> dict[str, dict[str, str]]:
    """``{mutant name: {"original", "mutant", "verdict": "equivalent" | "gap", "why"}}`` from the verdict files.

    A mutant's name is its function and a number, which an edit of the function can give to another
    mutation: ``original`` and ``mutant`` (the changed line before and after, as the report lists them)
    tie the verdict to the mutation it argued about, and :func:`current` drops it when they no longer match.
    """
    judged: dict[str, dict[str, str]] = {}
    for path in sorted(VERDICTS.glob("*.toml")):
        for name, entry in tomllib.loads(path.read_text()).get("mutant", {}).items():
            if entry.get("verdict") not in ("equivalent", "gap") or not entry.get("why"):
                raise SystemExit(f"{path}: {name} needs verdict = 'equivalent' or 'gap' and a why")
            if not isinstance(entry.get("original"), str) or not isinstance(entry.get("mutant"), str):
                raise SystemExit(f"{path}: {name} needs original = and mutant = (the changed line, from the report)")
            judged[name] = entry
    return judged


def current(judged: dict[str, dict[str, str]], by_module: dict[str, dict[str, int | None]]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The verdicts whose mutant is still the mutation they were written for, and the names of the stale ones
    (only undetected and skipped mutants are looked at: a verdict on a detected one does not count)."""
    kept, stale = {}, []
    for module, codes in by_module.items():
        for name, code in codes.items():
            entry = judged.get(name)
            if entry is None or (code != SKIPPED and status_by_exit_code[code] not in UNDETECTED):
                continue
            if changed_lines(name, module) == (entry["original"], entry["mutant"]):
                kept[name] = entry
            else:
                stale.append(name)
    return kept, stale


def skip_judged_equivalent(run_them: bool = False) -> int:
    """Record every mutant not yet run whose *equivalent* verdict still names its mutation as skipped, so
    mutmut does not run it; give back to the run any skipped mutant whose verdict lapsed or was removed.

    An equivalent mutant survives every test by definition, and a survivor runs all its focused tests:
    about 20 s each, against well under a second for a detected mutant, so running the few hundred
    judged equivalent would take about an hour of a full run. ``run_them`` (``--run-equivalent``)
    puts them all back, to check the verdicts against the tests of the day (a verdict whose mutant a
    test kills is wrong). Returns the number of mutants skipped.
    """
    judged = {name: entry for name, entry in verdicts().items() if entry["verdict"] == "equivalent"}
    skipped = 0
    for meta in sorted(MUTANTS.glob("cagrad_clip/**/*.py.meta")):
        module = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        changed = False
        for name, code in codes.items():
            if code is not None and code != SKIPPED:
                continue
            entry = judged.get(name)
            skip = not run_them and entry is not None and changed_lines(name, module) == (entry["original"], entry["mutant"])
            new = SKIPPED if skip else None
            skipped += skip
            if new != code:
                codes[name], changed = new, True
        if changed:
            meta.write_text(json.dumps(data, indent=4))
    return skipped


def changed_lines(name: str, module: str) -> tuple[str, str]:
    """The original and the mutated line(s) of one mutant, from mutmut's diff."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        diff = get_diff_for_mutant(name, path=module).splitlines()[2:]
    finally:
        os.chdir(cwd)
    removed = " ".join(line[1:].strip() for line in diff if line.startswith("-"))
    added = " ".join(line[1:].strip() for line in diff if line.startswith("+"))
    return removed, added


def markdown(by_module: dict[str, dict[str, int | None]], judged: dict[str, dict[str, str]], table: str, scope: str) -> str:
    """The report as a page: the score table, then every undetected mutant with its verdict and diff."""
    lines = [
        "# Mutation testing: the last run",
        "",
        "Written by `python tools/mutation.py --markdown docs/mutation_report.md` (see `docs/development.md`).",
        f"Scope: {scope}.",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        "Every undetected mutant follows: *equivalent* (no test can tell it from the original, with the",
        "reason), *gap* (a behaviour no test pins down yet, named), or *not judged*. Verdicts live in",
        "`tools/mutation_verdicts/`. A mutant judged equivalent in an earlier run, whose verdict still names",
        "its mutation, is not run again (`--run-equivalent` runs it): it is listed as *not run*.",
    ]
    for module, codes in by_module.items():
        undetected = [n for n, code in codes.items() if code == SKIPPED or status_by_exit_code[code] in UNDETECTED]
        if not undetected:
            continue
        lines += ["", f"## `{module}`", "", "| mutant | status | verdict | original → mutant | why |", "|---|---|---|---|---|"]
        for name in undetected:
            removed, added = changed_lines(name, module)
            entry = judged.get(name, {})
            short = name.split(".", 2)[-1].replace("ǁ", ".").replace("|", "\\|")
            change = f"`{removed}` → `{added}`".replace("|", "\\|")
            why = entry.get("why", "").replace("|", "\\|")
            status = "not run (judged equivalent)" if codes[name] == SKIPPED else status_by_exit_code[codes[name]]
            lines.append(f"| `{short}` | {status} | {entry.get('verdict', 'not judged')} | {change} | {why} |")
    return "\n".join(lines) + "\n"


def report(markdown_path: Path | None = None) -> int:
    by_module, judged = results(), verdicts()
    scope = "every mutant of cagrad_clip/"
    if SAMPLE.exists():
        spec = json.loads(SAMPLE.read_text())
        keep = sampled(spec["fraction"], spec["seed"])
        by_module = {module: {name: codes[name] for name in keep.get(module, [])} for module, codes in by_module.items()}
        scope = f"a seeded sample of each module's mutants (fraction {spec['fraction']}, seed {spec['seed']}; `--sample`)"
        print(f"scored on {scope}")
    judged, stale = current(judged, by_module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary(by_module, judged)
    print(out.getvalue(), end="")
    if stale:
        print(f"{len(stale)} verdicts are stale (the function changed; the mutant is another mutation now), counted as not judged:")
        for name in stale:
            print(f"  {name}")
    if markdown_path is not None:
        table = out.getvalue().split("\nundetected:")[0]
        markdown_path.write_text(markdown(by_module, judged, table, scope))
        print(f"wrote {markdown_path}")
    return 0


def summary(by_module: dict[str, dict[str, int | None]], judged: dict[str, dict[str, str]]) -> None:
    total: Counter[str] = Counter()
    print(f"{'module':40s} {'mutants':>8s} {'detected':>9s} {'undetected':>10s} {'equivalent':>10s} {'score':>7s} {'not run':>8s}")
    undetected_names: list[tuple[str, str]] = []
    module_rates: list[tuple[int, float]] = []
    for module, codes in by_module.items():
        c: Counter[str] = Counter()
        for name, code in codes.items():
            status = status_by_exit_code[code]
            if status in DETECTED:
                c["detected"] += 1
            elif code == SKIPPED and judged.get(name, {}).get("verdict") == "equivalent":
                c["equivalent"] += 1
                total["equivalent, not run"] += 1
            elif status in UNDETECTED:
                if judged.get(name, {}).get("verdict") == "equivalent":
                    c["equivalent"] += 1
                else:
                    c["undetected"] += 1
                    undetected_names.append((name, status))
            else:
                c["not run"] += 1
            c["mutants"] += 1
        total.update(c)
        scored = c["detected"] + c["undetected"]
        if scored:
            module_rates.append((c["mutants"] - c["equivalent"], c["detected"] / scored))
        score = f"{100 * c['detected'] / scored:.1f}" if scored else "-"
        print(
            f"{module:40s} {c['mutants']:8d} {c['detected']:9d} {c['undetected']:10d} {c['equivalent']:10d} {score:>7s} {c['not run']:8d}"
        )
    weighted = sum(size * rate for size, rate in module_rates)
    stratified = 100 * weighted / sum(size for size, _ in module_rates) if module_rates else float("nan")
    scored = total["detected"] + total["undetected"]
    overall = 100 * total["detected"] / scored if scored else float("nan")
    print(
        f"{'cagrad_clip/':40s} {total['mutants']:8d} {total['detected']:9d} {total['undetected']:10d} "
        f"{total['equivalent']:10d} {overall:7.1f}"
    )
    if total["equivalent, not run"]:
        n = total["equivalent, not run"]
        print(f"{n} of the equivalent mutants were not run: their verdict names their mutation (--run-equivalent runs them)")
    if total["not run"]:
        print(
            f"{total['not run']} mutants not run: the score above counts the mutants run. Where a module was "
            f"sampled, its score estimates the whole module's; weighted by module size: {stratified:.1f}"
        )
    gaps = [n for n, _ in undetected_names if judged.get(n, {}).get("verdict") == "gap"]
    unjudged = [(n, why) for n, why in undetected_names if n not in judged]
    print(f"\nundetected: {len(undetected_names)} ({len(gaps)} named gaps, {len(unjudged)} not yet judged)")
    by_function: defaultdict[str, int] = defaultdict(int)
    for name, _ in unjudged:
        by_function[name.rsplit("__mutmut_", 1)[0]] += 1
    for function, n in sorted(by_function.items(), key=lambda item: -item[1]):
        print(f"  {n:4d}  {function}")


SAMPLE = MUTANTS / "mutation-sample.json"


def undetected(by_module: dict[str, dict[str, int | None]]) -> list[str]:
    """Every mutant whose last result is undetected (survived, no tests, suspicious): once tests were
    written for them, ``--rerun-undetected`` runs just these again, with the current tests."""
    return [
        name for codes in by_module.values() for name, code in codes.items() if code is not None and status_by_exit_code[code] in UNDETECTED
    ]


def sampled(fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded random ``fraction`` of each module's mutants (at least one per module).

    Membership is decided per mutant by a hash of ``seed`` and its name, so it does not depend on the
    other mutants: an edit elsewhere in a module leaves the sample of its other functions unchanged,
    and a smaller fraction with the same seed is a subset of a larger one.
    """
    chosen: dict[str, list[str]] = {}
    for module, codes in results().items():
        digest = {name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest() for name in codes}
        ranked = sorted(codes, key=digest.__getitem__)
        if ranked:
            keep = [name for name in ranked if int(digest[name][:8], 16) < fraction * 2**32]
            chosen[module] = keep or ranked[:1]
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="print the last run's report; run nothing")
    parser.add_argument("--resume", action="store_true", help="keep the mutants, stats and results: run what is left")
    parser.add_argument(
        "--rerun-undetected", action="store_true", help="with --resume: run every undetected mutant again (tests were added for them)"
    )
    parser.add_argument("--sample", type=float, help="run a seeded random fraction of every module and score on it")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="mutants run at once")
    parser.add_argument(
        "--run-equivalent", action="store_true", help="also run the mutants judged equivalent (by default they are skipped)"
    )
    parser.add_argument("--times", action="store_true", help="where the last run's time went, per module; run nothing")
    parser.add_argument("--markdown", type=Path, help="also write the report, every undetected mutant listed, here")
    parser.add_argument("patterns", nargs="*", help="mutmut name patterns to rerun (default: every mutant)")
    args = parser.parse_args()
    if args.times:
        return times()
    if not args.report_only:
        # 1. generate the mutants (a fresh run) and collect which tests reach which function (a resumed
        #    run: only the tests added since; no mutant runs, the pattern matches none), 2. narrow that map
        #    to each module's focus files, 3. run. mutmut would add a new test's functions unnarrowed.
        if not args.resume:  # mutmut would keep the results of every function whose code is unchanged
            shutil.rmtree(MUTANTS, ignore_errors=True)
        # mutmut stops with "nothing matches" once the stats are saved: that is the point of the pattern
        mutmut("run", "--max-children", str(args.max_children), "no-such-mutant", check=False)
        if not STATS.exists():
            raise SystemExit("mutmut collected no stats: run `mutmut run` to see why (a test that fails under mutmut?)")
        before, after = narrow_stats()
        print(f"focused: {after} of {before} (function, test) pairs kept", flush=True)
        skipped = skip_judged_equivalent(run_them=args.run_equivalent)
        print(f"skipped: {skipped} mutants judged equivalent, their verdicts still current", flush=True)
    if not args.report_only:
        names = args.patterns
        if args.rerun_undetected:
            if not args.resume:
                raise SystemExit("--rerun-undetected reruns the last run's undetected mutants: give --resume too")
            names = names + undetected(results())
            print(f"rerunning {len(names)} undetected mutants with the current tests", flush=True)
        if args.sample is not None:
            SAMPLE.write_text(json.dumps({"fraction": args.sample, "seed": args.seed}))
            codes = {name: code for module in results().values() for name, code in module.items()}
            chosen = [name for names in sampled(args.sample, args.seed).values() for name in names]
            names = [name for name in chosen if codes[name] is None]
            print(f"sample: {len(chosen)} mutants (fraction {args.sample}, seed {args.seed}), {len(names)} to run", flush=True)
        if names or args.sample is None:
            mutmut("run", "--max-children", str(args.max_children), *names)
        confirm_timeouts()
    return report(args.markdown)


def times() -> int:
    """Per module: mutants run, seconds in their test sessions (detected and undetected apart), from the
    lines ``tests/mutmut_plugin.py`` appended. The sessions run ``--max-children`` at a time; a timed-out
    mutant is killed before its line is written, so timeouts are not counted here."""
    if not TIMES.exists():
        raise SystemExit(f"no {TIMES.relative_to(ROOT)}: run the mutants first")
    rows = [json.loads(line) for line in TIMES.read_text().splitlines() if line.strip()]
    last = {row["mutant"]: row for row in rows}  # a rerun mutant counts once, its last run
    by_module: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for row in last.values():
        c = by_module[module_path(row["mutant"].rsplit("__mutmut_", 1)[0])]
        c["mutants"] += 1
        c["detected s" if row["exit"] != 0 else "survived s"] += row["seconds"]
        c["survived"] += row["exit"] == 0
    print(f"{'module':40s} {'mutants':>8s} {'survived':>9s} {'detected s':>11s} {'survived s':>11s} {'s/mutant':>9s}")
    total: Counter[str] = Counter()
    for module, c in sorted(by_module.items(), key=lambda item: -(item[1]["detected s"] + item[1]["survived s"])):
        total.update(c)
        seconds = c["detected s"] + c["survived s"]
        row = f"{module:40s} {c['mutants']:8d} {c['survived']:9d} {c['detected s']:11.0f} {c['survived s']:11.0f}"
        print(f"{row} {seconds / c['mutants']:9.2f}")
    seconds = total["detected s"] + total["survived s"]
    print(
        f"{'all':40s} {total['mutants']:8d} {total['survived']:9d} {total['detected s']:11.0f} {total['survived s']:11.0f} "
        f"{seconds / max(total['mutants'], 1):9.2f}"
    )
    return 0


def confirm_timeouts() -> None:
    """Run every timed-out mutant once more, one at a time: mutmut's limit is CPU time, which a loaded
    machine inflates (30 of a 209-mutant sample timed out under load, 29 of them survived on an idle
    machine). A mutant counts as timed out only if it does so twice.

    A mutant that timed out again is recorded in ``CONFIRMED`` with its changed lines, and a later call
    (``--resume``) does not run it a third time while it is still the same mutation: each confirmation
    runs the mutant's tests to a CPU limit of five times their cost (minutes for a solver mutant).
    """
    timed_out = {
        name: module for module, codes in results().items() for name, code in codes.items() if status_by_exit_code[code] == "timeout"
    }
    confirmed = json.loads(CONFIRMED.read_text()) if CONFIRMED.exists() else {}
    mutation = {name: list(changed_lines(name, module)) for name, module in timed_out.items()}
    todo = [name for name in timed_out if confirmed.get(name) != mutation[name]]
    if len(todo) < len(timed_out):
        print(f"{len(timed_out) - len(todo)} timeouts already confirmed (the same mutation timed out twice before)", flush=True)
    if not todo:
        return
    print(f"confirming {len(todo)} timeouts", flush=True)
    mutmut("run", "--max-children", "1", *todo)
    codes = {name: code for module in results().values() for name, code in module.items()}
    confirmed.update({name: mutation[name] for name in todo if status_by_exit_code[codes[name]] == "timeout"})
    CONFIRMED.write_text(json.dumps(confirmed, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    raise SystemExit(main())
