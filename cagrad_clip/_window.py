"""The phases of one accumulation window, kept in a small state object.

A window runs from the first ``backward`` after a step (or a reset) to the ``step`` that applies
it: ``empty`` → ``accumulating`` (per-objective gradients summed) → ``combined`` (the direction
is in ``.grad``; a further ``backward`` takes it back out and returns to ``accumulating``) →
``empty`` again at the step. ``zero_grad`` and any change of ``.grad`` made outside the optimizer
(checked against ``.grad`` itself by the gradient store) also return it to ``empty``. Only the
methods below change the phase. The object is plain data so that pickling and ``torch.compile`` graph
breaks cannot lose part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

__all__ = ["Phase", "WindowState"]

Phase = Literal["empty", "accumulating", "combined"]


@dataclass
class WindowState:
    """Where the current accumulation window stands."""

    phase: Phase = "empty"
    #: ``m`` of the open window (``None`` when none is open).
    num_objectives: int | None = None
    #: ``m`` last confirmed equal on every rank (a host-side collective runs only when ``m`` changes).
    ranks_agree_on: int | None = None
    #: 0-d bool on the gradients' device: some ``.grad`` was edited in place while the window held
    #: gradients a later call reuses (``None``: no such check ran yet). Read once, by ``step``.
    edited: Tensor | None = None

    @property
    def open(self) -> bool:
        """Gradients of this window are accumulated (and maybe combined) but not yet stepped on."""
        return self.phase in ("accumulating", "combined")

    def begin(self, num_objectives: int) -> None:
        self.phase = "accumulating"
        self.num_objectives = num_objectives
        self.edited = None

    def combined(self) -> None:
        """The direction was written into ``.grad``."""
        self.phase = "combined"

    def reopen(self) -> None:
        """A further ``backward`` took the written direction back out: accumulating again."""
        self.phase = "accumulating"

    def note_edited(self, edited: Tensor) -> Tensor:
        """Fold one device-side edit check into the window's flag (no host sync); returns the flag."""
        self.edited = edited if self.edited is None else self.edited | edited
        return self.edited

    def reset(self) -> None:
        self.phase = "empty"
        self.num_objectives = None
        self.edited = None
