"""MultiObjectiveModule (pytorch_lightning) against a hand-written loop with ConflictAverseOptimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations.lightning import MultiObjectiveModule  # noqa: E402

LR, WEIGHTS = 0.5, [0.7, 0.3]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def losses_of(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    out = model(x).float()
    return [(out[:, 0] - y).pow(2).mean(), (out[:, 1] + out[:, 0] * y).pow(2).mean()]


def data(n_batches: int = 6, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=g), torch.randn(size, generator=g)) for _ in range(n_batches)]


class Module(MultiObjectiveModule):
    def __init__(self, model: nn.Module, **kw) -> None:
        super().__init__(objective_weights=WEIGHTS, objective_names=["fit", "tie"], **kw)
        self.model = model

    def objective_losses(self, batch, batch_idx):
        return losses_of(self.model, batch)

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=LR)
        opt = self.wrap_optimizer(base)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def fit(module: pl.LightningModule, batches, **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


def hand_loop(model: nn.Module, batches, accumulate: int, clip_val: float | None, scale: float = 1.0) -> None:
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), weights=WEIGHTS)
    lr = LR
    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        opt.zero_grad()
        for i, batch in enumerate(window):
            opt.backward([loss / accumulate for loss in losses_of(model, batch)], combine=i == len(window) - 1)
        if clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_val)
        opt.step()
        lr *= 0.5
        for group in opt.param_groups:
            group["lr"] = lr


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("accumulate, clip_val", [(1, None), (2, None), (2, 0.5)])
def test_module_equals_hand_written_loop(accumulate, clip_val):
    """Also with accumulation and no clipping, where the step's size shows that each micro-batch's
    losses are divided by the window's length (clipping to a norm would hide that scale)."""
    batches = data()
    mine = net()
    hand_loop(mine, batches, accumulate, clip_val)
    module = Module(net(), accumulate_grad_batches=accumulate, gradient_clip_val=clip_val)
    trainer = fit(module, batches)
    assert trainer.global_step == len(batches) // accumulate
    assert max_diff(module.model, mine) < 1e-6
    assert max_diff(module.model, net()) > 1e-2
    metrics = trainer.callback_metrics
    for key in ("loss/fit", "loss/tie", "coef/fit", "coef/tie", "cos/fit|tie"):
        assert key in metrics, key
    assert metrics["coef/fit"].item() == pytest.approx(module.conflict_averse_optimizer.last.coefficients[0].item())


