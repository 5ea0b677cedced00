"""What ``step()`` does when an objective's gradient or the direction written into ``.grad`` is not
finite: one policy object each (``"skip"``, ``"raise"``, ``"ignore"`` name the built-in ones).

A policy says whether the step reads the device-side finiteness verdict (:attr:`NonfinitePolicy.checks`:
one host read per step) and what happens when it is not finite (:meth:`NonfinitePolicy.handle`, called
with the explanation before anything moved: return to skip the step, raise to stop). Another policy is
a subclass (log and skip, count in a metric, ...) passed as ``nonfinite=``.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["IGNORE", "NONFINITE_POLICIES", "RAISE", "SKIP", "NonfinitePolicy", "resolve_nonfinite"]


class NonfinitePolicy:
    """A non-finite policy: its ``name`` (saved in the optimizer's state dict), a one-line ``description``,
    whether the step ``checks`` finiteness, and :meth:`handle`."""

    def __init__(self, name: str, description: str, *, checks: bool = True) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a non-finite policy needs a non-empty name, got {name!r}")
        self.name, self.description, self.checks = name, description, bool(checks)

    def handle(self, message: str) -> None:
        """The step is not finite (``message`` says what): return to skip it (``skipped_steps`` counts it), raise to stop.
        Nothing has moved yet, and nothing moves if this returns or raises."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle(message)")

    def __repr__(self) -> str:
        return f"<nonfinite policy {self.name!r}>"

    def __reduce__(self) -> Any:
        if POLICIES.get(self.name) is self:  # a built-in pickles by name: unpickling gives the same object
            return (resolve_nonfinite, (self.name,))
        return super().__reduce__()


class _Skip(NonfinitePolicy):
    def handle(self, message: str) -> None:
        # stacklevel: handle -> step -> the caller of step
        warnings.warn(message + "; step skipped, parameters unchanged", RuntimeWarning, stacklevel=3)


class _Raise(NonfinitePolicy):
    def handle(self, message: str) -> None:
        raise FloatingPointError(message + "; the parameters were not updated")


class _Ignore(NonfinitePolicy):
    def handle(self, message: str) -> None:  # never called: checks is False
        """Not called (the step does not check)."""


SKIP = _Skip("skip", "skip the step: parameters and optimizer state untouched, a warning, skipped_steps counts it")
RAISE = _Raise("raise", "raise FloatingPointError before the base optimizer steps")
IGNORE = _Ignore("ignore", "no check and no host sync (for GradScaler, which checks itself)", checks=False)

#: The built-in policies by name.
POLICIES: dict[str, NonfinitePolicy] = {p.name: p for p in (SKIP, RAISE, IGNORE)}
#: The accepted names of ``nonfinite`` and what each does.
NONFINITE_POLICIES: dict[str, str] = {name: p.description for name, p in POLICIES.items()}


def resolve_nonfinite(nonfinite: Any) -> NonfinitePolicy:
    """``nonfinite`` as a policy: a built-in's name, or a :class:`NonfinitePolicy` itself."""
    if isinstance(nonfinite, NonfinitePolicy):
        return nonfinite
    if isinstance(nonfinite, str) and nonfinite in POLICIES:
        return POLICIES[nonfinite]
    raise ValueError(f"unknown nonfinite={nonfinite!r}; choose one of {list(POLICIES)} or pass a NonfinitePolicy")
