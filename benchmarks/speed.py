"""Speed at the floor: ``python -m benchmarks.speed``.

Measures, in one process and side by side (warm-up, medians over interleaved repeats):

1. the dual solver: time per call and accuracy for m in {2, 4, ..., 64}, batch in {1, 1024}:
   ours (eager, float32 and float64; compiled with ``--compile``), TorchJD's CAGrad weighting
   (cvxpy + Clarabel), scipy SLSQP called the way the official CAGrad code calls it (uniform
   start, bounds [0, 1], an equality constraint, finite-difference gradient, default tolerances;
   re-implemented from that description) and, for m = 2, the exact closed form (one exact line
   search on the edge);
2. a training step (MLP with 3 hidden layers of width 512 / 2048; a small TransformerEncoder):
   plain summed loss, the floor (m ``autograd.grad`` passes + base step), ours, TorchJD
   (``backward`` / ``mtl_backward`` + ``jac_to_grad``) with CAGrad and UPGrad, as ratios to the floor;
3. the peak memory of each step (CPU allocator, through the profiler) against the bound
   ``m x shared parameter bytes + O(m^2)``, and whether the graph survives the step.

Peers are optional: rows whose package is missing say so. Writes ``results/speed/speed.md``.
Accuracy is ``F(p) - F_ref`` over the scale ``max_i H_ii`` where ``F_ref`` is the smallest dual
value found by any method or by an independent tight reference (``tests/reference.py``'s multistart
SLSQP for m <= 8, Clarabel at 1e-10 tolerances when cvxpy is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip.dual import AUTO_EXACT_MAX_M, _exact_line_search, _solve, auto_solver, default_max_iter

try:  # optional peer
    import torchjd
    from torchjd.aggregation import CAGrad as TJDCAGrad
    from torchjd.aggregation import UPGrad as TJDUPGrad
    from torchjd.aggregation._cagrad import CAGradWeighting as TJDCAGradWeighting
    from torchjd.autojac import backward as tjd_backward
    from torchjd.autojac import jac_to_grad as tjd_jac_to_grad
    from torchjd.autojac import mtl_backward as tjd_mtl_backward

    TJDCAGradWeighting(0.4)  # raises ImportError without cvxpy / clarabel
    HAVE_TORCHJD = True
    TORCHJD_NOTE = f"torchjd {getattr(torchjd, '__version__', '')}".strip()
except Exception as error:  # noqa: BLE001 - any failure means "peer absent"
    HAVE_TORCHJD = False
    TORCHJD_NOTE = f"TorchJD not available ({type(error).__name__}: {error}); pip install 'torchjd[cagrad]' quadprog qpsolvers"

try:
    import cvxpy as cp

    HAVE_CVXPY = True
except Exception:  # noqa: BLE001
    HAVE_CVXPY = False

from scipy.optimize import minimize

C = 0.4
RESULTS = Path("results/speed")


# --------------------------------------------------------------------------- timing helpers
def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (ms) of each callable; the callables run in rounds so load drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: _median_ms(v) for k, v in samples.items()}


# --------------------------------------------------------------------------- solver problems
def random_grams(m: int, batch: int, seed: int, dim: int = 64) -> np.ndarray:
    """Grams of gradients with mixed conflict: a common component plus individual noise, random scales."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((batch, 1, dim))
    G = 0.5 * common + rng.standard_normal((batch, m, dim))
    G *= np.exp(rng.uniform(-1.0, 1.0, size=(batch, m, 1)))
    return G @ np.swapaxes(G, -1, -2)


def dual_value(H: np.ndarray, p: np.ndarray, c: float = C) -> float:
    """``F(p)`` in float64 at ``p`` put back on the simplex (a float32 or solver-tolerance ``p`` can sum
    to ``1 - 1e-8``, which lowers ``F`` by as much and would look *better* than the optimum)."""
    p = np.maximum(np.asarray(p, dtype=np.float64), 0.0)
    p = p / p.sum()
    m = H.shape[0]
    w = np.full(m, 1.0 / m)
    b = H @ w
    s = c * np.sqrt(max(w @ b, 0.0))
    return float(b @ p + s * np.sqrt(max(p @ H @ p, 0.0)))


