"""Framework integrations for :class:`~cagrad_clip.ConflictAverseOptimizer` (each an optional extra).

Import the submodule you need; this package itself imports nothing heavy:

* :mod:`cagrad_clip.integrations.trl` -- ``MultiObjectiveDPOConfig`` / ``MultiObjectiveDPOTrainer``, TRL's
  ``DPOTrainer`` with one DPO loss per objective (``pip install "cagrad-clip[trl]"``);
* :mod:`cagrad_clip.integrations.hf` -- ``MultiObjectiveTrainerMixin`` for a plain Hugging Face ``Trainer``
  (an ``objective_losses(model, inputs)`` hook);
* :mod:`cagrad_clip.integrations.lightning` -- ``MultiObjectiveModule``, a ``pytorch_lightning`` module
  with an ``objective_losses(batch, batch_idx)`` hook (``pip install "cagrad-clip[lightning]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "MultiObjectiveOptimizer",
    "check_module_patterns",
    "check_weights",
    "find_conflict_averse",
    "objective_names",
    "optimizer_options",
    "require_conflict_averse",
    "shared_parameters",
]


@runtime_checkable
class MultiObjectiveOptimizer(Protocol):
    """What the integrations drive: an optimizer that takes one loss per objective.

    :class:`~cagrad_clip.ConflictAverseOptimizer` is one; another multi-objective rule (the DPO
    benchmark's MGDA and PCGrad baselines) plugs into the trainers by having the same three members:
    ``backward(losses, combine=...)`` accumulates every objective's gradient and, with ``combine=True``,
    writes the combined direction into ``.grad``; ``last`` holds what the last combination computed
    (``.coefficients`` at least, for the logs); ``weights`` the user weights (or ``None``).
    """

    def backward(self, losses: Sequence[Any], combine: bool = True) -> None: ...  # pragma: no mutate (a Protocol's members)

    @property
    def last(self) -> Any: ...

    @property
    def weights(self) -> Any: ...


def find_conflict_averse(optimizer: object, types: tuple[type, ...] | None = None) -> object | None:
    """The multi-objective optimizer inside ``optimizer``, or ``None``.

    Walks the chain of ``.optimizer`` attributes (accelerate's ``AcceleratedOptimizer``, ...) and returns
    the first object that *is* one of ``types`` (default: any :class:`MultiObjectiveOptimizer`).
    A ``hasattr(opt, "optimizer")`` test would return the *base* optimizer when nothing wrapped the
    wrapper, since the wrapper has an ``.optimizer`` too. Lightning's ``LightningOptimizer`` is looked
    through first: it passes ``isinstance`` for the class it wraps but holds a shallow *copy* of its
    attributes, so state set on it (``last``, ...) would not reach the real optimizer.
    """
    import sys

    if types is None:
        types = (MultiObjectiveOptimizer,)
    seen: set[int] = set()
    current = optimizer
    lightning = tuple(
        cls
        for cls in (
            getattr(sys.modules.get(name), "LightningOptimizer", None)
            for name in ("pytorch_lightning.core.optimizer", "lightning.pytorch.core.optimizer")
        )
        if isinstance(cls, type)
    )
    while current is not None and id(current) not in seen:
        if lightning and isinstance(current, lightning):
            seen.add(id(current))
            current = current._optimizer  # type: ignore[attr-defined]
            continue
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = getattr(current, "optimizer", None)
    return None


def check_weights(weights: Sequence[float] | None, names: Sequence[str] | None) -> tuple[list[float] | None, list[str] | None]:
    """Validate user weights (by the library's own rule) and objective names (shared by the integrations);
    returns them as lists."""
    from cagrad_clip._settings import normalize_weights

    w = None
    if weights is not None:
        try:
            checked = normalize_weights(weights)  # finite, >= 0, positive sum
        except (TypeError, ValueError) as error:
            raise type(error)(f"objective_weights: {error}") from None
        if checked.dim() != 1:
            raise ValueError(f"objective_weights must be one number per objective, got shape {tuple(checked.shape)}")
        w = [float(x) for x in weights]  # kept as given (normalised where they are used)
    n = None if names is None else [str(x) for x in names]
    if n is not None:
        if len(set(n)) != len(n):
            raise ValueError(f"objective_names must be distinct; got {n}")
        if w is not None and len(n) != len(w):
            raise ValueError(f"{len(n)} objective_names {n} but {len(w)} objective_weights; give one name per weight")
    return w, n


def objective_names(names: Sequence[str] | None, m: int) -> list[str]:
    """The objectives' names for logging: ``names`` (checked to be ``m`` long) or ``objective_0``, ..."""
    if names is None:
        return [f"objective_{i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"{m} objective losses but {len(names)} objective_names {list(names)}")
    return list(names)


def require_conflict_averse(optimizer: object, owner: str, hint: str, types: tuple[type, ...] | None = None) -> object:
    """:func:`find_conflict_averse`, or a ``TypeError`` saying that ``owner`` needs one and how (``hint``)."""
    found = find_conflict_averse(optimizer, types)
    if found is None:
        raise TypeError(f"{owner} needs a ConflictAverseOptimizer; got {type(optimizer).__name__}. {hint}")
    return found


def check_module_patterns(patterns: Any) -> list[str] | None:
    """``shared_modules`` as a list of ``fnmatch`` patterns (``None`` stays ``None``), or a ``TypeError``."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"shared_modules must be a list of module-name patterns, got {patterns!r}")
    return list(patterns)


def shared_parameters(model: Any, patterns: Sequence[str]) -> list[Any]:
    """The trainable parameters of ``model``'s modules whose qualified name (``model.named_modules()``) matches one
    of the ``fnmatch`` patterns (e.g. ``"transformer.h.*"``), each once: the ``shared=`` parameters the
    Gram is measured on. A pattern that matches no module is refused, naming a few of the names."""
    import fnmatch

    checked = check_module_patterns(patterns) or []
    named = [(name, module) for name, module in model.named_modules() if name]
    params: dict[int, Any] = {}
    for pattern in checked:
        matched = [module for name, module in named if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            sample = ", ".join(name for name, _ in named[:8])
            raise ValueError(f"shared_modules pattern {pattern!r} matches no module of the model; its modules are named like: {sample}")
        trainable = [p for module in matched for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"shared_modules pattern {pattern!r} matches {len(matched)} module(s) but none has a trainable parameter")
        for p in trainable:  # frozen ones (a LoRA base model's) are not the optimizer's
            params.setdefault(id(p), p)
    return list(params.values())


def optimizer_options(
    *,
    c: float,
    clip: bool,
    rescale: str | None,
    solver: str,
    max_iter: int | None,
    memory: str,
    accumulate_dtype: Any,
    nonfinite: Any,
) -> dict[str, Any]:
    """The :class:`~cagrad_clip.ConflictAverseOptimizer` keyword arguments of an integration, validated now
    by the library's own checks (so a bad config fails when it is built, not at the first step).
    ``accumulate_dtype`` may be a dtype or its name (``"float32"``); ``nonfinite=None`` is left out (the
    integration picks its default)."""
    import torch

    from cagrad_clip._layout import GradientFlow
    from cagrad_clip._nonfinite import resolve_nonfinite
    from cagrad_clip._settings import CAGradSettings

    checked = CAGradSettings(c=c, clip=clip, rescale=rescale, solver=solver, max_iter=max_iter)
    options: dict[str, Any] = {
        "c": checked.c,
        "clip": checked.clip,
        "rescale": checked.rescale,
        "solver": checked.solver,
        "max_iter": checked.max_iter,
    }
    if isinstance(accumulate_dtype, str):  # a config field holds the name
        if accumulate_dtype not in ("float32", "float64"):
            raise ValueError(f"accumulate_dtype must be None, 'float32' or 'float64', got {accumulate_dtype!r}")
        accumulate_dtype = getattr(torch, accumulate_dtype)
    GradientFlow(memory=memory, accumulate_dtype=accumulate_dtype)  # the optimizer's own checks of the two
    if memory != "default":
        options["memory"] = memory
    if accumulate_dtype is not None:
        options["accumulate_dtype"] = accumulate_dtype
    if nonfinite is not None:
        resolve_nonfinite(nonfinite)  # refused here, early, if unknown
        options["nonfinite"] = nonfinite
    return options
