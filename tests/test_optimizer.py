"""Tests of ConflictAverseOptimizer against independent numpy references and torch.optim contracts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cagrad_clip import ConflictAverseOptimizer, solve_cagrad
from tests.policies import step_refused
from tests.reference import reference_coefficients


@pytest.fixture(autouse=True)
def float64_default():
    """These tests compare against float64 references; restore the default dtype afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def quadratic_problem(m: int = 3, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(m):
        q = rng.standard_normal((dim, dim))
        mats.append(q @ q.T / dim + 0.1 * np.eye(dim))
    centers = rng.standard_normal((m, dim)) * 2
    return np.array(mats), centers


def quadratic_losses(x: torch.Tensor, mats: np.ndarray, centers: np.ndarray) -> list[torch.Tensor]:
    out = []
    for A, u in zip(mats, centers):
        r = x - torch.as_tensor(u)
        out.append(0.5 * r @ torch.as_tensor(A) @ r)
    return out


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("rescale", [None, "1+c^2"])
def test_sgd_trajectory_matches_numpy_algorithm1(clip, rescale):
    """20 SGD steps on quadratics equal a numpy re-implementation of Algorithm 1 with a scipy dual."""
    mats, centers = quadratic_problem()
    w, c, lr = np.array([0.5, 0.3, 0.2]), 0.4, 0.05
    x_ref = np.zeros(6)
    x = torch.zeros(6, requires_grad=True)
    opt = ConflictAverseOptimizer(torch.optim.SGD([x], lr=lr), weights=w.tolist(), c=c, clip=clip, rescale=rescale)
    for _ in range(20):
        G = np.stack([A @ (x_ref - u) for A, u in zip(mats, centers)])
        a = reference_coefficients(G @ G.T, w, c, clip=clip, rescale=rescale)
        x_ref = x_ref - lr * (a @ G)
        opt.zero_grad()
        opt.step(quadratic_losses(x, mats, centers))
    np.testing.assert_allclose(x.detach().numpy(), x_ref, rtol=1e-8, atol=1e-9)


def test_c_zero_is_the_weighted_sum_gradient():
    mats, centers = quadratic_problem()
    x = torch.randn(6, requires_grad=True)
    w = [0.6, 0.3, 0.1]
    opt = ConflictAverseOptimizer(torch.optim.SGD([x], lr=0.1), weights=w, c=0.0)
    opt.backward(quadratic_losses(x, mats, centers))
    expected = torch.autograd.grad(sum(wi * li for wi, li in zip(w, quadratic_losses(x, mats, centers))), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-13, atol=1e-13)
    assert torch.equal(opt.last.coefficients, torch.tensor(np.array(w) / np.sum(w)))  # a = w exactly


def test_single_objective_rescaled_is_exactly_the_base_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    twin = copy.deepcopy(model)
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), c=0.4, rescale="1+c")
    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    opt.step([((model(x) - y) ** 2).mean()])
    ((twin(x) - y) ** 2).mean().backward()
    base.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    # Unscaled, one objective is the step inflated by (1 + c).
    opt2 = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), c=0.4)
    opt2.zero_grad()
    opt2.backward([((model(x) - y) ** 2).mean()])
    g = torch.autograd.grad(((model(x) - y) ** 2).mean(), model.weight)[0]
    torch.testing.assert_close(model.weight.grad, 1.4 * g, rtol=1e-14, atol=1e-14)


def mlp_with_heads(seed: int = 0):
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)])
    return trunk, heads


def sgd_on(trunk, heads, lr=0.1, **kwargs):
    """A ConflictAverseOptimizer over SGD on the trunk and the heads."""
    return ConflictAverseOptimizer(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=lr), **kwargs)


def head_losses(trunk, heads, x, y):
    z = trunk(x)
    return [((heads[0](z) - y) ** 2).mean(), ((heads[1](z) + y) ** 2).mean() + 0.1 * (heads[0](z) ** 2).mean()]


