"""The accumulation window against tools that touch ``.grad`` between calls, and calls that fail.

Each test states the behaviour a user relies on and compares against an independent reference:
the same run without the tool, or per-objective gradients from ``torch.autograd.grad`` combined
by hand with the optimizer's reported coefficients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer

STORES = {
    "default": {},
    "accumulator": {"accumulate_dtype": torch.float64},
}


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.ModuleDict({"trunk": nn.Linear(4, 6), "a": nn.Linear(6, 1), "b": nn.Linear(6, 1)}).to(dtype)


def losses_of(net, x, y):
    h = torch.tanh(net["trunk"](x))
    return [((net["a"](h) - y) ** 2).mean(), ((net["b"](h) + y) ** 2).mean() + 0.1 * h.pow(2).mean()]


def batches(n=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g, dtype=dtype), torch.randn(8, 1, generator=g, dtype=dtype)) for _ in range(n)]


def accumulate(opt, net, data, scale=lambda loss: loss, combine_last=False):
    for k, (x, y) in enumerate(data):
        last = k == len(data) - 1
        opt.backward([scale(loss / len(data)) for loss in losses_of(net, x, y)], combine=combine_last and last)


def plain_run(options, data, weights=(0.7, 0.3)):
    """The reference: the same accumulation, no tool in between."""
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=list(weights), **options)
    accumulate(opt, net, data)
    opt.step()
    return net, opt


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("combine_last", [False, True])
@pytest.mark.parametrize("store", list(STORES))
def test_grad_scaler_step_over_accumulated_micro_batches_equals_the_unscaled_step(store, combine_last):
    """``scaler.step(opt)`` after micro-batches of scaled losses takes the unscaled step (to rounding):
    the scaler unscales the combined direction, never a single objective's gradient."""
    data = batches()
    reference, ref_opt = plain_run(STORES[store], data)
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accumulate(opt, net, data, scale=scaler.scale, combine_last=combine_last)
    scaler.step(opt)
    scaler.update()
    assert max_diff(net, reference) < 1e-5
    assert scaler.get_scale() == 1024.0  # no overflow seen
    # the combination saw the scaled gradients: the coefficients of a scaled Gram are the same up to rounding
    torch.testing.assert_close(opt.last.coefficients.double(), ref_opt.last.coefficients.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("store", list(STORES))
def test_grad_scaler_skips_an_overflowing_accumulation_and_backs_off(store):
    data = batches()
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = data[0]
    opt.backward([scaler.scale(loss) for loss in losses_of(net, x, y)], combine=False)
    first, second = losses_of(net, *data[1])
    opt.backward([scaler.scale(first), scaler.scale(second * float("inf"))], combine=False)  # the light objective overflows
    scaler.step(opt)
    scaler.update()
    assert max_diff(net, before) == 0.0
    assert scaler.get_scale() == 512.0


def test_grad_scaler_unscale_before_the_combination_is_refused_not_mixed():
    """``scaler.unscale_(opt)`` after ``backward(..., combine=False)`` would unscale only what ``.grad``
    shows; the step is refused with the reason and the parameters stay as they were."""
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accumulate(opt, net, batches(), scale=scaler.scale)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="changed in place"):
        opt.step()
    assert max_diff(net, before) == 0.0


def test_grad_scaler_unscale_then_clip_then_step_after_combining_clips_the_unscaled_direction():
    data = batches()
    max_norm = 0.05
    reference = model()
    ref_opt = ConflictAverseOptimizer(torch.optim.SGD(reference.parameters(), lr=1.0), weights=[0.7, 0.3])
    accumulate(ref_opt, reference, data, combine_last=True)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    ref_opt.step()
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accumulate(opt, net, data, scale=scaler.scale, combine_last=True)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    scaler.step(opt)
    scaler.update()
    assert max_diff(net, reference) < 1e-6


# ----------------------------------------------------------------------------------- edits of .grad
@pytest.mark.parametrize("store", list(STORES))
def test_a_clip_that_clips_nothing_between_micro_batches_changes_nothing(store):
    data = batches()
    reference, _ = plain_run(STORES[store], data)
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    opt.backward([loss / 2 for loss in losses_of(net, *data[0])], combine=False)
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e9)
    opt.backward([loss / 2 for loss in losses_of(net, *data[1])], combine=False)
    opt.step()
    assert max_diff(net, reference) == 0.0


