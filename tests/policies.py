"""A shared test helper: one step under a non-finite policy that must refuse it."""

from __future__ import annotations

import pytest


def step_refused(opt, losses, policy: str, match: str) -> None:
    """``opt.step(losses)`` must raise (``"raise"``) or warn and skip (``"skip"``) with a message matching ``match``."""
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=match):
            opt.step(losses)
    else:
        with pytest.warns(RuntimeWarning, match=match):
            opt.step(losses)
