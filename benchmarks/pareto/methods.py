"""Combination rules compared by the Pareto benchmarks, all batched over runs.

Every rule maps per-run gradients ``G`` of shape ``(R, m, d)``, their Gram matrices
``H = G G^T`` of shape ``(R, m, m)`` and user weights ``W`` of shape ``(R, m)`` to update
directions of shape ``(R, d)``. Rules of our own work on ``H`` only (coefficients ``a`` with
``d = sum_i a_i g_i``); there is no Python loop over runs. Baselines that are not ours
(MGDA, PCGrad, TorchJD peers) live here, not in the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cagrad_clip import solve_cagrad

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "Method",
    "available_methods",
    "get_methods",
    "min_norm_coefficients",
    "pcgrad_coefficients",
    "torchjd_available",
]


def min_norm_coefficients(gram: Tensor, max_iter: int | None = None) -> Tensor:
    """MGDA: ``argmin_{p in simplex} p^T H p`` for a batch of Gram matrices ``(..., m, m)``.

    ``m = 2`` in closed form; otherwise pairwise Frank-Wolfe (move mass from the worst active
    vertex to the best vertex) with an exact line search, for a fixed number of iterations
    (default ``max(60, 25 m)``). Starts at the vertex of least norm.
    """
    m = gram.shape[-1]
    H = 0.5 * (gram + gram.mT)
    if m == 1:
        return torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
    diag = H.diagonal(dim1=-2, dim2=-1)
    tiny = torch.finfo(H.dtype).eps * diag.amax(-1).clamp_min(torch.finfo(H.dtype).tiny)
    if m == 2:
        h11, h22, h12 = H[..., 0, 0], H[..., 1, 1], H[..., 0, 1]
        den = h11 + h22 - 2.0 * h12
        safe = den > tiny
        p1 = torch.where(safe, (h22 - h12) / torch.where(safe, den, torch.ones_like(den)), torch.full_like(den, 0.5))
        p1 = p1.clamp(0.0, 1.0)
        return torch.stack([p1, 1.0 - p1], -1)
    if max_iter is None:
        max_iter = max(60, 25 * m)
    idx = torch.arange(m, device=H.device)
    p = (idx == diag.argmin(-1, keepdim=True)).to(H.dtype)
    for _ in range(max_iter):
        hp = (H @ p.unsqueeze(-1)).squeeze(-1)
        j = hp.argmin(-1, keepdim=True)
        k = torch.where(p > 0, hp, torch.full_like(hp, -torch.inf)).argmax(-1, keepdim=True)
        hpj, hpk = hp.gather(-1, j), hp.gather(-1, k)
        hjj = diag.gather(-1, j)
        hkk = diag.gather(-1, k)
        hjk = H.gather(-2, j.unsqueeze(-1).expand(*j.shape[:-1], 1, m)).squeeze(-2).gather(-1, k)
        curv = hjj + hkk - 2.0 * hjk
        pk = p.gather(-1, k)
        ok = curv > tiny.unsqueeze(-1)
        gamma = torch.where(ok, (hpk - hpj) / torch.where(ok, curv, torch.ones_like(curv)), pk)
        gamma = torch.where(hpk > hpj, gamma.clamp(min=0.0).minimum(pk), torch.zeros_like(gamma))
        p = p.scatter_add(-1, j, gamma).scatter_add(-1, k, -gamma).clamp_min(0.0)
    return p / p.sum(-1, keepdim=True)


def pcgrad_coefficients(gram: Tensor, weights: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad (Yu et al. 2020) in coefficient space, batched over ``(R, m, m)`` Grams.

    Each ``g_i`` is projected, in a random order drawn per run and per ``i`` (seeded by
    ``generator``), off every other original ``g_j`` it conflicts with. The direction is the
    ``w``-weighted sum of the projected gradients (the paper's sum up to the factor ``m`` when
    ``w`` is uniform). Returns ``a`` with ``d = sum_k a_k g_k``.
    """
    R, m, _ = gram.shape
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    coef = eye.expand(R, m, m).clone()  # row i: g_i^PC = sum_k coef[:, i, k] g_k
    order = torch.rand((R, m, m), generator=generator, dtype=torch.float64).argsort(-1).to(gram.device)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    rows = torch.arange(R, device=gram.device)
    for i in range(m):
        ci = coef[:, i, :]
        for t in range(m):
            j = order[:, i, t]  # (R,)
            gj = gram[rows, :, j]  # (R, m): <g_k, g_j>
            dot = (ci * gj).sum(-1)
            hjj = diag[rows, j]
            project = (dot < 0) & (j != i) & (hjj > 0)
            step = torch.where(project, dot / torch.where(hjj > 0, hjj, torch.ones_like(hjj)), torch.zeros_like(dot))
            ci = ci - step.unsqueeze(-1) * torch.nn.functional.one_hot(j, m).to(gram.dtype)
        coef[:, i, :] = ci
    w = weights / weights.sum(-1, keepdim=True)
    return (w.unsqueeze(-1) * coef).sum(-2)


