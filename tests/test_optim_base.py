"""torch.optim citizenship of the wrapper (cagrad_clip/optim_base.py): pickling, deep copies,
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
    """Case 12: ``copy.deepcopy(opt)`` and pickle raised ``AttributeError: ... 'optimizer'``."""
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
    """Case 12: the four registries registered but never fired."""
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
    """Case 16: the wrapper's state loaded into a plain optimizer raised ``KeyError``; a plain
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
    """Case 16: an unknown key raised ``TypeError: _configure()``; a failed load changes nothing."""
    model, losses, opt = trained()
    state = opt.state_dict()
    state["conflict_averse"]["temperature"] = 2.0
    state["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['temperature'\]"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("keyword", [False, True])
def test_step_with_a_closure_returns_its_value_positionally_or_by_keyword(keyword):
    """Case 16: ``step(closure)`` positionally raised "losses must be a sequence ... got function";
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
