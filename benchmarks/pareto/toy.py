"""Problem 1: the CAGrad toy (two objectives on R^2) and its 0.1-scaled variant.

Losses as in the CAGrad paper's toy example (Liu et al., arXiv 2110.14048; LOWER = 5e-6). Below the ridge
(theta2 < 0) both losses are ``tanh(-theta2/2) q_i``, so the minimiser of ``L_w`` has
``theta1* = 7 (w1 - w2)`` exactly and ``theta2*`` solves a 1-D problem (computed numerically).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from .common import Config, Section, md_table
from .engine import RunResult
from .problem import Batch

LOWER = 5e-6
STARTS = [(-8.5, 7.5), (-8.5, 5.0), (0.0, 0.0), (9.0, 9.0), (10.0, -8.0)]
STARTS_SCALED = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
W1_VALUES = (0.2, 0.5, 0.8)
TARGET = 0.1
TOY_STEPS = 100_000  # the CAGrad paper's step count
VARIANTS = [("standard", 1.0, STARTS), ("scaled 0.1 (Nash-MTL/FAMO)", 0.1, STARTS_SCALED)]


def toy_losses(x: Tensor, scale1: Tensor | float = 1.0) -> Tensor:
    """``(..., 2)`` parameters to ``(..., 2)`` losses ``(scale1 * L1, L2)``."""
    t1, t2 = x[..., 0], x[..., 1]
    f1 = torch.log(torch.clamp((0.5 * (-t1 - 7) - torch.tanh(-t2)).abs(), min=LOWER)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-t1 + 3) + torch.tanh(-t2) + 2).abs(), min=LOWER)) + 6
    q1 = ((-t1 + 7) ** 2 + 0.1 * (-t2 - 8) ** 2) / 10 - 20
    q2 = ((-t1 - 7) ** 2 + 0.1 * (-t2 - 8) ** 2) / 10 - 20
    k1 = torch.clamp(torch.tanh(t2 / 2), min=0)
    k2 = torch.clamp(torch.tanh(-t2 / 2), min=0)
    return torch.stack([scale1 * (k1 * f1 + k2 * q1), k1 * f2 + k2 * q2], -1)


def weighted_optimum(w1: float, scale1: float = 1.0) -> np.ndarray:
    """Minimiser of ``w1 scale1 L1 + w2 L2``: ``theta1* = 7 (v1 - v2)`` with ``v`` the
    normalised effective weights, ``theta2*`` by a bounded 1-D search."""
    v1, v2 = w1 * scale1, 1.0 - w1
    v1, v2 = v1 / (v1 + v2), v2 / (v1 + v2)
    t1 = 7.0 * (v1 - v2)
    quad = (v1 * (t1 - 7) ** 2 + v2 * (t1 + 7) ** 2) / 10

    def f(t2: float) -> float:
        return float(np.tanh(-t2 / 2) * (quad + 0.01 * (t2 + 8) ** 2 - 20))

    res = minimize_scalar(f, bounds=(-30.0, -1e-6), method="bounded", options={"xatol": 1e-10})
    return np.array([t1, res.x])


def pareto_set(n: int = 2001) -> np.ndarray:
    """Points ``x*(lambda)`` for ``lambda1`` on a uniform grid of ``[0, 1]``: the Pareto set."""
    return np.stack([weighted_optimum(l1) for l1 in np.linspace(0.0, 1.0, n)])


def _contour(ax, w1: float, scale1: float) -> None:
    g = np.linspace(-10, 10, 160)
    T1, T2 = np.meshgrid(g, g)
    X = torch.tensor(np.stack([T1, T2], -1), dtype=torch.float64)
    L = toy_losses(X, scale1)
    Lw = (w1 * L[..., 0] + (1 - w1) * L[..., 1]).numpy()
    ax.contourf(T1, T2, Lw, levels=25, cmap="Greys", alpha=0.6)


def _figure(
    path: Path,
    traj: Tensor,
    rows: list,
    variant: int,
    methods: Sequence,
    w1_values: Sequence[float],
    scale1: float,
    opt_pts: Tensor,
    pset: np.ndarray,
    title: str,
) -> None:
    """Rows: user weights; columns: methods; each panel: contours of L_w and every start's path."""
    from .report import COLORS, plt, save

    nr, nc = len(w1_values), len(methods)
    fig, axes = plt.subplots(nr, nc, figsize=(2.0 * nc, 2.0 * nr), sharex=True, sharey=True, squeeze=False)
    for a, w1 in enumerate(w1_values):
        sel = [i for i, r in enumerate(rows) if r[0] == variant and r[2] == w1]
        for k, meth in enumerate(methods):
            ax = axes[a, k]
            _contour(ax, w1, scale1)
            ax.plot(pset[:, 0], pset[:, 1], color="tab:green", lw=2)
            for j, i in enumerate(sel):
                path_ = traj[:, k, i].numpy()
                ax.plot(path_[:, 0], path_[:, 1], color=COLORS[j % len(COLORS)], lw=1)
                ax.plot(path_[0, 0], path_[0, 1], "o", color=COLORS[j % len(COLORS)], ms=3)
                ax.plot(path_[-1, 0], path_[-1, 1], "x", color="k", ms=4)
            o = opt_pts[sel[0]].numpy()
            ax.plot(o[0], o[1], "*", color="red", ms=8)
            ax.set_xlim(-10, 10)
            ax.set_ylim(-10, 10)
            ax.tick_params(labelsize=6)
            if a == 0:
                ax.set_title(meth.label, fontsize=7)
            if k == 0:
                ax.set_ylabel(f"w1 = {w1}", fontsize=8)
    fig.suptitle(title + " (green: Pareto set, red star: x*(w), x: end)", fontsize=9)
    save(fig, path)


