"""``ConflictAverseOptimizer``: RACO's clipped CAGrad direction in front of any ``torch.optim`` optimizer."""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .distributed import active_group, average_across_ranks, check_distributed, sum_across_ranks
from .dual import SOLVER_OPTIONS, _solve, check_c, default_max_iter, normalize_weights, rescale_divisor, resolve_solver
from .gradients import ObjectiveGradients, check_losses

__all__ = ["ConflictAverseOptimizer", "StepDiagnostics", "NONFINITE_POLICIES"]

#: What :meth:`ConflictAverseOptimizer.step` does when an objective's gradient is not finite.
NONFINITE_POLICIES = ("skip", "raise", "ignore")


class StepDiagnostics(NamedTuple):
    """What the last combination computed; all on-device tensors, read them without a sync cost."""

    gram: Tensor
    """``(m, m)`` Gram of the per-objective gradients on the shared parameters."""
    cosines: Tensor
    """``(m, m)`` pairwise cosine similarities of the objectives' gradients (0 for a zero gradient)."""
    dual: Tensor
    """``p``: the CAGrad dual solution on the simplex."""
    clipped_dual: Tensor
    """``p~ = min(p, w)`` (``p`` when ``clip=False``)."""
    coefficients: Tensor
    """``a``: the direction written into ``.grad`` is ``sum_i a_i g_i``."""
    anchor_norm: Tensor
    """``||g0||`` with ``g0 = sum_i w_i g_i`` on the shared parameters."""
    fw_gap: Tensor
    """Frank-Wolfe gap of the dual solve (an upper bound on its suboptimality)."""
    finite: Tensor
    """``(m,)`` bool: whether objective ``i``'s gradient (its squared norm) is finite."""


