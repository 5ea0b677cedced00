"""``ConflictAverseOptimizer``: RACO's clipped CAGrad direction in front of any ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor

from ._accumulation import WrapperState, accumulate, combine_window, host_weights
from ._arguments import check_base_optimizer, check_no_step_in_backward, check_shared, fixed, read_only, shared_list, split_step_arguments
from ._checkpoint import restore_wrapper_state, saved_wrapper_state
from ._diagnostics import StepDiagnostics, all_finite, explain_nonfinite
from ._distributed import active_group
from ._grad_scaler import EDITED, check_grad_scaler, scaler_allows_step
from ._layout import GradientFlow, current_store
from ._loss_checks import check_losses
from ._low_memory import AutogramEngine
from ._nonfinite import NONFINITE_POLICIES, NonfinitePolicy, resolve_nonfinite
from ._optim_base import WrappedOptimizer
from ._settings import CAGradSettings, Rescale, Solver
from ._storage import GradientStore

__all__ = ["NONFINITE_POLICIES", "ConflictAverseOptimizer"]


class ConflictAverseOptimizer(WrappedOptimizer):
    """Wrap a ``torch.optim`` optimizer so each step follows RACO's clipped CAGrad direction.

    Each step takes one loss per objective, accumulates every objective's gradient (``m``
    backward passes through the shared graph), solves the clipped CAGrad dual on their Gram matrix
    on the gradients' device (RACO Algorithm 1, arXiv 2602.02495), writes
    ``d = g0 + c ||g0|| G~/||G~||`` (``g0 = sum_i w_i g_i``) into ``.grad`` and steps the wrapped
    optimizer. The per-objective gradients are kept in the parameters' dtype; the Gram and the
    combination accumulate in float32 or better.

    Args:
        optimizer: the base optimizer (any ``torch.optim.Optimizer`` whose ``step`` needs no
            closure; not ``LBFGS`` or ``SparseAdam``). It owns ``param_groups``, ``state`` and
            ``defaults``, so LR schedulers and ``GradScaler`` work on the wrapper.
        weights: user weights ``w`` (one per objective, finite, ``>= 0``, positive sum; normalised
            to sum 1). ``None`` means uniform over however many losses are passed.
        c: trust-region radius, a finite real ``>= 0``; ``c = 0`` is the weighted-sum gradient.
            The convergence theory (RACO Thm 3.1) needs ``c < 1``.
        clip: RACO's clip ``p~ = min(p, w)``; ``False`` gives CAGrad with a weighted anchor.
        rescale: ``None`` (default, as in the paper), ``"1+c"`` (official CAGrad toy script) or
            ``"1+c^2"`` (official CAGrad code, LibMTL): divide the direction by that factor.
        solver: ``"auto"``, ``"exact"`` or ``"frank_wolfe"`` (see :data:`~cagrad_clip.SOLVER_OPTIONS`).
        max_iter: Frank-Wolfe iterations of the dual solver; ``None`` picks ``default_max_iter(m)``.
        shared: parameters on which the Gram (the conflict) is measured (a module, meaning its
            parameters, one parameter, or an iterable of them); default all of the base
            optimizer's parameters. The same coefficients combine every parameter's gradients.
        memory: ``"default"`` stores ``m - 1`` gradients (the floor for ``m`` separate gradients);
            ``"low"`` stores none (``docs/low_memory.md``): with an ``engine``, every step (any ``m``)
            takes TorchJD's autogram Gramian and one weighted backward; without one, ``m <= 2`` takes
            three backward passes with per-parameter hooks. No gradient accumulation, one process
            (or ``distributed=False``).
        engine: an :class:`~cagrad_clip.AutogramEngine` on the modules that hold the
            shared parameters, built before the first forward; needed by ``memory="low"`` for
            ``m >= 3``.
        accumulate_dtype: ``None`` (default) keeps the per-objective gradient sums in the
            gradients' own dtype, as torch keeps ``.grad``; ``torch.float32`` (or ``float64``) sums
            low-precision gradients in a wider buffer instead (more memory: see ``docs/guide.md``).
        nonfinite: what :meth:`step` does if an objective's gradient, or the direction written into
            ``.grad``, has an Inf/NaN: ``"skip"`` (default) leaves parameters and optimizer state
            untouched, warns and counts it in :attr:`skipped_steps`; ``"raise"`` raises
            ``FloatingPointError``; ``"ignore"`` steps anyway (no check, no host sync; use it with
            ``GradScaler``, which checks itself). The non-finite direction stays visible in ``.grad``.
            A :class:`~cagrad_clip.NonfinitePolicy` of your own (a subclass) is accepted too.
        distributed: with ``torch.distributed`` initialised and a world size above one, average
            every objective's gradient across ranks before the Gram, so every rank takes the step of
            one process on the full batch (see ``docs/distributed.md``). FSDP2 shards are detected.
        process_group: the group to average over; ``None`` (default) is the default group.

    Settings change only through :meth:`configure`; they take effect at the next combination.

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=2e-5)
        opt = ConflictAverseOptimizer(base, weights=[0.8, 0.2], c=0.4)
        opt.zero_grad()
        opt.step([quality_loss, brevity_loss])
    """

    STATE_KEY = "conflict_averse"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weights: Sequence[float] | Tensor | None = None,
        *,
        c: float = 0.4,
        clip: bool = True,
        rescale: Rescale = None,
        solver: Solver = "auto",
        max_iter: int | None = None,
        shared: torch.nn.Module | Tensor | Iterable[Tensor] | None = None,
        memory: Literal["default", "low"] = "default",
        engine: AutogramEngine | None = None,
        accumulate_dtype: torch.dtype | None = None,
        nonfinite: str | NonfinitePolicy = "skip",
        distributed: bool = True,
        process_group: Any = None,
    ) -> None:
        settings = CAGradSettings(
            weights=weights,  # type: ignore[arg-type]  # a tensor is checked (dtype included) and stored as floats
            c=c,
            clip=clip,
            rescale=rescale,
            solver=solver,
            max_iter=max_iter,
        )
        nonfinite = resolve_nonfinite(nonfinite)
        check_base_optimizer(optimizer)
        shared_request = None if shared is None else check_shared(shared_list(shared), optimizer)
        # how gradients flow (the store is built from it): validated here, fixed for the optimizer's life
        self._flow = GradientFlow(memory, engine, accumulate_dtype, distributed, process_group, shared_request)
        super().__init__(optimizer)
        #: Every piece of mutable state, in one object: shallow copies of this optimizer (Lightning's
        #: LightningOptimizer copies ``__dict__``) then share it instead of diverging.
        self._state = WrapperState(settings=settings, nonfinite=nonfinite)
        self._current_store()  # validates the parameters now (complex, devices, FSDP layout)

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> CAGradSettings:
        """The frozen settings that decide the direction (change them with :meth:`configure`)."""
        return self._state.settings

    @property
    def weights(self) -> Tensor | None:
        """The normalised user weights (float64, CPU), or ``None`` for uniform."""
        w = self._state.settings.weights
        return None if w is None else torch.tensor(w, dtype=torch.float64, device="cpu")

    @weights.setter
    def weights(self, value: Any) -> None:
        read_only("weights")

    c = property(lambda self: self._state.settings.c, lambda self, v: read_only("c"), doc="Trust-region radius ``c``.")
    clip = property(lambda self: self._state.settings.clip, lambda self, v: read_only("clip"), doc="RACO's clip on or off.")
    rescale = property(lambda self: self._state.settings.rescale, lambda self, v: read_only("rescale"), doc="Rescaling convention.")
    solver = property(lambda self: self._state.settings.solver, lambda self, v: read_only("solver"), doc="The dual solver.")
    max_iter = property(lambda self: self._state.settings.max_iter, lambda self, v: read_only("max_iter"), doc="Frank-Wolfe budget.")
    nonfinite = property(
        lambda self: self._state.nonfinite.name, lambda self, v: read_only("nonfinite"), doc="The non-finite policy's name."
    )
    memory = property(lambda self: self._flow.memory, lambda self, v: fixed("memory"), doc="``'default'`` or ``'low'``.")
    engine = property(lambda self: self._flow.engine, lambda self, v: fixed("engine"), doc="The low-memory mode's AutogramEngine.")
    accumulate_dtype = property(
        lambda self: self._flow.accumulate_dtype, lambda self, v: fixed("accumulate_dtype"), doc="The accumulator rows' dtype (or None)."
    )
    distributed = property(lambda self: self._flow.distributed, lambda self, v: fixed("distributed"), doc="Average across ranks.")
    process_group = property(lambda self: self._flow.process_group, lambda self, v: fixed("process_group"), doc="The group averaged over.")

    def configure(self, **changes: Any) -> CAGradSettings:
        """Change settings (``weights``, ``c``, ``clip``, ``rescale``, ``solver``, ``max_iter``, ``nonfinite``).

        Everything is validated before anything changes. The new settings apply from the next
        combination (a direction already in ``.grad`` stays as it was computed). Returns the new
        :attr:`settings`. Typical use: anneal ``c`` or switch weights between training phases.
        """
        nonfinite = resolve_nonfinite(changes.pop("nonfinite", self._state.nonfinite))
        settings = self._state.settings.replace(**changes)
        m = self._state.window.num_objectives
        store = self._state.store
        if self._state.window.open and store is not None and store.grads_intact():
            if settings.num_objectives not in (None, m):
                raise ValueError(
                    f"{settings.num_objectives} weights given while {m} objectives are accumulated; call step() or zero_grad() first"
                )
            assert m is not None
            if host_weights(settings, m)[store.home] == 0:
                raise ValueError(
                    f"weight 0 for objective {store.home} while this window accumulates: its gradient is the one kept in "
                    ".grad and scaled by its coefficient, which weight 0 can make 0, so the accumulated gradients could not "
                    "be taken back out of a combination; change the weights after step() or zero_grad()"
                )
        self._state.settings = settings
        self._state.nonfinite = nonfinite
        self._state.device_weights.clear()
        return settings

    def _wrapper_state(self) -> dict[str, Any]:
        return saved_wrapper_state(self._state)

    def _load_wrapper_state(self, state: dict[str, Any] | None) -> Callable[[], None]:
        """The checkpoint's settings replace the current ones, with a warning naming every difference."""
        return restore_wrapper_state(self._state, state, self.STATE_KEY)

    def __repr__(self) -> str:
        s = self._state.settings
        weights = None if s.weights is None else [round(x, 6) for x in s.weights]
        base = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(weights={weights}, c={s.c}, clip={s.clip}, rescale={s.rescale!r}, "
            f"max_iter={s.max_iter}, solver={s.solver!r}, nonfinite={self._state.nonfinite.name!r},\n  optimizer=\n{base}\n)"
        )

    # ------------------------------------------------------------------ torch.optim citizenship
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        kept = self._state
        state["_state"] = WrapperState(settings=kept.settings, nonfinite=kept.nonfinite, skipped_steps=kept.skipped_steps)
        return state

    @property
    def last(self) -> StepDiagnostics | None:
        """What the last combination computed (``None`` before the first)."""
        return self._state.last

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``nonfinite="skip"``."""
        return self._state.skipped_steps

    @property
    def _store(self) -> GradientStore | None:
        return self._state.store

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer (not while gradients are accumulated and unstepped)."""
        if self._state.window.open and self._state.store is not None and self._state.store.grads_intact():
            raise RuntimeError("add_param_group() while gradients are accumulated; call step() or zero_grad() first")
        self.optimizer.add_param_group(param_group)
        self._state.window.reset()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's ``.grad`` and end the accumulation window."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._state.window.reset()
        if self._state.store is not None:
            self._state.store.discard_window()
            if not set_to_none:
                self._state.store.mark_zeroed()

    def _current_store(self) -> GradientStore:
        return current_store(self._state, self.optimizer, self._flow)

    # ------------------------------------------------------------------ the work
    @torch.compiler.disable
    def backward(self, losses: Sequence[Tensor] | Tensor, combine: bool = True) -> None:
        """Accumulate every objective's gradient of ``losses`` (one backward pass each).

        With ``combine=True`` (default) ``.grad`` then holds the combined direction of everything
        accumulated since the window began, so gradient clipping or ``GradScaler.unscale_`` can
        run before :meth:`step`. With gradient accumulation, pass ``combine=False`` for all but the
        last micro-batch: it solves once and spares one rounding of the direction.

        The window: it continues while ``.grad`` holds the tensors this optimizer left there; a step,
        a ``zero_grad`` (the optimizer's or the model's) or an assignment to ``.grad`` starts a new one,
        and so does an in-place write to a combined direction (clipping it, or zeroing it with
        ``zero_grad(set_to_none=False)``): the edited direction is kept and the new window's direction
        is added to it, as torch adds gradients. Between a ``backward(..., combine=False)`` and the
        next call ``.grad`` holds an intermediate the optimizer owns: an in-place edit of it (or an
        edit that bypasses the version counter, such as ``GradScaler.unscale_`` or ``.data``, of a
        combined direction before a further ``backward``) cannot be taken apart from the
        per-objective gradients, so :meth:`step` refuses it with a ``RuntimeError`` (detected on the
        device, no host sync). A no-op edit changes nothing. Everything is validated before anything
        changes.
        """
        self._backward(losses, combine, seal=True)

    def _backward(self, losses: Sequence[Tensor] | Tensor, combine: bool, seal: bool) -> None:
        losses = check_losses(losses)
        if not isinstance(combine, bool):
            raise TypeError(f"combine must be True or False, got {combine!r}")
        m = len(losses)
        self._state.settings.weights_tensor(m)  # raises if the number of weights differs
        store = self._current_store()
        check_no_step_in_backward(store.params)
        accumulate(self._state, store, losses, combine=combine, seal=seal, ranks=self._ranks())

    @torch.compiler.disable
    def combine(self) -> StepDiagnostics:
        """Solve the dual on the accumulated gradients and write the direction into ``.grad``.

        Idempotent: a second call without new gradients returns :attr:`last`. Sync-free.
        """
        return combine_window(self._state, seal=True, ranks=self._ranks())

    def _ranks(self) -> tuple[Any, int]:
        return active_group(self._flow.distributed, self._flow.process_group)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch's protocol for optimizers that handle scaled gradients themselves, on while the window's
        gradients are accumulated but not combined: ``GradScaler.step`` then hands itself to :meth:`step`,
        which combines before the scaler unscales and checks ``.grad``. Off otherwise, so ``GradScaler``,
        Lightning and accelerate unscale (and clip) a combined direction as for any optimizer."""
        return self._state.window.phase == "accumulating"

    @torch.compiler.disable
    def step(
        self,
        losses: Sequence[Tensor] | Tensor | Callable[[], Any] | None = None,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: Any = None,
    ) -> Any:
        """Update the parameters along the conflict-averse direction.

        ``step(losses)`` is ``backward(losses)`` then ``step()``. ``step()`` alone uses what was
        accumulated in this window (solving once if not yet combined). ``step(closure)`` or
        ``step(closure=closure)`` calls ``closure`` with grad enabled; it must return the list of
        losses, and ``step`` returns what it returned (as torch optimizers return the closure's
        loss). Otherwise ``step`` returns ``None``.

        ``grad_scaler`` is passed by ``torch.amp.GradScaler.step(opt)`` itself (do not pass it by
        hand): the window is combined on the scaled gradients (the direction is positively
        homogeneous, so ``d(s g) = s d(g)``), the scaler unscales the direction (unless
        ``scaler.unscale_(opt)`` already did) and the step is skipped, silently, when it found an
        Inf/NaN, so ``scaler.update()`` backs off as usual.

        After a step the next :meth:`backward` starts a new window even without ``zero_grad``;
        its direction is then added to ``.grad`` as torch adds gradients.
        """
        check_grad_scaler(grad_scaler)
        losses, closure = split_step_arguments(losses, closure)
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            losses = result
        if losses is not None:
            self._backward(cast("Sequence[Tensor] | Tensor", losses), combine=True, seal=False)
        diagnostics = combine_window(self._state, seal=False, ranks=self._ranks())
        self._state.window.reset()  # whatever happens below, this window is over
        try:
            if grad_scaler is not None:
                if scaler_allows_step(self, grad_scaler, diagnostics, self._state.nonfinite.checks):
                    self.optimizer.step()
                return result
            if self._state.nonfinite.checks and not bool(all_finite(diagnostics)):  # the one host read
                if not bool(diagnostics.window_intact):
                    raise RuntimeError(EDITED)
                self._state.nonfinite.handle(explain_nonfinite(diagnostics, self._state.store))  # returns to skip, raises to stop
                self._state.skipped_steps += 1
                return result
            self.optimizer.step()
            return result
        finally:
            if self._state.store is not None:  # .grad is the user's now: keep no reference to it
                self._state.store.end_window()