@pytest.mark.parametrize("store", [{}, {"accumulate_dtype": torch.float64}], ids=["direct", "accumulator"])
@pytest.mark.parametrize("combine_each", [True, False])
def test_accumulating_two_halves_equals_one_full_batch(combine_each, store):
    trunk, heads = mlp_with_heads()
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def make(t, h):
        params = list(t.parameters()) + list(h.parameters())
        return ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), weights=[0.7, 0.3], c=0.5, **store)

    full, halves = make(trunk, heads), make(twin_trunk, twin_heads)
    for _ in range(3):
        full.zero_grad()
        full.step(head_losses(trunk, heads, x, y))
        halves.zero_grad()
        for k, sl in enumerate([slice(0, 8), slice(8, 16)]):
            losses = [0.5 * loss for loss in head_losses(twin_trunk, twin_heads, x[sl], y[sl])]
            halves.backward(losses, combine=combine_each or k == 1)
        halves.step()
    for p, q in zip(list(trunk.parameters()) + list(heads.parameters()), list(twin_trunk.parameters()) + list(twin_heads.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def per_objective_grads(losses, params):
    return [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]


def test_shared_parameters_define_the_gram_and_heads_use_the_same_coefficients():
    trunk, heads = mlp_with_heads()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.5, 0.5], c=0.6, shared=trunk.parameters())
    losses = head_losses(trunk, heads, x, y)
    grads = per_objective_grads(losses, params)
    opt.backward(losses)
    flat_shared = torch.stack([torch.cat([g.flatten() for g in gs[:2]]) for gs in grads])
    torch.testing.assert_close(opt.last.gram, flat_shared @ flat_shared.T)
    a = opt.last.coefficients
    for j, p in enumerate(params):
        expected = sum(a[i] * (grads[i][j] if grads[i][j] is not None else torch.zeros_like(p)) for i in range(2))
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-12)
    # Head 1 is not reached by objective 0: its gradient is objective 1's part only.
    assert grads[0][4] is None
    torch.testing.assert_close(heads[1].weight.grad, a[1] * grads[1][4])


def test_frozen_parameters_are_skipped():
    trunk, heads = mlp_with_heads()
    trunk[0].bias.requires_grad_(False)
    opt = ConflictAverseOptimizer(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1))
    before = trunk[0].bias.detach().clone()
    opt.step(head_losses(trunk, heads, torch.randn(8, 4), torch.randn(8, 1)))
    assert trunk[0].bias.grad is None
    assert torch.equal(trunk[0].bias, before)
    assert trunk[0].weight.grad is not None


def test_is_a_torch_optimizer_and_delegates_state():
    trunk, heads = mlp_with_heads()
    base = torch.optim.Adam(list(trunk.parameters()) + list(heads.parameters()), lr=0.01)
    opt = ConflictAverseOptimizer(base, weights=[0.8, 0.2])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for _ in range(4):
        opt.zero_grad()
        opt.step(head_losses(trunk, heads, torch.randn(8, 4), torch.randn(8, 1)))
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)
    assert calls == ["pre", "post"] * 4
    assert len(base.state) == len(list(trunk.parameters()) + list(heads.parameters()))
    text = repr(opt)
    for piece in ["weights=[0.8, 0.2]", "c=0.4", "clip=True", "rescale=None", "Adam"]:
        assert piece in text


def test_state_dict_round_trip_continues_identically():
    trunk, heads = mlp_with_heads()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = ConflictAverseOptimizer(torch.optim.Adam(params, lr=0.01), weights=[0.3, 0.7], c=0.2, clip=False, rescale="1+c")
    for _ in range(3):
        opt.zero_grad()
        opt.step(head_losses(trunk, heads, x, y))
    state = copy.deepcopy(opt.state_dict())
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    twin = ConflictAverseOptimizer(torch.optim.Adam(list(twin_trunk.parameters()) + list(twin_heads.parameters()), lr=0.5))
    with pytest.warns(UserWarning, match=r"c: 0.4 -> 0.2"):
        twin.load_state_dict(state)
    assert (twin.c, twin.clip, twin.rescale) == (0.2, False, "1+c")
    torch.testing.assert_close(twin.weights, torch.tensor([0.3, 0.7]))
    assert twin.param_groups[0]["lr"] == 0.01
    for o, t, h in [(opt, trunk, heads), (twin, twin_trunk, twin_heads)]:
        o.zero_grad()
        o.step(head_losses(t, h, x, y))
    for p, q in zip(params, list(twin_trunk.parameters()) + list(twin_heads.parameters())):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="no 'state' and 'param_groups'"):
        twin.load_state_dict({"conflict_averse": state["conflict_averse"]})


