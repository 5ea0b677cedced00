"""``memory="low"``: a store that keeps no per-objective gradient at all.

The Gram comes from extra backward passes (per-parameter hooks, ``m <= 2``) or from TorchJD's
autogram Gramian (an :class:`~cagrad_clip._low_memory.AutogramEngine`, any ``m``), and the
combination ``sum_i a_i g_i`` from a weighted backward into ``.grad``
(:func:`~cagrad_clip._low_memory.low_memory_passes`; measurements in ``docs/low_memory.md``). With
nothing stored there is nothing to accumulate over micro-batches or to average over ranks: those
calls are refused by :meth:`PassesStore.check_backward`, before anything changes.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import torch
from torch import Tensor

from .._low_memory import AutogramEngine, low_memory_passes
from .._numerics import reduction_dtype
from .base import GradientStore, fingerprint

__all__ = ["PassesStore"]


class PassesStore(GradientStore):
    """No rows: the Gram and the direction are computed by backward passes (see the module doc)."""

    def __init__(self, params: Sequence[Tensor], shared_count: int, engine: AutogramEngine | None) -> None:
        dtype = reduction_dtype(params[0].dtype)
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        super().__init__(params, shared_count, [p.shape for p in params], dtype)
        self.engine = engine
        self.m = 0
        self._passes: Generator[Tensor, Tensor, str] | None = None
        self._gram: Tensor | None = None

    def check_backward(self, combine: bool, continuing: bool, world_size: int) -> None:
        if not combine:
            raise ValueError("memory='low' keeps no per-objective gradients, so it cannot accumulate: use combine=True")
        if continuing:
            raise RuntimeError("memory='low' cannot add another backward to this step's direction: call step() or zero_grad() first")
        if any(p.grad is not None for p in self.params):
            raise ValueError("memory='low' needs .grad = None on every parameter before backward: call zero_grad() first")
        if world_size > 1:
            raise NotImplementedError(
                "memory='low' cannot average the objectives' gradients across ranks (it stores none); use the default "
                "memory mode, or distributed=False to combine each rank's own gradients"
            )

    @property
    def num_objectives(self) -> int | None:
        return self.m or None

    def start_window(self, m: int, home: int) -> None:
        self.m, self.home = m, home
        self._gram = None

    def accumulate(self, losses: Sequence[Tensor]) -> None:
        """The passes up to the Gram (the graph is kept for the weighted backward of :meth:`write`)."""
        # distributed=False: check_backward already refused more than one rank in the optimizer's own group
        # (the world may be larger than a process_group of one rank)
        passes = low_memory_passes(losses, self.params, self.shared_count, engine=self.engine, distributed=False)
        self._gram = next(passes)
        self._passes = passes
        self.guard.record(self.params)

    def gram_over_ranks(self, counter: Any, group: Any, world_size: int) -> Tensor:
        assert self._gram is not None
        return self._gram  # one process (or per rank): check_backward refused world_size > 1

    def gram(self) -> Tensor:
        assert self._gram is not None
        return self._gram

    def write(self, coefficients: Tensor) -> Tensor:
        """The weighted backward: ``.grad = sum_i a_i g_i``; returns whether every written value is finite."""
        assert self._passes is not None
        passes, self._passes = self._passes, None
        try:
            passes.send(coefficients)
        except StopIteration:
            pass
        grads = [p.grad for p in self.params if p.grad is not None]
        self.guard.record(self.params)
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        # each norm taken in float32 or better: a finite float16 direction may have a norm above 65504
        return torch.isfinite(fingerprint(grads)).all()

    def unshared_sumsq(self) -> Tensor:
        """The written direction's squared norm over the non-shared parameters, for every objective:
        an Inf/NaN in one objective's head gradient shows in the direction, but which objective's
        it was is not known without the stored gradients."""
        heads = [p.grad for p in self.params[self.shared_count :] if p.grad is not None]
        if not heads:
            return torch.zeros(self.m, dtype=self.dtype, device=self.device)
        total = fingerprint(heads).to(self.dtype).square().sum()  # norms in float32 or better, as above
        return total.expand(self.m)

    def explain_nonfinite(self, bad: list[int], gram: Tensor) -> str:
        named = [i for i in bad if not bool(torch.isfinite(gram[i, i]))]
        if named:
            return f"objective(s) {named} have a non-finite gradient (Inf/NaN) on the shared parameters, or one too large to square"
        return (
            "the direction written into .grad is not finite on the parameters outside shared=: an objective's gradient there is "
            "Inf/NaN (memory='low' keeps no per-objective gradient, so which objective's cannot be told)"
        )

    def unwrite(self) -> None:  # pragma: no cover - check_backward refuses every continued window
        raise RuntimeError("memory='low' cannot take a combination back out of .grad")

    def discard_window(self) -> None:
        if self._passes is not None:
            self._passes.close()  # .grad back to None, the engine forgets the forward
            self._passes = None
        super().discard_window()

    def end_window(self) -> None:
        super().end_window()
        self._gram = None
