"""``torch.amp.GradScaler`` and the window: the scaler's protocol for optimizers that take scaled
gradients, and the message for a window edited in place while its gradients were apart."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import StepDiagnostics, all_finite

__all__ = ["EDITED", "NO_INF_CHECKS", "check_grad_scaler", "scaler_allows_step"]

# While a window's gradients are uncombined, GradScaler.step passes itself to step() (torch's protocol
# for optimizers that handle scaled gradients, see _step_supports_amp_scaling) and warns that it will
# one day pass tensors instead; the warning is about that protocol, not about the user's code.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)

EDITED = (
    ".grad was changed in place while this window's per-objective gradients waited for a later call (after "
    "backward(..., combine=False), or after a combination that a further backward continued): the edit cannot be "
    "taken apart from the objectives' gradients, so the step is refused and the parameters were not updated. Edit "
    ".grad (clip_grad_norm_, GradScaler.unscale_, ...) only after the window's last backward with combine=True (or "
    "opt.combine()) and before step(); call zero_grad() to start over"
)


NO_INF_CHECKS = (
    "GradScaler recorded no inf checks for this optimizer: scaler.unscale_(opt) ran while no parameter had a .grad "
    "(before the window's backward), so the combined direction was never unscaled and the step is refused (the "
    "parameters were not updated). Call scaler.unscale_(opt) after the last backward and before scaler.step(opt), "
    "or leave it to scaler.step(opt)"
)


def check_grad_scaler(grad_scaler: Any) -> None:
    """Refuse a ``grad_scaler=`` that is not a ``GradScaler`` passing itself (host-side)."""
    if grad_scaler is not None and not (
        isinstance(getattr(grad_scaler, "_per_optimizer_states", None), dict) and callable(getattr(grad_scaler, "unscale_", None))
    ):
        raise TypeError(
            f"grad_scaler is passed by torch.amp.GradScaler.step(opt) itself (call scaler.step(opt)); got {type(grad_scaler).__name__}"
        )


def scaler_allows_step(optimizer: Any, scaler: Any, diagnostics: StepDiagnostics, checks: bool) -> bool:
    """Unscale the combined direction through ``scaler`` and read its Inf/NaN verdict (one host read,
    as ``GradScaler.step`` makes itself); refuse an edited window. ``checks``: the non-finite policy
    checks, so our own verdict joins the scaler's."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as error:  # scaler.unscale_(opt) ran before step(): .grad is unscaled already
        if "already been called" not in str(error):
            raise
    device = diagnostics.coefficients.device
    per_device: dict[Any, Tensor] = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    if not per_device:  # torch's own optimizers refuse this step too ("No inf checks were recorded")
        raise RuntimeError(NO_INF_CHECKS)
    if checks:
        # An unscale_ before the combination saw .grad without the gradients kept aside: its verdict can
        # miss an Inf of another objective. Our own verdict is merged into the scaler's record (in place,
        # on the device), so the step is skipped and scaler.update() backs off as for any overflow.
        record = next(iter(per_device.values()))
        record.copy_(torch.maximum(record, (~all_finite(diagnostics)).to(record)))
    found_inf = torch.stack([t.to(device) for t in per_device.values()]).sum() > 0
    skip, edited = torch.stack([found_inf, ~diagnostics.window_intact]).tolist()
    if edited:
        raise RuntimeError(EDITED)
    return not skip