def test_solver_setting_round_trips_and_steps_alike():
    """solver='exact' and 'frank_wolfe' solve the same dual: the same update to rounding."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    runs = {}
    for solver in ("exact", "frank_wolfe"):
        torch.manual_seed(1)
        trunk, heads = mlp_with_heads()
        trunk, heads = trunk.double(), heads.double()
        params = list(trunk.parameters()) + list(heads.parameters())
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.05), weights=[0.5, 0.3, 0.2], solver=solver)
        assert f"solver={solver!r}" in repr(opt)
        for _ in range(3):  # three objectives: m = 2 has its own exact path whatever the solver
            opt.zero_grad()
            third = (trunk(x.double()) - 1.0).pow(2).mean()
            opt.step(head_losses(trunk, heads, x.double(), y.double()) + [third])
        runs[solver] = params
        twin = make_opt()[0]
        twin.load_state_dict(opt.state_dict())
        assert twin.solver == solver
    for p, q in zip(runs["exact"], runs["frank_wolfe"]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_diagnostics_are_on_device_and_consistent():
    trunk, heads = mlp_with_heads()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.8, 0.2], c=0.4)
    losses = head_losses(trunk, heads, torch.randn(16, 4), torch.randn(16, 1))
    grads = per_objective_grads(losses, params)
    opt.step(losses)
    last = opt.last
    g = torch.stack([torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(gs, params)]) for gs in grads])
    cos = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)
    torch.testing.assert_close(last.cosines[0, 1], cos)
    torch.testing.assert_close(last.anchor_norm, (0.8 * g[0] + 0.2 * g[1]).norm())
    torch.testing.assert_close(last.clipped_dual, torch.minimum(last.dual, torch.tensor([0.8, 0.2])))
    assert last.finite.all() and last.fw_gap >= 0
    for t in [*last._replace(solution=torch.zeros(())), *last.solution]:  # every field a tensor, the solve's too
        assert isinstance(t, torch.Tensor)
    for name in last.solution._fields:  # the solve's fields read through the diagnostics by the same names
        assert getattr(last, name) is getattr(last.solution, name)


def test_backward_then_step_equals_step_with_losses_and_combine_is_idempotent():
    trunk, heads = mlp_with_heads()
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    a, b = sgd_on(trunk, heads), sgd_on(twin_trunk, twin_heads)
    a.step(head_losses(trunk, heads, x, y))
    b.backward(head_losses(twin_trunk, twin_heads, x, y))
    grad_before = twin_trunk[0].weight.grad.clone()
    b.combine()
    b.combine()
    assert torch.equal(twin_trunk[0].weight.grad, grad_before)
    b.step()
    for p, q in zip(trunk.parameters(), twin_trunk.parameters()):
        assert torch.equal(p, q)


def test_closure_is_supported():
    trunk, heads = mlp_with_heads()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ConflictAverseOptimizer(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1))
    before = trunk[0].weight.detach().clone()
    opt.step(closure=lambda: head_losses(trunk, heads, x, y))
    assert not torch.equal(before, trunk[0].weight)


def test_grad_scaler_combines_scaled_gradients_exactly_and_skips_overflow():
    trunk, heads = mlp_with_heads()
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    plain = sgd_on(trunk, heads, weights=[0.8, 0.2])
    scaled = ConflictAverseOptimizer(
        torch.optim.SGD(list(twin_trunk.parameters()) + list(twin_heads.parameters()), lr=0.1), weights=[0.8, 0.2]
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plain.step(head_losses(trunk, heads, x, y))
    scaled.backward([scaler.scale(loss) for loss in head_losses(twin_trunk, twin_heads, x, y)])
    scaler.unscale_(scaled)
    torch.nn.utils.clip_grad_norm_(twin_trunk.parameters(), max_norm=1e9)  # clipping sees the combined direction
    scaler.step(scaled)
    scaler.update()
    for p, q in zip(trunk.parameters(), twin_trunk.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    # Injected overflow: Inf reaches .grad, the scaler skips the step and lowers the scale.
    before = [p.detach().clone() for p in twin_trunk.parameters()]
    scaled.zero_grad()
    losses = head_losses(twin_trunk, twin_heads, x, y)
    scaled.backward([scaler.scale(losses[0]) * float("inf"), scaler.scale(losses[1])])
    assert not torch.isfinite(twin_trunk[0].weight.grad).all()
    scale_before = scaler.get_scale()
    scaler.step(scaled)
    scaler.update()
    assert scaler.get_scale() < scale_before
    for p, q in zip(before, twin_trunk.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_never_reaches_parameters(policy):
    trunk, heads = mlp_with_heads()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = ConflictAverseOptimizer(torch.optim.AdamW(params, lr=0.1), nonfinite=policy)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt.step(head_losses(trunk, heads, x, y))
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.optimizer.state_dict())
    opt.zero_grad()
    losses = head_losses(trunk, heads, x, y)
    bad = [losses[0], losses[1] * torch.tensor(float("nan"))]
    step_refused(opt, bad, policy, r"objective\(s\) \[1\]" + ("" if policy == "raise" else ".*skipped"))
    if policy == "skip":
        assert opt.skipped_steps == 1
    for p, q in zip(before, params):
        assert torch.equal(p, q)
    assert opt.optimizer.state_dict()["state"][0]["step"] == state_before["state"][0]["step"]


def test_bf16_parameters_accumulate_the_gram_in_fp32_and_track_fp32():
    trunk, heads = mlp_with_heads()
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    t16, h16 = copy.deepcopy(trunk).to(torch.bfloat16), copy.deepcopy(heads).to(torch.bfloat16)
    t32, h32 = copy.deepcopy(trunk).float(), copy.deepcopy(heads).float()
    o16 = ConflictAverseOptimizer(torch.optim.SGD(list(t16.parameters()) + list(h16.parameters()), lr=0.05), weights=[0.8, 0.2])
    o32 = ConflictAverseOptimizer(torch.optim.SGD(list(t32.parameters()) + list(h32.parameters()), lr=0.05), weights=[0.8, 0.2])
    o16.step(head_losses(t16, h16, x.bfloat16(), y.bfloat16()))
    o32.step(head_losses(t32, h32, x.float(), y.float()))
    assert o16.last.gram.dtype == torch.float32
    assert t16[0].weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(o16.last.coefficients, o32.last.coefficients, rtol=0.05, atol=0.02)
    for p, q in zip(t16.parameters(), t32.parameters()):
        torch.testing.assert_close(p.float(), q, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ bad input
def make_opt(**kwargs):
    trunk, heads = mlp_with_heads()
    opt = ConflictAverseOptimizer(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1), **kwargs)
    return opt, trunk, heads


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weights": [0.5, -0.5]}, ValueError, ">= 0"),
        ({"weights": [float("nan"), 1.0]}, ValueError, "finite"),
        ({"weights": [0.0, 0.0]}, ValueError, "positive sum"),
        ({"weights": [[0.5, 0.5]]}, ValueError, "one number per objective"),
        ({"c": -0.1}, ValueError, "c must be finite and >= 0"),
        ({"c": float("inf")}, ValueError, "c must be finite"),
        ({"c": True}, TypeError, "c must be a real number"),
        ({"rescale": "1+c^3"}, ValueError, "unknown rescale"),
        ({"nonfinite": "zero"}, ValueError, "unknown nonfinite"),
        ({"max_iter": -1}, ValueError, "max_iter"),
        ({"solver": "newton"}, ValueError, "unknown solver"),
        ({"clip": "yes"}, TypeError, "clip must be True or False"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_opt(**kwargs)


def test_bad_optimizer_and_shared_raise():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ConflictAverseOptimizer(object())  # type: ignore[arg-type]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        ConflictAverseOptimizer(torch.optim.SGD(frozen.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not a parameter of the base optimizer"):
        make_opt(shared=[torch.nn.Parameter(torch.zeros(3))])


def test_bad_losses_raise_clear_errors():
    opt, trunk, heads = make_opt(weights=[0.5, 0.5])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    losses = head_losses(trunk, heads, x, y)
    with pytest.raises(ValueError, match="losses is empty"):
        opt.step([])
    with pytest.raises(ValueError, match="must be a scalar"):
        opt.step([losses[0], (trunk(x) ** 2).mean(0)])
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step([losses[0], losses[1].detach()])
    with pytest.raises(ValueError, match="got 3 losses but 2 weights"):
        opt.step(losses + [losses[0]])
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        opt.step([losses[0], 1.0])
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no per-objective gradients are accumulated"):
        opt.step()


def test_losses_count_must_stay_fixed_within_an_accumulation():
    opt, trunk, heads = make_opt()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.backward(head_losses(trunk, heads, x, y))
    with pytest.raises(ValueError, match="2 objectives were accumulated"):
        opt.backward(head_losses(trunk, heads, x, y) + [(trunk(x) ** 2).mean()])


def test_model_zero_grad_between_steps_starts_a_fresh_accumulation():
    """Frameworks that call model.zero_grad() (HF Trainer) must not carry old gradients over."""
    trunk, heads = mlp_with_heads()
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    ours, reference = sgd_on(trunk, heads), sgd_on(twin_trunk, twin_heads)
    for _ in range(3):
        trunk.zero_grad()
        heads.zero_grad()  # not ours.zero_grad()
        ours.step(head_losses(trunk, heads, x, y))
        reference.zero_grad()
        reference.step(head_losses(twin_trunk, twin_heads, x, y))
    for p, q in zip(list(trunk.parameters()) + list(heads.parameters()), list(twin_trunk.parameters()) + list(twin_heads.parameters())):
        assert torch.equal(p, q)


def test_without_any_zero_grad_grad_accumulates_like_torch_but_objectives_restart():
    trunk, heads = mlp_with_heads()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ConflictAverseOptimizer(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.0))
    opt.step(head_losses(trunk, heads, x, y))
    first = trunk[0].weight.grad.clone()
    opt.step(head_losses(trunk, heads, x, y))  # lr 0: same parameters, same direction
    torch.testing.assert_close(trunk[0].weight.grad, 2 * first, rtol=1e-12, atol=1e-12)
    # The Gram is that of one batch (a fresh accumulation), not of two batches summed.
    params = list(trunk.parameters()) + list(heads.parameters())
    g = per_objective_grads(head_losses(trunk, heads, x, y), params)
    flat = torch.stack([torch.cat([(t if t is not None else torch.zeros_like(p)).flatten() for t, p in zip(gs, params)]) for gs in g])
    torch.testing.assert_close(opt.last.gram[0, 0], flat[0] @ flat[0])


def test_a_held_grad_is_never_overwritten():
    """``.grad`` is autograd's own tensor (the home objective's gradient, combined in place), so a
    ``.grad`` a user keeps after a step is never overwritten by the next step."""
    trunk, heads = mlp_with_heads()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.5, 0.5])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.zero_grad()
    opt.step(head_losses(trunk, heads, x, y))
    held = params[0].grad
    snapshot = held.clone()
    opt.zero_grad()
    opt.step(head_losses(trunk, heads, x + 1.0, y))
    assert torch.equal(held, snapshot) and not torch.equal(params[0].grad, snapshot)


@pytest.mark.parametrize("store", [{}, {"accumulate_dtype": torch.float64}], ids=["direct", "accumulator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_gram_matches_float64_reference(dtype, store, monkeypatch):
    """The Gram summed tile by tile (``bmm`` over whole ``GRAM_BLOCK`` tiles, plus a remainder)
    equals the float64 Gram of independently computed gradients, to float32 accuracy.

    The store gathers at most 1/16 of the parameters' bytes per chunk, so at this size a chunk is
    one tile and would take the plain ``rows @ rows.T`` path: the tile is shrunk to 256 columns so
    that some chunk holds at least two tiles and a remainder (checked, not assumed)."""
    from cagrad_clip import _numerics as numerics
    from cagrad_clip._storage import GRAM_BLOCK, blocks, direct

    tiled_with_remainder = []
    gram_of_block = blocks.gram_of_block

    def spy(rows):
        n = rows.shape[1]
        tiled_with_remainder.append(n // blocks.GRAM_BLOCK >= 2 and n % blocks.GRAM_BLOCK != 0)
        return gram_of_block(rows)

    monkeypatch.setattr(blocks, "GRAM_BLOCK", 256)  # the chunk planning's
    monkeypatch.setattr(numerics, "GRAM_BLOCK", 256)  # the tiles'
    monkeypatch.setattr(blocks, "gram_of_block", spy)
    monkeypatch.setattr(direct, "gram_of_block", spy)
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 3 * GRAM_BLOCK // 300 + 7, dtype=dtype)  # ~3.1 blocks: bmm + remainder
    x = torch.randn(16, 300, dtype=dtype)
    targets = torch.randn(3, 16, layer.out_features, dtype=dtype)

    def losses(module):
        out = module(x.to(module.weight.dtype))
        return [((out - t.to(out.dtype)) ** 2).mean() * (k + 1) for k, t in enumerate(targets)]

    twin = copy.deepcopy(layer).double()
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(twin.parameters()), retain_graph=True)]) for loss in losses(twin)
    ]
    G = torch.stack(rows)
    assert G.shape[1] > 2 * GRAM_BLOCK and G.shape[1] % GRAM_BLOCK != 0
    expected = G @ G.T
    opt = ConflictAverseOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), weights=[0.2, 0.3, 0.5], **store)
    opt.step(losses(layer))
    assert any(tiled_with_remainder), "no Gram was reduced over two tiles and a remainder"
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(opt.last.gram.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


# ----------------------------------------------------------------------------------------------
# regressions: each case of the trust review, named by what it guards
# ----------------------------------------------------------------------------------------------
def test_reductions_never_run_under_the_callers_autocast():
    """``opt.backward`` under ``torch.autocast`` (Lightning's bf16-mixed) ran the Gram and the
    solve in bf16 and lost the correction. The backward passes behave as the caller's own
    ``backward`` would under autocast; the Gram and the solve must be float32-exact on those gradients."""
    torch.set_default_dtype(torch.float32)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    trunk, heads = mlp_with_heads()
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    opt = sgd_on(trunk, heads, weights=[0.5, 0.5], c=0.6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.backward(head_losses(trunk, heads, x, y))
        params = list(twin_trunk.parameters()) + list(twin_heads.parameters())
        grads = per_objective_grads(head_losses(twin_trunk, twin_heads, x, y), params)
    G = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]) for gs in grads])
    gram = G.double() @ G.double().T
    assert opt.last.gram.dtype == torch.float32 and opt.last.coefficients.dtype == torch.float32
    torch.testing.assert_close(opt.last.gram.double(), gram, rtol=1e-6, atol=1e-6)
    expected = solve_cagrad(gram, [0.5, 0.5], c=0.6).coefficients
    torch.testing.assert_close(opt.last.coefficients.double(), expected, rtol=1e-5, atol=1e-6)
    assert (expected - 0.5).abs().max() > 0.05  # the correction is there to lose


@pytest.mark.parametrize("call", ["step", "backward"])
def test_torch_compile_around_step_applies_the_direction_once(call):
    """Dynamo dropped attribute writes, so the direction landed twice (2x SGD step) and
    ``opt.last`` stayed ``None``. The optimizer's methods run eagerly (a graph break)."""
    torch.set_default_dtype(torch.float32)
    trunk, heads = mlp_with_heads()
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    compiled_opt, eager_opt = sgd_on(trunk, heads), sgd_on(twin_trunk, twin_heads)

    def train_step(opt, t, h):
        opt.zero_grad()
        if call == "step":
            opt.step(head_losses(t, h, x, y))
        else:
            opt.backward(head_losses(t, h, x, y))
            opt.step()

    torch._dynamo.reset()
    compiled = torch.compile(train_step, backend="eager")
    for _ in range(2):
        compiled(compiled_opt, trunk, heads)
        train_step(eager_opt, twin_trunk, twin_heads)
    assert compiled_opt.last is not None
    for p, q in zip(list(trunk.parameters()) + list(heads.parameters()), list(twin_trunk.parameters()) + list(twin_heads.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_a_rejected_backward_changes_nothing():
    """a different number of losses mid-accumulation raised only after the previous direction
    was taken out of .grad, and step() then applied zero while Adam's step count advanced."""
    trunk, heads = mlp_with_heads()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = ConflictAverseOptimizer(torch.optim.Adam(params, lr=0.1))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.backward(head_losses(trunk, heads, x, y))
    grads = [p.grad.clone() for p in params]
    last = opt.last
    with pytest.raises(ValueError, match="2 objectives were accumulated"):
        opt.backward(head_losses(trunk, heads, x, y) + [(trunk(x) ** 2).mean()])
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert opt.last is last
    before = [p.detach().clone() for p in params]
    opt.step()  # applies the direction that was in .grad
    for p, b, g in zip(params, before, grads):
        assert not torch.equal(p, b) or not g.any()
    twin_trunk, twin_heads = mlp_with_heads()
    twin = torch.optim.Adam(list(twin_trunk.parameters()) + list(twin_heads.parameters()), lr=0.1)
    for q, g in zip(twin.param_groups[0]["params"], grads):
        q.grad = g.clone()
    twin.step()
    for p, q in zip(params, twin.param_groups[0]["params"]):
        torch.testing.assert_close(p, q)


def test_settings_change_only_through_configure_and_take_effect():
    """``opt.c = 0.8`` kept the old rescale divisor and ``opt.c = -3`` was accepted."""
    opt, trunk, heads = make_opt(c=0.2, rescale="1+c")
    with pytest.raises(AttributeError, match=r"configure\(c=...\)"):
        opt.c = 0.8
    with pytest.raises(AttributeError, match=r"configure\(weights=...\)"):
        opt.weights = [0.5, 0.5]
    with pytest.raises(ValueError, match="finite and >= 0"):
        opt.configure(c=-3)
    assert opt.c == 0.2
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.configure(c=0.8, weights=[0.7, 0.3])
    opt.backward(head_losses(trunk, heads, x, y))
    params = list(trunk.parameters()) + list(heads.parameters())
    grads = per_objective_grads(head_losses(trunk, heads, x, y), params)
    G = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]) for gs in grads])
    expected = reference_coefficients((G @ G.T).numpy(), np.array([0.7, 0.3]), 0.8, clip=True, rescale="1+c")
    np.testing.assert_allclose(opt.last.coefficients.numpy(), expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="3 weights given while 2 objectives are accumulated"):
        opt.configure(weights=[0.2, 0.3, 0.5])


