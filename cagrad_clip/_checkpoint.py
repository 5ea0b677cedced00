"""The optimizer's own entry in its ``state_dict``: the settings, the non-finite policy's name and the
skipped-step count, saved as plain data and restored (validated before anything changes)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ._accumulation import WrapperState
from ._nonfinite import resolve_nonfinite
from ._settings import CAGradSettings

__all__ = ["restore_wrapper_state", "saved_wrapper_state"]


def saved_wrapper_state(state: WrapperState) -> dict[str, Any]:
    """What a checkpoint keeps of the optimizer's own state."""
    return {**state.settings.to_dict(), "nonfinite": state.nonfinite.name, "skipped_steps": state.skipped_steps}


def restore_wrapper_state(state: WrapperState, saved: dict[str, Any] | None, key: str) -> Callable[[], None]:
    """Validate ``saved`` (the checkpoint's ``key`` entry) and return what applies it: the checkpoint's
    settings replace the current ones, with a warning naming every difference. ``None`` (a plain
    optimizer's state dict) keeps the current settings."""
    if saved is None:
        return lambda: None
    if not isinstance(saved, dict):
        raise TypeError(f"the saved '{key}' entry must be a dict, got {type(saved).__name__}")
    values = dict(saved)
    skipped = values.pop("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"saved skipped_steps must be an int >= 0, got {skipped!r}")
    name = values.pop("nonfinite", state.nonfinite.name)
    # the policy this optimizer holds under that name (a custom one included), else a built-in's
    nonfinite = state.nonfinite if name == state.nonfinite.name else resolve_nonfinite(name)
    settings = CAGradSettings.from_dict(values)
    changed = {k: (v, settings.to_dict()[k]) for k, v in state.settings.to_dict().items() if settings.to_dict()[k] != v}
    if nonfinite is not state.nonfinite:
        changed["nonfinite"] = (state.nonfinite.name, nonfinite.name)

    def apply() -> None:
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            warnings.warn(
                f"load_state_dict replaced this optimizer's settings with the checkpoint's ({listed}); to keep "
                "new settings (a new training phase), call opt.configure(...) after loading",
                UserWarning,
                stacklevel=3,  # apply() runs in load_state_dict: point at its caller
            )
        state.settings = settings
        state.nonfinite = nonfinite
        state.skipped_steps = skipped
        state.device_weights.clear()

    return apply
