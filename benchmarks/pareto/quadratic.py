"""Problem 2: convex quadratics ``L_i(x) = (x - u_i)^T A_i (x - u_i)`` with an exact Pareto set.

The Pareto set is ``{x*(lam) : (sum lam_i A_i) x = sum lam_i A_i u_i, lam in simplex}`` and
``x*(w)`` is the user-weighted optimum. Distance to ``x*(w)`` and the Pareto-stationarity
measure ``min_{p in simplex} ||sum p_i g_i||`` are exact; the distance to the Pareto set is the
minimum over a dense set of ``x*(lam)`` (an upper bound, tight up to the sampling).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from . import engine
from .common import Config, Section, md_table
from .engine import RunResult
from .methods import min_norm_coefficients
from .problem import Batch

DIM = 10
M_VALUES = (2, 3, 5)
CONDITIONS = {"well": 2.0, "ill": 100.0}
LR = 0.2


def make_instance(m: int, kappa: float, seed: int, dim: int = DIM) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``A (m, n, n)`` with eigenvalues log-uniform in ``[1/kappa, 1]``, ``u (m, n)`` and
    a start ``x0 (n,)``, all from ``seed``."""
    g = torch.Generator().manual_seed(10_000 * m + int(kappa) + 7919 * seed)
    q, _ = torch.linalg.qr(torch.randn(m, dim, dim, generator=g, dtype=torch.float64))
    eig = kappa ** (-torch.rand(m, dim, generator=g, dtype=torch.float64))
    eig[:, 0], eig[:, 1] = 1.0, 1.0 / kappa
    A = q @ torch.diag_embed(eig) @ q.mT
    u = torch.randn(m, dim, generator=g, dtype=torch.float64)
    x0 = 3.0 * torch.randn(dim, generator=g, dtype=torch.float64)
    return A, u, x0


def weighted_optimum(A: Tensor, u: Tensor, lam: Tensor) -> Tensor:
    """``x*(lam)`` for ``A (..., m, n, n)``, ``u (..., m, n)``, ``lam (..., m)``."""
    Al = (lam[..., None, None] * A).sum(-3)
    rhs = (lam[..., None] * (A @ u.unsqueeze(-1)).squeeze(-1)).sum(-2)
    return torch.linalg.solve(Al, rhs)


def weight_set(m: int, quick: bool) -> Tensor:
    """User weights: uniform, one skewed towards objective 1, and (full run) seeded Dirichlet draws."""
    ws = [torch.full((m,), 1.0 / m), torch.tensor([0.6] + [0.4 / (m - 1)] * (m - 1))]
    if not quick:
        g = torch.Generator().manual_seed(123 + m)
        d = torch.distributions.Dirichlet(torch.ones(m))
        torch.manual_seed(123 + m)
        ws += [d.sample() for _ in range(2)]
        del g
    W = torch.stack(ws).to(torch.float64)
    return W / W.sum(-1, keepdim=True)


def lambda_grid(m: int, n: int = 3000, seed: int = 0) -> Tensor:
    """Dense simplex points: vertices, a uniform grid for m = 2, plus Dirichlet(1) and Dirichlet(0.3) draws."""
    if m == 2:
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        return torch.stack([t, 1 - t], -1)
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(n, m, generator=g, dtype=torch.float64))
    e2 = torch.rand(n, m, generator=g, dtype=torch.float64) ** (1 / 0.3)  # sparse-ish points near faces
    pts = torch.cat([torch.eye(m, dtype=torch.float64), e / e.sum(-1, keepdim=True), e2 / e2.sum(-1, keepdim=True)])
    return pts


def losses(A: Tensor, u: Tensor, x: Tensor) -> Tensor:
    """``x (M, R, n)`` with per-run ``A (R, m, n, n)``, ``u (R, m, n)`` -> ``(M, R, m)``."""
    diff = x.unsqueeze(-2) - u
    return (diff * (A @ diff.unsqueeze(-1)).squeeze(-1)).sum(-1)


