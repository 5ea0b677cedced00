"""Section ``solver``: the dual solver alone, time per call and accuracy, against the peers.

For m in {2, 4, ..., 64} and batch in {1, 1024}: ours (eager, float32 and float64; compiled with
``--compile``; both solvers where ``auto`` could pick either), TorchJD's CAGrad weighting (cvxpy +
Clarabel), scipy SLSQP as the official CAGrad code calls it and, for m = 2, the exact closed form
(one exact line search on the edge). Accuracy is ``(F(p) - F_ref) / max_i H_ii`` where ``F_ref`` is
the smallest dual value found by any method or by the independent tight reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from cagrad_clip import CAGradSolution, default_max_iter
from cagrad_clip._dual import AUTO_EXACT_MAX_M, auto_solver, solve_with_settings
from cagrad_clip._dual.line_search import exact_line_search
from cagrad_clip._settings import CAGradSettings

from .common import C, Log, time_interleaved
from .peers import HAVE_TORCHJD, TJDCAGradWeighting, dual_value, slsqp_official, tight_reference, torchjd_dual


def solve(H: torch.Tensor, w: torch.Tensor, *, clip: bool = True, solver: str = "auto", max_iter: int | None = None) -> CAGradSolution:
    """Our solver on already-checked inputs (``H`` and ``w`` of one float dtype, ``w`` on the simplex)."""
    m = H.shape[-1]
    settings = CAGradSettings(c=C, clip=clip, solver=solver, max_iter=default_max_iter(m) if max_iter is None else max_iter)
    return solve_with_settings(H, w, settings)


def random_grams(m: int, batch: int, seed: int, dim: int = 64) -> np.ndarray:
    """Grams of gradients with mixed conflict: a common component plus individual noise, random scales."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((batch, 1, dim))
    G = 0.5 * common + rng.standard_normal((batch, m, dim))
    G *= np.exp(rng.uniform(-1.0, 1.0, size=(batch, m, 1)))
    return G @ np.swapaxes(G, -1, -2)


def closed_form_m2(H: torch.Tensor, c: float = C) -> torch.Tensor:
    """Exact batched dual for m = 2: one exact line search on the edge e_1 -> e_2."""
    h11, h12, h22 = H[..., 0, 0], H[..., 0, 1], H[..., 1, 1]
    b1 = 0.5 * (h11 + h12)
    b2 = 0.5 * (h12 + h22)
    s = c * (0.5 * (b1 + b2)).clamp_min(0.0).sqrt()
    gamma = exact_line_search(b2 - b1, s, h11, 2.0 * (h12 - h11), (h11 + h22 - 2.0 * h12).clamp_min(0.0), torch.ones_like(h11))
    return torch.stack([1.0 - gamma, gamma], -1)


OURS_VARIANTS = ("ours fp32", "ours fp64", "ours exact fp32", "ours Frank-Wolfe fp32")


def _accuracy(m: int, n_acc: int, tjd_weighting: Callable | None) -> dict[str, tuple[float, float]]:
    """Median and max scaled dual error of every method on ``n_acc`` single problems."""
    grams = random_grams(m, n_acc, seed=1000 + m)
    points: dict[str, list[np.ndarray]] = {k: [] for k in (*OURS_VARIANTS, "TorchJD CAGrad", "SLSQP (official call)", "closed form")}
    refs = []
    for H in grams:
        Ht = torch.from_numpy(H)
        w64 = torch.full((m,), 1.0 / m, dtype=torch.float64)
        points["ours fp64"].append(solve(Ht, w64).dual.numpy())
        points["ours fp32"].append(solve(Ht.float(), w64.float()).dual.double().numpy())
        if 2 < m <= AUTO_EXACT_MAX_M:  # the lever: both solvers where auto may pick either
            points["ours exact fp32"].append(solve(Ht.float(), w64.float(), solver="exact").dual.double().numpy())
            points["ours Frank-Wolfe fp32"].append(solve(Ht.float(), w64.float(), solver="frank_wolfe").dual.double().numpy())
        if tjd_weighting is not None:
            points["TorchJD CAGrad"].append(torchjd_dual(tjd_weighting, Ht.float()))
        points["SLSQP (official call)"].append(slsqp_official(H))
        if m == 2:
            points["closed form"].append(closed_form_m2(Ht).numpy())
        refs.append(tight_reference(H))
    errors: dict[str, list[float]] = {}
    for j, H in enumerate(grams):
        values = [dual_value(H, ps[j]) for ps in points.values() if ps]
        if refs[j] is not None:
            values.append(dual_value(H, refs[j]))
        best = min(values)
        scale = float(np.max(np.diag(H)))
        for name, ps in points.items():
            if ps:
                errors.setdefault(name, []).append(max(dual_value(H, ps[j]) - best, 0.0) / scale)
    return {k: (float(np.median(v)), float(np.max(v))) for k, v in errors.items()}


