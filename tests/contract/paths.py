"""The registry of gradient paths: one small record per way gradients reach ``ConflictAverseOptimizer``.

A new path joins the contract suite by adding one :class:`GradientPath` to :data:`PATHS`; every
case of :mod:`tests.contract.cases` then runs on it, for each of its dtypes and for 1 and 2
processes. A combination the path does not support must be listed in ``refuses`` with the error it
raises (at construction or at the first call, before any parameter moves); the suite asserts that
refusal and its message. Only a missing torch feature is skipped (see :meth:`GradientPath.missing`).

Importable without pytest or scipy: the 2-rank workers import it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tests.process_groups import fsdp2_missing, gloo_missing

__all__ = ["PATHS", "WORLDS", "GradientPath", "by_name", "dtype_name"]

#: The process counts of the matrix: one process, and 2 gloo CPU ranks.
WORLDS = (1, 2)

Refusal = tuple[type[BaseException], str]


@dataclass(frozen=True)
class GradientPath:
    """One gradient path.

    ``build(model)`` returns the path's optimizer keyword arguments (on top of the suite's
    ``weights=`` and ``c=``); it is called on the freshly built (and, for ``fsdp``, sharded) model
    before any forward pass. ``dtypes`` are the parameters' dtype; with ``mixed`` that is the
    trunk's dtype and the heads get the other one of float32 / bfloat16. ``shared`` names the
    parameters the Gram is measured on (``"all"`` or ``"trunk"``; it must agree with a ``shared=``
    that ``build`` passes). ``refuses`` maps a pattern to ``(ExceptionType, regex of the message)``:
    the pattern is a case name (every dtype and process count of it) or an ``fnmatch`` pattern over
    ``"<case>-<dtype>-<n>proc"`` (``"*-2proc"``). A combination several entries match is refused
    by any one of them (the suite does not pin which check a path makes first).
    """

    name: str
    build: Callable[[Any], dict[str, Any]] = lambda model: {}
    m: int = 2
    procs: tuple[int, ...] = WORLDS
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    mixed: bool = False
    fsdp: bool = False
    shared: str = "all"
    refuses: dict[str, Refusal] = field(default_factory=dict)
    #: Combinations torch itself cannot run on this path (same patterns as ``refuses``): skipped with the reason.
    torch_limits: dict[str, str] = field(default_factory=dict)

    def head_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The heads' dtype when the trunk is ``dtype``."""
        if not self.mixed:
            return dtype
        return torch.float32 if dtype == torch.bfloat16 else torch.bfloat16

    def refusals(self, case: str, dtype: torch.dtype, world: int) -> list[Refusal]:
        """The refusals this path declares for one combination (empty: the path runs it)."""
        key = f"{case}-{dtype_name(dtype)}-{world}proc"
        return [refusal for pattern, refusal in self.refuses.items() if pattern == case or fnmatch.fnmatchcase(key, pattern)]

    def missing(self, world: int, case: str | None = None, dtype: torch.dtype | None = None) -> str | None:
        """Why torch cannot run the path on ``world`` processes (or this case of it): a skip reason, or ``None``."""
        if case is not None and dtype is not None:
            key = f"{case}-{dtype_name(dtype)}-{world}proc"
            for pattern, reason in self.torch_limits.items():
                if pattern == case or fnmatch.fnmatchcase(key, pattern):
                    return reason
        missing = (fsdp2_missing() if self.fsdp else None) or (gloo_missing() if world > 1 else None)
        if missing is not None:
            return missing
        if self.build is _autogram:
            try:
                import torchjd.autogram  # noqa: F401
            except ImportError:
                return "torchjd (autogram) is not installed"
        return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _autogram(model: Any) -> dict[str, Any]:
    from cagrad_clip._low_memory import AutogramEngine

    return {"memory": "low", "engine": AutogramEngine(model.trunk), "shared": list(model.trunk.parameters())}


# What the low-memory mode refuses by design (docs/low_memory.md): no accumulation over several
# backward calls (combine=False, or a second combine=True), .grad must be None when backward starts,
# and one process only (it cannot average gradients it does not store).
_LOW_MEMORY_REFUSES: dict[str, Refusal] = {
    "accumulate_combine_false": (ValueError, r"cannot accumulate: use combine=True"),
    "accumulate_combine_true": (RuntimeError, r"cannot add another backward"),
    "grad_scaler": (ValueError, r"cannot accumulate: use combine=True"),
    "grad_scaler_overflow": (ValueError, r"cannot accumulate: use combine=True"),
    "unscale_early_overflow": (ValueError, r"cannot accumulate: use combine=True"),
    "clip_between_microbatches": (ValueError, r"cannot accumulate: use combine=True"),
    "edit_between_microbatches": (ValueError, r"cannot accumulate: use combine=True"),
    "edit_before_step": (ValueError, r"cannot accumulate: use combine=True"),
    "flat_buffers": (ValueError, r"needs \.grad = None on every parameter before backward"),
    # it walks the graph with backward(inputs=...), where reentrant checkpointing hides the parameters: a loss
    # that reaches none of them is refused as that likely mistake rather than taken as a zero gradient
    "no_parameter_reached": (ValueError, r"reaches none of the parameters"),
    "*-2proc": (NotImplementedError, r"memory='low' cannot average the objectives' gradients across ranks"),
}

PATHS: list[GradientPath] = [
    GradientPath("default"),
    GradientPath("accumulator", build=lambda model: {"accumulate_dtype": torch.float32}),
    # the Gram measured on the trunk only (shared=): every store must slice its Gram to the shared parameters
    GradientPath("default/trunk", build=lambda model: {"shared": list(model.trunk.parameters())}, shared="trunk"),
    GradientPath(
        "accumulator/trunk",
        build=lambda model: {"accumulate_dtype": torch.float32, "shared": list(model.trunk.parameters())},
        shared="trunk",
    ),
    # one bf16 and one fp32 sub-module (trunk in the listed dtype, heads in the other)
    GradientPath("mixed", mixed=True),
    # every parameter a DTensor shard of torch.distributed.fsdp.fully_shard (1 process: a 1-rank gloo group)
    GradientPath(
        "fsdp2",
        fsdp=True,
        torch_limits={
            "partly_reached_distributed": "FSDP2 (fully_shard) cannot reduce-scatter a parameter only some ranks reach: plain "
            "sum(losses).backward() already aborts in gloo ('Received data size doesn't match expected size'; torch 2.13)",
        },
    ),
    GradientPath("low/hooks", build=lambda model: {"memory": "low"}, m=2, procs=(1,), refuses=dict(_LOW_MEMORY_REFUSES)),
    GradientPath("low/autogram", build=_autogram, m=3, procs=(1,), shared="trunk", refuses=dict(_LOW_MEMORY_REFUSES)),
]


def by_name(name: str) -> GradientPath:
    return next(p for p in PATHS if p.name == name)
