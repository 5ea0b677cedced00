"""torch.optim citizenship of the wrapper (cagrad_clip/_optim_base.py): pickling, deep copies,
hook registries, state dicts interchangeable with plain optimizers, closures."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer


def model_and_losses(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(16, 4, dtype=torch.float64)

    def losses(m=model):
        out = m(x)
        return [(out[:, 0] - 1).pow(2).mean(), (out[:, 1] + out[:, 0]).pow(2).mean()]

    return model, losses


def trained(seed=0, steps=2):
    model, losses = model_and_losses(seed)
    opt = ConflictAverseOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), weights=[0.7, 0.3], c=0.3, rescale="1+c")
    for _ in range(steps):
        opt.zero_grad()
        opt.step(losses())
    return model, losses, opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_give_an_optimizer_that_continues_identically(how):
    """``copy.deepcopy(opt)`` and pickle raised ``AttributeError: ... 'optimizer'``."""
    model, losses, opt = trained()
    if how == "deepcopy":
        twin_model, twin = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        twin_model, twin = torch.load(buffer, weights_only=False)
        pickle.loads(pickle.dumps(opt))  # plain pickle works too
    assert twin.settings == opt.settings and twin.param_groups[0]["params"][0] is next(twin_model.parameters())
    for o, m in ((opt, model), (twin, twin_model)):
        o.zero_grad()
        o.step(losses(m))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_state_dict_and_load_state_dict_hooks_fire():
    """the four registries registered but never fired."""
    model, losses, opt = trained()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = dict(sd)
        sd.pop("extra")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    state = opt.state_dict()
    assert state["extra"] == 1
    opt.load_state_dict(state)
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_a_state_dict_post_hook_may_return_a_new_dict():
    """As in ``torch.optim``: a post-hook that returns a dict replaces the state dict (the argument is
    left as it was), and later hooks receive the replacement."""
    model, losses, opt = trained()
    seen = []

    def replace(o, sd):
        return {**sd, "extra": 1}

    def observe(o, sd):
        seen.append(sd.get("extra"))

    opt.register_state_dict_post_hook(replace)
    opt.register_state_dict_post_hook(observe)
    state = opt.state_dict()
    assert state["extra"] == 1 and seen == [1]
    assert state["conflict_averse"]["c"] == 0.3 and set(state) == {"state", "param_groups", "conflict_averse", "extra"}


def test_a_base_load_that_fails_leaves_the_wrappers_settings_unchanged():
    """The wrapper's settings are applied only once the base optimizer has loaded: a state dict with
    the wrong number of parameter groups is refused by the base optimizer and changes nothing."""
    model, losses, opt = trained()
    state = opt.state_dict()
    other_model, _ = model_and_losses(1)
    params = list(other_model.parameters())
    two_groups = ConflictAverseOptimizer(
        torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.5), weights=[0.5, 0.5], c=0.1
    )
    settings = two_groups.settings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="parameter groups"):
            two_groups.load_state_dict(state)
    assert two_groups.settings == settings and two_groups.c == 0.1
    assert [g["lr"] for g in two_groups.param_groups] == [0.5, 0.5]
    assert not caught  # no "settings replaced" warning for a load that did not happen


def test_the_wrappers_state_dict_loads_into_a_plain_optimizer_and_back():
    """the wrapper's state loaded into a plain optimizer raised ``KeyError``; a plain
    optimizer's state loads into the wrapper and keeps the wrapper's settings."""
    model, losses, opt = trained()
    plain = torch.optim.Adam(model.parameters(), lr=0.5)
    plain.load_state_dict(opt.state_dict())
    assert plain.param_groups[0]["lr"] == 0.01
    for p in model.parameters():
        assert torch.equal(plain.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    fresh = ConflictAverseOptimizer(torch.optim.Adam(model.parameters(), lr=0.5), weights=[0.2, 0.8])
    fresh.load_state_dict(plain.state_dict())
    assert fresh.settings.weights == (0.2, 0.8) and fresh.param_groups[0]["lr"] == 0.01


def test_unknown_saved_setting_is_a_clear_error_and_nothing_is_loaded():
    """an unknown key raised ``TypeError: _configure()``; a failed load changes nothing."""
    model, losses, opt = trained()
    state = opt.state_dict()
    state["conflict_averse"]["temperature"] = 2.0
    state["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['temperature'\]"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("keyword", [False, True])
def test_step_with_a_closure_returns_its_value_positionally_or_by_keyword(keyword):
    """``step(closure)`` positionally raised "losses must be a sequence ... got function";
    ``step(closure=...)`` returned ``None``; torch returns the closure's value."""
    model, losses = model_and_losses()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []

    def closure():
        opt.zero_grad()
        out = losses()
        seen.append(out)
        return out

    result = opt.step(closure=closure) if keyword else opt.step(closure)
    assert result is seen[0]
    assert opt.last is not None


