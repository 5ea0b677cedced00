"""Multi-objective training with a plain Hugging Face ``Trainer``: a mixin with one hook.

::

    class MyTrainer(MultiObjectiveTrainerMixin, transformers.Trainer):
        def objective_losses(self, model, inputs):
            out = model(input_ids=inputs["input_ids"])
            return [quality(out, inputs), brevity(out, inputs)]   # one scalar per objective

    MyTrainer(model=model, args=args, train_dataset=ds, objective_weights=[0.8, 0.2], c=0.4).train()

What the mixin does for you:

* builds the optimizer as the ``Trainer`` does (``optim``, learning rate, weight-decay groups, scheduler)
  and wraps it in :class:`~cagrad_clip.ConflictAverseOptimizer`; a plain optimizer passed through
  ``optimizers=(opt, sched)`` is wrapped too, a ``ConflictAverseOptimizer`` is used as is;
* ``training_step`` runs the ``m`` backward passes. With gradient accumulation each micro-batch's losses
  are weighted by its share of the window's examples (so a window, a short last one included, gives the
  update of one batch of the same total size) and the dual is solved once, on the window's last
  micro-batch; the ``Trainer`` then clips the combined direction (``max_grad_norm``) and steps;
* with fp16 loss scaling, each objective's loss is scaled (the combination is positively homogeneous, so
  the scaled gradients combine exactly and ``GradScaler`` unscales the combined direction);
* evaluation calls the same hook (the inputs are never passed to ``model.forward`` wholesale) and
  reports the weighted loss;
* logs ``loss/<objective>`` every logging step, and the coefficients ``coef/<objective>`` and pairwise
  gradient cosines ``cos/<a>|<b>`` of the last step, read from ``opt.last`` once per logging step
  (no host sync on the other steps).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._distributed import _dtensor_types

from . import (
    MultiObjectiveOptimizer,
    check_module_patterns,
    check_weights,
    find_conflict_averse,
    objective_names,
    optimizer_options,
    require_conflict_averse,
    shared_parameters,
)

__all__ = ["MultiObjectiveTrainerMixin"]

logger = logging.getLogger(__name__)


def check_no_deepspeed(trainer: Any) -> None:
    """Refuse DeepSpeed: its engine runs the backward pass and partitions the gradients (ZeRO-2/3) in its
    own buffers, so ``.grad`` never holds an objective's gradient to keep apart; FSDP2 is the way to shard."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            "DeepSpeed is not supported: its engine runs the backward pass and keeps (ZeRO-2/3: partitions) the "
            "gradients in its own buffers, so the per-objective gradients the conflict-averse direction needs are "
            "never in .grad. Shard with FSDP2 instead (fsdp_config={'fsdp_version': 2}; docs/integrations.md)"
        )


def check_sharding(trainer: Any) -> None:
    """Refuse a model sharded by hand (``fully_shard`` before the trainer) when the ``Trainer``'s own FSDP
    is off: on several processes accelerate would wrap it in DDP, which cannot take DTensor shards."""
    if getattr(trainer.args, "world_size", 1) <= 1 or getattr(trainer, "is_fsdp_enabled", False):
        return
    types = _dtensor_types()
    if types is not None and any(isinstance(p, types[0]) for p in trainer.model.parameters()):
        raise ValueError(
            "the model's parameters are FSDP2 shards (fully_shard was applied before the trainer) but the Trainer's FSDP is "
            "off: accelerate would wrap the model in DDP, which cannot take DTensor shards. Let the Trainer shard it "
            "(fsdp=True, fsdp_config={'fsdp_version': 2}; GPUs), or train with ConflictAverseOptimizer directly "
            "(docs/distributed.md)"
        )


class MultiObjectiveTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (list it *before* the ``Trainer``) and implement
    :meth:`objective_losses`.

    Extra keyword arguments of the constructor: ``objective_weights`` (user weights ``w``, default
    uniform), ``objective_names`` (for the logs; default ``objective_0``, ...), ``c``, ``clip``,
    ``rescale`` and ``nonfinite`` (passed to :class:`~cagrad_clip.ConflictAverseOptimizer`; without
    ``nonfinite`` the library's ``"skip"``, or ``"ignore"`` under ``fp16``, whose ``GradScaler`` checks),
    ``solver``, ``max_iter``, ``memory``, ``accumulate_dtype`` (a dtype or ``"float32"``/``"float64"``),
    ``shared_modules`` (``fnmatch`` patterns of module names, e.g. ``["transformer.h.*"]``: the Gram is
    measured on their parameters), and ``objective_columns``: the dataset columns :meth:`objective_losses` reads besides the model's
    inputs, which the ``Trainer``'s ``remove_unused_columns=True`` (its default) would otherwise drop
    from a ``datasets.Dataset``.
    """

    #: With ``logging_strategy="no"`` only this many recent training steps' metrics are kept for a manual
    #: :meth:`log` (without the cap a long run would hold every step's small tensors until train() ends).
    unlogged_metric_steps: int = 64

    #: The optimizer types :meth:`training_step` accepts (walked to through accelerate's wrapper): any
    #: :class:`~cagrad_clip.integrations.MultiObjectiveOptimizer` (a subclass may narrow it).
    multi_objective_types: tuple[type, ...] = (MultiObjectiveOptimizer,)

    # Attributes the Trainer provides (declared for readers and type checkers).
    args: Any
    model: Any
    optimizer: Any
    accelerator: Any
    _signature_columns: Any

    def __init__(
        self,
        *args: Any,
        objective_weights: Sequence[float] | None = None,
        objective_names: Sequence[str] | None = None,
        c: float = 0.4,
        clip: bool = True,
        rescale: str | None = None,
        solver: str = "auto",
        max_iter: int | None = None,
        shared_modules: Sequence[str] | None = None,
        memory: str = "default",
        accumulate_dtype: Any = None,
        nonfinite: Any = None,
        objective_columns: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.objective_weights, self.objective_names = check_weights(objective_weights, objective_names)
        if objective_columns is not None and (isinstance(objective_columns, str) or not all(isinstance(c, str) for c in objective_columns)):
            raise TypeError(f"objective_columns must be a list of column names, got {objective_columns!r}")
        #: dataset columns objective_losses reads, kept when the Trainer removes the ones model.forward does not take
        self.objective_columns = list(objective_columns or [])
        # bad values raise here, early; a nonfinite= given wins over the fp16 default of wrap_optimizer
        self.conflict_averse_kwargs: dict[str, Any] = optimizer_options(
            c=c,
            clip=clip,
            rescale=rescale,
            solver=solver,
            max_iter=max_iter,
            memory=memory,
            accumulate_dtype=accumulate_dtype,
            nonfinite=nonfinite,
        )
        #: fnmatch patterns of the modules whose parameters the Gram is measured on (None: all parameters)
        self.shared_modules = check_module_patterns(shared_modules)
        self._window: list[Any] | None = None  # [sizes of the window's micro-batches, index of the next one]
        #: per mode and key, this process's (total, count) of every step since the last log
        self._objective_store: dict[str, dict[str, list[tuple[Tensor, Tensor]]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)
        check_no_deepspeed(self)
        check_sharding(self)
        if self.shared_modules is not None:
            shared_parameters(self.model, self.shared_modules)  # a pattern that matches nothing is refused now, not at train()
        if self.optimizer is not None and find_conflict_averse(self.optimizer, self.multi_objective_types) is None:
            self.optimizer = self.wrap_optimizer(self.optimizer)

    # ------------------------------------------------------------------ the hook
    def objective_losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Sequence[Tensor]:
        """One scalar loss per objective for this (micro-)batch, each a mean over its examples. Override."""
        raise NotImplementedError(f"{type(self).__name__} must implement objective_losses(model, inputs)")

    def _objective_losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
        """:meth:`objective_losses`, with a missing input that the Trainer removed named with the fix."""
        try:
            return list(self.objective_losses(model, inputs))
        except KeyError as error:
            key = error.args[0] if error.args else None
            if isinstance(key, str) and key not in inputs and getattr(self.args, "remove_unused_columns", False):
                raise KeyError(
                    f"objective_losses read inputs[{key!r}], which the batch does not have: with remove_unused_columns=True "
                    "(the Trainer's default) a datasets.Dataset keeps only model.forward's arguments. Pass "
                    f"objective_columns=[{key!r}, ...] (every column objective_losses reads) to the trainer, or set "
                    "remove_unused_columns=False"
                ) from error
            raise

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns: list[str] = list(getattr(self, "_signature_columns", None) or [])
        extra = [c for c in self.objective_columns if c not in columns]
        if extra:
            self._signature_columns = [*columns, *extra]

    def objective_batch_size(self, inputs: dict[str, Any]) -> int:
        """Number of examples the losses of ``inputs`` average over (default: the first tensor's length)."""
        for value in inputs.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                return int(value.shape[0])
        raise ValueError("cannot tell the batch size of the inputs; override objective_batch_size()")

    # ------------------------------------------------------------------ optimizer
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wrap a base optimizer in :class:`~cagrad_clip.ConflictAverseOptimizer` with this trainer's settings."""
        # With fp16 the GradScaler checks for Inf/NaN itself: no second (host-syncing) check, unless the
        # user chose a policy (nonfinite=, or conflict_averse_kwargs["nonfinite"]).
        options = dict(self.conflict_averse_kwargs)
        options.setdefault("nonfinite", "ignore" if getattr(self.args, "fp16", False) else "skip")
        if self.shared_modules is not None:
            options["shared"] = shared_parameters(self.model, self.shared_modules)
        return ConflictAverseOptimizer(optimizer, weights=self.objective_weights, **options)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer (``optim``, learning rate, weight-decay groups), wrapped."""
        super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        if find_conflict_averse(self.optimizer, self.multi_objective_types) is None:
            self.optimizer = self.wrap_optimizer(self.optimizer)
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resuming: the optimizer's state comes from the checkpoint, its objective settings (weights,
        ``c``, ``clip``, ``rescale``, ``solver``, ``max_iter``, ``nonfinite``) from this run's arguments,
        so a new phase can change them; one log line names every setting that differs from the checkpoint's."""
        # the ConflictAverseOptimizer itself, also inside a multi-objective wrapper of the user's own
        opt = find_conflict_averse(self.optimizer, (ConflictAverseOptimizer,))  # None for no optimizer yet
        if checkpoint is None or not isinstance(opt, ConflictAverseOptimizer):
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        wanted, wanted_nonfinite = opt.settings, opt.nonfinite
        with warnings.catch_warnings():  # the optimizer's own "replaced with the checkpoint's" warning: undone below
            warnings.filterwarnings("ignore", message="load_state_dict replaced this optimizer's settings")
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        saved, saved_nonfinite = opt.settings.to_dict(), opt.nonfinite
        changes = {k: (saved[k], v) for k, v in wanted.to_dict().items() if saved[k] != v}
        if wanted_nonfinite != saved_nonfinite:
            changes["nonfinite"] = (saved_nonfinite, wanted_nonfinite)
        if changes:
            opt.configure(**{k: new for k, (_, new) in changes.items()})
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            logger.warning(f"resumed from {checkpoint}: this run's settings replace the checkpoint's ({listed})")

    @property
    def conflict_averse_optimizer(self) -> Any:
        """The multi-objective optimizer behind ``self.optimizer`` (through accelerate's wrapper)."""
        return require_conflict_averse(
            self.optimizer,
            type(self).__name__,
            "Pass optimizers=(ConflictAverseOptimizer(base, weights=...), scheduler) or let the trainer build it.",
            self.multi_objective_types,
        )

    def objective_names_for(self, m: int) -> list[str]:
        return objective_names(self.objective_names, m)

    def _weights(self, m: int, like: Tensor) -> Tensor:
        opt = find_conflict_averse(self.optimizer, self.multi_objective_types) if self.optimizer is not None else None
        w = getattr(opt, "weights", None)
        if w is None:
            w = self.objective_weights
        if w is None:
            return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
        w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
        if w.shape[0] != m:
            raise ValueError(f"got {m} objective losses but {w.shape[0]} objective weights; give one loss per weight, in the same order")
        return w / w.sum()

    # ------------------------------------------------------------------ training
    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The ``Trainer`` prefetches each accumulation window: remember its micro-batch sizes."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        self._window = [[self.objective_batch_size(b) for b in batch_samples], 0]
        return batch_samples, num_items

    def _micro_batch_share(self) -> tuple[float, bool]:
        """(this micro-batch's share of the window's examples, whether it is the window's last)."""
        window = self._window
        if window is None or window[1] >= len(window[0]):  # no prefetched window: the Trainer's own count
            steps = getattr(self, "current_gradient_accumulation_steps", None) or getattr(self.args, "gradient_accumulation_steps", 1)
            return 1.0 / max(1, int(steps or 1)), True
        sizes, i = window
        window[1] += 1
        return sizes[i] / max(1, sum(sizes)), i == len(sizes) - 1

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """Per-objective losses, ``m`` backward passes; the direction is in ``.grad`` after the window's last."""
        opt = self.conflict_averse_optimizer
        model.train()
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        share, last = self._micro_batch_share()
        # DDP must not all-reduce during our m backward passes: the optimizer averages per objective.
        no_sync = self.accelerator.no_sync(model) if getattr(self.args, "world_size", 1) > 1 else contextlib.nullcontext()
        with no_sync:
            with self.compute_loss_context_manager():  # type: ignore[attr-defined]
                losses = self._objective_losses(model, inputs)
            self._record_losses("train", losses, inputs)
            scaled = [loss * share for loss in losses]
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:  # fp16: scale every objective (exact: d(s g) = s d(g))
                scaled = [scaler.scale(loss) for loss in scaled]
            opt.backward(scaled, combine=last)
        w = self._weights(len(losses), losses[0])
        return (torch.stack([loss.detach() for loss in losses]).to(w.dtype) @ w) * share

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The ``w``-weighted sum of :meth:`objective_losses` (what evaluation reports)."""
        losses = self._objective_losses(model, inputs)
        self._record_losses("train" if model.training else "eval", losses, inputs)
        w = self._weights(len(losses), losses[0])
        loss = torch.stack(losses).to(w.dtype) @ w
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[Tensor, None, None]:
        """Evaluation: the weighted loss through :meth:`objective_losses` (no logits)."""
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        with torch.no_grad(), self.compute_loss_context_manager():  # type: ignore[attr-defined]
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logging
    def _record_losses(self, mode: str, losses: Sequence[Tensor], inputs: dict[str, Any]) -> None:
        n = self.objective_batch_size(inputs)
        totals = torch.stack([loss.detach().float() for loss in losses]) * n
        self.record_objective_metric(mode, "loss/{}", totals, torch.full_like(totals, n))

    def record_objective_metric(self, mode: str, key: str, total: Tensor, count: Tensor | float) -> None:
        """Keep this step's ``total`` over ``count`` items (examples, pairs or tokens) for the next log: a
        vector (one per objective; ``key`` has a ``{}`` for the objective's name) or a scalar. No host read.

        At the log, totals and counts are summed over the processes (one all-reduce per log), so each
        step's value, ``total / count``, is over every process's items, as TRL's own metrics are (0 where
        the count is 0); the logged number is the mean of those values over the steps since the last log.
        """
        total = total.detach().float()
        steps = self._objective_store[mode][key]
        steps.append((total, torch.as_tensor(count, dtype=total.dtype, device=total.device).expand_as(total)))
        strategy = getattr(self.args, "logging_strategy", "steps")
        if mode == "train" and getattr(strategy, "value", strategy) == "no" and len(steps) > self.unlogged_metric_steps:
            del steps[0]  # no periodic log will read them: keep the last few steps only (a manual log() still can)

    def _reduced_objective_metrics(self, mode: str) -> dict[str, Tensor]:
        """Every stored key's value, over all processes' items, averaged over the stored steps; clears the store."""
        store = self._objective_store[mode]
        keys = sorted(store)  # the same order on every process
        if not keys:
            return {}
        flat = [torch.stack([torch.stack(pair) for pair in store[key]]).flatten() for key in keys]  # (steps, 2, ...) each
        sizes = [t.numel() for t in flat]
        summed = torch.cat(flat)
        if getattr(self.accelerator, "num_processes", 1) > 1:
            summed = self.accelerator.reduce(summed, reduction="sum")
        out = {}
        for key, part in zip(keys, summed.split(sizes)):
            steps = len(store[key])
            pairs = part.view(steps, 2, *store[key][0][0].shape)
            total, count = pairs[:, 0], pairs[:, 1]
            out[key] = torch.where(count > 0, total / count.clamp_min(1e-30), torch.zeros_like(total)).mean(0)
        store.clear()
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, mean in self._reduced_objective_metrics(mode).items():
            if "{}" in key:
                per_objective = mean.tolist()
                for name, v in zip(self.objective_names_for(len(per_objective)), per_objective):
                    logs[prefix + key.format(name)] = v
            else:
                logs[prefix + key] = float(mean)
        opt = find_conflict_averse(self.optimizer, self.multi_objective_types) if self.optimizer is not None else None
        last = getattr(opt, "last", None)
        if mode == "train" and last is not None and "train_runtime" not in logs:  # not on the run's summary
            coefficients, cosines = last.coefficients.tolist(), last.cosines.tolist()  # one read per logging step
            names = self.objective_names_for(len(coefficients))
            for name, a in zip(names, coefficients):
                logs[f"coef/{name}"] = a
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    logs[f"cos/{names[i]}|{names[j]}"] = cosines[i][j]
        super().log(logs, *args, **kwargs)  # type: ignore[misc]
