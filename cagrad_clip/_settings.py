"""The validated, immutable settings of one CAGrad-Clip solve (shared by the solver and the optimizer).

:class:`CAGradSettings` holds what decides the direction of RACO's Algorithm 1 (arXiv 2602.02495):
the user weights ``w``, the radius ``c``, the clip, the rescaling convention and the dual solver.
It is frozen: a change is a new object made by :meth:`CAGradSettings.replace`, validated like the
first. ``solve_cagrad`` and ``ConflictAverseOptimizer`` read their options from it, and the
optimizer's ``state_dict``, ``load_state_dict`` and ``repr`` derive from :meth:`to_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CAGradSettings",
    "RESCALE_OPTIONS",
    "Rescale",
    "Solver",
    "check_c",
    "check_max_iter",
    "check_rescale",
    "check_solver",
    "normalize_weights",
    "rescale_divisor",
]

#: A key of :data:`RESCALE_OPTIONS`.
Rescale = str | None
#: A registered dual solver's name, or ``"auto"`` (``cagrad_clip._dual.registry``).
Solver = str

#: The rescaling conventions: name -> (what it means, the divisor of the direction as a function of ``c``).
#: A new convention is one entry here.
_RESCALES: dict[str | None, tuple[str, Callable[[float], float]]] = {
    None: ("no rescaling (RACO paper, TorchJD)", lambda c: 1.0),
    "1+c": ("divide by 1 + c (official CAGrad toy script)", lambda c: 1.0 + c),
    "1+c^2": ("divide by 1 + c^2 (official CAGrad code for NYUv2/Cityscapes, LibMTL)", lambda c: 1.0 + c * c),
}

#: Accepted values of ``rescale`` and what each means.
RESCALE_OPTIONS: dict[str | None, str] = {name: description for name, (description, _) in _RESCALES.items()}


def _real_number(value: Any, name: str) -> float:
    """``value`` as a Python float if it is a real number (int, float, numpy scalar, 0-d tensor), else raise."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        return float(value.detach().cpu().reshape(()))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_c(c: Any) -> float:
    """Validate the trust-region radius ``c`` (a finite real ``>= 0``) and return it as a float."""
    value = _real_number(c, "c")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"c must be finite and >= 0, got {value}")
    return value


def check_rescale(rescale: Any) -> Rescale:
    """Validate ``rescale`` (a key of :data:`RESCALE_OPTIONS`)."""
    if not (rescale is None or (isinstance(rescale, str) and rescale in RESCALE_OPTIONS)):
        raise ValueError(f"unknown rescale={rescale!r}; choose one of {list(RESCALE_OPTIONS)}")
    return rescale


def rescale_divisor(rescale: Rescale, c: float) -> float:
    """The factor the direction is divided by for ``rescale`` and ``c``."""
    return _RESCALES[check_rescale(rescale)][1](c)


def check_solver(solver: Any) -> Solver:
    """Validate ``solver`` (a key of :data:`SOLVER_OPTIONS`: ``"auto"`` or a registered solver)."""
    from ._dual.registry import AUTO, SOLVER_OPTIONS, SOLVERS  # the registry imports nothing of ours: no cycle at call time

    # membership in the plain dict, not the live mapping: torch.compile (Dynamo, torch 2.4) cannot trace a Mapping's __contains__
    if not isinstance(solver, str) or (solver != AUTO and solver not in SOLVERS):
        raise ValueError(f"unknown solver={solver!r}; choose one of {list(SOLVER_OPTIONS)}")
    return solver


def check_max_iter(max_iter: Any) -> int | None:
    """Validate ``max_iter`` (``None`` or an int ``>= 0``)."""
    if max_iter is None:
        return None
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"max_iter must be None or an int >= 0, got {max_iter!r}")
    return int(max_iter)


def _flat(values: Any) -> Iterator[Any]:
    """The scalars of a (nested) list or tuple; anything else as one value."""
    if isinstance(values, (list, tuple)):
        for value in values:
            yield from _flat(value)
    else:
        yield values


