"""Accuracy of the optimizer's Gram for bf16 / fp16 gradients, against float64.

``python -m benchmarks.gram_accuracy`` prints one Markdown table. Each row: ``m`` objectives whose
gradients over ``D`` parameters (one parameter per chunk-sized piece, so the store's chunking is
exercised) are given low-precision values ``g_i``; objective ``i``'s loss is ``<w, g_i>``, so its
gradient is exactly ``g_i``. The Gram that ``ConflictAverseOptimizer`` computed (``opt.last.gram``)
is compared with the float64 Gram of the very same low-precision values (so the input rounding is
not counted, only the reduction's), entry by entry, relative to ``sqrt(G_ii G_jj)`` (the scale of a
cosine). For contrast, the same Gram computed in the gradients' own dtype (``G @ G.T`` in bf16).
The gradients are correlated (a shared component plus noise), as conflicting objectives' are.
"""

from __future__ import annotations

import argparse

import torch

from cagrad_clip import ConflictAverseOptimizer

PIECE = 1 << 18  # elements per parameter tensor


def gradients(m: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``(m, d)`` correlated gradients (cosines around 0.5), rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(m, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 1, m, dtype=torch.float64).unsqueeze(1)  # norms over three decades
    return ((common + noise) * scales * 1e-3).to(dtype)


def optimizer_gram(rows: torch.Tensor) -> torch.Tensor:
    """``opt.last.gram`` for objectives whose gradients are ``rows`` (one parameter per ``PIECE``)."""
    m, d = rows.shape
    params = [torch.nn.Parameter(torch.zeros(n, dtype=rows.dtype)) for n in torch.full((d // PIECE,), PIECE).tolist()]
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), c=0.4)
    pieces = rows.split(PIECE, dim=1)
    losses = [sum((p * piece[i]).sum() for p, piece in zip(params, pieces)) for i in range(m)]
    opt.backward(losses)  # type: ignore[arg-type]
    assert opt.last is not None
    return opt.last.gram.double()


def relative_error(gram: torch.Tensor, exact: torch.Tensor) -> float:
    scale = exact.diagonal().sqrt()
    return ((gram - exact).abs() / (scale.unsqueeze(0) * scale.unsqueeze(1))).max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1048576,16777216", help="comma list of D (multiples of 2**18)")
    parser.add_argument("--ms", default="2,8", help="comma list of m")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| dtype | m | D | ours: max error / sqrt(G_ii G_jj) | Gram in the gradients' dtype |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float16):
        for m in (int(v) for v in args.ms.split(",")):
            for d in (int(v) for v in args.sizes.split(",")):
                rows = gradients(m, d, dtype, seed=m)
                exact = rows.double() @ rows.double().T
                ours = relative_error(optimizer_gram(rows), exact)
                naive = relative_error((rows @ rows.T).double(), exact)
                print(f"| {str(dtype).removeprefix('torch.')} | {m} | {d:,} | {ours:.1e} | {naive:.1e} |")


if __name__ == "__main__":
    main()
