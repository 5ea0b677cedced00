"""Contracts of ``MultiObjectiveModule`` and of the walk through Lightning's optimizer wrapper that the
end-to-end tests in ``test_lightning.py`` leave open: a short last accumulation window, what
``training_step`` returns, the exact coefficient/cosine logs, schedulers, settings, the nonfinite
default of an arbitrary precision plugin. Each against a hand computation."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.core.optimizer import LightningOptimizer  # noqa: E402

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations import find_conflict_averse  # noqa: E402
from cagrad_clip.integrations.lightning import MultiObjectiveModule, default_nonfinite  # noqa: E402

from .test_lightning import LR, Module, data, fit, hand_loop, losses_of, max_diff, net  # noqa: E402


# ------------------------------------------------------------------ find_conflict_averse and LightningOptimizer
class Chain:
    def __init__(self, inner: object) -> None:
        self.optimizer = inner


class SelfLoop(LightningOptimizer):
    """A LightningOptimizer wrapping itself: the walk must stop (a few reads mean it went round again)."""

    def __init__(self) -> None:  # no super().__init__: it would make the class imitate the wrapped one
        self.reads = 0

    @property
    def _optimizer(self):
        self.reads += 1
        if self.reads > 3:
            raise RuntimeError("the walk went round the cycle again")
        return self


def cao() -> ConflictAverseOptimizer:
    return ConflictAverseOptimizer(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=LR), weights=[0.5, 0.5])


def test_the_real_optimizer_is_found_behind_lightnings_wrapper_and_plain_wrappers_still_walk():
    """A LightningOptimizer passes ``isinstance`` for the class it wraps: the walk returns the wrapped
    optimizer itself, not the wrapper."""
    opt = cao()
    lopt = LightningOptimizer(opt)
    assert isinstance(lopt, ConflictAverseOptimizer)
    assert find_conflict_averse(lopt) is opt
    assert find_conflict_averse(Chain(lopt)) is opt
    assert find_conflict_averse(Chain(Chain(opt))) is opt  # with Lightning imported, plain wrappers too
    assert find_conflict_averse(LightningOptimizer(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=LR))) is None
    assert find_conflict_averse(SelfLoop()) is None


def test_the_unified_lightning_packages_optimizer_wrapper_is_looked_through_too(monkeypatch):
    """``lightning.pytorch`` (the unified package) has its own LightningOptimizer class: stand-in module."""

    class UnifiedLightningOptimizer:
        def __init__(self, optimizer) -> None:
            self._optimizer = optimizer
            self.__class__ = type("LightningWrapped", (UnifiedLightningOptimizer, type(optimizer)), {})

    module = types.ModuleType("lightning.pytorch.core.optimizer")
    module.LightningOptimizer = UnifiedLightningOptimizer
    monkeypatch.setitem(sys.modules, "lightning.pytorch.core.optimizer", module)
    opt = cao()
    wrapped = UnifiedLightningOptimizer(opt)
    assert isinstance(wrapped, ConflictAverseOptimizer)
    assert find_conflict_averse(wrapped) is opt
    assert find_conflict_averse(LightningOptimizer(opt)) is opt  # pytorch_lightning's still


def test_fit_steps_the_optimizer_returned_by_configure_optimizers():
    module = Module(net())
    trainer = fit(module, data(2))
    assert module.conflict_averse_optimizer is trainer.optimizers[0]
    assert trainer.optimizers[0].last is not None


# ------------------------------------------------------------------ the module
def test_settings_reach_the_wrapper_and_without_a_trainer_nonfinite_is_skip():
    module = Module(net(), c=0.1, clip=False, rescale="1+c")
    opt = module.wrap_optimizer(torch.optim.SGD(module.parameters(), lr=LR))
    assert (opt.c, opt.clip, opt.rescale, opt.nonfinite) == (0.1, False, "1+c", "skip")
    assert opt.weights.tolist() == pytest.approx([0.7, 0.3])
    defaults = Module(net()).wrap_optimizer(torch.optim.SGD(module.parameters(), lr=LR))
    assert (defaults.c, defaults.clip, defaults.rescale) == (0.4, True, None)
    assert Module(net()).accumulate_grad_batches == 1
    with pytest.raises(ValueError):
        Module(net(), accumulate_grad_batches=0)


def test_any_precision_plugin_without_a_scaler_or_an_fp16_name_gets_skip():
    assert default_nonfinite(object()) == "skip"  # neither `scaler` nor `precision`
    assert default_nonfinite(types.SimpleNamespace(precision="16")) == "ignore"
    assert default_nonfinite(types.SimpleNamespace(precision=16)) == "ignore"  # the precision's string form
    assert default_nonfinite(types.SimpleNamespace(scaler=None, precision="32-true")) == "skip"
    assert default_nonfinite(types.SimpleNamespace(scaler=object())) == "ignore"


def test_a_short_last_window_is_stepped_like_the_others():
    """5 batches, accumulation 2: windows (2, 2, 1); the last one steps at the epoch's end, its losses
    divided by 2 as Lightning does, with no clipping to hide the scale."""
    batches = data(5)
    mine = net()
    hand_loop(mine, batches, 2, None)
    module = Module(net(), accumulate_grad_batches=2)
    trainer = fit(module, batches)
    assert trainer.global_step == 3
    assert max_diff(module.model, mine) < 1e-6


class Recording(MultiObjectiveModule):
    """Records each step's losses (as the hook returned them) and what ``training_step`` returned."""

    def __init__(self, m: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.model = net()
        self.m = m
        self.seen: list[list[float]] = []
        self.returned: list[torch.Tensor] = []

    def objective_losses(self, batch, batch_idx):
        losses = losses_of(self.model, batch)
        losses = [losses[0], losses[1], (losses[0] - losses[1]).abs()][: self.m] if self.m != 1 else [losses[0] + losses[1]]
        self.seen.append([loss.item() for loss in losses])
        return losses

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.returned.append(outputs["loss"])

    def configure_optimizers(self):
        return self.wrap_optimizer(torch.optim.SGD(self.parameters(), lr=LR))


@pytest.mark.parametrize("m, weights", [(2, None), (3, [1.0, 2.0, 1.0]), (1, None)])
def test_training_step_returns_the_weighted_loss_of_its_batch(m, weights):
    module = Recording(m, objective_weights=weights)
    fit(module, data(2))
    w = [1.0 / m] * m if weights is None else [x / sum(weights) for x in weights]
    assert len(module.returned) == 2
    for seen, got in zip(module.seen, module.returned):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(sum(a * b for a, b in zip(w, seen)), rel=1e-6)


def test_the_logged_coefficients_and_cosines_are_the_last_steps_one_per_objective_and_pair():
    module = Recording(3, objective_names=["a", "b", "c"])
    trainer = fit(module, data(3))
    last = module.conflict_averse_optimizer.last
    metrics = trainer.callback_metrics
    assert {k for k in metrics if k.startswith(("coef/", "cos/"))} == {"coef/a", "coef/b", "coef/c", "cos/a|b", "cos/a|c", "cos/b|c"}
    for i, name in enumerate("abc"):
        assert metrics[f"coef/{name}"].item() == pytest.approx(last.coefficients[i].item())
        assert metrics[f"loss/{name}"].item() == pytest.approx(module.seen[-1][i], rel=1e-6)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert metrics[f"cos/{'abc'[i]}|{'abc'[j]}"].item() == pytest.approx(last.cosines[i, j].item())


def test_every_scheduler_is_stepped_once_per_window_except_reduce_on_plateau():
    class TwoSchedulers(Module):
        def configure_optimizers(self):
            opt = self.wrap_optimizer(torch.optim.SGD(self.parameters(), lr=LR))
            halve = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            third = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda epoch: 1.0 / 3.0)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # needs a metric: left to the user
            return [opt], [halve, third, {"scheduler": plateau, "monitor": "loss/fit"}]

    module = TwoSchedulers(net(), accumulate_grad_batches=2)
    fit(module, data(4))  # 2 windows
    lr = module.conflict_averse_optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(LR * (0.5 / 3.0) ** 2)
