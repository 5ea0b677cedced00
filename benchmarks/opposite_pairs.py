"""Pareto-stationary pairs: two exactly opposite gradients at ``c >= 1`` must get the direction 0.

``python -m benchmarks.opposite_pairs`` prints one Markdown table. Each instance: ``g_1`` random in
``R^n`` (``n`` in 1..4, its norm over four decades), ``g_2 = -t g_1`` (``t`` over six decades),
``w = (w_1, 1 - w_1)``, ``c`` uniform on ``[1, 10]``, with and without the clip. ``d = 0`` is then
conflict-free and inside the trust region, and every other conflict-free direction is orthogonal
to ``g_1``, so the optimum is Pareto-stationary and the direction ``G a`` is 0. A row counts the
instances whose ``||G a||`` exceeds ``1e-6 sum_i w_i ||g_i||`` and gives the worst ratio. Run it in
a checkout of an older solver to compare (the edge search before eaeab32 failed 86 of 4 000).
"""

from __future__ import annotations

import argparse

import torch

from cagrad_clip import solve_cagrad


def row(n_instances: int, dtype: torch.dtype, seed: int) -> tuple[int, int, float]:
    """``(instances, wrong, worst ratio)`` over ``n_instances`` pairs, each with and without the clip."""
    gen = torch.Generator().manual_seed(seed)
    wrong, worst, total = 0, 0.0, 0
    for _ in range(n_instances):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        g1 = torch.randn(n, dtype=torch.float64, generator=gen) * 10 ** (4 * torch.rand(1, generator=gen).item() - 2)
        t = 10 ** (6 * torch.rand(1, generator=gen).item() - 3)
        G = torch.stack([g1, -t * g1], 1)
        w1 = torch.rand(1, generator=gen).item() * 0.98 + 0.01
        w = torch.tensor([w1, 1.0 - w1], dtype=torch.float64)
        c = 1 + 9 * torch.rand(1, generator=gen).item()
        scale = (w * G.norm(dim=0)).sum().item()
        for clip in (True, False):
            a = solve_cagrad((G.T @ G).to(dtype), w.to(dtype), c=c, clip=clip).coefficients.double()
            ratio = (G @ a).norm().item() / scale
            worst, wrong, total = max(worst, ratio), wrong + (ratio > 1e-6), total + 1
    return total, wrong, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000, help="pairs per dtype (each solved with and without the clip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| dtype | solves | direction > 1e-6 sum w_i ||g_i|| | worst ||G a|| / sum w_i ||g_i|| |")
    print("|---|---|---|---|")
    for dtype in (torch.float64, torch.float32):
        total, wrong, worst = row(args.instances, dtype, args.seed)
        print(f"| {str(dtype).removeprefix('torch.')} | {total} | {wrong} | {worst:.1e} |")


if __name__ == "__main__":
    main()