class Toy:
    """Every method from every start and weight, both variants, as one batch."""

    name = "toy"
    peers = False

    def batches(self, cfg: Config) -> Iterator[Batch]:
        steps = 1000 if cfg.quick else TOY_STEPS
        rows = []  # (variant index, scale, w1, start)
        for vi, (_, scale, starts) in enumerate(VARIANTS):
            for w1 in W1_VALUES:
                for s in starts:
                    rows.append((vi, scale, w1, s))
        x0 = torch.tensor([r[3] for r in rows], dtype=torch.float64)
        W = torch.tensor([[r[2], 1 - r[2]] for r in rows], dtype=torch.float64)
        scale = torch.tensor([r[1] for r in rows], dtype=torch.float64)
        opt_pts = torch.tensor(np.stack([weighted_optimum(r[2], r[1]) for r in rows]), dtype=torch.float64)

        def loss_fn(x: Tensor) -> Tensor:
            return toy_losses(x, scale.expand(x.shape[:-1]))

        def dist_opt(x: Tensor) -> Tensor:
            return (x - opt_pts).norm(dim=-1)

        yield Batch(
            loss_fn,
            x0,
            W,
            steps,
            optimizer="adam",
            lr=1e-3,
            log_points=400,
            desc="toy",
            hit_fn=lambda x: dist_opt(x) < TARGET,
            record_trajectory=True,
            context=dict(rows=rows, scale=scale, opt_pts=opt_pts, dist_opt=dist_opt),
        )

    def report(self, cfg: Config, runs: list[tuple[Batch, RunResult]]) -> Section:
        ((batch, res),) = runs
        rows, scale, opt_pts, dist_opt = (batch.context[k] for k in ("rows", "scale", "opt_pts", "dist_opt"))
        W, steps, R, variants = batch.weights, batch.steps, len(rows), VARIANTS
        assert res.first_hit is not None
        pset = torch.tensor(pareto_set(), dtype=torch.float64)
        final = res.final  # (M, R, 2)
        d_opt = dist_opt(final)
        d_par = torch.cdist(final.reshape(-1, 2), pset).amin(-1).reshape(final.shape[:2])
        Lf = toy_losses(final, scale.expand(final.shape[:-1]))
        Lw = (W * Lf).sum(-1)
        Lopt = (W * toy_losses(opt_pts, scale)).sum(-1)
        stalled = d_par > TARGET

        md = [
            f"Adam, lr 1e-3, {steps} steps, c = {cfg.c}; user weights w1 in {list(W1_VALUES)}; "
            f"{len(STARTS)} starts per variant; one batch of {R} runs x {len(cfg.methods)} methods "
            f"({res.seconds:.0f} s). 'stalled' = ended farther than {TARGET} from the Pareto set; "
            f"'steps to 0.1' = first step within {TARGET} of x*(w) (-1: never).\n",
            "Weighted optima x*(w) computed by the code (theta1* = 7(v1 - v2), v = normalised effective weights):\n",
        ]
        opt_rows = []
        for vname, sc, _ in variants:
            for w1 in W1_VALUES:
                o = weighted_optimum(w1, sc)
                opt_rows.append([vname, w1, f"({o[0]:.4f}, {o[1]:.4f})"])
        md.append(md_table(["variant", "w1", "x*(w)"], opt_rows))
        summary_rows = []
        for vi, (vname, _, _starts) in enumerate(variants):
            sel = [i for i, r in enumerate(rows) if r[0] == vi]
            for k, meth in enumerate(cfg.methods):
                reached = int(sum(res.first_hit[k, i] >= 0 for i in sel))
                hits = [int(res.first_hit[k, i]) for i in sel if res.first_hit[k, i] >= 0]
                summary_rows.append(
                    [
                        vname,
                        meth.label,
                        f"{reached}/{len(sel)}",
                        int(sum(bool(stalled[k, i]) for i in sel)),
                        float(np.median([float(d_opt[k, i]) for i in sel])),
                        float(np.median([float(d_par[k, i]) for i in sel])),
                        int(np.median(hits)) if hits else -1,
                    ]
                )
        md.append("\nSummary over starts and weights (counts out of starts x weights):\n")
        md.append(
            md_table(
                [
                    "variant",
                    "method",
                    "within 0.1 of x*(w)",
                    "stalled",
                    "median dist x*(w)",
                    "median dist Pareto set",
                    "median steps to 0.1 (reached runs)",
                ],
                summary_rows,
            )
        )
        for vi, (vname, _, _) in enumerate(variants):
            detail = []
            for k, meth in enumerate(cfg.methods):
                for i, r in enumerate(rows):
                    if r[0] != vi:
                        continue
                    f = final[k, i]
                    detail.append(
                        [
                            meth.label,
                            r[2],
                            f"({r[3][0]:g}, {r[3][1]:g})",
                            f"({float(f[0]):.3f}, {float(f[1]):.3f})",
                            float(d_opt[k, i]),
                            float(d_par[k, i]),
                            float(Lw[k, i]),
                            float(Lopt[i]),
                            int(res.first_hit[k, i]),
                            "yes" if bool(stalled[k, i]) else "no",
                        ]
                    )
            md.append(f"\n<details><summary>Per method and start: {vname}</summary>\n\n")
            md.append(
                md_table(
                    ["method", "w1", "start", "final", "dist x*(w)", "dist Pareto", "L_w", "L_w(x*)", "steps to 0.1", "stalled"], detail
                )
            )
            md.append("\n</details>\n")

        figs = []
        assert res.trajectory is not None
        for vi, (vname, sc, _) in enumerate(variants):
            name = f"toy_{'standard' if vi == 0 else 'scaled'}.png"
            _figure(
                cfg.out / name,
                res.trajectory,
                rows,
                vi,
                cfg.methods,
                W1_VALUES,
                sc,
                opt_pts,
                pset.numpy(),
                f"CAGrad toy, {vname}: trajectories over contours of L_w",
            )
            figs.append(name)

        best = []
        for vi, (vname, _, _) in enumerate(variants):
            sel = [i for i, r in enumerate(rows) if r[0] == vi]
            counts = {m.label: int(sum(res.first_hit[k, i] >= 0 for i in sel)) for k, m in enumerate(cfg.methods)}
            top = max(counts.values())
            best.append(f"{vname}: most runs within 0.1 of x*(w): {', '.join(k for k, v in counts.items() if v == top)} ({top}/{len(sel)})")
        return Section(
            title="1. CAGrad toy",
            markdown="".join(md),
            figures=figs,
            summary="toy — " + "; ".join(best),
            data={"result": res, "rows": rows, "d_opt": d_opt, "d_par": d_par, "stalled": stalled},
        )


PROBLEM = Toy()