def test_weights_configured_between_steps_are_the_next_steps_coefficients():
    """``configure(weights=B)`` after a step: at ``c = 0`` the next step's coefficients are exactly B
    (``a = w``), not the weights of the first step (kept on the device between steps)."""
    trunk, heads = mlp_with_heads()
    opt = sgd_on(trunk, heads, weights=[0.7, 0.3], c=0.0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.zero_grad()
    opt.step(head_losses(trunk, heads, x, y))
    assert torch.equal(opt.last.coefficients, torch.tensor([0.7, 0.3]))
    opt.configure(weights=[0.25, 0.75])
    opt.zero_grad()
    opt.step(head_losses(trunk, heads, x, y))
    assert torch.equal(opt.last.coefficients, torch.tensor([0.25, 0.75]))


def test_configure_after_backward_leaves_the_direction_in_grad_and_last_as_computed():
    """Settings apply from the next combination: ``configure(c=...)`` between ``backward`` and ``step``
    changes neither ``.grad`` nor ``opt.last``, and the step applies the direction already written."""
    trunk, heads = mlp_with_heads()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = sgd_on(trunk, heads, lr=0.1, weights=[0.7, 0.3], c=0.4)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.backward(head_losses(trunk, heads, x, y))
    last = opt.last
    written = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    opt.configure(c=0.9)
    assert opt.last is last
    assert all(torch.equal(p.grad, g) for p, g in zip(params, written))
    opt.step()
    for p, b, g in zip(params, before, written):
        assert torch.equal(p.detach(), b.add(g, alpha=-0.1))
    assert opt.c == 0.9


def test_load_state_dict_restores_the_nonfinite_policy_and_the_skipped_steps():
    """A checkpoint saved under ``nonfinite="raise"`` after two skipped steps, loaded into an optimizer
    with the defaults: the policy (and its behaviour) and ``skipped_steps`` come back."""
    trunk, heads = mlp_with_heads()
    opt = sgd_on(trunk, heads)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def nan_losses():
        losses = head_losses(trunk, heads, x, y)
        return [losses[0], losses[1] * float("nan")]

    for _ in range(2):
        opt.zero_grad()
        with pytest.warns(RuntimeWarning, match="step skipped"):
            opt.step(nan_losses())
    opt.configure(nonfinite="raise")
    state = opt.state_dict()
    fresh = sgd_on(trunk, heads)
    assert (fresh.nonfinite, fresh.skipped_steps) == ("skip", 0)
    with pytest.warns(UserWarning, match="nonfinite: 'skip' -> 'raise'"):
        fresh.load_state_dict(state)
    assert (fresh.nonfinite, fresh.skipped_steps) == ("raise", 2)
    fresh.zero_grad()
    with pytest.raises(FloatingPointError):
        fresh.step(nan_losses())
    assert fresh.skipped_steps == 2


def test_construction_refuses_what_cannot_work_naming_the_cause():
    """complex parameters failed inside the solver, LBFGS with a missing 'closure'."""
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        ConflictAverseOptimizer(torch.optim.SGD([z], lr=0.1))
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="LBFGS re-evaluates its closure"):
        ConflictAverseOptimizer(torch.optim.LBFGS([w]))
    with pytest.raises(TypeError, match="SparseAdam needs sparse gradients"):
        ConflictAverseOptimizer(torch.optim.SparseAdam([w]))


