"""``ConflictAverseOptimizer`` as a ``torch.optim`` citizen: its ``repr``, its copies (pickle and
deepcopy) and its checkpoints, each compared with what a plain ``torch.optim`` optimizer does or
with values fixed by hand."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer


def two_head_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def losses_of(model, x):
    out = model(x)
    return [(out[:, 0] - 1).pow(2).mean(), (out[:, 1] + out[:, 0]).pow(2).mean()]


def nan_losses_of(model, x):
    first, second = losses_of(model, x)
    return [first, second * float("nan")]


X = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(5, 3)


# ------------------------------------------------------------------------------------------ repr
def test_repr_lists_every_setting_then_the_base_optimizers_repr_indented():
    """First line: the class name and every setting (weights normalised, rounded to 6 digits); then
    ``optimizer=`` and torch's own repr of the base optimizer (its groups and hyperparameters, as
    ``torch.optim`` lists them), each line indented by four spaces; then ``)``."""
    model = two_head_model()
    base = torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.5)
    opt = ConflictAverseOptimizer(
        base, weights=[1.0, 2.0], c=0.25, clip=False, rescale="1+c", max_iter=7, solver="exact", nonfinite="raise"
    )
    lines = repr(opt).splitlines()
    assert lines[0] == (
        "ConflictAverseOptimizer(weights=[0.333333, 0.666667], c=0.25, clip=False, rescale='1+c', "
        "max_iter=7, solver='exact', nonfinite='raise',"
    )
    assert lines[1] == "  optimizer="
    base_lines = repr(base).splitlines()
    assert base_lines[0] == "SGD (" and "    lr: 0.125" in base_lines and "    momentum: 0.5" in base_lines
    assert lines[2:-1] == ["    " + line for line in base_lines]
    assert lines[-1] == ")"


def test_repr_of_uniform_weights_and_of_a_subclass():
    """Uniform weights show as ``weights=None``; a subclass shows its own name, as torch's optimizers do."""

    class Tuned(ConflictAverseOptimizer):
        pass

    model = two_head_model()
    opt = Tuned(torch.optim.Adam(model.parameters(), lr=0.5))
    first = repr(opt).splitlines()[0]
    assert first == "Tuned(weights=None, c=0.4, clip=True, rescale=None, max_iter=None, solver='auto', nonfinite='skip',"
    assert repr(torch.optim.Adam(model.parameters())).startswith("Adam (")  # torch: the class name first too


# ------------------------------------------------------------------------------------------ copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_keeps_the_nonfinite_policy_and_the_skipped_steps_count(how):
    """After one skipped step and ``configure(nonfinite="raise")``, a copy reports the same policy and
    count, and acts on the policy: a NaN step raises and is not counted; a finite step is taken."""
    model = two_head_model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(nan_losses_of(model, X))
    opt.configure(nonfinite="raise")
    assert (opt.nonfinite, opt.skipped_steps) == ("raise", 1)
    if how == "deepcopy":
        twin_model, twin = copy.deepcopy((model, opt))
    elif how == "pickle":
        twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        twin_model, twin = torch.load(buffer, weights_only=False)
    assert (twin.nonfinite, twin.skipped_steps) == ("raise", 1)
    before = [p.detach().clone() for p in twin_model.parameters()]
    twin.zero_grad()
    with pytest.raises(FloatingPointError):
        twin.step(nan_losses_of(twin_model, X))
    assert twin.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(twin_model.parameters(), before))
    twin.zero_grad()
    twin.step(losses_of(twin_model, X))
    assert any(not torch.equal(p, b) for p, b in zip(twin_model.parameters(), before))
    assert (opt.nonfinite, opt.skipped_steps) == ("raise", 1)  # the original is untouched


# ------------------------------------------------------------------------------------------ checkpoints
def trained_with_two_skips():
    model = two_head_model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.6, 0.4], c=0.3)
    for _ in range(2):
        opt.zero_grad()
        with pytest.warns(RuntimeWarning, match="step skipped"):
            opt.step(nan_losses_of(model, X))
    opt.zero_grad()
    opt.step(losses_of(model, X))
    assert opt.skipped_steps == 2
    return model, opt


