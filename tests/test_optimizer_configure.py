"""``ConflictAverseOptimizer.configure``, the non-finite policy it sets and the losses ``step`` takes:
what is accepted, when it applies, and what a refused step reports. References are values fixed by hand (at ``c = 0`` the
coefficients are exactly the normalised weights) or the same call with plain Python values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer


def trunk_and_heads(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.ModuleDict({"trunk": nn.Linear(3, 4), "a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}).to(dtype)


def losses_of(net, x):
    h = torch.tanh(net["trunk"](x))
    return [(net["a"](h) - 1).pow(2).mean(), (net["b"](h) + net["a"](h)).pow(2).mean()]


X = torch.linspace(-1, 1, 18, dtype=torch.float64).reshape(6, 3)


@pytest.mark.parametrize(
    "weights",
    [
        torch.tensor([3.0, 1.0]),
        torch.tensor([3.0, 1.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([3, 1]),
    ],
    ids=["float32", "float64-requires-grad", "int64"],
)
def test_configure_accepts_weights_as_a_tensor_like_the_same_python_list(weights):
    """``configure(weights=tensor)`` gives the settings ``configure(weights=list)`` gives, and at
    ``c = 0`` the next step's coefficients are exactly those weights normalised: (0.75, 0.25)."""
    net = trunk_and_heads()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weights=[0.5, 0.5], c=0.0)
    returned = opt.configure(weights=weights)
    twin = ConflictAverseOptimizer(torch.optim.SGD(trunk_and_heads().parameters(), lr=0.1), weights=[0.5, 0.5], c=0.0)
    assert returned == opt.settings == twin.configure(weights=[3.0, 1.0])
    assert opt.settings.weights == (0.75, 0.25)
    assert torch.equal(opt.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))
    opt.zero_grad()
    opt.step(losses_of(net, X))
    assert torch.equal(opt.last.coefficients, torch.tensor([0.75, 0.25], dtype=opt.last.coefficients.dtype))


def test_configure_refuses_complex_weights_given_as_a_tensor_as_it_does_as_a_list():
    """Weights are real numbers: complex ones are refused (``TypeError``) whether they come as a list or
    a tensor (whose imaginary part must not be dropped silently), and the settings stay as they were."""
    net = trunk_and_heads()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weights=[0.5, 0.5], c=0.2)
    settings = opt.settings
    with pytest.raises(TypeError):
        opt.configure(weights=[1 + 1j, 3 + 0j])
    with pytest.raises(TypeError):
        opt.configure(weights=torch.tensor([1 + 1j, 3 + 0j]))
    with pytest.raises(TypeError):
        ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weights=torch.tensor([1 + 1j, 3 + 0j]))
    assert opt.settings is settings


@pytest.mark.parametrize("combine", [False, True])
def test_configure_with_uniform_weights_while_a_window_is_open_applies_at_the_next_combination(combine):
    """Uniform weights (``weights=None``), gradients accumulated and not yet stepped: changing ``c`` (or
    setting uniform weights again) is allowed mid-window. At ``c = 0`` the step's coefficients are then
    exactly (1/2, 1/2): the new ``c`` applies when the window is (re)combined, and ``.grad`` is the mean
    of the two objectives' gradients, computed independently with ``torch.autograd.grad``."""
    net = trunk_and_heads()
    params = list(net.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), c=0.7)
    per_objective = [torch.autograd.grad(losses_of(net, X)[i], params, allow_unused=True) for i in range(2)]
    opt.zero_grad()
    opt.backward(losses_of(net, X), combine=combine)
    opt.configure(c=0.0, weights=None)
    assert opt.settings.weights is None and opt.c == 0.0
    if combine:  # the direction already written keeps c = 0.7; a further backward recombines with c = 0
        assert opt.last.coefficients.tolist() != [0.5, 0.5]
        opt.backward([0.0 * loss for loss in losses_of(net, X)])
    opt.combine()
    assert torch.equal(opt.last.coefficients, torch.tensor([0.5, 0.5], dtype=opt.last.coefficients.dtype))
    for p, g0, g1 in zip(params, *per_objective):
        expected = 0.5 * (torch.zeros_like(p) if g0 is None else g0) + 0.5 * (torch.zeros_like(p) if g1 is None else g1)
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