@pytest.mark.parametrize("edit", ["clip", "data"])
@pytest.mark.parametrize("store", list(STORES))
def test_an_edit_of_an_uncombined_window_is_refused_at_step(store, edit):
    """A real edit of ``.grad`` between ``backward(..., combine=False)`` and ``step()`` (a clip that
    clips, or a write through ``.data`` that bumps no version counter) is refused, never mixed."""
    data = batches()
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    opt.backward([loss / 2 for loss in losses_of(net, *data[0])], combine=False)
    if edit == "clip":
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e-4)
    opt.backward([loss / 2 for loss in losses_of(net, *data[1])], combine=False)
    if edit == "data":
        for p in net.parameters():
            if p.grad is not None:
                p.grad.data.mul_(0.5)
    with pytest.raises(RuntimeError, match="changed in place"):
        opt.step()
    assert max_diff(net, before) == 0.0
    assert opt.last is not None and not bool(opt.last.window_intact)


def test_an_edit_of_a_combined_direction_through_data_before_more_accumulation_is_refused():
    data = batches()
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    opt.backward(losses_of(net, *data[0]))  # combined
    for p in net.parameters():
        p.grad.data.mul_(0.5)  # no version bump: the window would continue from an edited direction
    opt.backward(losses_of(net, *data[1]))
    with pytest.raises(RuntimeError, match="changed in place"):
        opt.step()
    assert max_diff(net, before) == 0.0


def test_under_ignore_an_edited_window_writes_nan_never_a_mix():
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], nonfinite="ignore")
    opt.backward(losses_of(net, *batches()[0]), combine=False)
    for p in net.parameters():
        if p.grad is not None:
            p.grad.data.mul_(0.5)
    opt.combine()
    assert all(torch.isnan(p.grad).all() for p in net.parameters())


def test_a_clip_of_the_combined_direction_is_what_the_step_applies():
    x, y = batches()[0]
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    before = [p.detach().clone() for p in net.parameters()]
    opt.backward(losses_of(net, x, y))
    direction = [p.grad.clone() for p in net.parameters()]
    total = torch.sqrt(sum((d**2).sum() for d in direction))
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.01)
    opt.step()
    for p, b, d in zip(net.parameters(), before, direction):
        torch.testing.assert_close(p.detach(), b - d * (0.01 / (total + 1e-6)))


# ----------------------------------------------------------------------------------- flat buffers
@pytest.mark.parametrize("store", list(STORES))
def test_grad_views_of_one_flat_buffer_receive_the_direction_in_place(store):
    """``.grad`` preallocated as views of one flat buffer (DDP's ``gradient_as_bucket_view``) and
    ``zero_grad(set_to_none=False)``: the direction lands in those very tensors."""
    x, y = batches()[0]
    reference = model()
    ref_opt = ConflictAverseOptimizer(torch.optim.SGD(reference.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    ref_opt.zero_grad()
    ref_opt.backward(losses_of(reference, x, y))
    expected = [p.grad.clone() for p in reference.parameters()]
    net = model()
    params = list(net.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    views = []
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        views.append(p.grad)
        offset += p.numel()
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=1.0), weights=[0.7, 0.3], **STORES[store])
    for _ in range(2):  # a second step reuses the same buffer
        opt.zero_grad(set_to_none=False)
        opt.backward(losses_of(net, x, y))
        assert all(p.grad is v for p, v in zip(params, views))
        if _ == 0:
            torch.testing.assert_close(flat, torch.cat([e.flatten() for e in expected]))
        opt.step()


# ----------------------------------------------------------------------------------- failed calls
@pytest.mark.parametrize("store", list(STORES))
def test_grad_replaced_by_equal_clones_between_backwards_starts_a_new_window(store):
    """Every ``.grad`` replaced by a clone (the same values, other tensors) after ``backward(...,
    combine=False)``: a new window begins. Its Gram is the second batch's alone, and the clones are
    kept as the user's ``.grad`` with the new direction added to them, as torch adds gradients."""
    net = model()
    params = list(net.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=1.0), weights=[0.7, 0.3], **STORES[store])
    (x1, y1), (x2, y2) = batches()
    opt.backward(losses_of(net, x1, y1), combine=False)
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.clone()
    kept = [None if p.grad is None else p.grad.clone() for p in params]
    assert any(k is not None for k in kept)
    opt.backward(losses_of(net, x2, y2))
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses_of(net, x2, y2)]
    G = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)]) for gs in grads])
    gram = (G.double() @ G.double().T).float()
    torch.testing.assert_close(opt.last.gram.float(), gram, rtol=1e-5, atol=1e-6 * gram.abs().max().item())
    a = opt.last.coefficients
    for j, p in enumerate(params):
        added = sum(a[i].to(p.dtype) * g[j] for i, g in enumerate(grads) if g[j] is not None)
        expected = added if kept[j] is None else kept[j] + added
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