def test_sparse_embedding_gradients_are_combined_densely():
    """``nn.Embedding(sparse=True)`` failed with ``copy_() between dense and sparse``;
    its gradients are now accumulated densely and combined like the rest."""
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(10, 4, sparse=True)
    dense = copy.deepcopy(sparse)
    dense.sparse = False
    idx = torch.tensor([1, 3, 3, 7])

    def losses(emb):
        e = emb(idx)
        return [(e[:, 0] - 1).pow(2).mean(), (e[:, 0] + e[:, 1]).pow(2).mean()]

    ours = ConflictAverseOptimizer(torch.optim.SGD(sparse.parameters(), lr=0.1))
    ours.backward(losses(sparse))
    reference = ConflictAverseOptimizer(torch.optim.SGD(dense.parameters(), lr=0.1))
    reference.backward(losses(dense))
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad)


def test_friendly_setting_types_and_frictions():
    """numpy / 0-d tensor ``c`` rejected, ``weights='ab'`` an internal TypeError,
    ``add_param_group`` refused right after ``step()``."""
    opt, trunk, heads = make_opt(c=np.float32(0.5))
    assert opt.c == 0.5
    assert make_opt(c=torch.tensor(0.25))[0].c == 0.25
    with pytest.raises(TypeError, match="weights must be a sequence of real numbers"):
        make_opt(weights="ab")
    opt.step(head_losses(trunk, heads, torch.randn(8, 4), torch.randn(8, 1)))
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})  # allowed: the next backward starts a new window
    opt.backward(head_losses(trunk, heads, torch.randn(8, 4), torch.randn(8, 1)))
    assert extra.grad is None  # no objective reaches it
    with pytest.raises(RuntimeError, match="while gradients are accumulated"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


def test_graph_is_freed_as_soon_as_the_last_objective_is_done():
    """probe right after backward (before any parameter update): a retained graph would let
    a further backward through the last loss succeed."""
    opt, trunk, heads = make_opt()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    losses = head_losses(trunk, heads, x, y)
    opt.backward(losses, combine=False)
    for loss in losses:
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            torch.autograd.grad(loss, list(trunk.parameters()))


def test_the_solver_setting_is_honoured():
    """ignoring ``solver=`` passed the suite (the old test only checked that both solvers
    agree). With a zero Frank-Wolfe budget they differ on a problem whose optimum has 4 active
    objectives: the exact solver is exact, Frank-Wolfe stops at its start (best face of <= 3)."""
    g = torch.Generator().manual_seed(2)
    G = torch.randn(5, 12, generator=g) + 1.0  # objective i's gradient is G[i] for L_i = <G[i], theta>
    results = {}
    for solver in ("exact", "frank_wolfe"):
        theta = torch.nn.Parameter(torch.zeros(12))
        opt = ConflictAverseOptimizer(torch.optim.SGD([theta], lr=0.0), c=3.0, solver=solver, max_iter=0)
        opt.backward(list(G @ theta))
        torch.testing.assert_close(opt.last.gram, G @ G.T)
        results[solver] = opt.last
    exact, fw = results["exact"], results["frank_wolfe"]
    assert exact.fw_gap <= 1e-10 < 1.0 < fw.fw_gap
    assert (exact.coefficients - fw.coefficients).abs().max() > 0.1
    for solver, last in results.items():
        expected = solve_cagrad(last.gram, None, c=3.0, solver=solver, max_iter=0)
        torch.testing.assert_close(last.coefficients, expected.coefficients, rtol=0, atol=0)


def test_freezing_or_unfreezing_after_construction_rebuilds_the_layout():
    """nothing unfroze a parameter after construction; a skipped rebuild would leave the
    unfrozen parameter untrained (and a frozen one still in the Gram)."""
    trunk, heads = mlp_with_heads()
    trunk[0].weight.requires_grad_(False)
    opt = sgd_on(trunk, heads)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.step(head_losses(trunk, heads, x, y))
    assert trunk[0].weight.grad is None
    trunk[0].weight.requires_grad_(True)
    heads[1].bias.requires_grad_(False)
    opt.zero_grad()
    before = trunk[0].weight.detach().clone()
    opt.step(head_losses(trunk, heads, x, y))
    assert trunk[0].weight.grad is not None and not torch.equal(trunk[0].weight, before)
    assert heads[1].bias.grad is None
    params = [p for p in list(trunk.parameters()) + list(heads.parameters()) if p.requires_grad]
    assert opt.last.gram.shape == (2, 2)
    grads = per_objective_grads(head_losses(trunk, heads, x, y), params)
    assert sum(p.numel() for p in params) == opt._store.numel and len(grads[0]) == len(params)


def test_unfreezing_mid_accumulation_is_refused_before_anything_changes():
    opt, trunk, heads = make_opt()
    trunk[0].bias.requires_grad_(False)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.backward(head_losses(trunk, heads, x, y), combine=False)
    trunk[0].bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match="changed during gradient accumulation"):
        opt.backward(head_losses(trunk, heads, x, y))


