"""Tests of the gradient stores (cagrad_clip/storage): where the per-objective gradients live and
what reaches ``.grad``, against hand-written references (per-objective ``torch.autograd.grad``,
float64 Grams, ``sum(losses).backward()``)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage.blocks import CHUNK, GRAM_BLOCK, blocked_gram, gram_of_block
from tests.policies import step_refused


def trunk_and_heads(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).to(dtype)
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)]).to(dtype)
    return trunk, heads


def params_of(*modules):
    return [p for m in modules for p in m.parameters()]


def two_losses(trunk, heads, x, y):
    z = trunk(x)
    return [((heads[0](z) - y) ** 2).mean(), ((heads[1](z) + y) ** 2).mean()]


def reference_direction(losses, params, coefficients):
    """``sum_i a_i g_i`` per parameter from independent autograd.grad calls (None where no loss reaches)."""
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    out = []
    for j in range(len(params)):
        parts = [coefficients[i] * g[j] for i, g in enumerate(grads) if g[j] is not None]
        out.append(sum(parts) if parts else None)
    return out


# ------------------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocked_gram_of_half_rows_accumulates_in_float32(dtype):
    """Half-precision rows, more than one chunk: the Gram equals the float64 Gram of the same values
    to float32 accuracy (a half-precision accumulation would be off by ~1e-2)."""
    torch.manual_seed(0)
    rows = torch.randn(3, CHUNK + 12345).to(dtype)
    expected = rows.double() @ rows.double().T
    gram = blocked_gram(rows, rows.shape[1])
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item())


def nonzero_integer_rows(k, n, seed=0):
    """``k`` rows of ``n`` non-zero integers in ``[-3, 3]``: every column adds to every Gram entry, and
    every dot product (at most ``9 n < 2**24``) is exact in float32 (and the values in bf16)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 4, (k, n), generator=g) * (torch.randint(0, 2, (k, n), generator=g) * 2 - 1)


@pytest.mark.parametrize("tiles, extra", [(2, 5), (3, 1), (2, 0), (1, 3)])
def test_gram_of_integer_rows_is_exact_past_two_tiles_and_in_the_remainder(tiles, extra):
    """``tiles * GRAM_BLOCK + extra`` columns of integers: the tiled Gram (``bmm`` over whole tiles plus
    the remainder) equals the int64 Gram exactly, so no column is lost or counted twice; so does the
    Gram over the first ``columns`` columns of float32 rows (in place) and of bf16 rows (upcast)."""
    n = tiles * GRAM_BLOCK + extra
    ints = nonzero_integer_rows(3, n)
    expected = (ints @ ints.T).float()
    assert torch.equal(gram_of_block(ints.float()), expected)
    assert torch.equal(blocked_gram(ints.to(torch.bfloat16), n), expected)
    head = ints[:, : n - 7]
    assert torch.equal(blocked_gram(ints.float(), n - 7), (head @ head.T).float())