def solver_section(ms: list[int], batches: list[int], repeats: int, n_acc: int, peer_sample: int, compiled: bool, log: Log) -> list[dict]:
    """Rows ``{m, batch, method, ms, extrapolated, acc_median, acc_max}``."""
    rows: list[dict] = []
    tjd_weighting = TJDCAGradWeighting(C) if HAVE_TORCHJD else None
    nan2 = (float("nan"), float("nan"))
    for m in ms:
        acc = _accuracy(m, n_acc, tjd_weighting)
        for batch in batches:
            H64 = torch.from_numpy(random_grams(m, batch, seed=m * 7 + batch))
            if batch == 1:
                H64 = H64[0]
            H32 = H64.float()
            w32 = torch.full((m,), 1.0 / m)
            w64 = w32.double()
            fns: dict[str, Callable[[], object]] = {
                "ours fp32": lambda: solve(H32, w32).coefficients,
                "ours fp64": lambda: solve(H64, w64).coefficients,
            }
            if 2 < m <= AUTO_EXACT_MAX_M:
                fns["ours exact fp32"] = lambda: solve(H32, w32, solver="exact").coefficients
                fns["ours Frank-Wolfe fp32"] = lambda: solve(H32, w32, solver="frank_wolfe").coefficients
            if m == 2:
                fns["closed form"] = lambda: closed_form_m2(H32)
            if compiled:
                fn = torch.compile(lambda H, w: solve(H, w).coefficients, fullgraph=True, dynamic=False)
                t0 = time.perf_counter()
                fn(H32, w32)
                log(f"  compiled solver m={m} batch={batch}: {time.perf_counter() - t0:.1f} s to compile")
                fns["ours fp32 compiled"] = lambda fn=fn: fn(H32, w32)
            times = time_interleaved(fns, repeats)
            # peers: a Python loop over problems; for large batches time a sample and scale up
            sample = min(batch, peer_sample)
            probs32 = [H32] if batch == 1 else list(H32[:sample])
            probs64 = [H64.numpy()] if batch == 1 else [h.numpy() for h in H64[:sample]]
            peer_fns: dict[str, Callable[[], object]] = {"SLSQP (official call)": lambda: [slsqp_official(h) for h in probs64]}
            if tjd_weighting is not None:
                peer_fns["TorchJD CAGrad"] = lambda: [tjd_weighting(h) for h in probs32]
            peer_times = time_interleaved(peer_fns, max(3, repeats // 4), warmup=1)
            for name, t in peer_times.items():
                times[name] = t * batch / sample
            for name, t in times.items():
                key = name.replace(" compiled", "")
                label = f"{name} (auto: {auto_solver(m, batch) if m > 2 else 'edge'})" if key in ("ours fp32", "ours fp64") else name
                rows.append(
                    {
                        "m": m,
                        "batch": batch,
                        "method": label,
                        "ms": t,
                        "extrapolated": name in peer_times and sample < batch,
                        "acc_median": acc.get(key, nan2)[0],
                        "acc_max": acc.get(key, nan2)[1],
                    }
                )
            if not HAVE_TORCHJD:
                rows.append(
                    {
                        "m": m,
                        "batch": batch,
                        "method": "TorchJD CAGrad",
                        "ms": float("nan"),
                        "extrapolated": False,
                        "acc_median": float("nan"),
                        "acc_max": float("nan"),
                    }
                )
            log(f"  solver m={m:>2} batch={batch:>4}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
    return rows
