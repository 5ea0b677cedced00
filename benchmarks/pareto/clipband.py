"""Problem 5: where RACO's clip matters. Conflicting quadratics whose gradient norms are swept through
the band where the clip acts.

``L_i(x) = (s_i / 2) ||x - u_i||^2`` on R^2 with the targets ``u_i`` far apart (two objectives:
``u = (1, 0), (-1, 0)``; three: the vertices of a triangle) and skewed user weights (``w = (0.9, 0.1)``;
``(0.8, 0.1, 0.1)``). The heavy objective has scale 1, the light ones scale ``sigma``. At the
weighted optimum ``sum_i w_i g_i = 0``, so with two objectives the gradient norms there are in the
ratio ``w_heavy / w_light`` exactly: the band where the clip ``p~ = min(p, w)`` acts. ``sigma`` sets
the light objectives' curvature against the heavy one's, and with it the path of the runs towards
that point; it is swept from 1 to 40. The weighted optimum is exact:
``x*(w) = sum_i w_i s_i u_i / sum_i w_i s_i``.

Metrics that can separate the methods: the number of steps until the weighted loss is within ``EPS``
of its optimum (relative to the start's gap), the weighted gap at a tenth of the budget and at the
end, and the worst objective at the end (``max_i L_i``). Both ``c = 0.4`` and ``c = 0.9``. The clip's
activity per run is in the report's clip table.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .common import Config, Section, md_table
from .engine import RunResult
from .methods import get_methods
from .problem import Batch

SIGMAS = (1.0, 3.0, 6.0, 9.0, 12.0, 20.0, 40.0)
SIGMAS_QUICK = (1.0, 9.0, 20.0)
RADII = (0.4, 0.9)
METHODS = ("weighted", "mgda", "pcgrad", "cagrad", "raco")
EPS = 1e-2
STARTS = 4
TARGETS = {
    2: torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64),
    3: torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]], dtype=torch.float64),
}
WEIGHTS = {2: (0.9, 0.1), 3: (0.8, 0.1, 0.1)}


def losses(x: Tensor, scales: Tensor, targets: Tensor) -> Tensor:
    """``x`` ``(..., R, 2)``, per-run ``scales`` ``(R, m)``, ``targets`` ``(m, 2)`` -> ``(..., R, m)``."""
    return 0.5 * scales * ((x.unsqueeze(-2) - targets) ** 2).sum(-1)


def weighted_optimum(scales: Tensor, weights: Tensor, targets: Tensor) -> Tensor:
    """``x*(w)`` per run: ``(R, 2)``."""
    ws = weights * scales  # (R, m)
    return (ws.unsqueeze(-1) * targets).sum(-2) / ws.sum(-1, keepdim=True)


def _figure(path, curves: dict[tuple[int, float], dict[str, list[np.ndarray]]], sigmas: list[float], steps: int) -> None:
    """One panel per (m, c): median steps to eps (unreached runs count as the budget) against sigma, 25-75 % band."""
    from .report import COLORS, _finish_grid, _label_panel, plt

    n = len(curves)
    ncols = min(2, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    for p, ((m, c), by_method) in enumerate(curves.items()):
        ax = axes[p // ncols, p % ncols]
        for j, (label, per_sigma) in enumerate(by_method.items()):
            vals = np.stack(per_sigma)  # (sigmas, runs)
            color = COLORS[j % len(COLORS)]
            ax.plot(sigmas, np.median(vals, axis=1), "o-", color=color, lw=1.2, ms=3, label=label)
            ax.fill_between(sigmas, np.percentile(vals, 25, axis=1), np.percentile(vals, 75, axis=1), color=color, alpha=0.12)
        ax.axhline(steps, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _label_panel(
            ax, f"m={m}, c={c} (w_heavy/w_light = {WEIGHTS[m][0] / WEIGHTS[m][1]:g})", "sigma (light objectives' scale)", "steps to eps"
        )
    _finish_grid(
        fig, axes, n, nrows, ncols, f"Steps to {EPS} of the weighted optimum (dotted: the budget; unreached runs count as it)", path, 5
    )


class ClipBand:
    """One batch per (c, m): every sigma, seed and start; the methods built with that c."""

    name = "clipband"
    peers = False

    def batches(self, cfg: Config) -> Iterator[Batch]:
        steps = 300 if cfg.quick else 2000
        sigmas = SIGMAS_QUICK if cfg.quick else SIGMAS
        names = [m.name for m in cfg.methods if m.name in METHODS] or list(METHODS)
        for c in RADII:
            methods = get_methods(names, c)
            for m, targets in TARGETS.items():
                runs = [(sigma, seed, k) for sigma in sigmas for seed in cfg.seeds for k in range(STARTS)]
                x0 = torch.stack(
                    [
                        4.0 * torch.rand(2, generator=torch.Generator().manual_seed(100 * seed + k), dtype=torch.float64) - 2.0
                        for _, seed, k in runs
                    ]
                )
                scales = torch.tensor([[1.0] + [sigma] * (m - 1) for sigma, _, _ in runs], dtype=torch.float64)
                W = torch.tensor([WEIGHTS[m]] * len(runs), dtype=torch.float64)
                xstar = weighted_optimum(scales, W, targets)
                best = (W * losses(xstar, scales, targets)).sum(-1)  # (R,)
                gap0 = (W * losses(x0, scales, targets)).sum(-1) - best

                def metrics(x: Tensor, scales=scales, targets=targets, W=W, best=best, gap0=gap0) -> dict[str, Tensor]:
                    L = losses(x, scales, targets)
                    return {"gap": ((W * L).sum(-1) - best) / gap0, "worst": L.amax(-1)}

                def hit(x: Tensor, scales=scales, targets=targets, W=W, best=best, gap0=gap0) -> Tensor:
                    return ((W * losses(x, scales, targets)).sum(-1) - best) <= EPS * gap0

                yield Batch(
                    lambda x, scales=scales, targets=targets: losses(x, scales, targets),
                    x0,
                    W,
                    steps,
                    optimizer="sgd",
                    lr=0.5 / max(sigmas),
                    log_points=50,
                    desc=f"clipband m={m} c={c}",
                    metric_fn=metrics,
                    hit_fn=hit,
                    methods=methods,
                    context=dict(m=m, c=c, runs=runs, sigmas=sigmas),
                )

    def report(self, cfg: Config, runs: list[tuple[Batch, RunResult]]) -> Section:
        steps = runs[0][0].steps
        md = [
            f"L_i(x) = s_i/2 ||x - u_i||^2 on R^2, heavy objective s = 1, light ones s = sigma; w = {WEIGHTS[2]} (m = 2) and "
            f"{WEIGHTS[3]} (m = 3); sigma in {list(SIGMAS_QUICK if cfg.quick else SIGMAS)}; SGD, lr 0.5 / max(sigma), {steps} steps; "
            f"{STARTS} starts uniform in [-2, 2]^2 per seed (seeds {cfg.seeds}); c in {list(RADII)}. 'steps to eps' = first step "
            f"with L_w - L_w* <= {EPS} (L_w(x0) - L_w*), median and quartiles over the runs that reached it (reached / runs); 'gap' = "
            "(L_w - L_w*) / (L_w(x0) - L_w*) at a tenth of the budget and at the end (median); 'worst' = max_i L_i at the end "
            "(median).\n\n"
        ]
        header = ["m", "c", "sigma", "method", "steps to eps", "25-75 %", "reached", "gap at T/10", "gap at T", "worst at T"]
        table = []
        curves: dict[tuple[int, float], dict[str, list[np.ndarray]]] = {}
        for batch, res in runs:
            m, c, run_keys, sigmas = (batch.context[k] for k in ("m", "c", "runs", "sigmas"))
            assert res.first_hit is not None
            lg = res.logs
            tenth = min(range(len(res.log_steps)), key=lambda i: abs(res.log_steps[i] - steps / 10))
            methods = batch.methods or cfg.methods
            for sigma in sigmas:
                sel = [i for i, r in enumerate(run_keys) if r[0] == sigma]
                for k, meth in enumerate(methods):
                    hits = res.first_hit[k, sel]
                    reached = hits[hits >= 0].double().numpy()
                    median = float(np.median(reached)) if len(reached) else -1.0  # numpy's: the mean of the middle two
                    spread = f"{np.percentile(reached, 25):.0f}-{np.percentile(reached, 75):.0f}" if len(reached) else "-"
                    table.append(
                        [
                            m,
                            c,
                            sigma,
                            meth.label,
                            f"{median:.0f}",
                            spread,
                            f"{len(reached)}/{len(sel)}",
                            float(np.median(lg["gap"][tenth, k, sel].numpy())),
                            float(np.median(lg["gap"][-1, k, sel].numpy())),
                            float(np.median(lg["worst"][-1, k, sel].numpy())),
                        ]
                    )
                    censored = torch.where(hits >= 0, hits, torch.full_like(hits, steps)).double().numpy()  # never: the budget
                    curves.setdefault((m, c), {}).setdefault(meth.label, []).append(censored)
        md.append(md_table(header, table))
        _figure(cfg.out / "clipband_steps.png", curves, list(SIGMAS_QUICK if cfg.quick else SIGMAS), steps)
        raco = [r for r in table if r[3].startswith("RACO")]
        cagrad = [r for r in table if r[3].startswith("CAGrad (")]
        steps_of = [(float(a[4]), float(b[4])) for a, b in zip(raco, cagrad)]
        faster = sum(a >= 0 and (b < 0 or a < b) for a, b in steps_of)
        slower = sum(b >= 0 and (a < 0 or a > b) for a, b in steps_of)
        summary = (
            f"clipband — RACO reached eps of the weighted optimum sooner than CAGrad (weighted anchor) in {faster} of {len(raco)} "
            f"(m, c, sigma) cells, later in {slower}, the same in {len(raco) - faster - slower}"
        )
        return Section("5. Where the clip matters (skewed weights, swept gradient scales)", "".join(md), ["clipband_steps.png"], summary)


PROBLEM = ClipBand()