class ConflictAverseOptimizer(torch.optim.Optimizer):
    """Wrap a ``torch.optim`` optimizer so each step follows RACO's clipped CAGrad direction.

    Each step takes one loss per objective, computes every objective's gradient (``m`` backward
    passes through the shared graph), solves the clipped CAGrad dual on their Gram matrix on the
    gradients' device (RACO Algorithm 1, arXiv 2602.02495), writes ``d = g0 + c ||g0|| G~/||G~||``
    (``g0 = sum_i w_i g_i``) into ``.grad`` and steps the wrapped optimizer.

    Args:
        optimizer: the base optimizer (any ``torch.optim.Optimizer``); it owns ``param_groups``,
            ``state`` and ``defaults``, so LR schedulers and ``GradScaler`` work on the wrapper.
        weights: user weights ``w`` (one per objective, finite, ``>= 0``, positive sum; normalised
            to sum 1). ``None`` means uniform over however many losses are passed.
        c: trust-region radius, finite ``>= 0``; ``c = 0`` is the weighted-sum gradient.
            The convergence theory (RACO Thm 3.1) needs ``c < 1``.
        clip: RACO's clip ``p~ = min(p, w)``; ``False`` gives CAGrad with a weighted anchor.
        rescale: ``None`` (default, as in the paper), ``"1+c"`` (official CAGrad toy script) or
            ``"1+c^2"`` (official CAGrad code, LibMTL): divide the direction by that factor.
        shared: parameters on which the Gram (the conflict) is measured; default all of the base
            optimizer's parameters. The same coefficients combine the gradients of every
            parameter, task-specific heads included.
        max_iter: Frank-Wolfe iterations of the dual solver; ``None`` picks
            :func:`~cagrad_clip.default_max_iter`.
        solver: the dual solver: ``"auto"`` (default; exact support enumeration for up to 12
            objectives, Frank-Wolfe above: :func:`~cagrad_clip.dual.auto_solver`), ``"exact"``
            or ``"frank_wolfe"`` (see :data:`~cagrad_clip.SOLVER_OPTIONS`).
        nonfinite: what :meth:`step` does if an objective's gradient has an Inf/NaN:
            ``"skip"`` (default) leaves parameters and optimizer state untouched, warns naming the
            objectives and counts it in :attr:`skipped_steps`; ``"raise"`` raises
            ``FloatingPointError``; ``"ignore"`` steps anyway (no check and so no host sync; use it
            with ``GradScaler``, which does its own check). In every policy the non-finite
            combination stays visible in ``.grad``, so a ``GradScaler`` skips the step itself.
        distributed: when ``torch.distributed`` is initialised with a world size above one,
            average every objective's gradient across ranks (one all-reduce of the ``(m, D)``
            buffer) before the Gram, so every rank gets identical coefficients and the update
            equals one process on the full batch. ``False`` turns it off (each rank combines its
            own gradients). With ``DistributedDataParallel``, run the forward under
            ``model.no_sync()``: this optimizer does the averaging (see ``docs/distributed.md``).
            With FSDP2 (``fully_shard``, DTensor parameters, detected at construction) each
            objective's gradient is taken with ``loss_i.backward()`` so FSDP reduce-scatters it,
            and the Gram is the all-reduce (SUM) of the shard Grams; ``distributed=False`` is
            then an error.
        process_group: the group to average over; ``None`` (default) is the default group.

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=2e-5)
        opt = ConflictAverseOptimizer(base, weights=[0.8, 0.2], c=0.4)
        opt.zero_grad()
        opt.step([quality_loss, brevity_loss])
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weights: Sequence[float] | Tensor | None = None,
        c: float = 0.4,
        clip: bool = True,
        rescale: str | None = None,
        shared: Iterable[Tensor] | None = None,
        max_iter: int | None = None,
        nonfinite: str = "skip",
        distributed: bool = True,
        process_group: Any = None,
        solver: str = "auto",
    ) -> None:
        check_distributed(distributed, process_group)
        self.distributed = distributed
        self.process_group = process_group
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ConflictAverseOptimizer):
            raise TypeError("optimizer is already a ConflictAverseOptimizer; wrap the base optimizer once")
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self._configure(weights=weights, c=c, clip=clip, rescale=rescale, max_iter=max_iter, nonfinite=nonfinite, solver=solver)
        self._shared_request = None if shared is None else list(shared)
        self._build_layout()
        self.last: StepDiagnostics | None = None
        self.skipped_steps = 0
        self._written: Tensor | None = None  # coefficients whose direction is currently in .grad
        # A weak reference to a .grad we wrote into: if it is gone or replaced, someone reset .grad. Weak, so
        # that zero_grad() really frees our direction (and its memory can be reused for the next one).
        self._grad_marker: weakref.ref[Tensor] | None = None
        self._combined = False
        self._stepped = False

    # ----------------------------------------------------------------- settings
    def _configure(
        self,
        *,
        weights: Sequence[float] | Tensor | None,
        c: float,
        clip: bool,
        rescale: str | None,
        max_iter: int | None,
        nonfinite: str,
        solver: str = "auto",
    ) -> None:
        self.c = check_c(c)
        if not isinstance(clip, bool):
            raise TypeError(f"clip must be True or False, got {clip!r}")
        self.clip = clip
        self._divisor = rescale_divisor(rescale, self.c)
        self.rescale = rescale
        if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0):
            raise ValueError(f"max_iter must be None or an int >= 0, got {max_iter!r}")
        self.max_iter = max_iter
        if solver not in SOLVER_OPTIONS:
            raise ValueError(f"unknown solver={solver!r}; choose one of {list(SOLVER_OPTIONS)}")
        self.solver = solver
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown nonfinite={nonfinite!r}; choose one of {list(NONFINITE_POLICIES)}")
        self.nonfinite = nonfinite
        if weights is not None:
            w = normalize_weights(weights)
            if w.dim() != 1:
                raise ValueError(f"weights must be one number per objective (shape (m,)), got shape {tuple(w.shape)}")
            self.weights: Tensor | None = w
        else:
            self.weights = None
        self._device_weights: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}

    def _build_layout(self) -> None:
        trainable = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        trainable = list({id(p): p for p in trainable}.values())
        if not trainable:
            raise ValueError("the base optimizer has no parameter with requires_grad=True; nothing to train")
        if self._shared_request is None:
            shared_ids = {id(p) for p in trainable}
        else:
            known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            shared_ids = set()
            for i, p in enumerate(self._shared_request):
                if not isinstance(p, Tensor):
                    raise TypeError(f"shared[{i}] is a {type(p).__name__}, not a parameter tensor")
                if id(p) not in known:
                    raise ValueError(f"shared[{i}] (shape {tuple(p.shape)}) is not a parameter of the base optimizer")
                if p.requires_grad:
                    shared_ids.add(id(p))
            if not shared_ids:
                raise ValueError("shared contains no parameter with requires_grad=True; the Gram would be empty")
        ordered = [p for p in trainable if id(p) in shared_ids] + [p for p in trainable if id(p) not in shared_ids]
        dtype = torch.float32
        for p in ordered:
            dtype = torch.promote_types(dtype, p.dtype)
        grads = ObjectiveGradients(ordered, len(shared_ids), dtype)
        if grads.sharded and not self.distributed:
            raise ValueError(
                "the parameters are DTensor shards (FSDP2 fully_shard) but distributed=False: each rank would solve "
                "on the Gram of its own shard only; keep distributed=True"
            )
        if grads.sharded and self.process_group is not None:
            raise ValueError(
                "process_group was given but the parameters are DTensor shards (FSDP2 fully_shard): the Gram is "
                "summed over their device mesh's group; drop process_group"
            )
        self._grads = grads
        self._layout_key = self._current_layout_key()

    def _current_layout_key(self) -> tuple[int, ...]:
        return tuple(id(p) for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad)

    # ------------------------------------------------------ torch.optim citizenship
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer (allowed only between steps)."""
        if self._grads.accumulated:
            raise RuntimeError("add_param_group() while gradients are accumulated; call zero_grad() first")
        self.optimizer.add_param_group(param_group)
        self._build_layout()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's ``.grad`` and forget the accumulated per-objective gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grads.reset()
        self._written = None
        self._combined = False
        self._stepped = False

    def _start_fresh_if_stale(self) -> None:
        """Begin a new accumulation if the last one was stepped on or ``.grad`` was reset elsewhere.

        Frameworks such as the Hugging Face ``Trainer`` call ``model.zero_grad()`` instead of the
        optimizer's: then ``.grad`` no longer holds our direction, and neither it nor the old
        per-objective gradients may be carried into the next step. Host-side checks only.
        """
        if not self._grads.accumulated:
            return
        marked = None if self._grad_marker is None else self._grad_marker()
        replaced = self._written is not None and (marked is None or marked is not self._grads.params[0].grad)
        if self._stepped or replaced:
            self._grads.reset()
            self._written = None
            self._combined = False
            self._stepped = False

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict nested under ``"base"``, and this wrapper's settings."""
        return {
            "base": self.optimizer.state_dict(),
            "conflict_averse": {
                "weights": None if self.weights is None else self.weights.tolist(),
                "c": self.c,
                "clip": self.clip,
                "rescale": self.rescale,
                "max_iter": self.max_iter,
                "nonfinite": self.nonfinite,
                "solver": self.solver,
                "skipped_steps": self.skipped_steps,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` produced (the settings are validated again)."""
        if not isinstance(state_dict, dict) or "base" not in state_dict or "conflict_averse" not in state_dict:
            raise ValueError(
                "state_dict must come from ConflictAverseOptimizer.state_dict() (keys 'base' and 'conflict_averse'); "
                "to load a plain optimizer state, call .optimizer.load_state_dict()"
            )
        settings = dict(state_dict["conflict_averse"])
        skipped = int(settings.pop("skipped_steps", 0))
        self._configure(**settings)
        self.optimizer.load_state_dict(state_dict["base"])
        self.skipped_steps = skipped

    def __repr__(self) -> str:
        weights = None if self.weights is None else [round(x, 6) for x in self.weights.tolist()]
        base = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(weights={weights}, c={self.c}, clip={self.clip}, rescale={self.rescale!r}, "
            f"max_iter={self.max_iter}, solver={self.solver!r}, nonfinite={self.nonfinite!r},\n  optimizer=\n{base}\n)"
        )

    # ----------------------------------------------------------------- the work
    def _weights_for(self, m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype, m)
        w = self._device_weights.get(key)
        if w is None:
            if self.weights is not None and self.weights.shape[0] != m:
                raise ValueError(
                    f"got {m} losses but {self.weights.shape[0]} weights; pass one loss per weight, in the same order"
                )
            base = self.weights if self.weights is not None else normalize_weights(None, m)
            w = base.to(device=device, dtype=dtype)
            self._device_weights[key] = w
        return w

    def backward(self, losses: Sequence[Tensor] | Tensor, combine: bool = True) -> None:
        """Accumulate every objective's gradient of ``losses`` (one backward pass each).

        With ``combine=True`` (default) ``.grad`` then holds the combined direction of
        everything accumulated since :meth:`zero_grad`, so gradient clipping or
        ``GradScaler.unscale_`` can run before :meth:`step`. With gradient accumulation, pass
        ``combine=False`` for all but the last micro-batch to solve only once.
        """
        losses = check_losses(losses)
        if self.weights is not None and len(losses) != self.weights.shape[0]:
            raise ValueError(
                f"got {len(losses)} losses but {self.weights.shape[0]} weights; pass one loss per weight, in the same order"
            )
        if self._current_layout_key() != self._layout_key:
            if self._grads.accumulated:
                raise RuntimeError("the trainable parameters changed during gradient accumulation; call zero_grad() first")
            self._build_layout()
        self._start_fresh_if_stale()
        if self._written is not None:
            # .grad holds the combination of the previous accumulation: take it out before adding more.
            self._grads.add_combination_to_grads(self._written, alpha=-1.0)
            self._written = None
        self._grads.accumulate(losses)
        self._combined = False
        if combine:
            self.combine()

    @torch.no_grad()
    def combine(self) -> StepDiagnostics:
        """Solve the dual on the accumulated gradients and write the direction into ``.grad``.

        Idempotent: a second call without new gradients does nothing. Sync-free.
        """
        if not self._grads.accumulated:
            raise RuntimeError(
                "no per-objective gradients are accumulated: call backward(losses) or step(losses) after zero_grad()"
            )
        if self._combined:
            assert self.last is not None
            return self.last
        if self._grads.sharded:
            # FSDP already averaged every objective's gradient over the ranks (reduce-scatter);
            # the full Gram is the sum of the shard Grams: one all-reduce of m * m numbers.
            gram = sum_across_ranks(self._grads.gram(), self._grads.shard_group)
        else:
            group, world_size = active_group(self.distributed, self.process_group)
            if world_size > 1:  # host-side check; the all-reduce itself never syncs
                assert self._grads.buffer is not None
                average_across_ranks(self._grads.buffer, group, world_size)
            gram = self._grads.gram()
        m = gram.shape[-1]
        w = self._weights_for(m, gram.device, gram.dtype)
        max_iter = default_max_iter(m) if self.max_iter is None else self.max_iter
        solution = _solve(gram, w, self.c, self.clip, self._divisor, max_iter, resolve_solver(self.solver, m))
        diag = gram.diagonal()
        finite = torch.isfinite(diag)
        norms = diag.clamp_min(0.0).sqrt()
        outer = norms.unsqueeze(-1) * norms.unsqueeze(-2)
        cosines = torch.where(outer > 0, gram / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(gram))
        self._grads.add_combination_to_grads(solution.coefficients)
        self._written = solution.coefficients
        marker = self._grads.params[0].grad
        self._grad_marker = None if marker is None else weakref.ref(marker)
        self._combined = True
        self.last = StepDiagnostics(
            gram=gram,
            cosines=cosines,
            dual=solution.dual,
            clipped_dual=solution.clipped_dual,
            coefficients=solution.coefficients,
            anchor_norm=solution.anchor_norm,
            fw_gap=solution.fw_gap,
            finite=finite,
        )
        return self.last

    def step(  # type: ignore[override]
        self,
        losses: Sequence[Tensor] | Tensor | None = None,
        closure: Callable[[], Sequence[Tensor]] | None = None,
    ) -> None:
        """Update the parameters along the conflict-averse direction.

        ``step(losses)`` is ``backward(losses)`` then ``step()``. ``step()`` alone uses what was
        accumulated since :meth:`zero_grad` (solving once if not yet combined). ``closure``, if
        given, is called with grad enabled and must return the list of losses.

        After a step the next :meth:`backward` starts a new accumulation of per-objective
        gradients even without :meth:`zero_grad`; its direction is then added to ``.grad`` as
        torch adds gradients (call ``zero_grad()`` first, as usual, to replace it).
        """
        if closure is not None:
            if losses is not None:
                raise ValueError("pass either losses or closure, not both")
            with torch.enable_grad():
                losses = closure()
        if losses is not None:
            self.backward(losses)
        self.combine()
        self._stepped = True  # the next backward() starts a new accumulation
        if self.nonfinite != "ignore":
            assert self.last is not None
            finite = self.last.finite
            if not bool(finite.all() & torch.isfinite(self.last.coefficients).all()):  # the one host read
                bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
                message = (
                    f"objective(s) {bad} have a non-finite gradient (Inf/NaN)"
                    if bad
                    else "the combination overflowed (the Gram of finite gradients is not finite)"
                )
                if self.nonfinite == "raise":
                    raise FloatingPointError(message + "; the parameters were not updated")
                self.skipped_steps += 1
                warnings.warn(message + "; step skipped, parameters unchanged", RuntimeWarning, stacklevel=3)
                return
        self.optimizer.step()
        return