def test_step_hooks_fire_once_per_step():
    model, losses = model_and_losses()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step(losses())
    assert calls == ["pre", "post"]


def test_a_shallow_copy_shares_the_state_as_lightning_optimizer_does():
    """Lightning's ``LightningOptimizer`` copies the optimizer's ``__dict__`` and calls its methods on
    the copy: backward on the copy and step on the original must see one accumulation window."""
    model, losses = model_and_losses()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    shallow = object.__new__(type(opt))
    shallow.__dict__ = dict(opt.__dict__)  # what LightningOptimizer does
    shallow.backward(losses(), combine=False)
    assert opt.step() is None and opt.last is not None and shallow.last is opt.last


# ------------------------------------------------------------------ WrappedOptimizer itself
# ``WrappedOptimizer`` is the base for other wrappers (benchmarks/dpo/baselines.py subclasses it):
# a minimal subclass that steps the base optimizer shows what it gives them, next to plain torch.
from collections import OrderedDict  # noqa: E402

from cagrad_clip._optim_base import WrappedOptimizer  # noqa: E402

_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class PassThrough(WrappedOptimizer):
    """Steps the base optimizer on whatever ``.grad`` holds."""

    def step(self, closure=None):
        return self.optimizer.step(closure)


class PassThroughWithoutHooksInPickles(PassThrough):
    """Leaves its hooks out of pickles, as ``torch.optim.Optimizer.__getstate__`` does."""

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k not in _REGISTRIES}


def test_wrapped_optimizer_repr_is_its_name_then_the_base_repr_indented():
    base = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.25)
    lines = repr(PassThrough(base)).splitlines()
    base_lines = repr(base).splitlines()
    assert "    lr: 0.25" in base_lines
    assert lines[:2] == ["PassThrough(", "  optimizer="]
    assert lines[2:-1] == ["    " + line for line in base_lines]
    assert lines[-1] == ")"


@pytest.mark.parametrize("set_to_none", [None, True, False])
def test_wrapped_optimizer_zero_grad_matches_torch(set_to_none):
    """``zero_grad()`` sets ``.grad`` to ``None`` (torch's default); ``set_to_none=False`` zeroes the
    same tensors in place. Compared with a plain SGD on a twin parameter."""
    ours, theirs = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    wrapped = PassThrough(torch.optim.SGD([ours], lr=0.1))
    plain = torch.optim.SGD([theirs], lr=0.1)
    held = []
    for p, opt in ((ours, wrapped), (theirs, plain)):
        p.grad = torch.full((3,), 2.0)
        held.append(p.grad)
        opt.zero_grad() if set_to_none is None else opt.zero_grad(set_to_none=set_to_none)
    if set_to_none is False:
        assert ours.grad is held[0] and torch.equal(ours.grad, torch.zeros(3))
        assert theirs.grad is held[1] and torch.equal(theirs.grad, torch.zeros(3))
    else:
        assert ours.grad is None and theirs.grad is None


