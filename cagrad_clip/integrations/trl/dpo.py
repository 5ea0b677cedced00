"""TRL's ``DPOTrainer`` with one DPO loss per objective (see the package docstring)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('cagrad_clip.integrations.trl needs TRL: pip install "cagrad-clip[trl]"') from exc

from .. import check_module_patterns, check_weights, optimizer_options
from ..hf import MultiObjectiveTrainerMixin
from .losses import PairScores, check_loss_types, objective_betas, objective_dpo_losses
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
        solver, max_iter, memory, accumulate_dtype, nonfinite: passed to
            :class:`~cagrad_clip.ConflictAverseOptimizer` (``accumulate_dtype`` by name: ``"float32"``;
            ``nonfinite=None``: ``"skip"``, or ``"ignore"`` under fp16, whose scaler checks).
        shared_modules: ``fnmatch`` patterns of module names (``model.named_modules()``, e.g.
            ``["transformer.h.*"]``): the Gram is measured on their trainable parameters only.
        objective_betas: one DPO ``beta`` per objective (``None``: ``beta`` for all): objective ``i``'s
            margin is ``s_i * beta_i * Delta``.
        ties: ``"keep"`` (a tie counts in the objective's mean with a constant loss, as TRL counts every
            pair) or ``"drop"`` (an objective's loss averages only its non-tied pairs of the batch; a
            batch with none gives that objective a zero gradient).
    """

    objective_weights: list[float] | None = field(default=None, metadata={"help": "User weights w, one per objective."})
    objective_names: list[str] | None = field(default=None, metadata={"help": "Objective names for the logs."})
    c: float = field(default=0.4, metadata={"help": "Trust-region radius of the conflict-averse correction (0: weighted sum)."})
    clip: bool = field(default=True, metadata={"help": "RACO's clip of the dual to w (False: CAGrad, weighted anchor)."})
    rescale: str | None = field(default=None, metadata={"help": "None, '1+c' or '1+c^2'."})
    solver: str = field(default="auto", metadata={"help": "The dual solver: 'auto', 'exact' or 'frank_wolfe'."})
    max_iter: int | None = field(default=None, metadata={"help": "Frank-Wolfe iterations (None: the default for m)."})
    shared_modules: list[str] | None = field(default=None, metadata={"help": "Module-name patterns of the shared parameters."})
    memory: str = field(default="default", metadata={"help": "'default' (m - 1 stored gradients) or 'low'."})
    accumulate_dtype: str | None = field(default=None, metadata={"help": "None, 'float32' or 'float64'."})
    nonfinite: str | None = field(default=None, metadata={"help": "'skip', 'raise' or 'ignore' (None: skip; ignore under fp16)."})
    signs_column: str = field(default="objective_signs", metadata={"help": "Column of per-objective signs in {+1, -1, 0}."})
    objective_betas: list[float] | None = field(default=None, metadata={"help": "One DPO beta per objective (None: beta)."})
    ties: str = field(default="keep", metadata={"help": "'keep' (ties count in the mean) or 'drop' (mean over non-tied pairs)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.objective_weights, self.objective_names = check_weights(self.objective_weights, self.objective_names)
        options = optimizer_options(  # bad values raise here, by the library's own checks
            c=self.c,
            clip=self.clip,
            rescale=self.rescale,
            solver=self.solver,
            max_iter=self.max_iter,
            memory=self.memory,
            accumulate_dtype=self.accumulate_dtype,
            nonfinite=self.nonfinite,
        )
        self.c, self.clip, self.rescale = options["c"], options["clip"], options["rescale"]
        self.shared_modules = check_module_patterns(self.shared_modules)
        if self.objective_betas is not None:
            betas = list(self.objective_betas)
            if not betas or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0 for b in betas):
                raise ValueError(f"objective_betas must be finite numbers > 0, one per objective; got {self.objective_betas!r}")
            for other in ("objective_weights", "objective_names"):
                given = getattr(self, other)
                if given is not None and len(given) != len(betas):
                    raise ValueError(f"{len(betas)} objective_betas but {len(given)} {other}; give one beta per objective")
            self.objective_betas = [float(b) for b in betas]
        if self.ties not in ("keep", "drop"):
            raise ValueError(f"ties must be 'keep' or 'drop', got {self.ties!r}")
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unsupported = check_loss_types(loss_types)
        if self.ld_alpha is not None:
            unsupported.append(f"ld_alpha={self.ld_alpha} (length-desensitised log-probs are not implemented here)")
        if self.f_divergence_type != "reverse_kl":
            unsupported.append(f"f_divergence_type={self.f_divergence_type!r} (not implemented here)")
        if self.use_weighting:
            unsupported.append("use_weighting=True (WPO's weights are not implemented here)")
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
    if args.objective_betas is not None:
        return len(args.objective_betas), "objective_betas"
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
            solver=args.solver,
            max_iter=args.max_iter,
            memory=args.memory,
            accumulate_dtype=args.accumulate_dtype,
            nonfinite=args.nonfinite,
            shared_modules=args.shared_modules,
            **kwargs,
        )
        if self._is_vision_dataset:
            raise ValueError("MultiObjectiveDPOTrainer supports text preference data only (no images)")
        if self.aux_loss_enabled:
            raise ValueError("MultiObjectiveDPOTrainer does not support an MoE auxiliary loss; set router_aux_loss_coef=0.0")
        self.signs_column = args.signs_column
        self.data_collator = SignsCollator(self.data_collator, args.signs_column, m, source)
        self._pending_tokens: Tensor | int = 0  # training tokens since the last log (this process; no host read)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns: list[str] = list(self._signature_columns or [])
        if self.args.signs_column not in columns:
            self._signature_columns = [*columns, self.args.signs_column]

    def objective_batch_size(self, inputs: dict[str, Any]) -> int:
        return int(inputs["input_ids"].shape[0]) // 2  # [chosen; rejected]

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.maybe_activation_offload_context:
            return MultiObjectiveTrainerMixin.training_step(self, *args, **kwargs)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != self.args.signs_column}
        return super().compute_ref_log_probs(model, inputs)

    def objective_losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
        """One policy forward (TRL's fused LM head) and one reference forward; one DPO loss per objective:
        the config's ``loss_type`` (and ``loss_weights``) applied to each objective's signed pairs."""
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
        per_token_logps = outputs.log_probs[:, -seq_len:]
        logps = per_token_logps.sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)
        chosen_ratios, rejected_ratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        signs = signs.to(device=chosen_logps.device, dtype=chosen_logps.dtype)
        pairs = PairScores(chosen_ratios, rejected_ratios, completion_mask, per_token_logps)
        losses = objective_dpo_losses(pairs, signs, self.args)

        mode = "train" if model.training else "eval"
        with torch.no_grad():
            self._record_dpo_metrics(mode, outputs, inputs, pairs, signs, chosen_logps, rejected_logps)
        return losses

    def _record_dpo_metrics(
        self,
        mode: str,
        outputs: Any,
        inputs: dict[str, Any],
        pairs: PairScores,
        signs: Tensor,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
    ) -> None:
        """TRL's ``DPOTrainer`` metrics under its names, and the per-objective rewards, as (total, count)
        over this process's items: :meth:`log` sums them over the processes (no host read here)."""
        record = self.record_objective_metric
        n = chosen_logps.shape[0]
        signed = signs * objective_betas(self.args, signs) * pairs.delta.unsqueeze(1)  # (B, m)
        decided = signs != 0
        record(mode, "rewards/{}/margins", (signed * decided).sum(0), decided.sum(0))
        record(mode, "rewards/{}/accuracies", ((signed > 0) & decided).sum(0), decided.sum(0))
        chosen_rewards, rejected_rewards = self.beta * pairs.chosen_ratios.detach(), self.beta * pairs.rejected_ratios.detach()
        record(mode, "rewards/chosen", chosen_rewards.sum(), n)
        record(mode, "rewards/rejected", rejected_rewards.sum(), n)
        record(mode, "rewards/accuracies", (chosen_rewards > rejected_rewards).sum(), n)
        record(mode, "rewards/margins", (chosen_rewards - rejected_rewards).sum(), n)
        record(mode, "logps/chosen", chosen_logps.detach().sum(), n)
        record(mode, "logps/rejected", rejected_logps.detach().sum(), n)
        seq_len = pairs.shift_completion_mask.shape[1]
        mask = pairs.shift_completion_mask
        record(mode, "entropy", (outputs.entropy[:, -seq_len:].detach() * mask).sum(), mask.sum())
        chosen_mask, rejected_mask = (part.bool() for part in mask.chunk(2, dim=0))
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
        record(mode, "logits/chosen", chosen_logits[chosen_mask].sum(), chosen_mask.sum())
        record(mode, "logits/rejected", rejected_logits[rejected_mask].sum(), rejected_mask.sum())
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        record(mode, "mean_token_accuracy", (chosen_top1 & chosen_mask).sum(), chosen_mask.sum())
        if mode == "train":
            self._pending_tokens = self._pending_tokens + inputs["attention_mask"].sum()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """TRL's ``num_tokens`` (training tokens so far, all processes) joins the metrics of the mixin."""
        if self.model.training and "train_runtime" not in logs:
            pending = self._pending_tokens
            if isinstance(pending, Tensor):
                if getattr(self.accelerator, "num_processes", 1) > 1:
                    pending = self.accelerator.reduce(pending, reduction="sum")
                self._total_train_tokens += int(pending) // getattr(self, "_tp_size", 1)
            self._pending_tokens = 0
            logs["num_tokens"] = float(self._total_train_tokens)
        super().log(logs, *args, **kwargs)
