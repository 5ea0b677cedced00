"""CLI: ``python -m benchmarks.dpo [--quick] [--out DIR] [--seeds ...] [--methods ...] [--m 2 3]``.

RACO's experiment in miniature: a tiny causal LM built in code is aligned with multi-objective DPO
through :class:`cagrad_clip.integrations.trl.MultiObjectiveDPOTrainer` on preference pairs labelled
per objective by a code judge (coverage of the prompt's keywords, brevity, politeness), for a sweep of
user weights x methods x seeds, m = 2 and m = 3. Writes ``report.md``, figures and ``results.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from . import report, task
from .run import METHODS, QUICK, WEIGHTS, Budget, run


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/dpo"), help="report folder (default results/dpo)")
    parser.add_argument("--quick", action="store_true", help="reduced budgets and one weight per m (CI): under 2 minutes")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--m", nargs="+", type=int, choices=[2, 3], default=[2, 3], help="numbers of objectives")
    parser.add_argument("--steps", type=int, help="DPO steps per run (overrides the budget)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny model)")
    parser.add_argument(
        "--rare",
        nargs=2,
        metavar=("OBJECTIVE", "KEEP"),
        help="the rare-signal variant: objective OBJECTIVE's sign is a tie in all but a KEEP fraction of the pairs (e.g. 0 0.1)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    budget = QUICK if args.quick else Budget()
    if args.steps:
        budget.steps = args.steps
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    weights = {m: WEIGHTS[m][:1] if args.quick else WEIGHTS[m] for m in args.m}
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rare = None
    if args.rare:
        objective, keep = int(args.rare[0]), float(args.rare[1])
        if objective not in range(min(args.m)) or not 0.0 < keep <= 1.0:
            parser.error(f"--rare takes an objective index below {min(args.m)} and a fraction in (0, 1], got {args.rare}")
        rare = (objective, keep)
    results = run(seeds, args.methods, args.m, budget, weights, progress=not args.no_progress, rare=rare)
    wall = time.perf_counter() - start
    command = "python -m benchmarks.dpo" + (" --quick" if args.quick else "") + (f" --rare {rare[0]} {rare[1]}" if rare else "")
    header = (
        f"Command: `{command}` (seeds {seeds}, methods {args.methods}, m {args.m}); wall time {wall:.0f} s on "
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"Python {platform.python_version()}.\n\n"
        f"Budget per run: reference = tiny GPT-2 after {budget.warmup_steps} supervised steps; {budget.pairs} reference-sample "
        f"pairs (all-tie pairs dropped); {budget.steps} DPO steps of {budget.batch} pairs, AdamW lr {budget.lr}, warm-up + cosine, "
        f"max-norm 1.0 clipping, beta {budget.beta}; evaluation on {budget.eval_prompts} held-out prompts, one temperature-1 "
        "sample of the policy against one of the reference, judged per objective (ties count half). "
        "MGDA ignores the weights: it runs once per (m, seed) and stands for every weight."
        + (
            f"\n\n**Rare-signal variant**: objective {task.OBJECTIVES[rare[0]]}'s sign is kept in {rare[1]:.0%} of the pairs "
            "(a tie elsewhere), so its DPO loss, a mean over every pair, has a gradient about that much shorter."
            if rare
            else ""
        )
        + ("\n\n**Quick mode (CI): one seed, one weight per m, a few steps -- a smoke test, not a result.**" if args.quick else "")
    )
    path = report.write(results, args.methods, args.out, header)
    print(report.headline(results, args.methods))
    print(f"report: {path} ({wall:.0f} s)", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