def test_a_checkpoint_without_skipped_steps_or_policy_loads_as_zero_skips_and_keeps_the_policy():
    """A wrapper entry holding only the settings (as ``CAGradSettings.to_dict()`` gives them, e.g. a
    checkpoint written before the count and the policy were saved) loads: no step was skipped, and the
    optimizer's own ``nonfinite`` policy stays."""
    model, opt = trained_with_two_skips()
    state = opt.state_dict()
    assert state["conflict_averse"].pop("skipped_steps") == 2
    assert state["conflict_averse"].pop("nonfinite") == "skip"
    target = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), weights=[0.6, 0.4], c=0.3, nonfinite="raise")
    with pytest.warns(RuntimeWarning, match="step skipped"):  # make its own count non-zero first
        target.configure(nonfinite="skip")
        target.zero_grad()
        target.step(nan_losses_of(model, X))
    target.configure(nonfinite="raise")
    assert target.skipped_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings, same policy: nothing to warn about
        target.load_state_dict(state)
    assert (target.skipped_steps, target.nonfinite) == (0, "raise")
    assert target.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("bad", [-1, True, 2.5, "3", None])
def test_a_saved_skipped_steps_that_is_not_an_int_at_least_zero_is_refused_and_nothing_loads(bad):
    """``skipped_steps`` counts steps: a negative, boolean, fractional, textual or missing-value count
    is refused with ``ValueError`` before anything changes (learning rate, settings, count)."""
    model, opt = trained_with_two_skips()
    state = opt.state_dict()
    state["conflict_averse"]["skipped_steps"] = bad
    state["conflict_averse"]["c"] = 0.9
    state["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError):
        opt.load_state_dict(state)
    assert (opt.skipped_steps, opt.c, opt.param_groups[0]["lr"]) == (2, 0.3, 0.1)


def test_a_saved_skipped_steps_count_round_trips_into_a_fresh_optimizer():
    model, opt = trained_with_two_skips()
    fresh = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.6, 0.4], c=0.3)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 2


def test_every_state_dict_hook_receives_the_optimizer_it_is_registered_on():
    """As in ``torch.optim``: each of the four state-dict hook kinds is called with the optimizer itself
    (compared with what a plain SGD passes its own hooks)."""
    model, opt = trained_with_two_skips()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    for o in (opt, plain):
        seen = []
        o.register_state_dict_pre_hook(lambda this: seen.append(this))
        o.register_state_dict_post_hook(lambda this, sd: seen.append(this))
        o.register_load_state_dict_pre_hook(lambda this, sd: seen.append(this))
        o.register_load_state_dict_post_hook(lambda this: seen.append(this))
        o.load_state_dict(o.state_dict())
        assert len(seen) == 4 and all(s is o for s in seen)


def test_a_load_pre_hook_that_returns_a_dict_replaces_the_one_loaded_and_one_that_returns_none_does_not():
    """torch's contract for ``register_load_state_dict_pre_hook``: a returned dict is what gets loaded;
    ``None`` keeps the argument. Checked on the learning rate and on a saved setting."""
    model, opt = trained_with_two_skips()
    state = opt.state_dict()
    opt.configure(c=0.7)
    opt.param_groups[0]["lr"] = 0.5
    handle = opt.register_load_state_dict_pre_hook(lambda this, sd: None)
    with pytest.warns(UserWarning, match="c: 0.7 -> 0.3"):
        opt.load_state_dict(state)
    assert (opt.c, opt.param_groups[0]["lr"]) == (0.3, 0.1)
    handle.remove()

    def halve_lr_and_set_c(this, sd):
        out = copy.deepcopy(sd)
        out["param_groups"][0]["lr"] = 0.05
        out["conflict_averse"]["c"] = 0.2
        return out

    opt.register_load_state_dict_pre_hook(halve_lr_and_set_c)
    with pytest.warns(UserWarning, match="c: 0.3 -> 0.2"):
        opt.load_state_dict(state)
    assert (opt.c, opt.param_groups[0]["lr"]) == (0.2, 0.05)
    assert state["param_groups"][0]["lr"] == 0.1 and state["conflict_averse"]["c"] == 0.3  # the argument is untouched


@pytest.mark.parametrize("keep", ["state", "param_groups"])
def test_a_state_dict_missing_state_or_param_groups_is_refused_with_valueerror_and_nothing_loads(keep):
    model, opt = trained_with_two_skips()
    state = opt.state_dict()
    state["conflict_averse"]["c"] = 0.9
    partial = {keep: state[keep], "conflict_averse": state["conflict_averse"]}
    with pytest.raises(ValueError):
        opt.load_state_dict(partial)
    assert opt.c == 0.3
