"""Tables, metrics and figures of the DPO sweep."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.pareto.hypervolume import hypervolume_2d, hypervolume_3d

from . import task
from .run import METHODS, RunResult


def _ms(values: list[float] | np.ndarray, digits: int = 3) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if v.size > 1 else f"{v.mean():.{digits}f}"


def hypervolume(win_rates: np.ndarray) -> float:
    """Volume of win-rate space (maximised, reference point 0) dominated by the points ``(n, m)``."""
    pts = 1.0 - np.asarray(win_rates, dtype=float)
    ref = np.ones(pts.shape[1])
    return hypervolume_2d(pts, ref) if pts.shape[1] == 2 else hypervolume_3d(pts, ref)


def metrics(results: list[RunResult]) -> dict[tuple[int, str], dict[str, list[float]]]:
    """Per (m, method), one value per seed of: hypervolume of its points over the weights, mean weighted
    win rate, w-regret (best weighted win rate any method reached at that (w, seed) minus its own, averaged
    over w) and steering (how much each objective's win rate rises when the weights favour it)."""
    by = defaultdict(list)
    for r in results:
        by[(r.m, r.seed)].append(r)
    out: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (m, _seed), runs in sorted(by.items()):
        weights = sorted({r.weights for r in runs}, reverse=True)
        best = {w: max(float(np.dot(w, r.win_rates)) for r in runs if r.weights == w) for w in weights}
        for method in dict.fromkeys(r.method for r in runs):
            mine = {r.weights: np.asarray(r.win_rates) for r in runs if r.method == method}
            pts = np.stack([mine[w] for w in weights])
            rec = out[(m, method)]
            rec["hypervolume"].append(hypervolume(pts))
            rec["weighted"].append(float(np.mean([np.dot(w, mine[w]) for w in weights])))
            rec["regret"].append(float(np.mean([best[w] - np.dot(w, mine[w]) for w in weights])))
            if len(weights) > 1:
                steer = []
                for i in range(m):
                    fav = max(weights, key=lambda w: w[i])
                    others = [mine[w][i] for w in weights if w != fav]
                    steer.append(mine[fav][i] - float(np.mean(others)))
                rec["steering"].append(float(np.mean(steer)))
    return out


def headline(results: list[RunResult], methods: list[str]) -> str:
    met = metrics(results)
    lines = ["| m | method | hypervolume ↑ | weighted win rate ↑ | w-regret ↓ | steering ↑ |", "|---|---|---|---|---|---|"]
    for m in sorted({r.m for r in results}):
        for method in methods:
            rec = met.get((m, method))
            if rec is None:
                continue
            lines.append(
                f"| {m} | {METHODS[method][0]} | {_ms(rec['hypervolume'])} | {_ms(rec['weighted'])} | "
                f"{_ms(rec['regret'])} | {_ms(rec['steering']) if rec['steering'] else '-'} |"
            )
    return "\n".join(lines)


def detail(results: list[RunResult], methods: list[str], m: int) -> str:
    names = task.OBJECTIVES[:m]
    head = (
        "| w | method | "
        + " | ".join(f"win rate {n}" for n in names)
        + " | "
        + " | ".join(f"mean {n} (ref)" for n in names)
        + " | clip active (% of steps) | clip change |"
    )
    lines = [head, "|" + "---|" * (4 + 2 * m)]
    weights = sorted({r.weights for r in results if r.m == m}, reverse=True)
    for w in weights:
        for method in methods:
            runs = [r for r in results if r.m == m and r.weights == w and r.method == method]
            if not runs:
                continue
            wr = np.array([r.win_rates for r in runs])
            pm = np.array([r.policy_means for r in runs])
            rm = np.array([r.reference_means for r in runs]).mean(0)
            cells = [_ms(wr[:, i]) for i in range(m)] + [f"{_ms(pm[:, i], 2)} ({rm[i]:.2f})" for i in range(m)]
            active = np.array([r.clip_active for r in runs], dtype=float)
            change = np.array([r.clip_change for r in runs], dtype=float)
            cells += ["-", "-"] if np.isnan(active).all() else [_ms(100 * active, 1), _ms(change, 3)]
            lines.append(f"| {', '.join(f'{x:g}' for x in w)} | {METHODS[method][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLORS = {"weighted": "tab:gray", "cagrad": "tab:blue", "raco": "tab:red", "mgda": "tab:green", "pcgrad": "tab:purple"}


def figure(results: list[RunResult], methods: list[str], m: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = task.OBJECTIVES[:m]
    pairs = [(0, 1)] if m == 2 else [(0, 1), (0, 2), (1, 2)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
    weights = sorted({r.weights for r in results if r.m == m}, reverse=True)
    markers = ["o", "s", "^", "D", "v"]
    for ax, (i, j) in zip(axes[0], pairs):
        for method in methods:
            xs, ys, ex, ey = [], [], [], []
            for w in weights:
                wr = np.array([r.win_rates for r in results if r.m == m and r.weights == w and r.method == method])
                if len(wr) == 0:
                    continue
                xs.append(wr[:, i].mean()), ys.append(wr[:, j].mean()), ex.append(wr[:, i].std()), ey.append(wr[:, j].std())
            if not xs:
                continue
            ax.plot(xs, ys, "-", color=COLORS.get(method, "k"), alpha=0.5)
            for k, (x, y, sx, sy) in enumerate(zip(xs, ys, ex, ey)):
                ax.errorbar(
                    x,
                    y,
                    xerr=sx,
                    yerr=sy,
                    fmt=markers[k % len(markers)],
                    color=COLORS.get(method, "k"),
                    ms=6,
                    capsize=2,
                    label=METHODS[method][0] if k == 0 else None,
                )
        ax.axvline(0.5, color="k", lw=0.5, ls=":")
        ax.axhline(0.5, color="k", lw=0.5, ls=":")
        ax.set_xlabel(f"win rate vs reference: {names[i]}")
        ax.set_ylabel(f"win rate vs reference: {names[j]}")
        ax.grid(alpha=0.3)
    legend = ", ".join(f"{markers[k]} = w {w}" for k, w in enumerate(weights))
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Multi-objective DPO on a tiny GPT-2, m = {m}: win rates, mean ± std over seeds\nmarkers: {legend}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(out: Path) -> list[RunResult]:
    """The runs saved in ``out/results.json``."""
    return [RunResult(**{**r, "weights": tuple(r["weights"])}) for r in json.loads((out / "results.json").read_text())]


def main(argv: list[str] | None = None) -> Path:
    """``python -m benchmarks.dpo.report DIR``: rebuild ``report.md`` and the figures from ``DIR/results.json``
    (the header, with the command and wall time, is kept from the existing ``report.md``)."""
    import sys

    out = Path((sys.argv[1:] if argv is None else argv)[0])
    results = load(out)
    header = (out / "report.md").read_text().split("\n## Headline")[0].split("\n", 2)[2].strip()
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    return write(results, methods, out, header)


def write(results: list[RunResult], methods: list[str], out: Path, header: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    parts = [f"# Multi-objective DPO benchmark\n\n{header}\n", "## Headline\n", headline(results, methods) + "\n"]
    for m in sorted({r.m for r in results}):
        name = f"dpo_m{m}.png"
        figure(results, methods, m, out / name)
        parts += [f"## m = {m}: {', '.join(task.OBJECTIVES[:m])}\n", f"![fronts, m = {m}]({name})\n", detail(results, methods, m) + "\n"]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


if __name__ == "__main__":
    main()