def test_bf16_combination_is_accumulated_in_float32_and_rounded_once():
    """bf16 parameters over more than one chunk: every value written into ``.grad`` is the exact
    combination of the bf16 per-objective gradients up to one bf16 rounding (a bf16 accumulation
    would be off by several roundings)."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.zeros(3 * CHUNK // 2, dtype=torch.bfloat16))
    targets = torch.randn(3, w.numel()).to(torch.bfloat16)
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.0), weights=[0.2, 0.3, 0.5], c=0.7)
    opt.backward([(w * t).sum() for t in targets])  # gradient of objective i is targets[i]
    a = opt.last.coefficients.double()
    exact = a @ targets.double()
    magnitude = a.abs() @ targets.double().abs()  # float32 accumulation error is relative to this
    error = (w.grad.double() - exact).abs()
    assert bool((error <= 2.0**-8 * exact.abs() + 1e-6 * magnitude).all())


# ------------------------------------------------------------------------------------------ memory floor
def test_every_objectives_gradient_stays_where_autograd_put_it_in_the_parameter_dtype():
    """Direct store: no buffer is allocated ahead of the backward. Objective 0's gradients are the
    bf16 tensors autograd allocated (equal to ``autograd.grad``); the home objective's (the largest
    weight) are left in ``.grad`` and the combination is written into those very tensors."""
    trunk, heads = trunk_and_heads(torch.bfloat16)
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.3, 0.7])
    x, y = torch.randn(8, 4, dtype=torch.bfloat16), torch.randn(8, 1, dtype=torch.bfloat16)
    expected = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in two_losses(trunk, heads, x, y)]
    opt.backward(two_losses(trunk, heads, x, y), combine=False)
    store = opt._store
    assert store.rows is None and store.home == 1
    held = [p.grad for p in params]
    for j, p in enumerate(params):
        for i in range(2):
            got = store.grads[i][j]
            if expected[i][j] is None:
                assert got is None  # objective i does not reach heads[1 - i]
                continue
            assert got.dtype == torch.bfloat16 and got.shape == p.shape
            torch.testing.assert_close(got, expected[i][j], rtol=0, atol=0)
        assert held[j] is store.grads[1][j]  # .grad is objective 1's own gradient before the combination
    opt.combine()
    assert all(p.grad is g for p, g in zip(params, held) if g is not None)  # combined in place


@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": torch.float32}], ids=["direct", "accumulator"])
def test_zero_grad_after_a_step_frees_every_gradient_like_torch(options):
    """After ``step`` the gradients in ``.grad`` are the user's: ``zero_grad()`` (set_to_none) frees
    them, as it does for a plain optimizer. A reference kept by the store would keep a whole
    parameter copy alive into the next forward pass (measured: +0.35 copies on the benchmark encoder)."""
    import gc
    import weakref

    trunk, heads = trunk_and_heads()
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), **options)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(two_losses(trunk, heads, x, y))
        rows = [] if opt._store.rows is None else [weakref.ref(opt._store.rows)]  # the accumulator's float32 rows
        assert len(rows) == (1 if options else 0)
        opt.step()
        refs = [weakref.ref(p.grad) for p in params if p.grad is not None] + rows
        assert len(refs) > len(rows)
        opt.zero_grad()
        gc.collect()
        assert [r() is None for r in refs] == [True] * len(refs)
        opt.zero_grad()


def test_accumulate_dtype_float32_sums_bf16_gradients_in_float32():
    trunk, heads = trunk_and_heads(torch.bfloat16)
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), accumulate_dtype=torch.float32)
    x, y = torch.randn(8, 4, dtype=torch.bfloat16), torch.randn(8, 1, dtype=torch.bfloat16)
    losses = two_losses(trunk, heads, x, y)
    expected = reference_direction(losses, params, [1.0, 0.0])  # objective 0's gradient, in bf16
    opt.backward(losses)
    assert opt._store.rows.dtype == torch.float32
    assert all(p.grad.dtype == torch.bfloat16 for p in params)
    row0 = opt._store.views(opt._store.rows[0])
    for r, e in zip(row0, expected):
        torch.testing.assert_close(r, e.float())


# ------------------------------------------------------------------------------------------ case 7
@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": torch.float32}], ids=["direct", "accumulator"])
def test_a_parameter_no_objective_reaches_keeps_grad_none(options):
    """as loss.backward() leaves it (AdamW would otherwise decay it, momentum move it)."""
    trunk, heads = trunk_and_heads()
    unused = nn.Linear(3, 3)
    params = params_of(trunk, heads, unused)
    opt = ConflictAverseOptimizer(torch.optim.AdamW(params, lr=0.1, weight_decay=0.5), **options)
    before = [p.detach().clone() for p in unused.parameters()]
    opt.step(two_losses(trunk, heads, torch.randn(8, 4), torch.randn(8, 1)))
    assert all(p.grad is None for p in unused.parameters())
    assert all(torch.equal(p, b) for p, b in zip(unused.parameters(), before))
    assert len(opt.state) == len(params_of(trunk, heads))  # AdamW never saw them


# ------------------------------------------------------------------------------------------ case 1
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_in_a_head_outside_shared_is_caught(policy):
    """the Gram is over ``shared`` only; a NaN that reaches only a head must still stop the step."""
    trunk, heads = trunk_and_heads()
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.Adam(params, lr=0.1), shared=trunk.parameters(), nonfinite=policy)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    z = trunk(x)
    nan_in_head_only = heads[1](z.detach()) * torch.tensor(float("nan"))  # no path back to the trunk
    losses = [((heads[0](z) - y) ** 2).mean(), ((heads[1](z) + y) ** 2).mean() + nan_in_head_only.mean()]
    before = [p.detach().clone() for p in params]
    step_refused(opt, losses, policy, r"objective\(s\) \[1\]")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0  # Adam's state untouched


@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": torch.float32}], ids=["direct", "accumulator"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nan_only_in_the_first_head_parameter_refuses_the_step_naming_that_objective_only(policy, options):
    """Objective 0's gradient is NaN on ``heads[0].weight`` only (the first parameter outside ``shared=``)
    and finite everywhere else; objective 1's is finite. The step is refused, parameters and Adam's
    state untouched, and the report names objective 0 alone: ``last.finite == [False, True]``, although
    objective 1 (uniform weights: the last of ties, the one whose gradient the default store turns into
    the direction) received that NaN through the combination."""
    trunk, heads = trunk_and_heads()
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.Adam(params, lr=0.1), shared=trunk.parameters(), nonfinite=policy, **options)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    z = trunk(x)
    nan_on_first_head_weight = (heads[0].weight * float("nan")).sum()  # reaches heads[0].weight and nothing else
    losses = [((heads[0](z) - y) ** 2).mean() + nan_on_first_head_weight, ((heads[1](z) + y) ** 2).mean()]
    grads = torch.autograd.grad(losses[0], params, retain_graph=True, allow_unused=True)
    assert [g is not None and not bool(torch.isfinite(g).all()) for g in grads] == [False, False, True, False, False, False]
    before = [p.detach().clone() for p in params]
    step_refused(opt, losses, policy, r"objective\(s\) \[0\] have a non-finite gradient")
    assert opt.last.finite.tolist() == [False, True]
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


# ------------------------------------------------------------------------------------------ case 2
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_combination_that_overflows_float16_is_not_applied(policy):
    """finite fp16 gradients whose combination exceeds 65504 must not reach the weights."""
    w = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    # orthogonal gradients of norm 5e4 (finite in float16); with c = 2 the coefficients are
    # a = (0.5 + 0.5 c) = (1.5, 1.5), so the direction is 7.5e4 > 65504 per entry
    losses = [w[0] * 5.0e4, w[1] * 5.0e4]
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=1.0), weights=[0.5, 0.5], c=2.0, nonfinite=policy)
    step_refused(opt, losses, policy, "overflows the parameters' dtype")
    assert torch.equal(w.detach(), torch.zeros(2, dtype=torch.float16))
    torch.testing.assert_close(opt.last.coefficients, torch.tensor([1.5, 1.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_finite_gradients_whose_combination_overflows_float32_or_bf16_are_not_applied(policy, dtype):
    """Gradients 1e4 e_1 and 1e4 e_2 (finite, their Gram too) and ``c = 1e36``: the coefficients are
    ``0.5 + 0.5 c`` (finite: 5e35) but the direction, 5e39 per entry, exceeds the largest float32 and bf16
    (3.4e38). The step must be refused with the overflow named, not take an Inf step."""
    w = nn.Parameter(torch.zeros(2, dtype=dtype))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=1.0), weights=[0.5, 0.5], c=1e36, nonfinite=policy)
    step_refused(opt, [w[0] * 1.0e4, w[1] * 1.0e4], policy, "overflows the parameters' dtype")
    assert torch.equal(w.detach(), torch.zeros(2, dtype=dtype))
    assert torch.isfinite(opt.last.gram).all() and opt.last.finite.tolist() == [True, True]
    torch.testing.assert_close(opt.last.coefficients, torch.tensor([5e35, 5e35]))


# ------------------------------------------------------------------------------------------ case 14
def test_a_finite_but_huge_gradient_is_reported_as_an_overflow():
    """|g| ~ 1e22 squares past float32; the message must not call the gradient non-finite."""
    w = nn.Parameter(torch.ones(3))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"objective\(s\) \[0\] have finite gradients whose squared norm overflows"):
        opt.step([(w * 1e22).sum(), (w * 2.0).sum()])


# ------------------------------------------------------------------------------------------ case 5
def test_model_zero_grad_without_set_to_none_between_backwards_starts_over():
    """``model.zero_grad(set_to_none=False)`` zeroes .grad in place; the next backward must
    give d(b) (a fresh window), not d(a + b) - d(a)."""
    trunk, heads = trunk_and_heads(torch.float64)
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.6, 0.4])
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt.backward(two_losses(trunk, heads, x, y))
    trunk.zero_grad(set_to_none=False)
    heads.zero_grad(set_to_none=False)
    opt.backward(two_losses(trunk, heads, x + 1.0, y))
    expected = reference_direction(two_losses(trunk, heads, x + 1.0, y), params, opt.last.coefficients)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-12)
    # and the Gram is that of the second batch alone
    grads = [
        torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
        for gs in (torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in two_losses(trunk, heads, x + 1.0, y))
    ]
    G = torch.stack(grads)
    torch.testing.assert_close(opt.last.gram, G @ G.T)


def test_grad_scaler_recovers_after_one_overflow_with_zero_grad_set_to_none_false():
    """after one overflow the NaN direction must not poison every later step."""
    trunk, heads = trunk_and_heads()
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.01), nonfinite="ignore")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    stepped = []
    for k in range(3):
        trunk.zero_grad(set_to_none=False)
        heads.zero_grad(set_to_none=False)
        losses = two_losses(trunk, heads, x, y)
        if k == 0:
            losses[0] = losses[0] * float("inf")
        opt.backward([scaler.scale(loss) for loss in losses])
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        stepped.append(scaler.get_scale() >= scale_before)
        assert all(torch.isfinite(p).all() for p in params)
    assert stepped == [False, True, True]
    assert all(torch.isfinite(p.grad).all() for p in params)


# ------------------------------------------------------------------------------------------ case 8
def test_reentrant_checkpointing_gives_the_same_direction_as_no_checkpointing():
    """``use_reentrant=True`` with inputs that require grad runs its own backward into
    ``.grad``; the stores take every objective's gradient with ``backward()``, so the checkpointed
    block is trained exactly. (With no input requiring grad, torch itself gives the block no
    gradient and warns; that is torch's documented behaviour.)"""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).double()
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)]).double()
    params = params_of(block, heads)
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)

    def losses(reentrant):
        h = checkpoint(block, x, use_reentrant=True) if reentrant else block(x)
        return [heads[0](h).pow(2).mean(), (heads[1](h) - 1).pow(2).mean()]

    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.5, 0.5])
    opt.backward(losses(True))
    with_ckpt = [p.grad.clone() for p in params]
    expected = reference_direction(losses(False), params, opt.last.coefficients)
    for g, e in zip(with_ckpt, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ case 9
def test_leaves_outside_the_optimizer_get_the_plain_sum_like_backward():
    """a leaf that requires grad but is not in the wrapped optimizer (a SparseAdam
    embedding next to the model) receives the plain sum of the objectives' gradients, exactly what
    ``sum(losses).backward()`` gives it, on the dense path as on the FSDP path; it is not combined."""
    torch.manual_seed(0)
    outside = nn.Parameter(torch.randn(4, dtype=torch.float64))
    trunk, heads = trunk_and_heads(torch.float64)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params_of(trunk, heads), lr=0.1))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)

    def losses():
        return two_losses(trunk, heads, x * outside, y)

    opt.backward(losses())
    expected = torch.autograd.grad(sum(losses()), outside)[0]
    torch.testing.assert_close(outside.grad, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ chunks
@given(
    numels=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    columns=st.integers(1, 50),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_chunk_plan_covers_each_parameter_once_in_order(numels, columns, data):
    """Every chosen parameter's ``[0, n)`` is covered exactly once, in order; no chunk exceeds
    ``columns`` and only the last may be shorter."""
    from cagrad_clip._storage.direct import plan_chunks

    indices = data.draw(st.lists(st.sampled_from(range(len(numels))), unique=True).map(sorted))
    plan = plan_chunks(numels, indices, columns)
    flat = [(j, start, stop) for chunk in plan for j, start, stop in chunk.pieces]
    covered = [(j, k) for j, start, stop in flat for k in range(start, stop)]
    assert covered == [(j, k) for j in indices for k in range(numels[j])]
    assert all(chunk.length == sum(stop - start for _, start, stop in chunk.pieces) for chunk in plan)
    assert all(chunk.length == columns for chunk in plan[:-1]) and all(0 < c.length <= columns for c in plan)


@given(m=st.integers(1, 16), numel=st.integers(1, 1 << 34), itemsize=st.sampled_from([2, 4, 8]))
@settings(max_examples=300, deadline=None)
def test_gathered_block_is_a_sixteenth_of_the_parameters(m, numel, itemsize):
    """The ``(m, columns)`` float32 block: whole Gram blocks, at most ``CHUNK`` columns, and as
    close to 1/16 of the parameters' bytes as whole Gram blocks allow (one Gram block at least)."""
    from cagrad_clip._storage.blocks import GRAM_BLOCK, gather_columns

    columns = gather_columns(m, numel, itemsize)
    budget = numel * itemsize // 16  # bytes, written out here independently
    assert columns % GRAM_BLOCK == 0 and GRAM_BLOCK <= columns <= CHUNK
    if columns == CHUNK:
        assert m * CHUNK * 4 <= budget
    elif columns > GRAM_BLOCK:
        assert m * columns * 4 <= budget < m * (columns + GRAM_BLOCK) * 4
    else:
        assert budget < m * 2 * GRAM_BLOCK * 4


def small_chunks(monkeypatch, columns):
    """Force the direct store's chunks down to ``columns`` columns, so parameters split across chunks."""
    import cagrad_clip._storage.direct as direct

    monkeypatch.setattr(direct, "gather_columns", lambda m, n, itemsize: columns)


@pytest.mark.parametrize("columns", [7, 50, 1 << 20])
def test_gram_and_direction_do_not_depend_on_the_chunking(monkeypatch, columns):
    """m = 3 with a head objective 0 does not reach: Gram and ``.grad`` equal a float64 reference of
    independent ``autograd.grad`` calls whether parameters share a chunk or are split over many."""
    small_chunks(monkeypatch, columns)
    torch.manual_seed(3)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])
    params = params_of(trunk, heads)
    x, y = torch.randn(10, 5), torch.randn(10, 3)

    def losses(t, h):
        z = t(x.to(h[0].weight.dtype))
        out = [((h[i](z).squeeze(-1) - y[:, i].to(z.dtype)) ** 2).mean() for i in range(3)]
        out[2] = out[2] + 0.1 * (h[0](z) ** 2).mean()  # objective 2 also reaches head 0; 0 reaches no other head
        return out

    twin_t, twin_h = copy.deepcopy(trunk).double(), copy.deepcopy(heads).double()
    twin_params = params_of(twin_t, twin_h)
    shared = len(list(trunk.parameters()))
    per = [torch.autograd.grad(loss, twin_params, retain_graph=True, allow_unused=True) for loss in losses(twin_t, twin_h)]
    rows = torch.stack([torch.cat([g.flatten() for g in gs[:shared]]) for gs in per])
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), weights=[0.2, 0.3, 0.5], shared=list(trunk.parameters()))
    opt.backward(losses(trunk, heads))
    torch.testing.assert_close(opt.last.gram.double(), rows @ rows.T, rtol=1e-5, atol=1e-7)
    a = opt.last.coefficients.double()
    for j, p in enumerate(params):
        parts = [a[i] * gs[j] for i, gs in enumerate(per) if gs[j] is not None]
        if not parts:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad.double(), sum(parts), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": torch.float32}], ids=["direct", "accumulator"])
