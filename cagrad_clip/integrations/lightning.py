"""Multi-objective training with PyTorch Lightning (``pip install "cagrad-clip[lightning]"``; ``import pytorch_lightning``).

Lightning's automatic optimisation calls ``loss.backward()`` on one loss, so
:class:`MultiObjectiveModule` uses manual optimisation and does the rest::

    class MyModule(MultiObjectiveModule):
        def __init__(self):
            super().__init__(objective_weights=[0.8, 0.2], c=0.4, gradient_clip_val=1.0)
            self.net = ...

        def objective_losses(self, batch, batch_idx):
            return [quality_loss(self.net, batch), brevity_loss(self.net, batch)]

        def configure_optimizers(self):
            return self.wrap_optimizer(torch.optim.AdamW(self.parameters(), lr=1e-3))   # or your own wrapper

What it handles: the ``m`` backward passes through :class:`~cagrad_clip.ConflictAverseOptimizer`
(reached through Lightning's ``LightningOptimizer`` by type), gradient accumulation
(``accumulate_grad_batches``: one solve per window, losses divided by the window length, as Lightning
does), clipping of the combined direction (``gradient_clip_val``; after the precision plugin unscaled
it), autocast (Lightning's precision plugin runs ``training_step`` under it), fp16 loss scaling (each
objective's loss is scaled by the plugin's ``GradScaler``; the plugin unscales and skips steps with
Inf/NaN), non-finite steps in fp32/bf16 (skipped and counted in ``skipped_steps`` by the library's
default ``nonfinite="skip"``; with fp16 the ``GradScaler`` checks: see :func:`default_nonfinite`),
LR schedulers (stepped once per optimizer step), and logging of ``loss/<objective>``,
``coef/<objective>`` and ``cos/<a>|<b>`` (the coefficient and cosine tensors are handed to ``self.log``
as tensors: no host sync in the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import pytorch_lightning as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('cagrad_clip.integrations.lightning needs pytorch-lightning: pip install "cagrad-clip[lightning]"') from exc

from cagrad_clip import ConflictAverseOptimizer

from .._nonfinite import NonfinitePolicy, resolve_nonfinite
from .._settings import CAGradSettings
from . import check_weights, objective_names, require_conflict_averse

__all__ = ["MultiObjectiveModule", "default_nonfinite"]

#: Precision strings whose plugin scales the loss and checks for Inf/NaN itself (DeepSpeed's plugin
#: does it inside its engine, without a ``scaler`` attribute). "16" is Lightning's old name of "16-mixed".
_SELF_CHECKING_PRECISIONS = ("16-mixed", "16")


def default_nonfinite(precision_plugin: Any) -> str:
    """The ``nonfinite`` policy :meth:`MultiObjectiveModule.wrap_optimizer` uses when the user gives none.

    ``"ignore"`` when the precision plugin checks for Inf/NaN itself (fp16 mixed precision: a
    ``GradScaler`` in ``plugin.scaler``, or the precision string ``"16-mixed"`` / ``"16"``), so the wrapper
    does not add a second, host-syncing check; otherwise the library's default ``"skip"`` (fp32, bf16,
    true fp16, no trainer attached), so a step with an Inf/NaN is not applied. Mirrors the HF mixin.
    """
    if precision_plugin is None:
        return "skip"
    if getattr(precision_plugin, "scaler", None) is not None:
        return "ignore"
    return "ignore" if str(getattr(precision_plugin, "precision", "")) in _SELF_CHECKING_PRECISIONS else "skip"


class MultiObjectiveModule(pl.LightningModule):
    """A ``LightningModule`` trained on several objectives with a conflict-averse combination.

    Args:
        objective_weights: user weights ``w`` (default uniform), used by :meth:`wrap_optimizer`.
        objective_names: names for the logs (default ``objective_0``, ...).
        c, clip, rescale (keyword-only, as every option after the weights): settings :meth:`wrap_optimizer` gives the wrapper.
        nonfinite: the wrapper's policy for a step with an Inf/NaN (``"skip"``, ``"raise"`` or ``"ignore"``);
            ``None`` (default): :func:`default_nonfinite` of the trainer's precision plugin.
        accumulate_grad_batches: micro-batches per optimizer step (use this, not the ``Trainer``'s argument,
            which manual optimisation ignores).
        gradient_clip_val: max-norm clipping of the combined direction (``None``: none). Lightning's
            ``Trainer(gradient_clip_val=...)`` is not available with manual optimisation.
    """

    def __init__(
        self,
        objective_weights: Sequence[float] | None = None,
        *,
        objective_names: Sequence[str] | None = None,
        c: float = 0.4,
        clip: bool = True,
        rescale: str | None = None,
        nonfinite: str | NonfinitePolicy | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.objective_weights, self.objective_names = check_weights(objective_weights, objective_names)
        checked = CAGradSettings(c=c, clip=clip, rescale=rescale)  # bad values raise here, early
        self.conflict_averse_kwargs: dict[str, Any] = {"c": checked.c, "clip": checked.clip, "rescale": checked.rescale}
        if nonfinite is not None:  # the user's choice wins over the precision-dependent default
            resolve_nonfinite(nonfinite)  # refused here, early, if unknown
            self.conflict_averse_kwargs["nonfinite"] = nonfinite
        if int(accumulate_grad_batches) < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val

    # ------------------------------------------------------------------ hooks to implement
    def objective_losses(self, batch: Any, batch_idx: int) -> Sequence[Tensor]:
        """One scalar loss per objective for this batch. Override."""
        raise NotImplementedError(f"{type(self).__name__} must implement objective_losses(batch, batch_idx)")

    # ------------------------------------------------------------------ plumbing
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> ConflictAverseOptimizer:
        """Wrap a base optimizer with this module's settings; call it in ``configure_optimizers``.

        ``nonfinite``: the user's (the constructor's argument, or ``conflict_averse_kwargs["nonfinite"]``),
        else :func:`default_nonfinite` of the trainer's precision plugin: ``"ignore"`` with fp16 (the
        ``GradScaler`` checks for Inf/NaN itself), ``"skip"`` otherwise.
        """
        kwargs = dict(self.conflict_averse_kwargs)
        if "nonfinite" not in kwargs:
            trainer = self._trainer  # None outside a Trainer (self.trainer would raise)
            kwargs["nonfinite"] = default_nonfinite(getattr(trainer, "precision_plugin", None))
        return ConflictAverseOptimizer(optimizer, weights=self.objective_weights, **kwargs)

    @property
    def conflict_averse_optimizer(self) -> Any:
        """The :class:`~cagrad_clip.ConflictAverseOptimizer` behind ``self.optimizers()`` (a property, as in the HF mixin)."""
        return require_conflict_averse(
            self.optimizers(), type(self).__name__, "Return self.wrap_optimizer(base) from configure_optimizers (one optimizer)."
        )

    def _names(self, m: int) -> list[str]:
        return objective_names(self.objective_names, m)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``m`` backward passes; one optimizer step (clip, precision plugin, scheduler) per window."""
        lopt = self.optimizers()
        if isinstance(lopt, list):
            raise TypeError(f"{type(self).__name__} trains with one optimizer; configure_optimizers returned {len(lopt)}")
        opt = self.conflict_averse_optimizer
        losses = list(self.objective_losses(batch, batch_idx))
        k = self.accumulate_grad_batches
        last = (batch_idx + 1) % k == 0 or bool(self.trainer.is_last_batch)
        scaled = [loss / k for loss in losses]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16: scale every objective (exact: d(s g) = s d(g)); the plugin unscales
            scaled = [scaler.scale(loss) for loss in scaled]
        opt.backward(scaled, combine=last)
        names = self._names(len(losses))
        self.log_dict({f"loss/{n}": loss.detach() for n, loss in zip(names, losses)}, on_step=True, on_epoch=False)
        if last:
            lopt.step()  # the precision plugin unscales, calls on_before_optimizer_step (clipping), steps
            lopt.zero_grad()
            schedulers = self.lr_schedulers()
            for sched in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []:
                if not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):  # needs a metric: step it yourself
                    sched.step()
            diag = opt.last
            if diag is not None:
                logs = {f"coef/{n}": diag.coefficients[i] for i, n in enumerate(names)}
                logs.update({f"cos/{names[i]}|{names[j]}": diag.cosines[i, j] for i in range(len(names)) for j in range(i + 1, len(names))})
                self.log_dict(logs, on_step=True, on_epoch=False)
        w = opt.weights
        w = torch.full((len(losses),), 1.0 / len(losses), device=losses[0].device) if w is None else w
        return torch.stack([loss.detach().float() for loss in losses]) @ w.to(device=losses[0].device, dtype=torch.float32)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip the combined direction (already unscaled by the precision plugin)."""
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