def test_wrapped_optimizer_add_param_group_reaches_the_base_and_steps_like_torch():
    """The new group lands in the base optimizer with its own lr and the defaults filled in, and a
    step moves its parameter exactly as a plain SGD with the same groups does."""
    first, second = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    twins = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))]
    wrapped = PassThrough(torch.optim.SGD([first], lr=0.1, momentum=0.9))
    plain = torch.optim.SGD([twins[0]], lr=0.1, momentum=0.9)
    wrapped.add_param_group({"params": [second], "lr": 0.5})
    plain.add_param_group({"params": [twins[1]], "lr": 0.5})
    assert wrapped.optimizer.param_groups[1]["params"] == [second]
    assert {k: v for k, v in wrapped.param_groups[1].items() if k != "params"} == {
        k: v for k, v in plain.param_groups[1].items() if k != "params"
    }
    assert wrapped.param_groups[1]["lr"] == 0.5 and wrapped.param_groups[1]["momentum"] == 0.9
    for params, opt in (([first, second], wrapped), (twins, plain)):
        for p in params:
            p.grad = torch.arange(1.0, p.numel() + 1)
        opt.step()
    assert torch.equal(second.detach(), torch.tensor([0.5, 0.0, -0.5]))
    for p, q in zip([first, second], twins):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_wrapper_unpickled_without_hook_registries_gets_empty_ones_like_torch(how):
    """A subclass may leave its hooks out of pickles (torch's own ``__getstate__`` does): the copy then
    has empty registries, as an unpickled ``torch.optim`` optimizer has, and new hooks register and fire."""
    param = nn.Parameter(torch.ones(2))
    wrapped = PassThroughWithoutHooksInPickles(torch.optim.SGD([param], lr=0.1))
    wrapped.register_step_pre_hook(lambda o, a, k: None)
    plain = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    plain.register_step_pre_hook(lambda o, a, k: None)
    if how == "deepcopy":
        twin, plain_twin = copy.deepcopy(wrapped), copy.deepcopy(plain)
    else:
        twin, plain_twin = pickle.loads(pickle.dumps(wrapped)), pickle.loads(pickle.dumps(plain))
    for name in _REGISTRIES:
        assert getattr(plain_twin, name) == OrderedDict()
        assert getattr(twin, name) == OrderedDict() and type(getattr(twin, name)) is OrderedDict
    calls = []
    twin.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    twin.register_step_post_hook(lambda o, a, k: calls.append("post"))
    twin.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    twin.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    twin_param = twin.param_groups[0]["params"][0]
    twin_param.grad = torch.ones(2)
    twin.step()
    twin.load_state_dict(twin.state_dict())
    assert calls == ["pre", "post", "sd_pre", "load_post"]
    assert torch.equal(twin_param.detach(), torch.full((2,), 0.9))
    assert torch.equal(param.detach(), torch.ones(2))  # the original did not move


# ------------------------------------------------------------------ with an LR scheduler attached
def _scheduled(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ConflictAverseOptimizer(base) if wrap else base
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # patches opt.step, as every scheduler does
    return model, opt


def _take_a_step(model, opt, wrap):
    out = model(torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3))
    losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean()]
    opt.zero_grad()
    if wrap:
        opt.step(losses)
    else:
        sum(losses).backward()
        opt.step()


@pytest.mark.parametrize(
    "wrap",
    [False, True],
    ids=["torch", "wrapper"],
)
def test_a_deepcopy_made_after_an_lr_scheduler_was_attached_steps_its_own_parameters(wrap):
    """An LR scheduler replaces ``opt.step`` by an instance attribute that calls the *original*
    optimizer (through a weak reference). torch's ``__getstate__`` keeps only defaults, state and
    groups, so a copy steps its own parameters; so must the wrapper's copy (copying that instance
    ``step`` would make the copy step the original's parameters with the copy's losses)."""
    model, opt = _scheduled(wrap)
    twin_model, twin = copy.deepcopy((model, opt))
    before = [p.detach().clone() for p in model.parameters()]
    twin_before = [p.detach().clone() for p in twin_model.parameters()]
    _take_a_step(twin_model, twin, wrap)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(not torch.equal(p, b) for p, b in zip(twin_model.parameters(), twin_before))


@pytest.mark.parametrize(
    "wrap",
    [False, True],
    ids=["torch", "wrapper"],
)
def test_an_optimizer_with_an_lr_scheduler_attached_pickles(wrap):
    """``torch.save(opt)`` / ``pickle.dumps(opt)`` of a plain optimizer works with a scheduler attached, and
    so must the wrapper's (the scheduler's instance ``step`` is a local function, which cannot be pickled)."""
    model, opt = _scheduled(wrap)
    twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
    _take_a_step(twin_model, twin, wrap)
