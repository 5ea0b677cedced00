"""The non-finite policy as an object: the built-ins by name, and a policy of one's own."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from cagrad_clip import NONFINITE_POLICIES, ConflictAverseOptimizer, NonfinitePolicy
from cagrad_clip._nonfinite import IGNORE, RAISE, SKIP, resolve_nonfinite


class Recording(NonfinitePolicy):
    """Skip, and keep the explanation (instead of a warning): a user's policy."""

    def __init__(self) -> None:
        super().__init__("record", "skip and keep the message")
        self.messages: list[str] = []

    def handle(self, message: str) -> None:
        self.messages.append(message)


class Stopping(NonfinitePolicy):
    def handle(self, message: str) -> None:
        raise KeyboardInterrupt(message)


def model_and_losses():
    torch.manual_seed(0)
    net = nn.ModuleDict({"trunk": nn.Linear(3, 4), "a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    x = torch.randn(8, 3)

    def losses(nan_in_b: bool = False):
        h = torch.tanh(net["trunk"](x))
        second = net["b"](h).pow(2).mean()
        return [net["a"](h).pow(2).mean(), second * float("nan") if nan_in_b else second]

    return net, losses


def test_the_built_in_policies_are_named_and_described() -> None:
    assert NONFINITE_POLICIES == {p.name: p.description for p in (SKIP, RAISE, IGNORE)}
    assert [resolve_nonfinite(n) for n in ("skip", "raise", "ignore")] == [SKIP, RAISE, IGNORE]
    assert (SKIP.checks, RAISE.checks, IGNORE.checks) == (True, True, False)
    for policy in (SKIP, RAISE, IGNORE):  # a built-in copies and pickles to itself
        assert copy.deepcopy(policy) is policy and pickle.loads(pickle.dumps(policy)) is policy
    with pytest.raises(ValueError, match="unknown nonfinite='warn'; choose one of"):
        resolve_nonfinite("warn")
    with pytest.raises(ValueError, match="non-empty name"):
        NonfinitePolicy("", "no name")


def test_a_policy_of_ones_own_decides_what_a_nonfinite_step_does() -> None:
    """``handle`` gets the explanation (the objective named) before anything moved; returning skips the
    step and counts it; raising stops with the policy's own error; the optimizer reports its name."""
    net, losses = model_and_losses()
    policy = Recording()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), nonfinite=policy)
    before = copy.deepcopy(net.state_dict())
    opt.step(losses(nan_in_b=True))
    assert opt.nonfinite == "record" and opt.skipped_steps == 1
    assert len(policy.messages) == 1 and "objective(s) [1]" in policy.messages[0]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    opt.zero_grad()
    opt.step(losses())  # a finite step is not the policy's business
    assert len(policy.messages) == 1 and opt.skipped_steps == 1
    stopping = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), nonfinite=Stopping("stop", "stop the run"))
    moved = copy.deepcopy(net.state_dict())
    with pytest.raises(KeyboardInterrupt, match="objective"):
        stopping.step(losses(nan_in_b=True))
    assert all(torch.equal(moved[k], v) for k, v in net.state_dict().items()) and stopping.skipped_steps == 0


def test_a_checkpoint_names_the_policy_and_loads_into_an_optimizer_that_holds_it() -> None:
    """The state dict saves the policy's name: an optimizer built with the same policy keeps its object;
    one without it refuses the checkpoint before changing anything."""
    net, losses = model_and_losses()
    policy = Recording()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), nonfinite=policy)
    opt.step(losses(nan_in_b=True))
    state = opt.state_dict()
    assert state["conflict_averse"]["nonfinite"] == "record"
    twin = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), nonfinite=policy)
    twin.load_state_dict(state)
    assert twin._state.nonfinite is policy and twin.skipped_steps == 1
    plain = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.5), c=0.9)
    with pytest.raises(ValueError, match="unknown nonfinite='record'"):
        plain.load_state_dict(state)
    assert (plain.nonfinite, plain.c, plain.param_groups[0]["lr"]) == ("skip", 0.9, 0.5)
    opt.configure(nonfinite="raise")
    assert opt.nonfinite == "raise" and opt._state.nonfinite is RAISE