def test_the_overflow_report_names_the_dtypes_of_the_parameters():
    """Finite float16 gradients whose combination exceeds 65504 (coefficients 1.5 each on orthogonal
    gradients of 5e4, ``c = 2``), next to a float32 parameter: the refused step names both parameter
    dtypes, so the user sees which precision overflowed."""
    half = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    single = nn.Parameter(torch.zeros(1, dtype=torch.float32))
    opt = ConflictAverseOptimizer(torch.optim.SGD([half, single], lr=1.0), weights=[0.5, 0.5], c=2.0, nonfinite="raise")
    losses = [half[0].float() * 5.0e4 + single[0], half[1].float() * 5.0e4]
    with pytest.raises(FloatingPointError) as error:
        opt.step(losses)
    assert "torch.float16" in str(error.value) and "torch.float32" in str(error.value)
    assert opt.last.finite.tolist() == [True, True] and not bool(opt.last.written_finite)
    assert torch.equal(half.detach(), torch.zeros(2, dtype=torch.float16))


# ------------------------------------------------------------------------------------------ the losses step takes
def test_losses_as_a_list_a_tuple_or_a_1d_tensor_give_the_same_step():
    """One scalar per objective, as a list, a tuple or a 1-D tensor (``torch.stack`` of them), or
    one-element tensors (which torch's ``backward`` also takes as scalars): the same parameters after one
    step, and the same coefficients."""
    results = []
    for form in ("list", "tuple", "stacked", "one-element"):
        net = trunk_and_heads()
        opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weights=[0.6, 0.4], c=0.5)
        losses = losses_of(net, X)
        given = {
            "list": losses,
            "tuple": tuple(losses),
            "stacked": torch.stack(losses),
            "one-element": [loss.reshape(1) for loss in losses],
        }[form]
        opt.step(given)
        results.append((torch.cat([p.detach().flatten() for p in net.parameters()]), opt.last.coefficients))
    for params, coefficients in results[1:]:
        assert torch.equal(params, results[0][0]) and torch.equal(coefficients, results[0][1])


def test_losses_step_refuses_and_nothing_changes():
    """What is not one floating-point scalar per objective is refused before anything changes: a 0-d or
    2-D tensor of losses, an unordered or one-shot container (set, generator), a two-element loss, a
    complex loss."""
    net = trunk_and_heads()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    before = [p.detach().clone() for p in net.parameters()]
    first, second = losses_of(net, X)
    pair = torch.stack([first, second])
    refused = {
        ValueError: [first, pair.reshape(2, 1), [first, pair], [first, second.reshape(1, 1).expand(1, 2)]],
        TypeError: [{first, second}, (loss for loss in (first, second)), [first, torch.complex(second, second)]],
    }
    for error, cases in refused.items():
        for losses in cases:
            with pytest.raises(error):
                opt.step(losses)
    assert opt.last is None and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_the_weights_reach_the_device_once_and_are_reused_by_every_step():
    """The normalised weights are copied to the gradients' device and dtype once per ``(device, dtype, m)``;
    later steps reuse that tensor (no host-to-device copy per step) until ``configure`` changes them."""
    net = trunk_and_heads()
    x = torch.randn(8, 3, dtype=torch.float64)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), weights=[0.6, 0.4])
    opt.step(losses_of(net, x))
    (key, first), *others = opt._state.device_weights.items()
    assert not others and key == (torch.device("cpu"), torch.float64, 2) and first.tolist() == [0.6, 0.4]
    opt.step(losses_of(net, x))
    assert opt._state.device_weights == {key: first} and opt._state.device_weights[key] is first
    opt.configure(weights=[0.5, 0.5])
    opt.step(losses_of(net, x))
    assert opt._state.device_weights[key] is not first and opt._state.device_weights[key].tolist() == [0.5, 0.5]


@pytest.mark.parametrize(
    ("name", "value"),
    [("memory", "low"), ("engine", None), ("accumulate_dtype", torch.float32), ("distributed", False), ("process_group", None)],
)
def test_how_gradients_flow_is_fixed_at_construction(name, value):
    """``memory``, ``engine``, ``accumulate_dtype``, ``distributed`` and ``process_group`` decide the gradient store:
    readable, but an assignment raises (naming the way to change it) and changes nothing, as the settings do."""
    net = trunk_and_heads()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), accumulate_dtype=torch.float64, distributed=True)
    before = {n: getattr(opt, n) for n in ("memory", "engine", "accumulate_dtype", "distributed", "process_group")}
    assert before == {"memory": "default", "engine": None, "accumulate_dtype": torch.float64, "distributed": True, "process_group": None}
    with pytest.raises(AttributeError, match=f"{name} is fixed at construction.*ConflictAverseOptimizer"):
        setattr(opt, name, value)
    assert {n: getattr(opt, n) for n in before} == before
    with pytest.raises(AttributeError, match="c is read-only: call opt.configure"):
        opt.c = 0.9