def test_weights_given_as_python_floats_keep_every_digit():
    """Weights went through the default float32 dtype on their way to float64 (0.3 -> 0.30000000745)."""
    opt = make_opt(weights=[0.2, 0.3, 0.5])[0]
    assert opt.settings.weights == (0.2, 0.3, 0.5)


# ----------------------------------------------------------------------------------------------
# memory="low": the same direction without stored per-objective gradients
# ----------------------------------------------------------------------------------------------
def _low_vs_default(m, shared_trunk, **low_kwargs):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(m)])
    twin_trunk, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(32, 4), torch.randn(32, m)

    def losses(t, h):
        z = t(x)
        return [((head(z).squeeze(-1) - y[:, i]) ** 2).mean() + 0.1 * (z**2).mean() * i for i, head in enumerate(h)]

    weights = [0.5, 0.3, 0.2][:m]
    kwargs = dict(weights=weights, c=0.4)
    low = ConflictAverseOptimizer(
        torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1),
        shared=trunk.parameters() if shared_trunk else None,
        memory="low",
        **kwargs,
        **{k: v(trunk) for k, v in low_kwargs.items()},
    )
    default = ConflictAverseOptimizer(
        torch.optim.SGD(list(twin_trunk.parameters()) + list(twin_heads.parameters()), lr=0.1),
        shared=twin_trunk.parameters() if shared_trunk else None,
        **kwargs,
    )
    for _ in range(3):
        low.zero_grad()
        low.step(losses(trunk, heads))
        default.zero_grad()
        default.step(losses(twin_trunk, twin_heads))
        torch.testing.assert_close(low.last.coefficients, default.last.coefficients)
    for p, q in zip(list(trunk.parameters()) + list(heads.parameters()), list(twin_trunk.parameters()) + list(twin_heads.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    return low


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_low_memory_mode_two_objectives_equals_the_default_path(shared_trunk):
    _low_vs_default(2, shared_trunk)


def test_low_memory_mode_autogram_three_objectives_equals_the_default_path():
    pytest.importorskip("torchjd")
    from cagrad_clip._low_memory import AutogramEngine

    _low_vs_default(3, True, engine=lambda trunk: AutogramEngine(trunk))


def test_low_memory_mode_refuses_accumulation_and_stale_grad():
    opt, trunk, heads = make_opt()
    low = ConflictAverseOptimizer(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1), memory="low")
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    with pytest.raises(ValueError, match="cannot accumulate"):
        low.backward(head_losses(trunk, heads, x, y), combine=False)
    low.step(head_losses(trunk, heads, x, y))
    with pytest.raises(ValueError, match=r"needs .grad = None"):
        low.backward(head_losses(trunk, heads, x, y))
    with pytest.raises(ValueError, match="unknown memory"):
        ConflictAverseOptimizer(torch.optim.SGD(trunk.parameters(), lr=0.1), memory="tiny")
