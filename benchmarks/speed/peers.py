"""Optional peers: TorchJD (autojac and autogram), scipy SLSQP as the official CAGrad code calls it, cvxpy.

Every peer is optional: ``HAVE_TORCHJD`` / ``HAVE_CVXPY`` say whether it imported, and the rows of a
missing peer say so in the report.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from .common import C

try:  # optional peer
    from torchjd.aggregation import CAGrad as TJDCAGrad
    from torchjd.aggregation import UPGrad as TJDUPGrad
    from torchjd.aggregation._cagrad import CAGradWeighting as TJDCAGradWeighting
    from torchjd.autojac import backward as tjd_backward
    from torchjd.autojac import jac_to_grad as tjd_jac_to_grad
    from torchjd.autojac import mtl_backward as tjd_mtl_backward

    TJDCAGradWeighting(0.4)  # raises ImportError without cvxpy / clarabel
    HAVE_TORCHJD = True
    TORCHJD_NOTE = f"torchjd {metadata.version('torchjd')}"
except Exception as error:  # noqa: BLE001 - any failure means "peer absent"
    HAVE_TORCHJD = False
    TORCHJD_NOTE = f"TorchJD not available ({type(error).__name__}: {error}); pip install 'torchjd[cagrad]' quadprog qpsolvers"

try:
    from torchjd.autogram import Engine as TJDEngine
except Exception:  # noqa: BLE001
    TJDEngine = None

try:
    import cvxpy as cp

    HAVE_CVXPY = True
except Exception:  # noqa: BLE001
    HAVE_CVXPY = False

__all__ = [
    "HAVE_CVXPY",
    "HAVE_TORCHJD",
    "TJDCAGrad",
    "TJDCAGradWeighting",
    "TJDEngine",
    "TJDUPGrad",
    "TORCHJD_NOTE",
    "dual_value",
    "slsqp_official",
    "tight_reference",
    "tjd_backward",
    "tjd_jac_to_grad",
    "tjd_mtl_backward",
    "torchjd_dual",
]


def dual_value(H: np.ndarray, p: np.ndarray, c: float = C) -> float:
    """``F(p)`` in float64 at ``p`` put back on the simplex.

    A float32 or solver-tolerance ``p`` can sum to ``1 - 1e-8``, which lowers ``F`` by as much and
    would look *better* than the optimum.
    """
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


def torchjd_dual(weighting: Callable[[torch.Tensor], torch.Tensor], H: torch.Tensor) -> np.ndarray:
    """TorchJD's CAGrad weights are ``1/m + (s/n) p``; the dual ``p`` is recovered from them."""
    a = weighting(H).double().numpy()
    m = a.shape[0]
    p = np.clip(a - 1.0 / m, 0.0, None)
    return p / p.sum() if p.sum() > 0 else np.full(m, 1.0 / m)


def tight_reference(H: np.ndarray, c: float = C) -> np.ndarray | None:
    """Independent tight reference: ``tests/reference.py`` (m <= 8) and/or Clarabel at 1e-10 tolerances."""
    m = H.shape[0]
    candidates = []
    if m <= 8:
        with contextlib.suppress(Exception):
            root = str(Path(__file__).resolve().parents[2])
            if root not in sys.path:
                sys.path.insert(0, root)
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