class Quadratics:
    """One batch per (m, condition): every seed's instance and start under every user weight."""

    name = "quadratic"
    peers = True

    def batches(self, cfg: Config) -> Iterator[Batch]:
        steps = 150 if cfg.quick else 400
        for m in M_VALUES:
            for cname, kappa in CONDITIONS.items():
                W1 = weight_set(m, cfg.quick)
                inst = [make_instance(m, kappa, s) for s in cfg.seeds]
                runs = [(si, wi) for si in range(len(cfg.seeds)) for wi in range(len(W1))]
                A = torch.stack([inst[si][0] for si, _ in runs])
                u = torch.stack([inst[si][1] for si, _ in runs])
                x0 = torch.stack([inst[si][2] for si, _ in runs])
                W = torch.stack([W1[wi] for _, wi in runs])
                xstar = weighted_optimum(A, u, W)
                # x*(w) of the runs' own weights are Pareto points too: add them to the candidates.
                lam = torch.cat([lambda_grid(m), W1])
                front = torch.stack(
                    [weighted_optimum(a.expand(len(lam), *a.shape), uu.expand(len(lam), *uu.shape), lam) for a, uu, _ in inst]
                )  # (S, K, n)
                front_r = front[[si for si, _ in runs]]  # (R, K, n)

                def metrics(x: Tensor, A=A, u=u, xstar=xstar, front_r=front_r) -> dict[str, Tensor]:
                    _, G = engine.per_objective_grads(lambda z: losses(A, u, z), x)
                    H = G @ G.mT
                    p = min_norm_coefficients(H)
                    stat = torch.einsum("...m,...mn->...n", p, G).norm(dim=-1)
                    pd = torch.cdist(x.transpose(0, 1), front_r).amin(-1).transpose(0, 1)
                    return {"dist_w": (x - xstar).norm(dim=-1), "pareto": pd, "stat": stat}

                yield Batch(
                    lambda z, A=A, u=u: losses(A, u, z),
                    x0,
                    W,
                    steps,
                    optimizer="sgd",
                    lr=LR,
                    log_points=50,
                    desc=f"quadratic m={m} {cname}",
                    metric_fn=metrics,
                    context=dict(m=m, cname=cname, kappa=kappa),
                )

    def report(self, cfg: Config, runs: list[tuple[Batch, RunResult]]) -> Section:
        steps = runs[0][0].steps
        md = [
            f"n = {DIM}, plain gradient descent with lr {LR} for every method (eigenvalues of each A_i in "
            f"[1/kappa, 1], so every L_w is 2-smooth), {steps} steps, c = {cfg.c}, seeds {cfg.seeds} "
            f"(one instance and start per seed). 'Pareto dist' is the distance to the nearest of "
            f"thousands of x*(lambda) (upper bound); 'stationarity' = min_p ||sum p_i g_i||.\n\n"
        ]
        header = [
            "m",
            "kappa",
            "method",
            "dist x*(w) start",
            "dist x*(w) end (median)",
            "dist x*(w) end (max)",
            "Pareto dist end (median)",
            "Pareto dist end (max)",
            "stationarity end (median)",
        ]
        table = []
        panels_w, panels_p = [], []
        data = {}
        for batch, res in runs:
            m, cname, kappa = (batch.context[k] for k in ("m", "cname", "kappa"))
            data[(m, cname)] = res
            lg = res.logs
            for k, meth in enumerate(cfg.methods):
                dw, pdist, st = lg["dist_w"][-1, k].numpy(), lg["pareto"][-1, k].numpy(), lg["stat"][-1, k].numpy()
                table.append(
                    [
                        m,
                        kappa,
                        meth.label,
                        float(np.median(lg["dist_w"][0, k].numpy())),
                        float(np.median(dw)),
                        float(dw.max()),
                        float(np.median(pdist)),
                        float(pdist.max()),
                        float(np.median(st)),
                    ]
                )
            panels_w.append(
                (f"m={m}, kappa={kappa:g}", res.log_steps, {meth.label: lg["dist_w"][:, k].numpy() for k, meth in enumerate(cfg.methods)})
            )
            panels_p.append(
                (
                    f"m={m}, kappa={kappa:g}",
                    res.log_steps,
                    {meth.label: lg["pareto"][:, k].numpy() + 1e-12 for k, meth in enumerate(cfg.methods)},
                )
            )
        md.append(md_table(header, table))
        from . import report

        report.curves_figure(
            cfg.out / "quadratic_dist_xw.png",
            panels_w,
            "||x - x*(w)||",
            "Convex quadratics: distance to the w-weighted optimum (median, 25-75 % band)",
        )
        report.curves_figure(
            cfg.out / "quadratic_dist_pareto.png",
            panels_p,
            "dist to Pareto set",
            "Convex quadratics: distance to the Pareto set (median, 25-75 % band)",
        )
        # headline: which method is closest to x*(w) at the end, over all configs
        labels = [m.label for m in cfg.methods]
        med = {lab: float(np.median([r[4] for r in table if r[2] == lab])) for lab in labels}
        best = min(med, key=med.get)
        summary = f"quadratics — median final ||x - x*(w)|| over all (m, kappa): best {best} ({med[best]:.2e}); " + ", ".join(
            f"{k} {v:.2e}" for k, v in med.items()
        )
        figures = ["quadratic_dist_xw.png", "quadratic_dist_pareto.png"]
        return Section("2. Convex quadratics", "".join(md), figures, summary, data=data)


PROBLEM = Quadratics()