def test_channels_last_parameters_are_combined_element_for_element(options):
    """A ``channels_last`` convolution's gradients keep the parameter's strides; the combination must
    pair the same elements of every objective's gradient (checked against ``autograd.grad``)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    target = torch.randn(2, 4, 4, 4)

    def losses():
        out = conv(x)
        return [((out - target) ** 2).mean(), (out[:, :2] ** 2).mean(), out.abs().mean()]

    params = list(conv.parameters())
    per = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses()]
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), weights=[0.5, 0.3, 0.2], c=0.5, **options)
    opt.backward(losses())
    a = opt.last.coefficients
    for j, p in enumerate(params):
        torch.testing.assert_close(p.grad, sum(a[i] * per[i][j] for i in range(3)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_optimizers_gram_of_half_gradients_is_accumulated_in_float32(monkeypatch, dtype):
    """Half-precision gradients spread over several chunks and parameters: ``opt.last.gram`` equals
    the float64 Gram of the same half-precision values to float32 accuracy (a Gram reduced in the
    gradients' dtype is off by ~1e-3 of sqrt(G_ii G_jj))."""
    small_chunks(monkeypatch, 5000)
    torch.manual_seed(5)
    sizes = [3000, 7000, 11, 4096]
    params = [nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes]
    grads = [torch.randn(sum(sizes)).add(1.0).mul(0.01 * (i + 1)).to(dtype) for i in range(3)]
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0))
    opt.backward([sum((p * piece).sum() for p, piece in zip(params, g.split(sizes))) for g in grads])
    rows = torch.stack(grads).double()
    exact = rows @ rows.T
    scale = exact.diagonal().sqrt()
    error = (opt.last.gram.double() - exact).abs() / (scale[:, None] * scale[None, :])
    assert error.max().item() < 1e-5


