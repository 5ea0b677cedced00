"""What the accumulation window's edit check costs: its fingerprint pass against the step it guards.

``python -m benchmarks.window_overhead`` prints one Markdown table. The window takes a fingerprint of
``.grad`` (one fused 2-norm per dtype, :func:`cagrad_clip._storage.base.fingerprint`) after each
``backward(..., combine=False)`` and after a public ``combine()``, and compares it when a later call
reuses the window; ``opt.step(losses)`` takes none. Each row, side by side in one run on one model
(a 2-layer MLP, one head per objective, batch 64, one thread): the median time of

* ``opt.step(losses)`` (no fingerprint),
* two micro-batches ``backward(..., combine=False)`` then ``step()`` (four fingerprint passes: a seal
  and a check per micro-batch's reuse),
* one fingerprint pass over the gradients that ``.grad`` holds after the combination,

and the passes' share of the accumulation: ``4 x pass / accumulation``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage.base import fingerprint


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def row(width: int, m: int, repeats: int) -> str:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(m)])
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(64, width)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=1e-6), nonfinite="ignore")

    def losses(batch: torch.Tensor, scale: float) -> list[torch.Tensor]:
        h = trunk(batch)
        return [head(h).pow(2).mean() * scale for head in heads]

    def one_step() -> None:
        opt.zero_grad()
        opt.step(losses(x, 1.0))

    def accumulate() -> None:
        opt.zero_grad()
        for k in range(2):
            opt.backward(losses(x[k * 32 : (k + 1) * 32], 0.5), combine=False)
        opt.step()

    step_ms = median_ms(one_step, repeats)
    accumulate_ms = median_ms(accumulate, repeats)
    grads = [p.grad for p in params if p.grad is not None]
    pass_ms = median_ms(lambda: fingerprint(grads), repeats)
    numel = sum(p.numel() for p in params)
    share = 4 * pass_ms / accumulate_ms
    return f"| {width} | {numel / 1e6:.2f} M | {m} | {step_ms:.2f} | {accumulate_ms:.2f} | {pass_ms:.3f} | {share:.1%} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="512,1024,2048", help="comma list of MLP widths")
    parser.add_argument("--ms", default="2,4", help="comma list of objective counts")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| width | parameters | m | step(losses) ms | 2 micro-batches + step ms | one fingerprint pass ms | 4 passes / accumulation |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for width in (int(w) for w in args.widths.split(",")):
        for m in (int(v) for v in args.ms.split(",")):
            print(row(width, m, args.repeats), flush=True)


if __name__ == "__main__":
    main()