def test_fp16_loss_scaling_unscales_before_clipping():
    """16-mixed on CPU through a MixedPrecision plugin with a CPU GradScaler: every objective's loss is scaled,
    the plugin unscales before our clipping hook, so the step is the fp32 one up to fp16 autocast rounding."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    batches = data(4)
    mine = net()
    hand_loop(mine, batches, 1, 0.5)
    module = Module(net(), gradient_clip_val=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fit(module, batches, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    moved = max_diff(mine, net())
    assert max_diff(module.model, mine) < 0.05 * moved
    assert scaler.get_scale() == 2.0**12  # no overflow was met


def test_bf16_autocast_runs_and_wrong_optimizer_is_refused():
    module = Module(net(), gradient_clip_val=1.0)
    fit(module, data(2), precision="bf16-mixed")
    assert torch.isfinite(module.conflict_averse_optimizer.last.coefficients).all()

    class Plain(Module):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    with pytest.raises(TypeError, match="wrap_optimizer"):
        fit(Plain(net()), data(1))


def test_user_wrapper_is_used_as_is():
    model = net()

    class Own(Module):
        def configure_optimizers(self):
            return ConflictAverseOptimizer(torch.optim.SGD(self.parameters(), lr=LR), weights=[0.1, 0.9], c=0.0)

    module = Own(model)
    fit(module, data(2))
    torch.testing.assert_close(module.conflict_averse_optimizer.last.coefficients, torch.tensor([0.1, 0.9]))
    assert copy.deepcopy(module.conflict_averse_optimizer.weights).tolist() == pytest.approx([0.1, 0.9])


# ------------------------------------------------------------------ non-finite losses (issue 15, item 9)
BAD = 2  # the batch whose second objective is NaN


class NaNAt(Module):
    """Objective ``tie`` is NaN on batch ``BAD``; the parameters are recorded before every batch."""

    def __init__(self, model: nn.Module, **kw) -> None:
        super().__init__(model, **kw)
        self.snapshots: list[list[torch.Tensor]] = []

    def objective_losses(self, batch, batch_idx):
        losses = losses_of(self.model, batch)
        if batch_idx == BAD:
            losses[1] = losses[1] * float("nan")
        return losses

    def on_train_batch_start(self, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in self.model.parameters()])

    def on_train_end(self):
        self.snapshots.append([p.detach().clone() for p in self.model.parameters()])


def hand_loop_skipping(model: nn.Module, batches, skip: int) -> None:
    """``hand_loop`` (accumulation 1, no clipping) where batch ``skip`` takes no step but the LR still decays."""
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), weights=WEIGHTS)
    lr = LR
    for i, batch in enumerate(batches):
        if i != skip:
            opt.zero_grad()
            opt.backward(losses_of(model, batch))
            opt.step()
        lr *= 0.5
        for group in opt.param_groups:
            group["lr"] = lr


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nonfinite_loss_skips_the_step_in_fp32_and_bf16(precision):
    batches = data(5)
    module = NaNAt(net())
    with pytest.warns(RuntimeWarning, match="step skipped"):
        fit(module, batches, precision=precision)
    opt = module.conflict_averse_optimizer
    assert opt.nonfinite == "skip"
    assert opt.skipped_steps == 1
    snaps = module.snapshots
    assert len(snaps) == len(batches) + 1
    for i in range(len(batches)):
        same = all(torch.equal(a, b) for a, b in zip(snaps[i], snaps[i + 1]))
        assert same == (i == BAD), f"step {i}: parameters {'unchanged' if same else 'changed'}"
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    if precision == "32-true":  # the other steps are the hand-written loop's
        mine = net()
        hand_loop_skipping(mine, batches, BAD)
        assert max_diff(module.model, mine) < 1e-6


@pytest.mark.parametrize("how", ["argument", "kwargs"])
def test_users_nonfinite_wins(how):
    from pytorch_lightning.plugins.precision import MixedPrecision

    if how == "argument":
        module = NaNAt(net(), nonfinite="raise")
    else:  # set on the module's conflict-averse kwargs before configure_optimizers runs
        module = NaNAt(net())
        module.conflict_averse_kwargs["nonfinite"] = "raise"
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit(module, data(4))
    assert module.conflict_averse_optimizer.nonfinite == "raise"
    assert len(module.snapshots) == BAD + 1  # it stopped at the bad batch
    # the user's choice wins over the fp16 default too
    module = Module(net(), nonfinite="skip")
    fit(module, data(1), plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    assert module.conflict_averse_optimizer.nonfinite == "skip"
    with pytest.raises(ValueError, match="nonfinite"):
        Module(net(), nonfinite="sometimes")


def test_fp16_with_a_scaler_leaves_the_check_to_the_scaler():
    """16-mixed on CPU (a real Lightning run): "ignore", and the GradScaler skips the NaN step itself."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = NaNAt(net())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fit(module, data(4), plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    opt = module.conflict_averse_optimizer
    assert opt.nonfinite == "ignore" and opt.skipped_steps == 0
    snaps = module.snapshots
    assert all(torch.equal(a, b) for a, b in zip(snaps[BAD], snaps[BAD + 1]))  # the scaler skipped it
    assert scaler.get_scale() == 2.0**11  # and backed off once


def test_nonfinite_policy_decision():
    from pytorch_lightning.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

    from cagrad_clip.integrations.lightning import default_nonfinite

    assert default_nonfinite(None) == "skip"  # no trainer attached
    assert default_nonfinite(Precision()) == "skip"
    assert default_nonfinite(DoublePrecision()) == "skip"
    assert default_nonfinite(HalfPrecision("16-true")) == "skip"  # no scaler checks true fp16
    assert default_nonfinite(MixedPrecision("bf16-mixed", "cpu")) == "skip"
    assert default_nonfinite(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))) == "ignore"

    class ScalesItself(Precision):  # e.g. DeepSpeed's plugin: "16-mixed" and no `scaler` attribute
        precision = "16-mixed"

    assert default_nonfinite(ScalesItself()) == "ignore"