def torchjd_available() -> bool:
    """Whether the optional peer library ``torchjd`` can be imported."""
    try:
        import torchjd.aggregation  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


@dataclass
class Method:
    """One combination rule. ``rule(G, H, W, generator) -> (R, d)`` directions."""

    name: str
    label: str
    rule: Callable[[Tensor, Tensor, Tensor, torch.Generator], Tensor]
    respects_w: bool
    conflict_averse: bool
    external: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    def direction(self, G: Tensor, H: Tensor, W: Tensor, generator: torch.Generator) -> Tensor:
        return self.rule(G, H, W, generator)

    @property
    def reports_clip(self) -> bool:
        """Whether :meth:`direction_and_clip` tells the clip's effect (the CAGrad family)."""
        return "clip_rule" in self.extra

    def direction_and_clip(self, G: Tensor, H: Tensor, W: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The directions ``(R, d)`` and, per run, how much RACO's clip changes (or would change) the
        direction, ``||d(p~) - d(p)|| / ||g0||``, and whether it was active (the same solve)."""
        return self.extra["clip_rule"](G, H, W, generator)


def _combine(a: Tensor, G: Tensor) -> Tensor:
    return torch.einsum("rm,rmd->rd", a, G)


def _weighted(G: Tensor, H: Tensor, W: Tensor, gen: torch.Generator) -> Tensor:
    return _combine(W / W.sum(-1, keepdim=True), G)


def _mgda(G: Tensor, H: Tensor, W: Tensor, gen: torch.Generator) -> Tensor:
    return _combine(min_norm_coefficients(H), G)


def _pcgrad(G: Tensor, H: Tensor, W: Tensor, gen: torch.Generator) -> Tensor:
    return _combine(pcgrad_coefficients(H, W, gen), G)


def _cagrad_clip_rule(c: float, clip: bool, rescale: str | None) -> Callable[[Tensor, Tensor, Tensor, torch.Generator], tuple]:
    def rule(G: Tensor, H: Tensor, W: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        solution = solve_cagrad(H, W, c=c, clip=clip, rescale=rescale, validate=False)
        return _combine(solution.coefficients, G), solution.clip_change, solution.clip_active

    return rule


def _cagrad(name: str, label: str, c: float, clip: bool, rescale: str | None, note: str = "") -> Method:
    clip_rule = _cagrad_clip_rule(c, clip, rescale)
    return Method(name, label, lambda G, H, W, gen: clip_rule(G, H, W, gen)[0], True, True, note=note, extra={"clip_rule": clip_rule})


def _torchjd_rule(kind: str, c: float) -> Callable[[Tensor, Tensor, Tensor, torch.Generator], Tensor]:
    def rule(G: Tensor, H: Tensor, W: Tensor, gen: torch.Generator) -> Tensor:  # pragma: no cover - optional
        from torchjd import aggregation

        agg = aggregation.UPGrad() if kind == "upgrad" else aggregation.CAGrad(c=c)
        # TorchJD aggregates one Jacobian at a time: the one loop over runs in this benchmark.
        return torch.stack([agg(G[r]) for r in range(G.shape[0])])

    return rule


def build_methods(c: float = 0.4) -> dict[str, Method]:
    """All methods, keyed by CLI name, with trust-region radius ``c`` for the CAGrad family."""
    methods = {
        "weighted": Method("weighted", "Weighted sum (DPO-LW)", _weighted, True, False),
        "mgda": Method("mgda", "MGDA (min-norm)", _mgda, False, True, note="ignores w"),
        "pcgrad": Method("pcgrad", "PCGrad", _pcgrad, False, True, note="w-weighted sum of projected gradients"),
        "cagrad": _cagrad("cagrad", f"CAGrad (c={c})", c, False, None, note="weighted anchor, no clip"),
        "cagrad-official": _cagrad("cagrad-official", f"CAGrad /(1+c²) (c={c})", c, False, "1+c^2", note="official rescale 1/(1+c^2)"),
        "raco": _cagrad("raco", f"RACO (c={c}, clip)", c, True, None),
        "torchjd-upgrad": Method("torchjd-upgrad", "TorchJD UPGrad", _torchjd_rule("upgrad", c), False, True, external=True),
        "torchjd-cagrad": Method(
            "torchjd-cagrad",
            f"TorchJD CAGrad (c={c})",
            _torchjd_rule("cagrad", c),
            False,
            True,
            external=True,
        ),
    }
    return methods


METHODS: dict[str, Method] = build_methods()
DEFAULT_METHODS: tuple[str, ...] = ("weighted", "mgda", "pcgrad", "cagrad", "cagrad-official", "raco")


def available_methods() -> list[str]:
    """Method names usable here (TorchJD peers only when ``torchjd`` is installed)."""
    names = list(DEFAULT_METHODS)
    if torchjd_available():
        names += ["torchjd-upgrad", "torchjd-cagrad"]
    return names


def get_methods(names: list[str] | tuple[str, ...], c: float = 0.4) -> list[Method]:
    """Look up methods by name; raises ``ValueError`` naming the unknown ones."""
    table = build_methods(c)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(table)}")
    return [table[n] for n in names]