def normalize_weights(weights: Sequence[float] | Tensor | None, m: int | None = None) -> Tensor:
    """Check user weights on the host and return them normalised to sum 1 (float64, CPU).

    ``weights`` must be finite and non-negative with a positive sum; ``None`` means uniform
    (then ``m`` is required). Raises naming what is wrong.
    """
    if weights is None:
        if m is None:
            raise ValueError("weights=None needs the number of objectives m")
        return torch.full((m,), 1.0 / m, dtype=torch.float64, device="cpu")
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"weights must be a sequence of real numbers (one per objective), got the string {weights!r}")
    dtype = getattr(weights, "dtype", None)  # a tensor's or a NumPy array's: complex or bool is not a weight
    if dtype is not None and (getattr(dtype, "is_complex", False) or dtype == torch.bool or getattr(dtype, "kind", "") in ("c", "b")):
        raise TypeError(f"weights must be real numbers (one per objective), got {type(weights).__name__} of dtype {dtype}")
    if not isinstance(weights, Tensor) and any(type(x).__name__ in ("bool", "bool_") for x in _flat(weights)):
        raise TypeError(f"weights must be real numbers (one per objective), got booleans {weights!r}")
    try:
        if isinstance(weights, Tensor):
            w = weights.detach().to("cpu", torch.float64)
        else:  # Python floats straight to float64 (through the default float32 they would lose digits)
            w = torch.as_tensor(weights, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"weights must be a sequence of real numbers (one per objective), got {weights!r}") from error
    if w.dim() < 1 or w.shape[-1] < 1:
        raise ValueError(f"weights must have shape (m,) or (..., m) with m >= 1, got shape {tuple(w.shape)}")
    if m is not None and w.shape[-1] != m:
        raise ValueError(f"got {w.shape[-1]} weights for {m} objectives; pass one weight per objective")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be >= 0, got {w.tolist()}")
    total = w.sum(-1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError(f"weights must have a positive sum, got {w.tolist()}")
    return w / total


@dataclasses.dataclass(frozen=True)
class CAGradSettings:
    """What decides one CAGrad-Clip direction; validated on construction, immutable afterwards.

    Args:
        weights: user weights ``w`` (one per objective; finite, ``>= 0``, positive sum), stored
            normalised to sum 1 as a tuple. ``None`` means uniform over however many objectives.
        c: trust-region radius, finite ``>= 0``; the direction is ``g0 + c ||g0|| G~/||G~||``.
        clip: RACO's clip ``p~ = min(p, w)``; ``False`` gives CAGrad with a weighted anchor.
        rescale: ``None``, ``"1+c"`` or ``"1+c^2"`` (:data:`RESCALE_OPTIONS`).
        solver: ``"auto"`` or a registered solver, ``"exact"`` or ``"frank_wolfe"`` (:data:`SOLVER_OPTIONS`).
        max_iter: Frank-Wolfe iterations; ``None`` uses ``default_max_iter(m)``.
    """

    weights: tuple[float, ...] | None = None
    _: dataclasses.KW_ONLY
    c: float = 0.4
    clip: bool = True
    rescale: Rescale = None
    solver: Solver = "auto"
    max_iter: int | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            w = normalize_weights(self.weights)
            if w.dim() != 1:
                raise ValueError(f"weights must be one number per objective (shape (m,)), got shape {tuple(w.shape)}")
            object.__setattr__(self, "weights", tuple(float(x) for x in w.tolist()))
        object.__setattr__(self, "c", check_c(self.c))
        if not isinstance(self.clip, bool):
            raise TypeError(f"clip must be True or False, got {self.clip!r}")
        check_rescale(self.rescale)  # validated as given (a valid value is kept as it is)
        check_solver(self.solver)
        object.__setattr__(self, "max_iter", check_max_iter(self.max_iter))

    @property
    def divisor(self) -> float:
        """The factor the direction is divided by (``rescale``)."""
        return rescale_divisor(self.rescale, self.c)

    @property
    def num_objectives(self) -> int | None:
        """``m`` fixed by the weights, or ``None`` when the weights are uniform over any ``m``."""
        return None if self.weights is None else len(self.weights)

    def weights_tensor(self, m: int) -> Tensor:
        """The normalised weights for ``m`` objectives (float64, CPU), or raise if ``m`` does not match."""
        if self.weights is not None and len(self.weights) != m:
            raise ValueError(f"got {m} losses but {len(self.weights)} weights; pass one loss per weight, in the same order")
        if self.weights is None:
            return normalize_weights(None, m)
        return torch.tensor(self.weights, dtype=torch.float64, device="cpu")

    def replace(self, **changes: Any) -> CAGradSettings:
        """A new validated settings object with ``changes`` applied (unknown names raise ``TypeError``)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; the settings are {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain Python values (for ``state_dict`` and ``repr``)."""
        out = dataclasses.asdict(self)
        out["weights"] = None if self.weights is None else list(self.weights)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CAGradSettings:
        """Settings from :meth:`to_dict`'s output; an unknown key raises ``ValueError`` naming it."""
        if not isinstance(values, Mapping):
            raise TypeError(f"settings must be a mapping, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} in the saved settings; known: {sorted(names)}")
        return cls(**dict(values))
