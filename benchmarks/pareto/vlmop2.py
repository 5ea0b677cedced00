"""Problem 3: VLMOP2, ``f_{1,2}(x) = 1 - exp(-||x -+ 1/sqrt(n)||^2)`` with n = 10.

The Pareto set is the segment ``x = t / sqrt(n) * 1``, ``t in [-1, 1]``, with front
``(1 - exp(-(t - 1)^2), 1 - exp(-(t + 1)^2))``; distances to both are exact (the front one up
to a 20001-point grid in ``t``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .common import Config, Section, md_table
from .engine import RunResult
from .hypervolume import hypervolume_2d
from .problem import Batch

N = 10
LR = 0.01
#: Pareto-set parameters whose front points measure the distance to the front
T_GRID = torch.linspace(-1, 1, 20001, dtype=torch.float64)


def vlmop2(x: Tensor) -> Tensor:
    """``(..., n)`` -> ``(..., 2)`` objectives."""
    a = 1.0 / x.shape[-1] ** 0.5
    return torch.stack([1 - torch.exp(-((x - a) ** 2).sum(-1)), 1 - torch.exp(-((x + a) ** 2).sum(-1))], -1)


def front(t: Tensor) -> Tensor:
    """Front points for Pareto-set parameters ``t in [-1, 1]``."""
    return torch.stack([1 - torch.exp(-((t - 1) ** 2)), 1 - torch.exp(-((t + 1) ** 2))], -1)


def dist_pareto_set(x: Tensor) -> Tensor:
    """Exact distance from ``x (..., n)`` to the segment ``{t/sqrt(n) 1 : |t| <= 1}``."""
    n = x.shape[-1]
    t = (x.sum(-1) / n**0.5).clamp(-1, 1)
    return (x - t.unsqueeze(-1) / n**0.5).norm(dim=-1)


def weighted_optimum_t(w1: float) -> float:
    """``t`` minimising ``w1 f1 + w2 f2`` on the Pareto set (a fine grid; L_w's minimiser lies there)."""
    t = torch.linspace(-1, 1, 200001, dtype=torch.float64)
    f = front(t)
    return float(t[(w1 * f[:, 0] + (1 - w1) * f[:, 1]).argmin()])


class Vlmop2:
    """A sweep of user weights from one random start per seed, as one batch."""

    name = "vlmop2"
    peers = True

    def batches(self, cfg: Config) -> Iterator[Batch]:
        steps = 300 if cfg.quick else 600
        w1s = [0.1, 0.3, 0.5, 0.7, 0.9] if cfg.quick else [round(float(v), 2) for v in np.linspace(0.05, 0.95, 11)]
        runs = [(s, w1) for s in cfg.seeds for w1 in w1s]
        x0 = torch.stack(
            [2.0 * torch.rand(N, generator=torch.Generator().manual_seed(1000 + s), dtype=torch.float64) - 1.0 for s, _ in runs]
        )
        W = torch.tensor([[w1, 1 - w1] for _, w1 in runs], dtype=torch.float64)
        F = front(T_GRID)
        tstar = torch.tensor([weighted_optimum_t(w1) for _, w1 in runs], dtype=torch.float64)
        xstar = tstar.unsqueeze(-1) / N**0.5 * torch.ones(N, dtype=torch.float64)

        def metrics(x: Tensor) -> dict[str, Tensor]:
            f = vlmop2(x)
            dfront = torch.cdist(f.reshape(-1, 2), F).amin(-1).reshape(f.shape[:-1])
            return {"front": dfront, "set": dist_pareto_set(x), "dist_w": (x - xstar).norm(dim=-1)}

        yield Batch(
            vlmop2,
            x0,
            W,
            steps,
            optimizer="adam",
            lr=LR,
            log_points=50,
            desc="vlmop2",
            metric_fn=metrics,
            context=dict(w1s=w1s, runs=runs, F=F, tstar=tstar),
        )

    def report(self, cfg: Config, runs_results: list[tuple[Batch, RunResult]]) -> Section:
        ((batch, res),) = runs_results
        w1s, runs, F, tstar = (batch.context[k] for k in ("w1s", "runs", "F", "tstar"))
        steps, n = batch.steps, N
        lg = res.logs
        fin = vlmop2(res.final)  # (M, R, 2)
        rows = []
        pts = {}
        hv_front = hypervolume_2d(F.numpy(), [1.0, 1.0])
        hv_by = {}
        for k, meth in enumerate(cfg.methods):
            hvs, spreads = [], []
            for s in cfg.seeds:
                sel = [i for i, r in enumerate(runs) if r[0] == s]
                hvs.append(hypervolume_2d(fin[k, sel].numpy(), [1.0, 1.0]))
                tt = res.final[k, sel].sum(-1) / n**0.5
                spreads.append(float(tt.clamp(-1, 1).max() - tt.clamp(-1, 1).min()) / 2)
            hv_by[meth.label] = float(np.mean(hvs))
            rows.append(
                [
                    meth.label,
                    float(np.median(lg["front"][-1, k].numpy())),
                    float(lg["front"][-1, k].max()),
                    float(np.median(lg["set"][-1, k].numpy())),
                    float(np.median(lg["dist_w"][-1, k].numpy())),
                    float(lg["dist_w"][-1, k].max()),
                    float(np.mean(spreads)),
                    float(np.mean(hvs)),
                    hv_front,
                ]
            )
            pts[meth.label] = fin[k].numpy()
        targets = front(tstar[: len(w1s)]).numpy()
        md = (
            f"n = {N}, Adam lr {LR}, {steps} steps, c = {cfg.c}; w1 in {w1s}; starts uniform in [-1, 1]^n per seed "
            f"(seeds {cfg.seeds}; every w of a seed starts from the same point). Spread = half the range of the final "
            f"points' Pareto parameter t (1 = the whole front); hypervolume w.r.t. (1, 1) of the final points of one "
            f"sweep (mean over seeds; the whole front has {hv_front:.4f}).\n\n"
        )
        md += md_table(
            [
                "method",
                "dist to front (median)",
                "dist to front (max)",
                "dist to Pareto set (median)",
                "dist x*(w) (median)",
                "dist x*(w) (max)",
                "spread",
                "hypervolume",
                "HV of front",
            ],
            rows,
        )
        from . import report

        report.fronts_figure(
            cfg.out / "vlmop2_front.png",
            [(lab, F.numpy(), {lab: p}, targets) for lab, p in pts.items()],
            "f1",
            "f2",
            "VLMOP2: final points of the w sweep (+: w-optimum)",
            ncols=3,
        )
        best = max(hv_by, key=hv_by.get)
        summary = f"vlmop2 — best hypervolume {best} ({hv_by[best]:.4f}); " + ", ".join(f"{k} {v:.4f}" for k, v in hv_by.items())
        return Section("3. VLMOP2", md, ["vlmop2_front.png"], summary, data={"result": res})


PROBLEM = Vlmop2()