def test_a_rejected_micro_batch_changes_nothing():
    """A call refused after validation-worthy input (three losses in a two-objective window, a loss
    that does not require grad) leaves the window as it was: the step equals the run without it."""
    data = batches(3)
    reference, _ = plain_run({}, data[:2])
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    opt.backward([loss / 2 for loss in losses_of(net, *data[0])], combine=False)
    bad = losses_of(net, *data[2])
    with pytest.raises(ValueError):
        opt.backward([*bad, bad[0]], combine=False)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.backward([bad[0], bad[1].detach()], combine=False)
    opt.backward([loss / 2 for loss in losses_of(net, *data[1])], combine=False)
    opt.step()
    assert max_diff(net, reference) == 0.0


def test_an_objective_constant_on_the_batch_has_a_zero_gradient():
    """A loss that reaches no trainable parameter (every pair tied on that objective) is a zero
    gradient, as in ``sum(losses).backward()``: the direction is the other objective's, scaled by
    its coefficient, and the Gram has a zero row."""
    x, y = batches()[0]
    net = model(dtype=torch.float64)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    first = losses_of(net, x.double(), y.double())[0]
    constant = torch.zeros((), dtype=torch.float64, requires_grad=True) * 2.0
    expected = torch.autograd.grad(first, list(net.parameters()), retain_graph=True, allow_unused=True)
    opt.backward([first, constant])
    a = opt.last.coefficients
    assert opt.last.gram[1].abs().max().item() == 0.0
    for p, g in zip(net.parameters(), expected):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, a[0] * g, rtol=1e-12, atol=1e-12)


def test_optimizer_in_backward_hooks_are_refused_before_anything_changes():
    net = model()
    params = list(net.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=1.0), weights=[0.7, 0.3])
    params[0].register_post_accumulate_grad_hook(lambda p: p.data.add_(p.grad, alpha=-1.0))
    before = copy.deepcopy(net)
    with pytest.raises(RuntimeError, match="post-accumulate-grad hook"):
        opt.step(losses_of(net, *batches()[0]))
    assert max_diff(net, before) == 0.0
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("store", list(STORES))
def test_weights_that_zero_the_kept_objective_mid_window_are_refused(store):
    """``configure(weights=...)`` giving the objective kept in ``.grad`` weight 0 while a combined
    window can still be continued: refused, the settings unchanged, the window still usable."""
    data = batches()
    reference, _ = plain_run(STORES[store], data, weights=(0.7, 0.3))
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    opt.backward([loss / 2 for loss in losses_of(net, *data[0])], combine=True)
    with pytest.raises(ValueError, match="weight 0 for objective 0"):
        opt.configure(weights=[0.0, 1.0])
    assert opt.settings.weights == (0.7, 0.3)
    opt.backward([loss / 2 for loss in losses_of(net, *data[1])], combine=False)
    opt.step()
    assert max_diff(net, reference) < 1e-6
    opt.configure(weights=[0.0, 1.0])  # between windows: fine


# ----------------------------------------------------------------------------------- shared=
def test_shared_accepts_a_module_or_a_single_parameter():
    x, y = batches()[0]
    results = []
    for shared in ("list", "module", "parameter"):
        net = model()
        trunk = net["trunk"]
        given = {"list": list(trunk.parameters()), "module": trunk, "parameter": trunk.weight}[shared]
        opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], shared=given)
        opt.step(losses_of(net, x, y))
        results.append((net, opt.last.gram))
    assert max_diff(results[0][0], results[1][0]) == 0.0
    # one parameter: the Gram over the trunk weight alone, from autograd.grad
    net = model()
    grads = [torch.autograd.grad(loss, net["trunk"].weight, retain_graph=True)[0].flatten() for loss in losses_of(net, x, y)]
    G = torch.stack(grads).double()
    torch.testing.assert_close(results[2][1].double(), G @ G.T, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="module, a parameter or an iterable"):
        ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), shared=3)