def slsqp_official(H: np.ndarray, c: float = C) -> np.ndarray:
    """SLSQP as the official CAGrad code calls it (re-implemented from its description)."""
    m = H.shape[0]
    x0 = np.full(m, 1.0 / m)
    g0_norm = np.sqrt(H.mean() + 1e-8)
    radius = c * g0_norm + 1e-8
    Hb = H @ x0

    def objective(x: np.ndarray) -> float:
        return float(x @ Hb + radius * np.sqrt(x @ H @ x + 1e-8))

    res = minimize(objective, x0, bounds=[(0.0, 1.0)] * m, constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum()},))
    p = np.clip(res.x, 0.0, None)
    return p / p.sum()


def torchjd_dual(weighting: Callable, H: torch.Tensor) -> np.ndarray:
    """TorchJD's CAGrad weights ``1/m + (s/n) p``; the dual ``p`` is recovered from them."""
    a = weighting(H).double().numpy()
    m = a.shape[0]
    p = np.clip(a - 1.0 / m, 0.0, None)
    return p / p.sum() if p.sum() > 0 else np.full(m, 1.0 / m)


def tight_reference(H: np.ndarray, c: float = C) -> np.ndarray | None:
    """Independent tight reference: tests/reference.py (m <= 8) and/or Clarabel at 1e-10 tolerances."""
    m = H.shape[0]
    candidates = []
    if m <= 8:
        with contextlib.suppress(Exception):
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.reference import solve_dual_reference

            candidates.append(solve_dual_reference(H, np.full(m, 1.0 / m), c).p)
    if HAVE_CVXPY:
        with contextlib.suppress(Exception):
            evals, evecs = np.linalg.eigh(H)
            R = evecs * np.sqrt(np.clip(evals, 0.0, None))  # H = R R^T
            w = np.full(m, 1.0 / m)
            b = H @ w
            s = c * np.sqrt(max(w @ b, 0.0))
            x = cp.Variable(m)
            prob = cp.Problem(cp.Minimize(b @ x + s * cp.norm(R.T @ x, 2)), [x >= 0, cp.sum(x) == 1])
            prob.solve(cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
            p = np.clip(np.asarray(x.value), 0.0, None)
            candidates.append(p / p.sum())
    if not candidates:
        return None
    return min(candidates, key=lambda p: dual_value(H, p, c))


def closed_form_m2(H: torch.Tensor, c: float = C) -> torch.Tensor:
    """Exact batched dual for m = 2: one exact line search on the edge e_1 -> e_2 (ALGORITHM.md §4)."""
    h11, h12, h22 = H[..., 0, 0], H[..., 0, 1], H[..., 1, 1]
    b1 = 0.5 * (h11 + h12)
    b2 = 0.5 * (h12 + h22)
    s = c * (0.5 * (b1 + b2)).clamp_min(0.0).sqrt()
    gamma = _exact_line_search(b2 - b1, s, h11, 2.0 * (h12 - h11), (h11 + h22 - 2.0 * h12).clamp_min(0.0), torch.ones_like(h11))
    return torch.stack([1.0 - gamma, gamma], -1)


def solver_section(ms: list[int], batches: list[int], repeats: int, n_acc: int, peer_sample: int, compiled: bool,
                   log: Callable[[str], None]) -> list[dict]:
    rows: list[dict] = []
    tjd_weighting = TJDCAGradWeighting(C) if HAVE_TORCHJD else None
    compiled_fns: dict = {}
    for m in ms:
        iters = default_max_iter(m)
        auto = "auto"  # what users get (``auto_solver``: exact enumeration for small m and batches)
        # ---- accuracy on n_acc single problems (float64 numpy evaluation of every method's p)
        grams = random_grams(m, n_acc, seed=1000 + m)
        points: dict[str, list[np.ndarray]] = {k: [] for k in ("ours fp32", "ours fp64", "ours exact fp32", "ours Frank-Wolfe fp32",
                                                               "TorchJD CAGrad", "SLSQP (official call)", "closed form")}
        refs = []
        for H in grams:
            Ht = torch.from_numpy(H)
            w64 = torch.full((m,), 1.0 / m, dtype=torch.float64)
            points["ours fp64"].append(_solve(Ht, w64, C, False, 1.0, iters, auto).dual.numpy())
            points["ours fp32"].append(_solve(Ht.float(), w64.float(), C, False, 1.0, iters, auto).dual.double().numpy())
            if 2 < m <= AUTO_EXACT_MAX_M:  # the lever: both solvers where auto may pick either
                for solver in ("exact", "frank_wolfe"):
                    name = "ours exact fp32" if solver == "exact" else "ours Frank-Wolfe fp32"
                    points[name].append(_solve(Ht.float(), w64.float(), C, False, 1.0, iters, solver).dual.double().numpy())
            if tjd_weighting is not None:
                points["TorchJD CAGrad"].append(torchjd_dual(tjd_weighting, Ht.float()))
            points["SLSQP (official call)"].append(slsqp_official(H))
            if m == 2:
                points["closed form"].append(closed_form_m2(Ht).numpy())
            refs.append(tight_reference(H))
        accuracy: dict[str, tuple[float, float]] = {}
        for j, H in enumerate(grams):
            values = [dual_value(H, ps[j]) for ps in points.values() if ps]
            if refs[j] is not None:
                values.append(dual_value(H, refs[j]))
            best = min(values)
            scale = float(np.max(np.diag(H)))
            for name, ps in points.items():
                if ps:
                    accuracy.setdefault(name, []).append(max(dual_value(H, ps[j]) - best, 0.0) / scale)  # type: ignore[arg-type]
        acc = {k: (float(np.median(v)), float(np.max(v))) for k, v in accuracy.items()}

        for batch in batches:
            H64 = torch.from_numpy(random_grams(m, batch, seed=m * 7 + batch))
            if batch == 1:
                H64 = H64[0]
            H32 = H64.float()
            w32 = torch.full((m,), 1.0 / m)
            w64 = w32.double()
            fns: dict[str, Callable[[], object]] = {
                "ours fp32": lambda: _solve(H32, w32, C, True, 1.0, iters, auto).coefficients,
                "ours fp64": lambda: _solve(H64, w64, C, True, 1.0, iters, auto).coefficients,
            }
            if 2 < m <= AUTO_EXACT_MAX_M:
                fns["ours exact fp32"] = lambda: _solve(H32, w32, C, True, 1.0, iters, "exact").coefficients
                fns["ours Frank-Wolfe fp32"] = lambda: _solve(H32, w32, C, True, 1.0, iters, "frank_wolfe").coefficients
            if m == 2:
                fns["closed form"] = lambda: closed_form_m2(H32)
            if compiled:
                key = (m, batch)
                fn = torch.compile(lambda H, w: _solve(H, w, C, True, 1.0, iters, auto).coefficients, fullgraph=True, dynamic=False)
                t0 = time.perf_counter()
                fn(H32, w32)
                log(f"  compiled solver m={m} batch={batch}: {time.perf_counter() - t0:.1f} s to compile")
                compiled_fns[key] = fn
                fns["ours fp32 compiled"] = lambda fn=fn: fn(H32, w32)
            times = time_interleaved(fns, repeats)
            # peers: a Python loop over problems; for large batches time a sample and scale up
            sample = min(batch, peer_sample)
            probs32 = [H32] if batch == 1 else list(H32[:sample])
            probs64 = [H64.numpy()] if batch == 1 else [h.numpy() for h in H64[:sample]]
            peer_fns: dict[str, Callable[[], object]] = {
                "SLSQP (official call)": lambda: [slsqp_official(h) for h in probs64],
            }
            if tjd_weighting is not None:
                peer_fns["TorchJD CAGrad"] = lambda: [tjd_weighting(h) for h in probs32]
            peer_times = time_interleaved(peer_fns, max(3, repeats // 4), warmup=1)
            for name, t in peer_times.items():
                times[name] = t * batch / sample
            for name, t in times.items():
                acc_key = name.replace(" compiled", "")
                label = f"{name} (auto: {auto_solver(m, batch) if m > 2 else 'edge'})" if acc_key in ("ours fp32", "ours fp64") else name
                rows.append({
                    "m": m, "batch": batch, "method": label, "ms": t,
                    "extrapolated": name in peer_times and sample < batch,
                    "acc_median": acc.get(acc_key, (float("nan"),) * 2)[0],
                    "acc_max": acc.get(acc_key, (float("nan"),) * 2)[1],
                })
            if not HAVE_TORCHJD:
                rows.append({"m": m, "batch": batch, "method": "TorchJD CAGrad", "ms": float("nan"), "extrapolated": False,
                             "acc_median": float("nan"), "acc_max": float("nan")})
            log(f"  solver m={m:>2} batch={batch:>4}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
    return rows


# --------------------------------------------------------------------------- training step
class MLP(nn.Module):
    """3 hidden layers of ``width``; one shared output layer with an output per objective."""

    def __init__(self, width: int, m: int, d_in: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU())
        self.out = nn.Linear(width, m)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = self.trunk(x)
        pred = self.out(feats)
        return list(((pred - y) ** 2).mean(0).unbind()), feats


class Transformer(nn.Module):
    """A small TransformerEncoder trunk (shared) with one linear head per objective (task-specific)."""

    def __init__(self, m: int, d_model: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.heads = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(m))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = self.encoder(x).mean(1)
        return [((head(feats).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)], feats


MLP_BATCH = 64  # rows per MLP step; ``--mlp-batch`` changes it


def make_case(kind: str, m: int, seed: int = 0):
    torch.manual_seed(seed)
    if kind.startswith("mlp"):
        width = int(kind.split("-")[1])
        model = MLP(width, m)
        x, y = torch.randn(MLP_BATCH, 256), torch.randn(MLP_BATCH, m)
        shared = list(model.trunk.parameters()) + list(model.out.parameters())
        heads: list[list[nn.Parameter]] | None = None
    else:
        model = Transformer(m)
        x, y = torch.randn(16, 32, 128), torch.randn(16, m)
        shared = list(model.encoder.parameters())
        heads = [list(h.parameters()) for h in model.heads]
    return model, x, y, shared, heads


def step_variants(kind: str, m: int) -> tuple[dict[str, Callable[[], object]], dict]:
    """One full iteration (zero_grad, forward, gradients, base step) per variant, each on its own model copy."""
    variants: dict[str, Callable[[], object]] = {}
    info: dict = {}

    def fresh():
        model, x, y, shared, heads = make_case(kind, m)
        return model, x, y, shared, heads, torch.optim.SGD(model.parameters(), lr=1e-6)

    model, x, y, shared, heads, base = fresh()
    info["shared_bytes"] = sum(p.numel() * p.element_size() for p in shared)
    info["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())

    def plain(model=model, x=x, y=y, base=base):
        base.zero_grad()
        losses, _ = model.losses(x, y)
        torch.stack(losses).sum().backward()
        base.step()

    variants["(a) plain sum"] = plain

    model, x, y, shared, heads, base = fresh()
    params = list(model.parameters())

    def floor(model=model, x=x, y=y, base=base, params=params):
        base.zero_grad()
        losses, _ = model.losses(x, y)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=i < m - 1, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        base.step()

    variants["(b) floor"] = floor

    model, x, y, shared, heads, base = fresh()
    opt = ConflictAverseOptimizer(base, c=C, shared=shared, nonfinite="ignore")

    def ours(model=model, x=x, y=y, opt=opt):
        opt.zero_grad()
        losses, _ = model.losses(x, y)
        opt.step(losses)

    variants["(c) ours"] = ours
    info["ours_opt"] = opt
    info["ours_model"] = (model, x, y)

    if HAVE_TORCHJD:
        for agg_name, make_agg in (("CAGrad", lambda: TJDCAGrad(C)), ("UPGrad", TJDUPGrad)):
            model, x, y, shared, heads, base = fresh()
            agg = make_agg()
            if heads is None:
                def tjd(model=model, x=x, y=y, base=base, agg=agg, shared=shared):
                    base.zero_grad()
                    losses, _ = model.losses(x, y)
                    tjd_backward(losses, inputs=shared)
                    tjd_jac_to_grad(shared, agg)
                    base.step()
            else:
                def tjd(model=model, x=x, y=y, base=base, agg=agg, shared=shared, heads=heads):
                    base.zero_grad()
                    losses, feats = model.losses(x, y)
                    tjd_mtl_backward(losses, feats, tasks_params=heads, shared_params=shared)
                    tjd_jac_to_grad(shared, agg)
                    base.step()
            variants[f"(d) TorchJD {agg_name}"] = tjd
    return variants, info


def peak_memory_bytes(fn: Callable[[], object]) -> float:
    """Peak bytes allocated by the CPU allocator during ``fn`` above what was allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    total, peak = 0, 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if e["args"].get("Device Type", 0) != 0:
            continue
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return float(peak)


def graph_freed_after_step(opt: ConflictAverseOptimizer, model, x, y) -> bool:
    opt.zero_grad()
    losses, _ = model.losses(x, y)
    opt.step(losses)
    try:
        torch.autograd.grad(losses[-1], [p for p in model.parameters()], allow_unused=True)
    except RuntimeError:
        return True
    return False


def combine_only_ms(opt: ConflictAverseOptimizer, model, x, y, repeats: int) -> float:
    """Median time of the combination alone (Gram + solve + write-back) on accumulated gradients."""
    opt.zero_grad()
    losses, _ = model.losses(x, y)
    opt.backward(losses, combine=False)

    def combine() -> None:
        opt._combined = False  # benchmark only: force a fresh solve on the same accumulated gradients
        opt.combine()

    return time_interleaved({"combine": combine}, repeats)["combine"]


def step_section(kinds: list[str], ms: list[int], repeats: int, memory: bool, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for kind in kinds:
        for m in ms:
            variants, info = step_variants(kind, m)
            times = time_interleaved(variants, repeats)
            peaks = {name: peak_memory_bytes(fn) for name, fn in variants.items()} if memory else {}
            freed = graph_freed_after_step(info["ours_opt"], *info["ours_model"])
            combine_ms = combine_only_ms(info["ours_opt"], *info["ours_model"], repeats)
            buffer = info["ours_opt"]._grads.buffer
            persistent = {"(c) ours": 0.0 if buffer is None else float(buffer.numel() * buffer.element_size())}
            floor = times["(b) floor"]
            for name, t in times.items():
                rows.append({
                    "model": kind, "m": m, "variant": name, "ms": t, "ratio": t / floor,
                    "peak_mb": (peaks.get(name, float("nan")) + persistent.get(name, 0.0)) / 2**20,
                    "persistent_mb": persistent.get(name, 0.0) / 2**20, "combine_ms": combine_ms,
                    "shared_mb": info["shared_bytes"] / 2**20, "param_mb": info["param_bytes"] / 2**20,
                    "graph_freed": freed,
                })
            log(f"  step {kind} m={m}: " + ", ".join(f"{k} {v:.1f} ms ({v / floor:.3f}x)" for k, v in times.items()))
            del variants, info
            gc.collect()
    return rows


# --------------------------------------------------------------------------- report
def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {TORCHJD_NOTE}; "
            f"load average at start {os.getloadavg()[0]:.1f}")


# --------------------------------------------------------------------------- levers
def lever_section(numel: int, ms: list[int], repeats: int, log: Callable[[str], None]) -> list[dict]:
    """The memory-bound parts of ``combine()`` on an ``(m, numel)`` float32 buffer, old way vs kept way.

    Gram: one ``(m, D) x (D, m)`` GEMM vs the blocked Gram of ``ObjectiveGradients.gram`` (time and
    relative error against float64). Write-back: ``a @ buffer`` into a fresh tensor vs ``mv`` into the
    persistent buffer that ``add_combination_to_grads`` reuses.
    """
    from cagrad_clip.gradients import ObjectiveGradients

    rows = []
    for m in ms:
        param = torch.zeros(numel)
        grads = ObjectiveGradients([param], 1, torch.float32)
        grads.buffer = torch.randn(m, numel, generator=torch.Generator().manual_seed(m))
        grads.accumulated = True
        exact = grads.buffer.double() @ grads.buffer.double().T
        a = torch.rand(m)
        out = torch.empty(numel)
        fns = {
            "Gram: one GEMM": lambda: grads.buffer @ grads.buffer.T,
            "Gram: blocked (kept)": grads.gram,
            "write-back: a @ buffer, fresh tensor": lambda: a @ grads.buffer,
            "write-back: mv into reused buffer (kept)": lambda: torch.mv(grads.buffer.T, a, out=out),
        }
        times = time_interleaved(fns, repeats)
        errors = {
            "Gram: one GEMM": float(((grads.buffer @ grads.buffer.T).double() - exact).abs().max() / exact.abs().max()),
            "Gram: blocked (kept)": float((grads.gram().double() - exact).abs().max() / exact.abs().max()),
        }
        for name, t in times.items():
            rows.append({"m": m, "numel": numel, "variant": name, "ms": t, "rel_error": errors.get(name, float("nan"))})
        log(f"  levers m={m}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
    return rows


def render(solver_rows: list[dict], step_rows: list[dict], args: argparse.Namespace, header: str,
           lever_rows: list[dict] | None = None) -> str:
    command = " ".join(["python -m benchmarks.speed", *sys.argv[1:]])
    out = [f"# Speed at the floor\n\nCommand: `{command}`  \nMachine: {header}\n"]
    if solver_rows:
        out.append("## 1. Dual solver: time per call (ms, median) and accuracy\n")
        out.append("Accuracy: `(F(p) - F_ref) / max_i H_ii`, median / max over the accuracy problems "
                   "(F_ref: best of every method and the independent tight reference). "
                   "`*` = peer timed on a sample of the batch in a Python loop and scaled to the batch.\n")
        out.append("| m | batch | method | ms / call | vs TorchJD | accuracy median | accuracy max |")
        out.append("|---:|---:|---|---:|---:|---:|---:|")
        for r in solver_rows:
            tjd = next((q["ms"] for q in solver_rows if q["m"] == r["m"] and q["batch"] == r["batch"]
                        and q["method"] == "TorchJD CAGrad"), float("nan"))
            speed = tjd / r["ms"] if r["ms"] == r["ms"] and r["ms"] > 0 else float("nan")
            star = "*" if r["extrapolated"] else ""
            out.append(f"| {r['m']} | {r['batch']} | {r['method']} | {r['ms']:.3f}{star} | {speed:.1f}x | "
                       f"{r['acc_median']:.1e} | {r['acc_max']:.1e} |")
        out.append("")
    if step_rows:
        out.append("## 2. Training step: median ms per iteration (forward + gradients + SGD step) and ratio to the floor (b)\n")
        out.append("Memory: peak MB allocated by the CPU allocator during one iteration above what was allocated "
                   "before it, plus (ours) the persistent (m, D) gradient buffer that lives between steps. "
                   "Bound for ours: floor peak + m x shared-parameter MB.\n")
        out.append("| model | m | variant | ms | / floor | peak MB | ours - floor MB | bound: m x shared MB | graph freed |")
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---|")
        for r in step_rows:
            fl = next(q for q in step_rows if q["model"] == r["model"] and q["m"] == r["m"] and q["variant"] == "(b) floor")
            extra = bound = ""
            if r["variant"] == "(c) ours":
                extra = f"{r['peak_mb'] - fl['peak_mb']:.1f}"
                bound = f"{r['m'] * r['shared_mb']:.1f}"
            freed = ("yes" if r["graph_freed"] else "NO") if r["variant"] == "(c) ours" else ""
            out.append(f"| {r['model']} | {r['m']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.3f} | "
                       f"{r['peak_mb']:.1f} | {extra} | {bound} | {freed} |")
        out.append("")
        out.append("Combination overhead of ours, `(c) - (b)` as a percentage of the floor:\n")
        out.append("| model | m | floor ms | ours ms | overhead | of which combine() alone (Gram + solve + write-back) |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for r in step_rows:
            if r["variant"] == "(c) ours":
                fl = next(q for q in step_rows if q["model"] == r["model"] and q["m"] == r["m"] and q["variant"] == "(b) floor")
                out.append(f"| {r['model']} | {r['m']} | {fl['ms']:.2f} | {r['ms']:.2f} | {100 * (r['ms'] - fl['ms']) / fl['ms']:+.1f}% | {r['combine_ms']:.2f} ms ({100 * r['combine_ms'] / fl['ms']:.1f}%) |")
        out.append("")
    if lever_rows:
        out.append(f"## 3. Levers inside combine(): float32 buffer of {lever_rows[0]['numel']:,} entries per objective\n")
        out.append("| m | variant | ms (median) | rel. error vs float64 |")
        out.append("|---:|---|---:|---:|")
        for r in lever_rows:
            err = "" if r["rel_error"] != r["rel_error"] else f"{r['rel_error']:.1e}"
            out.append(f"| {r['m']} | {r['variant']} | {r['ms']:.2f} | {err} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd solvers (about a minute of compile per size)")
    parser.add_argument("--sections", default="solver,step,levers", help="comma list of: solver, step, levers")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler-based peak memory")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's); 1 avoids thread-pool wake-up latency on a loaded machine")
    parser.add_argument("--ms", default=None, help="comma list of m for the solver section (default 2,4,8,16,32,64)")
    parser.add_argument("--batches", default=None, help="comma list of solver batch sizes (default 1,1024)")
    parser.add_argument("--models", default=None, help="comma list of step models (default mlp-512,mlp-2048,transformer)")
    parser.add_argument("--step-ms", default=None, help="comma list of m for the step section (default 2,4,8)")
    parser.add_argument("--mlp-batch", type=int, default=64, help="rows per MLP training step (default 64)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    global MLP_BATCH
    MLP_BATCH = args.mlp_batch
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    warnings.filterwarnings("ignore")

    def log(msg: str) -> None:
        print(msg, flush=True)

    header = machine()
    log(f"machine: {header}")
    if args.quick:
        ms_solver, batches, kinds, ms_step = [2, 8], [1, 16], ["mlp-512"], [2]
        repeats, n_acc, peer_sample = args.repeats or 5, 2, 2
    else:
        ms_solver, batches, kinds, ms_step = [2, 4, 8, 16, 32, 64], [1, 1024], ["mlp-512", "mlp-2048", "transformer"], [2, 4, 8]
        repeats, n_acc, peer_sample = args.repeats or 15, 6, 4
    if args.ms:
        ms_solver = [int(v) for v in args.ms.split(",")]
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.models:
        kinds = args.models.split(",")
    if args.step_ms:
        ms_step = [int(v) for v in args.step_ms.split(",")]
    solver_rows = solver_section(ms_solver, batches, repeats, n_acc, peer_sample, args.compile, log) if "solver" in sections else []
    step_rows = step_section(kinds, ms_step, max(5, (2 * repeats) // 3), not args.no_memory, log) if "step" in sections else []
    # the width-2048 MLP's parameter count: the case of the overhead target
    lever_numel = sum(p.numel() for p in make_case("mlp-2048", 2)[0].parameters())
    lever_rows = lever_section(lever_numel, [2, 8] if args.quick else [2, 4, 8], max(3, repeats // 3), log) if "levers" in sections else []
    text = render(solver_rows, step_rows, args, header, lever_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(text + "\n")
    (out / "speed.json").write_text(json.dumps({"machine": header, "solver": solver_rows, "step": step_rows, "levers": lever_rows}, indent=1))
    print()
    print(text)
    log(f"wrote {out / 'speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
