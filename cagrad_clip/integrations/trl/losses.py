"""Per-objective forms of TRL's DPO losses.

Objective ``i`` labels each pair with a sign ``s_i`` (+1: chosen better, -1: rejected better, 0: a
tie). For the losses that depend on a pair only through its score margin ``beta * Delta``
(``Delta`` = the chosen minus the rejected log-ratio against the reference), objective ``i``'s loss
is TRL's with the margin ``z_i = s_i * beta * Delta``: a sign of -1 is the pair with chosen and
rejected swapped, and a tie gives a constant (no gradient; it counts in the mean, as a pair always
does in TRL). IPO and ``sigmoid_norm`` use the margin of per-token averages the same way, and RPO's
NLL term (``"sft"``) is the negative log-likelihood of the response objective ``i`` prefers (none for
a tie). With ``loss_type`` a list, each objective's loss is the ``loss_weights``-weighted sum, as TRL
sums them. At one objective with every sign +1 each form is TRL's loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MARGIN_LOSSES", "UNSUPPORTED_LOSSES", "PairScores", "check_loss_types", "objective_betas", "objective_dpo_losses"]

#: TRL loss types with a per-objective form (see the module docstring).
MARGIN_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm", "sft")

_SEPARATE = "it treats the chosen and rejected log-ratios separately, not through their margin, so a tie (sign 0) has no form"
_SORTED = "it sorts the margins across the batch, which couples the pairs: one objective's loss would depend on the other pairs' order"
#: TRL loss types without one, and why.
UNSUPPORTED_LOSSES = {
    "nca_pair": _SEPARATE,
    "bco_pair": _SEPARATE,
    "sppo_hard": _SEPARATE,
    "apo_zero": _SEPARATE,
    "apo_down": _SEPARATE,
    "aot": _SORTED,
    "aot_unpaired": _SORTED,
}


def check_loss_types(loss_types: list[str]) -> list[str]:
    """The reasons the trainer refuses ``loss_types`` (empty when every one has a per-objective form)."""
    problems = []
    for loss_type in loss_types:
        if loss_type in UNSUPPORTED_LOSSES:
            problems.append(f"loss_type {loss_type!r} ({UNSUPPORTED_LOSSES[loss_type]})")
        elif loss_type not in MARGIN_LOSSES:
            problems.append(f"loss_type {loss_type!r} (unknown; the per-objective forms are {list(MARGIN_LOSSES)})")
    return problems


@dataclass
class PairScores:
    """What the losses need of a batch of ``B`` pairs (rows ``[chosen; rejected]``)."""

    chosen_ratios: Tensor
    """``(B,)``: the chosen response's log-ratio, policy minus reference, summed over its tokens."""
    rejected_ratios: Tensor
    """``(B,)``: the rejected response's."""
    completion_mask: Tensor
    """``(2B, L)``: the completion tokens (TRL's length normalisation counts these)."""
    per_token_logps: Tensor
    """``(2B, L - 1)``: the policy's per-token log-probabilities (aligned with ``completion_mask[:, 1:]``)."""

    @property
    def delta(self) -> Tensor:
        """``(B,)``: ``Delta``, the chosen minus the rejected log-ratio."""
        return self.chosen_ratios - self.rejected_ratios

    @property
    def shift_completion_mask(self) -> Tensor:
        return self.completion_mask[..., 1:]

    def normalized_delta(self) -> Tensor:
        """``(B,)``: the margin of per-token averages (TRL's IPO and ``sigmoid_norm``)."""
        chosen_mask, rejected_mask = self.completion_mask.chunk(2, dim=0)
        return self.chosen_ratios / chosen_mask.sum(dim=1).clamp(min=1.0) - self.rejected_ratios / rejected_mask.sum(dim=1).clamp(min=1.0)


def _preferred_nll(pairs: PairScores, signs: Tensor) -> Tensor:
    """``(m,)``: each objective's mean NLL over the tokens of the responses it prefers (0 with none)."""
    chosen_mask, rejected_mask = (part.to(pairs.per_token_logps.dtype) for part in pairs.shift_completion_mask.chunk(2, dim=0))
    chosen_logps, rejected_logps = pairs.per_token_logps.chunk(2, dim=0)
    chosen_sum, rejected_sum = (chosen_logps * chosen_mask).sum(1), (rejected_logps * rejected_mask).sum(1)  # (B,)
    chosen_count, rejected_count = chosen_mask.sum(1), rejected_mask.sum(1)
    prefers_chosen, prefers_rejected = (signs > 0).to(chosen_sum.dtype), (signs < 0).to(chosen_sum.dtype)  # (B, m)
    total = prefers_chosen.T @ chosen_sum + prefers_rejected.T @ rejected_sum
    count = prefers_chosen.T @ chosen_count + prefers_rejected.T @ rejected_count
    return -total / count.clamp(min=1.0)


def objective_dpo_losses(pairs: PairScores, signs: Tensor, args: Any) -> list[Tensor]:
    """One scalar loss per objective (``signs``: ``(B, m)``) for ``args.loss_type`` / ``args.loss_weights``
    (TRL's ``DPOConfig`` fields; ``beta``, ``label_smoothing`` and ``discopop_tau`` as TRL reads them)."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    weights = args.loss_weights or [1.0] * len(loss_types)
    eps = args.label_smoothing
    beta = objective_betas(args, signs)  # (m,) or a float
    z = signs * beta * pairs.delta.unsqueeze(1)  # (B, m): each objective's signed margin
    decided = signs != 0
    drop_ties = getattr(args, "ties", "keep") == "drop"
    total = torch.zeros(signs.shape[1], dtype=z.dtype, device=z.device)
    for loss_type, weight in zip(loss_types, weights):
        if loss_type == "sigmoid":
            per_pair = -F.logsigmoid(z)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - z)
        elif loss_type in ("ipo", "sigmoid_norm"):
            normalized = signs * pairs.normalized_delta().unsqueeze(1)
            per_pair = (normalized - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * normalized)
        elif loss_type == "robust":
            per_pair = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "exo_pair":
            eps_t = torch.tensor(eps, dtype=z.dtype, device=z.device)
            per_pair = torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps_t)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - torch.log(eps_t)
            )
        elif loss_type == "discopop":
            modulation = torch.sigmoid(z / args.discopop_tau)
            per_pair = -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
        elif loss_type == "sft":
            total = total + weight * _preferred_nll(pairs, signs)
            continue
        else:  # pragma: no cover - the config refuses these (check_loss_types)
            raise ValueError(f"loss_type {loss_type!r} has no per-objective form")
        if drop_ties:  # the mean over each objective's non-tied pairs (0, and no gradient, when it has none)
            mean = torch.where(decided, per_pair, torch.zeros_like(per_pair)).sum(0) / decided.sum(0).clamp(min=1)
        else:
            mean = per_pair.mean(0)
        total = total + weight * mean
    return list(total.unbind(0))


def objective_betas(args: Any, signs: Tensor) -> Tensor | float:
    """Each objective's ``beta``: ``args.objective_betas`` as an ``(m,)`` tensor like ``signs``, else ``args.beta``."""
    betas = getattr(args, "objective_betas", None)
    if betas is None:
        return float(args.beta)
    if len(betas) != signs.shape[1]:
        raise ValueError(f"{len(betas)} objective_betas but the batch has {signs.shape[1]} signs per pair; give one beta per objective")
    return torch.tensor(betas, dtype=signs.dtype, device=signs.device)
