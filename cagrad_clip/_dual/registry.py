"""The dual solvers by name: adding a solver is one module that calls :func:`register` (and is imported
by ``_dual/__init__.py``); the settings, ``solve_cagrad``, the optimizer, :data:`SOLVER_OPTIONS` and the
solver property tests (``tests/dual/helpers.py``) all take the names from here.

Every solver has one signature: ``solve(problem, *, max_iter, kink_tol, zero_tol) -> (p, lam)``, where
``problem`` is the kernel's normalised batch (``Hn``, ``b``, ``s``, ``diag_n``, ``norms_n``,
``anchor_n``, ...; :class:`.kernel._Problem`), ``p`` ``(..., m)`` the dual solution on the simplex and
``lam`` ``(..., m)`` the non-negative least squares of :mod:`.stationary` (zeros if the solver has none).
It runs for ``m >= 3`` (``m <= 2`` has an exact closed form in the kernel) on the host's shapes only:
no host sync, traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["AUTO", "SOLVERS", "SOLVER_OPTIONS", "DualSolver", "register"]

#: The name that lets the kernel pick a registered solver by shape (``auto_solver``).
AUTO = "auto"
_AUTO_DESCRIPTION = "'exact' for small m and batches (auto_solver), else 'frank_wolfe'"


@dataclass(frozen=True)
class DualSolver:
    """One registered solver: its name, a one-line description and the solve (see the module docstring)."""

    name: str
    description: str
    solve: Callable[..., tuple[Tensor, Tensor]]
    #: The largest ``m`` it accepts (``None``: any); ``solver=<name>`` with more objectives is refused up front.
    max_m: int | None = None


#: Every registered solver, by name, in registration order.
SOLVERS: dict[str, DualSolver] = {}


def register(solver: DualSolver) -> DualSolver:
    """Add ``solver`` under its name (a second solver of the same name is refused)."""
    if solver.name == AUTO or solver.name in SOLVERS:
        raise ValueError(f"a dual solver named {solver.name!r} is already registered")
    SOLVERS[solver.name] = solver
    return solver


class _SolverOptions(Mapping[str, str]):
    """``{"auto": ..., <each registered solver>: its description}``, always in step with :data:`SOLVERS`."""

    def __getitem__(self, name: str) -> str:
        return _AUTO_DESCRIPTION if name == AUTO else SOLVERS[name].description

    def __iter__(self) -> Iterator[str]:
        yield AUTO
        yield from SOLVERS

    def __len__(self) -> int:
        return 1 + len(SOLVERS)

    def __repr__(self) -> str:
        return repr(dict(self))

    def __eq__(self, other: Any) -> bool:
        return dict(self) == other


#: Accepted values of ``solver`` and what each does.
SOLVER_OPTIONS: Mapping[str, str] = _SolverOptions()
