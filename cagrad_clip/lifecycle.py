"""The phases of one accumulation window, kept in a small state object.

A window runs from the first ``backward`` after a step (or a reset) to the ``step`` that applies
it: ``empty`` → ``accumulating`` (per-objective gradients summed) → ``combined`` (the direction
is in ``.grad``) → ``stepped`` (the base optimizer used it). ``zero_grad`` and any change of
``.grad`` made outside the optimizer (checked against ``.grad`` itself by the gradient store)
return it to ``empty``. The object is plain data so that pickling and ``torch.compile`` graph
breaks cannot lose part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Phase", "WindowState"]

Phase = Literal["empty", "accumulating", "combined", "stepped"]


@dataclass
class WindowState:
    """Where the current accumulation window stands."""

    phase: Phase = "empty"
    #: ``m`` of the open window (``None`` when none is open).
    num_objectives: int | None = None
    #: ``m`` last confirmed equal on every rank (a host-side collective runs only when ``m`` changes).
    ranks_agree_on: int | None = None

    @property
    def open(self) -> bool:
        """Gradients of this window are accumulated (and maybe combined) but not yet stepped on."""
        return self.phase in ("accumulating", "combined")

    def begin(self, num_objectives: int) -> None:
        self.phase = "accumulating"
        self.num_objectives = num_objectives

    def reset(self) -> None:
        self.phase = "empty"
        self.num_objectives = None
