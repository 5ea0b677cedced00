"""torch.optim citizenship for an optimizer that wraps another one (apart from any algorithm).

:class:`WrappedOptimizer` composes with a base ``torch.optim.Optimizer`` the way LR schedulers
do: it holds it and delegates ``param_groups``, ``state`` and ``defaults``, so schedulers,
``GradScaler`` and gradient clipping see the base optimizer's groups and state. It is still an
``Optimizer`` (``isinstance`` checks in schedulers and ``GradScaler`` pass) and keeps torch's
contracts: step pre/post hooks fire around :meth:`step`, the ``state_dict`` and
``load_state_dict`` hook registries fire, and it pickles and deep-copies.

Subclasses implement :meth:`step` and may extend :meth:`_wrapper_state` / :meth:`_load_wrapper_state`
(what they add to the base optimizer's state dict) and ``__getstate__`` (what must not be pickled).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["WrappedOptimizer"]

_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class WrappedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that delegates its groups and state to ``optimizer``.

    Subclasses must call ``super().__init__(optimizer)`` first. The wrapper's own entries in the
    state dict live under :attr:`STATE_KEY` next to the base optimizer's ``state`` and
    ``param_groups``, so a plain optimizer of the same kind can load it too.
    """

    #: Key of the wrapper's own entry in :meth:`state_dict`.
    STATE_KEY = "wrapper"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: D107 - no super().__init__: state is delegated
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        for name in _HOOK_REGISTRIES:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    # ------------------------------------------------------------------ delegation
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
        """Add a parameter group to the base optimizer."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state dict (hooks fire)
    def _wrapper_state(self) -> dict[str, Any]:
        """What the wrapper adds to the state dict (override)."""
        return {}

    def _load_wrapper_state(self, state: dict[str, Any] | None) -> Callable[[], None]:
        """Validate the wrapper's saved entry (``None`` if absent) and return a function that applies it.

        Validation happens before anything is loaded, so a bad state dict changes nothing (override).
        """
        return lambda: None

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus the wrapper's own entry under :attr:`STATE_KEY`."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        out = dict(self.optimizer.state_dict())
        out[self.STATE_KEY] = self._wrapper_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` produced, or a plain optimizer's state dict (wrapper settings kept)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        base = {k: v for k, v in state_dict.items() if k != self.STATE_KEY}
        wrapper = state_dict.get(self.STATE_KEY)
        if "param_groups" not in base or "state" not in base:
            raise ValueError(
                f"state_dict has no 'state' and 'param_groups' (keys: {sorted(state_dict)}); pass what "
                f"{type(self).__name__}.state_dict() or a torch.optim optimizer's state_dict() returned"
            )
        apply = self._load_wrapper_state(wrapper)
        self.optimizer.load_state_dict(base)
        apply()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ pickling, deepcopy
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # An LR scheduler replaces ``step`` by an instance attribute that calls *this* optimizer through a
        # weak reference (and holds a local function, which cannot be pickled); a copy steps by its own
        # class method, as a copy of a torch optimizer does (its state keeps no instance ``step``).
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_REGISTRIES:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._patch_step_function()

    def __repr__(self) -> str:
        base = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"{type(self).__name__}(\n  optimizer=\n{base}\n)"
