"""Behaviours of ``MultiObjectiveModule`` that surviving mutants showed no test pinned: manual
optimisation, which micro-batches of an accumulation window combine, and norm clipping whatever the
``Trainer`` says. Each against a hand computation or the documented value."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402

from cagrad_clip.integrations.lightning import MultiObjectiveModule  # noqa: E402

from .test_lightning import LR, Module, data, fit, losses_of, net  # noqa: E402


def test_the_module_uses_manual_optimisation():
    """``automatic_optimization`` is ``False`` (Lightning's bool), not just falsy."""
    assert Module(net()).automatic_optimization is False


# ------------------------------------------------------------------ which backward combines
class CombineRecordingSGD(torch.optim.SGD):
    """A multi-objective optimizer (the protocol's three members) that records each ``combine`` flag."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=LR)
        self.weights, self.last, self.combines = None, None, []

    def backward(self, losses, combine: bool = True) -> None:
        torch.stack(list(losses)).sum().backward()
        self.combines.append(combine)


class CombineRecording(MultiObjectiveModule):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.model = net()

    def objective_losses(self, batch, batch_idx):
        return losses_of(self.model, batch)

    def configure_optimizers(self):
        return CombineRecordingSGD(self.parameters())


@pytest.mark.parametrize(("k", "n"), [(3, 7), (2, 5), (1, 3)])
def test_only_the_last_micro_batch_of_each_window_combines(k, n):
    """``accumulate_grad_batches = k``: ``backward(..., combine=True)`` on micro-batches ``k-1, 2k-1, ...``
    and on the epoch's last (a short last window), ``combine=False`` on the others."""
    module = CombineRecording(accumulate_grad_batches=k)
    trainer = fit(module, data(n))
    assert module.conflict_averse_optimizer.combines == [(i + 1) % k == 0 or i == n - 1 for i in range(n)]
    assert trainer.global_step == -(-n // k)


# ------------------------------------------------------------------ clipping
def test_the_module_clips_by_norm_and_a_trainer_asking_for_value_clipping_is_refused():
    """``gradient_clip_val`` is a max-norm clip of the combined direction: a ``Trainer`` set to clip by
    value does not silently turn it into a value clip, Lightning refuses the two conflicting choices."""
    module = Module(net(), gradient_clip_val=0.5)
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm"):
        fit(module, data(1), gradient_clip_algorithm="value")
