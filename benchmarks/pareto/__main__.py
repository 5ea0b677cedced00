"""CLI: ``python -m benchmarks.pareto [--quick] [--out DIR] [--problems ...] [--methods ...] [--seeds ...]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import clipband, preference, quadratic, report, toy, vlmop2
from .common import Config, Section
from .methods import DEFAULT_METHODS, build_methods, get_methods, torchjd_available
from .problem import Problem, run_problem

#: The problems, in report order (a new one: a module with an object satisfying ``problem.Problem``).
PROBLEMS: dict[str, Problem] = {p.name: p for p in (toy.PROBLEM, quadratic.PROBLEM, vlmop2.PROBLEM, preference.PROBLEM, clipband.PROBLEM)}
#: Problems where the TorchJD peers join the default method list. They aggregate one Jacobian
#: at a time (a Python loop over runs, cvxpy for CAGrad), which makes the 20k-step toy and the
#: DPO sweeps take hours; name them with --methods to run them there anyway.
PEER_PROBLEMS = tuple(name for name, p in PROBLEMS.items() if p.peers)


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def main(argv: list[str] | None = None) -> list[Section]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pareto", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/pareto"), help="report folder")
    parser.add_argument("--quick", action="store_true", help="reduced budgets (CI): under 2 minutes on 2 cores")
    parser.add_argument("--problems", nargs="+", help=f"subset of {list(PROBLEMS)} (default: all)")
    parser.add_argument(
        "--methods",
        nargs="+",
        help=f"subset of {list(build_methods())} (default: ours + baselines, plus the TorchJD peers when torchjd is installed)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--c", type=float, default=0.4, help="trust-region radius of the CAGrad family (default 0.4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny tensors)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    problems = _split(args.problems) or list(PROBLEMS)
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problem(s) {unknown}; choose from {list(PROBLEMS)}")
    names = _split(args.methods)
    note = ""
    peers: list[str] = []
    if names is None:
        names = list(DEFAULT_METHODS)
        if torchjd_available() and not args.quick:
            peers = ["torchjd-upgrad", "torchjd-cagrad"]
            note = (
                f"TorchJD peers (UPGrad, CAGrad) run on {list(PEER_PROBLEMS)} by default (one Jacobian at a time: "
                "too slow for the long toy and DPO runs; request them with --methods)."
            )
        elif args.quick:
            note = "TorchJD peers skipped in --quick mode (name them with --methods to include them)."
        else:
            note = "TorchJD peers (UPGrad, CAGrad) skipped: `torchjd` is not installed (`pip install torchjd` to add them)."
    try:
        methods = get_methods(names, args.c)
        methods_with_peers = get_methods(names + peers, args.c)
    except ValueError as exc:
        parser.error(str(exc))
    if any(m.external for m in methods) and not torchjd_available():
        parser.error("the torchjd-* methods need `pip install torchjd`")
    seeds = args.seeds if args.seeds else ([0] if args.quick else [0, 1, 2])
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = Config(out=args.out, methods=methods, seeds=seeds, quick=args.quick, progress=not args.no_progress, c=args.c)
    if note:
        print(note, file=sys.stderr)
    start = time.perf_counter()
    sections = []
    peer_note = f" + {peers} on {list(PEER_PROBLEMS)}" if peers else ""
    header = (
        f"Command: `python -m benchmarks.pareto{' --quick' if args.quick else ''}` (seeds {seeds}, "
        f"methods {names}{peer_note}, c = {args.c}, float64, {args.threads} torch thread(s)). "
        "Every method runs through the same loop with the same optimizer, learning rate and step budget "
        "per problem; no per-method tuning.\n" + (f"\n{note}\n" if note else "")
    )
    for name in problems:
        cfg.methods = methods_with_peers if name in PEER_PROBLEMS else methods
        sections.append(run_problem(PROBLEMS[name], cfg))
        path = report.write_report(args.out, sections, header, time.perf_counter() - start)  # incremental
    wall = time.perf_counter() - start
    path = report.write_report(args.out, sections, header, wall)
    print(f"report: {path} ({wall:.0f} s)")
    for s in sections:
        print(s.summary)
    return sections


if __name__ == "__main__":
    main()
