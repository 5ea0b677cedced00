"""Problem 4: synthetic preference alignment (RACO's setting in miniature).

K contexts x Y responses with features ``phi (K, Y, d)``; a linear softmax policy
``pi_theta(y|x) = softmax_y(theta^T phi(x, y))``; the frozen reference is ``theta = 0``
(uniform). m ground-truth rewards ``r_i = Phi_c v_i`` (centred per context) have exactly the
pairwise cosine ``rho``. One set of preference pairs is shared by all objectives (one forward
pass); each objective labels it by Bradley-Terry on its own reward, and has its own DPO loss
``L_i = mean_b softplus(-beta s_{i,b} Delta_b)``. The expected true reward
``J_i = mean_x sum_y pi(y|x) r_i(x, y)`` is exact. Since ``Delta`` is linear in theta, every
``L_w`` is convex: its minimiser ``theta*(w)`` (L-BFGS) gives the w-optimal trade-off ``J(theta*(w))``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .common import Config, Section, md_table
from .engine import RunResult
from .hypervolume import hypervolume
from .problem import Batch

K, Y, D = 16, 8, 8
N_PAIRS = 1024
BETA = 0.1
LR = 0.05
RHOS = {2: (-0.9, -0.5, 0.0, 0.5), 3: (-0.45, 0.0, 0.5)}


def make_task(m: int, rho: float, seed: int) -> dict[str, Tensor]:
    """Features, rewards (exact pairwise cosine ``rho``) and BT-labelled pairs for one seed."""
    g = torch.Generator().manual_seed(97 * seed + 13 * m + int(100 * (rho + 1)))
    phi = torch.randn(K, Y, D, generator=g, dtype=torch.float64)
    phic = (phi - phi.mean(1, keepdim=True)).reshape(K * Y, D)
    sig = phic.T @ phic
    evals, evecs = torch.linalg.eigh(sig)
    sig_mhalf = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    corr = (1 - rho) * torch.eye(m, dtype=torch.float64) + rho * torch.ones(m, m, dtype=torch.float64)
    chol = torch.linalg.cholesky(corr)
    q, _ = torch.linalg.qr(torch.randn(D, m, generator=g, dtype=torch.float64))
    u = q @ chol.T  # columns u_i with u_i . u_j = corr_ij
    v = sig_mhalf @ u  # (D, m)
    r = (phic @ v).T.reshape(m, K, Y) * (K * Y) ** 0.5  # unit RMS, exact pairwise cosine rho
    ctx = torch.randint(0, K, (N_PAIRS,), generator=g)
    y1 = torch.randint(0, Y, (N_PAIRS,), generator=g)
    y2 = (y1 + torch.randint(1, Y, (N_PAIRS,), generator=g)) % Y
    diff = r[:, ctx, y1] - r[:, ctx, y2]  # (m, N)
    signs = torch.where(torch.rand(m, N_PAIRS, generator=g, dtype=torch.float64) < torch.sigmoid(diff), 1.0, -1.0)
    return {"phi": phi, "r": r, "i1": ctx * Y + y1, "i2": ctx * Y + y2, "signs": signs}


def policy_logp(phi: Tensor, theta: Tensor) -> Tensor:
    """``phi (R, K, Y, d)``, ``theta (..., R, d)`` -> log-probabilities ``(..., R, K, Y)``."""
    return torch.log_softmax(torch.einsum("rkyd,...rd->...rky", phi, theta), -1)


def dpo_losses(task: dict[str, Tensor], theta: Tensor) -> Tensor:
    """Per-objective DPO losses ``(..., R, m)``; the reference is uniform so its log-ratio cancels."""
    lp = policy_logp(task["phi"], theta).flatten(-2)
    i1 = task["i1"].expand(*lp.shape[:-1], -1)
    i2 = task["i2"].expand(*lp.shape[:-1], -1)
    delta = lp.gather(-1, i1) - lp.gather(-1, i2)  # (..., R, N)
    return torch.nn.functional.softplus(-BETA * task["signs"] * delta.unsqueeze(-2)).mean(-1)


def expected_reward(task: dict[str, Tensor], theta: Tensor) -> Tensor:
    """Exact ``J (..., R, m)``."""
    p = policy_logp(task["phi"], theta).exp()
    return torch.einsum("...rky,rmky->...rm", p, task["r"]) / K


def weighted_optimum(task: dict[str, Tensor], W: Tensor) -> Tensor:
    """``theta*(w)`` per run by L-BFGS on the (separable, convex) sum of ``L_w``."""
    theta = torch.zeros(W.shape[0], D, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (W * dpo_losses(task, theta)).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return theta.detach()


def weight_sweep(m: int, quick: bool) -> list[list[float]]:
    if m == 2:
        vals = [0.2, 0.5, 0.8] if quick else [0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]
        return [[v, 1 - v] for v in vals]
    base = [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]
    return base if quick else base + [[1 / 3] * 3, [0.4, 0.4, 0.2], [0.4, 0.2, 0.4], [0.2, 0.4, 0.4]]


class Preference:
    """One batch per (m, rho): every seed's task under the whole weight sweep, from theta = 0."""

    name = "preference"
    peers = False

    def batches(self, cfg: Config) -> Iterator[Batch]:
        steps = 150 if cfg.quick else 300
        for m, rhos in RHOS.items():
            sweep = weight_sweep(m, cfg.quick)
            for rho in rhos:
                tasks = {s: make_task(m, rho, s) for s in cfg.seeds}
                runs = [(s, w) for s in cfg.seeds for w in range(len(sweep))]
                task = {k: torch.stack([tasks[s][k] for s, _ in runs]) for k in tasks[cfg.seeds[0]]}
                W = torch.tensor([sweep[w] for _, w in runs], dtype=torch.float64)
                x0 = torch.zeros(len(runs), D, dtype=torch.float64)
                yield Batch(
                    lambda th, task=task: dpo_losses(task, th),
                    x0,
                    W,
                    steps,
                    optimizer="adam",
                    lr=LR,
                    log_points=20,
                    desc=f"preference m={m} rho={rho}",
                    context=dict(m=m, rho=rho, runs=runs, task=task),
                )

    def report(self, cfg: Config, batches: list[tuple[Batch, RunResult]]) -> Section:
        steps = batches[0][0].steps
        md = [
            f"K = {K} contexts x Y = {Y} responses, d = {D} features, linear softmax policy, reference = uniform "
            f"(theta = 0, also the start), {N_PAIRS} shared preference pairs per task labelled per objective by "
            f"Bradley-Terry, DPO beta = {BETA}; Adam lr {LR}, {steps} full-batch steps, c = {cfg.c}; seeds {cfg.seeds}. "
            f"J = exact expected true reward (unit-RMS rewards). Hypervolume (maximisation) of the final J of one weight "
            f"sweep, reference point = the worst achievable J (mean over contexts of min_y r_i), mean over seeds; "
            f"'gap' = ||J(theta_T) - J(theta*(w))|| with theta*(w) the exact minimiser of L_w (mean over runs).\n\n"
        ]
        header = ["m", "rho", "method", "hypervolume", "HV of theta*(w) sweep", "gap to w-optimal J", "mean J (sum)"]
        table, panels = [], []
        hv_wins: dict[str, int] = {}
        gap_all: dict[str, list[float]] = {}
        for batch, res in batches:
            m, rho, runs, task = (batch.context[k] for k in ("m", "rho", "runs", "task"))
            W = batch.weights
            J = expected_reward(task, res.final)  # (M, R, m)
            theta_star = weighted_optimum(task, W)
            Jstar = expected_reward(task, theta_star)  # (R, m)
            ref = -task["r"].amin(-1).mean(-1)  # (R, m): minimisation reference for -J
            hv_star = np.mean(
                [
                    hypervolume(
                        -Jstar[[i for i, r in enumerate(runs) if r[0] == s]].numpy(),
                        ref[[i for i, r in enumerate(runs) if r[0] == s][0]].numpy(),
                    )
                    for s in cfg.seeds
                ]
            )
            hvs = {}
            for k, meth in enumerate(cfg.methods):
                hv = np.mean(
                    [
                        hypervolume(
                            -J[k, [i for i, r in enumerate(runs) if r[0] == s]].numpy(),
                            ref[[i for i, r in enumerate(runs) if r[0] == s][0]].numpy(),
                        )
                        for s in cfg.seeds
                    ]
                )
                gap = float((J[k] - Jstar).norm(dim=-1).mean())
                gap_all.setdefault(meth.label, []).append(gap)
                hvs[meth.label] = hv
                table.append([m, rho, meth.label, float(hv), float(hv_star), gap, float(J[k].sum(-1).mean())])
            top = max(hvs, key=hvs.get)
            hv_wins[top] = hv_wins.get(top, 0) + 1
            if m == 2:
                s0 = [i for i, r in enumerate(runs) if r[0] == cfg.seeds[0]]
                panels.append(
                    (f"m=2, rho={rho}", None, {meth.label: J[k, s0].numpy() for k, meth in enumerate(cfg.methods)}, Jstar[s0].numpy())
                )
        md.append(md_table(header, table))
        from . import report

        report.fronts_figure(
            cfg.out / "preference_fronts.png",
            panels,
            "J_1 (true reward)",
            "J_2 (true reward)",
            f"Synthetic DPO, m = 2: final true rewards over the w sweep (seed {cfg.seeds[0]}; +: J(theta*(w)))",
        )
        gaps = {k: float(np.mean(v)) for k, v in gap_all.items()}
        best_gap = min(gaps, key=gaps.get)
        summary = (
            "preference — highest hypervolume per (m, rho): "
            + ", ".join(f"{k} {v}x" for k, v in hv_wins.items())
            + f"; smallest mean gap to the w-optimal trade-off: {best_gap} ({gaps[best_gap]:.3g}); "
            + ", ".join(f"{k} {v:.3g}" for k, v in gaps.items())
        )
        return Section(
            "4. Synthetic preference alignment (DPO)",
            "".join(md),
            ["preference_fronts.png"],
            summary,
            data={"table": table},
        )


PROBLEM = Preference()