def test_a_micro_batch_with_a_constant_objective_keeps_every_earlier_micro_batch():
    """A micro-batch where one objective is constant (its loss reaches no parameter) used to be
    refused after its passes, discarding the micro-batches before it; it is a zero gradient for
    that objective, and the window holds the sum of everything accumulated."""
    data = batches(dtype=torch.float64)
    net = model(dtype=torch.float64)
    params = list(net.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=1.0), weights=[0.7, 0.3])
    first = [loss / 2 for loss in losses_of(net, *data[0])]
    second = [losses_of(net, *data[1])[0] / 2, torch.zeros((), dtype=torch.float64, requires_grad=True) * 1.0]
    sums = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    for i, loss in enumerate(first + second[:1]):
        for s, g in zip(sums[i % 2 if i < 2 else 0], torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)):
            if g is not None:
                s += g
    opt.backward(first, combine=False)
    opt.backward(second, combine=True)
    flat = torch.stack([torch.cat([s.flatten() for s in objective]) for objective in sums])
    torch.testing.assert_close(opt.last.gram, flat @ flat.T, rtol=1e-12, atol=1e-14)
    a = opt.last.coefficients
    for j, p in enumerate(params):
        torch.testing.assert_close(p.grad, a[0] * sums[0][j] + a[1] * sums[1][j], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("store", list(STORES))
def test_sparse_embedding_gradients_accumulate_over_uncombined_micro_batches_like_dense_ones(store):
    """``nn.Embedding(sparse=True)``: the intermediate left in ``.grad`` between micro-batches may be
    sparse; the window still accumulates and gives the step of a dense embedding."""
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        emb, head = nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 2)
        params = [*emb.parameters(), *head.parameters()]
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.5), weights=[0.7, 0.3], **STORES[store])
        for idx in (torch.tensor([1, 2, 3]), torch.tensor([3, 4])):
            out = head(emb(idx))
            opt.backward([out[:, 0].pow(2).mean() / 2, (out[:, 1] - 1).pow(2).mean() / 2], combine=False)
        opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("store", list(STORES))
def test_the_window_reads_nothing_from_the_device_under_nonfinite_ignore(store, monkeypatch):
    """Accumulation (with the edit checks of a continued window) and the step: no ``.item()``,
    ``.tolist()`` or ``bool(tensor)`` anywhere on the path when ``nonfinite="ignore"``."""
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weights=[0.7, 0.3], nonfinite="ignore", **STORES[store])
    data = batches(3)
    opt.step(losses_of(net, *data[0]))  # the layout is built (host-side, once) before the check
    opt.zero_grad()
    losses = [[loss / 2 for loss in losses_of(net, x, y)] for x, y in data[1:]]
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, lambda *args, **kwargs: pytest.fail("host read on the step path"))
        opt.backward(losses[0], combine=True)
        opt.backward(losses[1], combine=False)  # continues a combined window: unwrite and the edit check
        opt.step()
        opt.zero_grad()
        opt.step(losses_of(net, *data[0]))


def test_a_grad_scaler_argument_that_is_not_a_scaler_is_refused_before_anything_changes():
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    opt.backward(losses_of(net, *batches()[0]), combine=False)
    with pytest.raises(TypeError, match=r"scaler\.step\(opt\)"):
        opt.step(grad_scaler=object())
    assert max_diff(net, before) == 0.0
    opt.step()  # the window is still there
    assert max_diff(net, before) > 0.0


# ----------------------------------------------------------------------------------- GradScaler, unscale_ first
def test_a_no_op_unscale_before_scaler_step_lets_the_scaler_step_proceed():
    """At scale 1 ``scaler.unscale_(opt)`` after ``backward(..., combine=False)`` changes no value (a
    no-op edit, so the window stays intact), and ``scaler.step(opt)`` then finds the scaler already
    unscaled: the step goes on, equal to the plain run's, and the scale stays."""
    data = batches()
    reference, _ = plain_run({}, data)
    net = model()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3])
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    accumulate(opt, net, data, scale=scaler.scale)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert max_diff(net, reference) < 1e-6 and scaler.get_scale() == 1.0


# ----------------------------------------------------------------------------------- NaN and the edit check
@pytest.mark.parametrize("store", list(STORES))
def test_writing_a_nan_into_a_waiting_grad_through_data_is_an_edit(store):
    """A finite ``.grad`` entry overwritten with NaN through ``.data`` (no version bump) between two
    ``backward(..., combine=False)``: an edit of the window, refused as such (not reported as an
    objective's non-finite gradient), and nothing moves."""
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    data = batches()
    accumulate(opt, net, data[:1])
    net["trunk"].weight.grad.data[0, 0] = float("nan")
    accumulate(opt, net, data[1:])
    with pytest.raises(RuntimeError, match="changed in place"):
        opt.step()
    assert max_diff(net, before) == 0.0


@pytest.mark.parametrize("store", list(STORES))
def test_a_gradient_that_is_nan_and_stays_nan_is_not_an_edit(store):
    """An objective whose gradient is NaN from the first micro-batch on: ``.grad`` holds NaN before and
    after the next ``backward`` without any edit, so the step is skipped as non-finite (the objective
    named), not refused as an edit."""
    net = model()
    before = copy.deepcopy(net)
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), weights=[0.7, 0.3], **STORES[store])
    for x, y in batches():
        first, second = losses_of(net, x, y)
        opt.backward([first * float("nan"), second], combine=False)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert max_diff(net, before) == 0.0 and opt.skipped_steps == 1
