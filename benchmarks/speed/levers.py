"""Section ``levers``: the memory-bound parts of the combination, old way against kept way.

On an ``(m, D)`` float32 matrix of per-objective gradients (D: the width-2048 MLP's parameter
count): the Gram as one ``(m, D) x (D, m)`` GEMM against the blocked Gram (column blocks through
one ``bmm``, block sums added pairwise; time and relative error against float64), and the
write-back ``a @ G`` into a fresh tensor against ``mv`` into a reused buffer. The kernels are
written out here (as ``cagrad_clip`` implements them) so the lever stays measurable whatever
storage the optimizer uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cagrad_clip._storage import GRAM_BLOCK

from .common import Log, time_interleaved

LEVER_VARIANTS = (
    "Gram: one GEMM",
    "Gram: blocked (kept)",
    "write-back: a @ buffer, fresh tensor",
    "write-back: mv into reused buffer (kept)",
)


def blocked_gram(rows: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """``rows @ rows.T`` summed over column blocks of ``block`` through one ``bmm``, plus the remainder."""
    blocks = rows.shape[1] // block
    if blocks < 2:
        return rows @ rows.T
    tiled = rows[:, : blocks * block].view(rows.shape[0], blocks, block).transpose(0, 1)
    gram = torch.bmm(tiled, tiled.transpose(1, 2)).sum(0)
    rest = rows[:, blocks * block :]
    return gram.addmm_(rest, rest.T)


def lever_section(numel: int, ms: list[int], repeats: int, log: Log) -> list[dict]:
    """Rows ``{m, numel, variant, ms, rel_error}`` in :data:`LEVER_VARIANTS` order per m."""
    rows = []
    for m in ms:
        G = torch.randn(m, numel, generator=torch.Generator().manual_seed(m))
        exact = G.double() @ G.double().T
        a = torch.rand(m)
        out = torch.empty(numel)
        fns = {
            LEVER_VARIANTS[0]: lambda: G @ G.T,
            LEVER_VARIANTS[1]: lambda: blocked_gram(G),
            LEVER_VARIANTS[2]: lambda: a @ G,
            LEVER_VARIANTS[3]: lambda: torch.mv(G.T, a, out=out),
        }
        times = time_interleaved(fns, repeats)
        scale = exact.abs().max()
        errors = {
            LEVER_VARIANTS[0]: float(((G @ G.T).double() - exact).abs().max() / scale),
            LEVER_VARIANTS[1]: float((blocked_gram(G).double() - exact).abs().max() / scale),
        }
        for name, t in times.items():
            rows.append({"m": m, "numel": numel, "variant": name, "ms": t, "rel_error": errors.get(name, float("nan"))})
        log(f"  levers m={m}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
    return rows
