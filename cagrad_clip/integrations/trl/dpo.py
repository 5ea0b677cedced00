"""TRL's ``DPOTrainer`` with one DPO loss per objective (see the package docstring)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('cagrad_clip.integrations.trl needs TRL: pip install "cagrad-clip[trl]"') from exc

from cagrad_clip import CAGradSettings

from .. import check_weights
from ..hf import MultiObjectiveTrainerMixin
from .signs import SignsCollator, check_dataset

__all__ = ["MultiObjectiveDPOConfig", "MultiObjectiveDPOTrainer"]

_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


@dataclass
class MultiObjectiveDPOConfig(DPOConfig):
    """``DPOConfig`` plus the multi-objective settings.

    Args:
        objective_weights: user weights ``w``, one per objective (finite, ``>= 0``, positive sum;
            normalised). ``None``: uniform over the number of signs in the data.
        objective_names: names used in the logs (default ``objective_0``, ...).
        c: trust-region radius of the conflict-averse correction (``0``: the weighted sum of the DPO losses).
        clip: RACO's clip of the dual solution to ``w`` (``False``: CAGrad with a weighted anchor).
        rescale: ``None``, ``"1+c"`` or ``"1+c^2"`` (see :class:`~cagrad_clip.ConflictAverseOptimizer`).
        signs_column: the dataset column with the per-objective preference signs.
    """

    objective_weights: list[float] | None = field(default=None, metadata={"help": "User weights w, one per objective."})
    objective_names: list[str] | None = field(default=None, metadata={"help": "Objective names for the logs."})
    c: float = field(default=0.4, metadata={"help": "Trust-region radius of the conflict-averse correction (0: weighted sum)."})
    clip: bool = field(default=True, metadata={"help": "RACO's clip of the dual to w (False: CAGrad, weighted anchor)."})
    rescale: str | None = field(default=None, metadata={"help": "None, '1+c' or '1+c^2'."})
    signs_column: str = field(default="objective_signs", metadata={"help": "Column of per-objective signs in {+1, -1, 0}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.objective_weights, self.objective_names = check_weights(self.objective_weights, self.objective_names)
        checked = CAGradSettings(c=self.c, clip=self.clip, rescale=self.rescale)  # bad values raise here
        self.c, self.clip, self.rescale = checked.c, checked.clip, checked.rescale
        unsupported = []
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_types != ["sigmoid"]:
            unsupported.append(f"loss_type={loss_types} (only the sigmoid DPO loss has a per-objective sign form)")
        if self.loss_weights not in (None, [1.0]):
            unsupported.append(f"loss_weights={self.loss_weights} (use objective_weights)")
        if self.ld_alpha is not None:
            unsupported.append(f"ld_alpha={self.ld_alpha}")
        if self.f_divergence_type != "reverse_kl":
            unsupported.append(f"f_divergence_type={self.f_divergence_type!r}")
        if self.use_weighting:
            unsupported.append("use_weighting=True")
        if self.label_smoothing:
            unsupported.append(f"label_smoothing={self.label_smoothing}")
        if self.padding_free:
            unsupported.append("padding_free=True")
        if self.router_aux_loss_coef:
            unsupported.append(f"router_aux_loss_coef={self.router_aux_loss_coef} (an MoE auxiliary loss is not an objective)")
        if unsupported:
            raise ValueError("MultiObjectiveDPOTrainer does not support " + "; ".join(unsupported) + ". Leave these at TRL's defaults.")
        if self.gradient_checkpointing:  # non-reentrant unless asked (torch's recommendation; reentrant needs inputs that require grad)
            raw = self.gradient_checkpointing_kwargs or {}
            kwargs: dict[str, Any] = dict(json.loads(raw) if isinstance(raw, str) else raw)
            kwargs.setdefault("use_reentrant", False)
            self.gradient_checkpointing_kwargs = kwargs


def _expected_objectives(args: MultiObjectiveDPOConfig) -> tuple[int | None, str]:
    """How many objectives the config implies, and which field says so (``None``: only the data knows).

    ``check_weights`` already made the two fields agree when both are given.
    """
    if args.objective_weights is not None:
        return len(args.objective_weights), "objective_weights"
    if args.objective_names is not None:
        return len(args.objective_names), "objective_names"
    return None, ""


class MultiObjectiveDPOTrainer(MultiObjectiveTrainerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with one DPO loss per objective and a conflict-averse combination.

    Takes the same arguments as ``DPOTrainer``; ``args`` must be a :class:`MultiObjectiveDPOConfig`.
    ``optimizers=(opt, scheduler)`` accepts a :class:`~cagrad_clip.ConflictAverseOptimizer` (used as is)
    or a plain optimizer (wrapped with the config's settings).

    Logged every logging step: ``loss/<objective>``, ``rewards/<objective>/margins`` (mean of
    ``s_i * beta * Delta`` over the pairs that are not ties for the objective),
    ``rewards/<objective>/accuracies``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    and the last step's ``coef/<objective>`` (the coefficients ``a``) and ``cos/<a>|<b>``.
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: MultiObjectiveDPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MultiObjectiveDPOConfig):
            raise TypeError(f"args must be a MultiObjectiveDPOConfig, got {type(args).__name__}")
        # The number of objectives: from the weights, else from the names (with objective_weights=None the
        # signs' length sets it, so mismatched names must be refused against the data, not at the first log).
        m, source = _expected_objectives(args)
        if train_dataset is not None:
            check_dataset(train_dataset, args.signs_column, m, "train_dataset", source)
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
        for name, ds in evals:
            if ds is not None:
                check_dataset(ds, args.signs_column, m, str(name), source)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            objective_weights=args.objective_weights,
            objective_names=args.objective_names,
            c=args.c,
            clip=args.clip,
            rescale=args.rescale,
            **kwargs,
        )
        if self._is_vision_dataset:
            raise ValueError("MultiObjectiveDPOTrainer supports text preference data only (no images)")
        if self.aux_loss_enabled:
            raise ValueError("MultiObjectiveDPOTrainer does not support an MoE auxiliary loss; set router_aux_loss_coef=0.0")
        self.signs_column = args.signs_column
        self.data_collator = SignsCollator(self.data_collator, args.signs_column, m, source)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns: list[str] = list(self._signature_columns or [])
        if self.args.signs_column not in columns:
            self._signature_columns = [*columns, self.args.signs_column]  # type: ignore[assignment]

    def objective_batch_size(self, inputs: dict[str, Any]) -> int:
        return int(inputs["input_ids"].shape[0]) // 2  # [chosen; rejected]

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.maybe_activation_offload_context:
            return MultiObjectiveTrainerMixin.training_step(self, *args, **kwargs)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != self.args.signs_column}
        return super().compute_ref_log_probs(model, inputs)

    def objective_losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
        """One policy forward (TRL's fused LM head) and one reference forward; one DPO loss per objective."""
        column = self.args.signs_column
        if column not in inputs:
            raise KeyError(f"the batch has no {column!r}; was the collator replaced? (keys: {sorted(inputs)})")
        signs = inputs[column]
        inputs = {k: v for k, v in inputs.items() if k != column}
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.shape[1] - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        logits = chosen_rewards - rejected_rewards  # beta * Delta, (B,)
        signs = signs.to(device=logits.device, dtype=logits.dtype)
        signed = signs * logits.unsqueeze(1)  # (B, m)
        losses = [-F.logsigmoid(signed[:, i]).mean() for i in range(signs.shape[1])]

        mode = "train" if model.training else "eval"
        with torch.no_grad():
            decided = signs != 0
            count = decided.sum(0).clamp_min(1).to(logits.dtype)
            self.record_objective_metric(mode, "rewards/{}/margins", (signed * decided).sum(0) / count)
            self.record_objective_metric(mode, "rewards/{}/accuracies", ((signed > 0) & decided).sum(0) / count)
            self.record_objective_metric(mode, "rewards/chosen", chosen_rewards.mean())
            self.record_objective_metric(mode, "rewards/rejected", rejected_rewards.mean())
            self.record_objective_metric(mode, "rewards/margins", logits.mean())
        return losses