@pytest.mark.parametrize("combine_each", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulation_over_micro_batches(dtype, combine_each):
    """Two micro-batches of bf16/fp16 gradients (half-precision path: float32 chunks): each objective's
    gradients are summed in the parameters' dtype as ``.grad`` sums them, and the direction is
    ``sum_i a_i g_i`` of those sums rounded once (``combine=True`` on the first micro-batch takes the
    combination back out first: a few roundings more)."""
    torch.manual_seed(6)
    trunk, heads = trunk_and_heads(dtype)
    params = params_of(trunk, heads)
    xs = [torch.randn(8, 4, dtype=dtype) for _ in range(2)]
    ys = [torch.randn(8, 1, dtype=dtype) for _ in range(2)]
    halves = [
        [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in two_losses(trunk, heads, x, y)]
        for x, y in zip(xs, ys)
    ]
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), weights=[0.6, 0.4], c=0.5)
    for k, (x, y) in enumerate(zip(xs, ys)):
        opt.backward(two_losses(trunk, heads, x, y), combine=combine_each or k == 1)
    a = opt.last.coefficients.double()
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for j, p in enumerate(params):
        grads = [[h[i][j] for h in halves if h[i][j] is not None] for i in range(2)]
        exact = sum(a[i] * (g[0] + g[1]).double() for i, g in enumerate(grads) if g)  # summed in the dtype, like .grad
        # every rounding is relative to what was summed, the micro-batches' own magnitudes included
        scale = sum(a[i].abs() * sum(t.double().abs() for t in g) for i, g in enumerate(grads) if g)
        rounds = 5 if combine_each else 1
        assert bool(((p.grad.double() - exact).abs() <= rounds * ulp * (exact.abs() + scale) + 1e-6).all())


def test_chunk_plans_stay_bounded_when_the_reached_parameters_change_every_step():
    """Conditional computation: a different head each step. The direction is still exact, and the
    store's cached chunk plans do not grow with the number of distinct reach patterns."""
    torch.manual_seed(7)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).to(torch.bfloat16)
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(7)]).to(torch.bfloat16)
    params = params_of(trunk, heads)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), weights=[0.6, 0.4], shared=list(trunk.parameters()))
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    for step in range(6):
        opt.zero_grad()
        z = trunk(x)
        losses = [(heads[0](z) ** 2).mean(), ((heads[step + 1](z) - 1) ** 2).mean()]
        per = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
        opt.backward(losses)
        a = opt.last.coefficients
        for j, p in enumerate(params):
            parts = [a[i].double() * g[j].double() for i, g in enumerate(per) if g[j] is not None]
            if not parts:
                assert p.grad is None
                continue
            torch.testing.assert_close(p.grad.double(), sum(parts), rtol=2**-7, atol=1e-6)
    assert len(opt._store._plans) <= 2
