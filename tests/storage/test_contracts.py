"""What every gradient store promises across a window, against hand-written references.

* A window that begins with ``.grad`` already holding something (another loss's ``backward``) keeps
  that tensor as the user's ``.grad`` and adds the combination to it; further ``backward`` calls,
  each combined, take the previous direction back out first (``unwrite``): after any number of them
  ``.grad`` is ``kept + sum_i a_i G_i``, ``G_i`` each objective's gradient summed over the
  micro-batches (per-objective ``torch.autograd.grad``, float64), ``a`` solved on ``G G^T``.
* A ``backward`` that fails half-way leaves ``.grad`` as it was before it.
* The low-memory store's Gram is the Gram of the objectives' gradients.
* The non-finite report names each objective for what its store can tell: a finite gradient whose
  square overflows, a non-finite one, or (the home objective of the default store, whose gradient
  became the direction; a shard, which sees part of the gradient) either.
"""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage import make_store
from tests.process_groups import fsdp2_missing, one_rank_group

F64 = torch.float64


class Net(nn.Module):
    """A shared layer and a vector ``b`` that each micro-batch reaches from a different objective."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4, dtype=F64)
        self.b = nn.Parameter(torch.tensor([0.5, -1.5], dtype=F64))

    def forward(self, x: torch.Tensor | None, y: torch.Tensor | None = None, k: int = 0) -> list[torch.Tensor] | torch.Tensor:
        """Micro-batch ``k``'s losses (through ``forward``: FSDP2 gathers the parameters around it), or,
        for ``x=None``, a loss outside the optimizer's objectives (a regulariser)."""
        if x is None:
            return 0.1 * self.lin.weight.square().sum()
        return self.losses(x, y, k)

    def losses(self, x: torch.Tensor, y: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Micro-batch ``k``: ``b`` is reached by objective 0 only (k = 0, 2) or by objective 1 only (k = 1)."""
        h = torch.tanh(self.lin(x))
        first = (h.sum(1) - y).square().mean()
        second = (2 * h[:, 0] + y).square().mean()
        if k in (0, 2):
            first = first + (self.b * h[:, :2].mean(0)).square().sum()
        else:
            second = second + (self.b.square() * x[:, :2].mean(0)).sum()
        return [first, second]


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)) for _ in range(n)]


def fsdp_available() -> bool:
    return fsdp2_missing() is None


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's values (one rank holds them all), a plain tensor itself."""
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t


STORES = {
    "direct": {},
    "accumulator": {"accumulate_dtype": F64},
    "fsdp2": {},
}


def store_param(name: str):
    marks = [pytest.mark.skipif(not fsdp_available(), reason="needs gloo and FSDP2")] if name == "fsdp2" else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("store", [store_param(s) for s in STORES])
@pytest.mark.parametrize("micro", [2, 3])
def test_a_window_that_began_with_grad_keeps_it_and_adds_the_direction_of_every_micro_batch(store, micro):
    """``.grad`` of ``lin.weight`` holds a regulariser's gradient (``model(None)``) when the window begins; ``micro`` backward
    calls follow, each combined. ``b`` is reached by the non-home objective in the first micro-batch
    and by the home objective (the largest weight) in the second: the home gradient allocated for the
    first direction must not stand for the home's own gradient later. At the end ``.grad`` of every
    parameter is ``kept + sum_i a_i G_i``, the kept tensor is still the user's ``.grad`` object, and the
    Gram is ``G G^T`` of the gradients summed over the micro-batches."""
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    with one_rank_group() if store == "fsdp2" else contextlib.nullcontext():
        if store == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
        params = list(model.parameters())
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.3, 0.7], c=0.4, **STORES[store])
        model(None).backward()
        kept = model.lin.weight.grad
        kept_before = local(kept).clone()
        assert model.b.grad is None and model.lin.bias.grad is None
        for k, (x, y) in enumerate(batches(micro)):
            opt.backward(model(x, y, k), combine=True)
        assert model.lin.weight.grad is kept  # the user's tensor, the combination added in place
        got = [local(p.grad) for p in params]
        gram, a = opt.last.gram, opt.last.coefficients

    ref_params = list(reference.parameters())
    summed = [[torch.zeros_like(p) for p in ref_params] for _ in range(2)]
    for k, (x, y) in enumerate(batches(micro)):
        for i, loss in enumerate(reference(x, y, k)):
            for j, g in enumerate(torch.autograd.grad(loss, ref_params, retain_graph=True, allow_unused=True)):
                if g is not None:
                    summed[i][j] += g
    G = torch.stack([torch.cat([g.flatten() for g in row]) for row in summed])
    torch.testing.assert_close(gram, G @ G.T, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in reference.named_parameters()]
    for j, name in enumerate(names):
        want = a[0] * summed[0][j] + a[1] * summed[1][j]
        if name == "lin.weight":
            want = want + kept_before
        torch.testing.assert_close(got[j], want, rtol=1e-10, atol=1e-12, msg=f".grad of {name}")
    assert torch.equal(kept_before, 0.2 * reference.lin.weight.detach())  # the regulariser's gradient, by hand


class Boom(Exception):
    pass


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_a_backward_that_fails_half_way_leaves_grad_as_it_was(store):
    """The second objective's backward raises (a tensor hook): ``.grad`` is the very tensors it held
    before the call, with their values (``None`` where it was ``None``)."""
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.3, 0.7], **STORES[store])
    model(None).backward()
    before = [p.grad for p in params]
    values = [None if g is None else g.clone() for g in before]
    x, y = batches(1)[0]
    losses = model.losses(x, y, 0)

    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise Boom

    losses[1].register_hook(boom)  # the home objective: its pass runs last
    with pytest.raises(Boom):
        opt.backward(losses)
    for p, g, v in zip(params, before, values):
        assert p.grad is g
        assert v is None or torch.equal(p.grad, v)


def test_the_low_memory_store_gram_is_the_gram_of_the_objectives_gradients():
    """``PassesStore`` (``memory="low"``): after the passes its Gram (and the Gram it hands over for a
    single process) is ``G G^T`` over the shared parameters, from per-objective ``autograd.grad``."""
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    store = make_store(params, len(params), memory="low", distributed=False)
    x, y = batches(1)[0]
    losses = model.losses(x, y, 0)
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    G = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(row, params)]) for row in grads])
    store.start_window(2, 1)
    store.accumulate(losses)
    try:
        torch.testing.assert_close(store.gram(), G @ G.T, rtol=1e-12, atol=1e-14)
        assert store.gram_over_ranks(None, None, 1) is store.gram()
    finally:
        store.discard_window()
    assert all(p.grad is None for p in params)


# ------------------------------------------------------------------------------------------ the non-finite report
def refusal(options: dict, weights: list[float], losses_of) -> str:
    w = nn.Parameter(torch.ones(3))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), nonfinite="raise", weights=weights, **options)
    with pytest.raises(FloatingPointError) as info:
        opt.step(losses_of(w))
    assert torch.equal(w.detach(), torch.ones(3))
    return str(info.value)


OVERFLOW = "have finite gradients whose squared norm overflows"


def huge(w):  # |g| = 1e22 per entry: finite in float32, its square is not
    return (w * 1e22).sum()


@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": torch.float32}], ids=["direct", "accumulator"])
def test_an_overflowing_objective_and_a_nonfinite_one_are_each_named_for_what_they_are(options):
    """Objective 0 (not the home one) is finite but squares past float32, objective 1 is NaN: the report
    names [0] as an overflow and [1] as non-finite; with objective 0 alone bad, nothing is called non-finite."""
    both = refusal(options, [0.3, 0.7], lambda w: [huge(w), (w * float("nan")).sum()])
    assert f"objective(s) [0] {OVERFLOW}" in both
    assert "objective(s) [1] have a non-finite gradient" in both
    alone = refusal(options, [0.3, 0.7], lambda w: [huge(w), (w * 2.0).sum()])
    assert f"objective(s) [0] {OVERFLOW}" in alone
    assert "non-finite" not in alone and "[1]" not in alone


def test_the_accumulator_store_tells_an_overflowing_home_objective_from_a_nonfinite_one():
    """The accumulator store keeps every objective's row, the home one's (the largest weight) too."""
    message = refusal({"accumulate_dtype": torch.float32}, [0.7, 0.3], lambda w: [huge(w), (w * 2.0).sum()])
    assert f"objective(s) [0] {OVERFLOW}" in message


@pytest.mark.parametrize("where", ["shared", "head"])
def test_the_default_store_never_calls_the_home_objectives_gradient_finite(where):
    """The default store turned the home objective's gradient into the direction: it cannot tell an
    overflow from a non-finite value there, and must not claim the gradient was finite, even when the
    direction it became is finite (a huge gradient on a head outside ``shared=``: the Gram, the
    coefficients and the direction stay finite, only the head's squared norm overflows)."""
    w, head = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, head], lr=0.1), shared=[w], nonfinite="raise", weights=[0.7, 0.3])
    big = w if where == "shared" else head
    with pytest.raises(FloatingPointError) as info:
        opt.step([(big * 1e22).sum() + (w * w).sum(), (w * 2.0).sum() + head.sum()])
    message = str(info.value)
    assert "objective(s) [0] have a non-finite gradient (Inf/NaN) or one too large to square" in message
    assert OVERFLOW not in message
    assert torch.equal(w.detach(), torch.ones(3)) and torch.equal(head.detach(), torch.ones(2))


def test_the_low_memory_store_names_an_objective_whose_shared_gradient_is_not_finite():
    """``memory="low"``: the Gram's diagonal tells which objective's shared gradient is not finite."""
    message = refusal({"memory": "low"}, [0.5, 0.5], lambda w: [(w * 2.0).sum(), (w * float("nan")).sum()])
    assert "objective(s) [1] have a non-finite gradient (Inf/NaN) on the shared parameters" in message


@pytest.mark.skipif(not fsdp_available(), reason="needs gloo and FSDP2")
def test_fsdp2_gradient_sync_off_is_refused_before_anything_changes():
    """``set_requires_gradient_sync(False)``: FSDP keeps the gradients unsharded and never writes the
    sharded ``.grad``, so every objective would read zero and the step would silently do nothing. The
    backward is refused up front, naming the parameters (only those of the module whose sync is off);
    the window it interrupted goes on unchanged once sync is back on: parameters bit-identical to a run
    that kept sync on throughout."""
    from torch.distributed.fsdp import fully_shard

    data = batches(2)
    with one_rank_group():
        runs = []
        for turn_off in (False, True):
            torch.manual_seed(0)
            model = Net()
            fully_shard(model.lin)
            fully_shard(model)
            opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.3, 0.7], c=0.4)
            opt.backward(model(*data[0], 0), combine=False)
            if turn_off:
                lin_params = [j for j, (name, _) in enumerate(model.named_parameters()) if name.startswith("lin.")]
                held = [local(p.grad) if p.grad is not None else None for p in model.parameters()]
                for unit, recurse, names in ((model.lin, False, lin_params), (model, True, [0, 1, 2])):
                    unit.set_requires_gradient_sync(False, recurse=recurse)
                    with pytest.raises(RuntimeError, match=r"gradient sync is off for parameter\(s\) " + re.escape(str(names))):
                        opt.backward(model(*data[1], 1), combine=False)
                    model.set_requires_gradient_sync(True)
                after = [local(p.grad) if p.grad is not None else None for p in model.parameters()]
                assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after, held))
            opt.backward(model(*data[1], 1))
            opt.step()
            runs.append([p.detach().full_tensor().clone() for p in model.parameters()])
    for got, want in zip(runs[1], runs[0]):
        assert torch.equal(got, want)


@pytest.mark.skipif(not fsdp_available(), reason="needs gloo and FSDP2")
def test_a_sharded_store_never_calls_a_gradient_finite_from_its_own_shard():
    """FSDP2: a rank holds a shard of each gradient, so a finite shard says nothing of the rest; an
    objective whose squared norm overflows is reported as non-finite or too large to square."""
    from torch.distributed.fsdp import fully_shard

    with one_rank_group():
        model = nn.Linear(3, 1, bias=False)
        nn.init.ones_(model.weight)
        fully_shard(model)
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="raise", weights=[0.3, 0.7])
        x = torch.ones(1, 3)
        with pytest.raises(FloatingPointError) as info:
            opt.step([(model(x) * 1e22).sum(), model(x).sum()])
        message = str(info.value)
    assert "objective(s) [0] have a non-finite gradient (Inf/NaN) or one too large to square" in message
    assert OVERFLOW not in message


def test_the_low_memory_finiteness_check_of_float16_heads_is_taken_in_float32():
    """``memory="low"``, float16 parameters: a head direction of norm 400 (finite in float16, its square
    is not) is a finite step; the squared norm is taken in float32, so the step is not refused."""
    w, head = nn.Parameter(torch.ones(2, dtype=torch.float16)), nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, head], lr=1e-4), shared=[w], memory="low", nonfinite="raise", weights=[0.5, 0.5])
    opt.step([(w * 2).sum() + (head * 200.0).sum(), (w * w).sum() + (head * 200.0).sum()])
    assert bool(opt.last.finite.all())
    assert not torch.equal(head.detach(), torch.ones(4, dtype=torch.float16))  # the step was taken


@pytest.mark.parametrize(("m", "n"), [(2, 1000), (4, 1 << 20), (2, 1 << 30)])
def test_a_half_precision_gram_chunk_is_whole_gram_blocks_between_one_block_and_chunk(m, n):
    """``chunk_columns(upcast=True)``: about ``n / (16 (m + 1))`` columns, a whole number of Gram blocks,
    at least one block (not the 2**16 floor of the no-upcast case) and at most ``CHUNK``."""
    from cagrad_clip._storage.blocks import CHUNK, GRAM_BLOCK, chunk_columns

    columns = chunk_columns(m, n, upcast=True)
    assert columns % GRAM_BLOCK == 0 and GRAM_BLOCK <= columns <= CHUNK
    if n // (16 * (m + 1)) < GRAM_BLOCK:
        assert columns == GRAM_BLOCK


# --------------------------------------------------------------------------- memory and dtype promises
def test_the_squared_norms_of_half_precision_rows_are_taken_in_float32() -> None:
    """``row_sumsq`` of float16 rows whose squares overflow float16 (300^2 > 65504): float32, exact."""
    from cagrad_clip._storage.blocks import row_sumsq

    rows = torch.tensor([[1.0, 300.0, 300.0], [2.0, -3.0, 0.5]], dtype=torch.float16)
    got = row_sumsq(rows, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([180000.0, 9.25]), rtol=1e-6, atol=0.0)
    assert row_sumsq(rows, 3).dtype == torch.float32 and row_sumsq(rows, 3).tolist() == [0.0, 0.0]


def test_the_accumulator_rows_of_float64_and_bfloat16_parameters_are_float64() -> None:
    """Mixed dtypes without ``accumulate_dtype``: the rows take the widest (float64 here), so the float64
    parameters' gradients are not rounded to float32 (checked against the float64 Gram)."""
    wide = nn.Parameter(torch.tensor([1.0 + 2**-40, 3.0], dtype=F64))
    narrow = nn.Parameter(torch.tensor([0.5], dtype=torch.bfloat16))
    opt = ConflictAverseOptimizer(torch.optim.SGD([wide, narrow], lr=0.0), c=0.4)
    opt.backward([(wide * wide).sum() + narrow.float().sum(), (wide[0] * 3.0) + narrow.float().sum() * 2], combine=False)
    assert opt._store.rows.dtype == F64
    opt.step()
    g0 = torch.tensor([2 * (1.0 + 2**-40), 6.0, 1.0], dtype=F64)
    g1 = torch.tensor([3.0, 0.0, 2.0], dtype=F64)
    assert opt.last.gram.dtype == F64
    assert opt.last.gram[0, 1].item() == float(g0 @ g1) and opt.last.gram[0, 0].item() == float(g0 @ g0)


def test_a_window_restarted_by_replacing_grad_reuses_the_accumulator_rows() -> None:
    """``model.zero_grad()`` between two ``backward(..., combine=False)`` (the Hugging Face ``Trainer``
    does it) starts a new window; its ``(m, D)`` rows reuse the abandoned window's memory instead of
    allocating a second float32 buffer next to it."""
    net = Net()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), accumulate_dtype=torch.float32)
    x, y = batches(1)[0]
    opt.zero_grad()
    opt.backward(net.losses(x, y, 0), combine=False)
    first = opt._store.rows
    net.zero_grad()
    opt.backward(net.losses(x, y, 1), combine=False)
    assert opt._store.rows is first


def test_after_zero_grad_without_set_to_none_the_home_objective_accumulates_into_the_zeroed_grad() -> None:
    """``zero_grad(set_to_none=False)`` leaves zeros in ``.grad``: the default store accumulates the home
    objective into those very tensors (nothing kept aside, no second allocation), so after
    ``backward(..., combine=False)`` every reached ``.grad`` is still the zeroed tensor."""
    net = Net()
    opt = ConflictAverseOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), weights=[0.7, 0.3])
    x, y = batches(1)[0]
    opt.zero_grad()
    opt.step(net.losses(x, y, 0))
    opt.zero_grad(set_to_none=False)
    zeroed = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and not g.any() for g in zeroed.values())
    opt.backward(net.losses(x, y, 0), combine=False)
    assert all(p.grad is zeroed[name] for name, p in net.named_parameters())
    assert opt._store.external == [None] * len(opt._store.params)


def test_shared_parameters_with_no_elements_give_a_zero_gram() -> None:
    """Every shared parameter has zero elements (an empty bias): the Gram is the ``(m, m)`` zero matrix,
    the coefficients are the weights, and the heads step as the weighted sum (c has nothing to act on)."""
    empty = nn.Parameter(torch.zeros(0, dtype=F64))
    head = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = ConflictAverseOptimizer(torch.optim.SGD([empty, head], lr=1.0), weights=[0.25, 0.75], c=0.5, shared=[empty])
    opt.step([(head * 2).sum() + empty.sum(), (head * head).sum() + empty.sum()])
    assert torch.equal(opt.last.gram, torch.zeros(2, 2, dtype=F64))
    assert opt.last.coefficients.tolist() == [0.25, 0.75]
    assert head.detach().tolist() == [1.0 - (0.25 * 2 + 0.75 * 2), -2.0 - (0.25 * 2 + 0.75 * -4)]


@pytest.mark.skipif(not fsdp_available(), reason="needs torch.distributed (gloo) and DTensor")
def test_a_replicated_or_two_dimensional_dtensor_parameter_is_refused_up_front() -> None:
    """Only ``Shard(dim)`` on a 1-D mesh (what ``fully_shard`` makes) is supported: a ``Replicate`` placement
    or a 2-D mesh (HSDP) is refused at construction, naming the placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        for placements in ([Replicate()], [Shard(0), Shard(0)]):
            target = mesh if len(placements) == 1 else init_device_mesh("cpu", (1, 1))
            p = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), target, placements))
            with pytest.raises(NotImplementedError, match=r"only Shard\(dim\) on a 1-D mesh"):
                ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1))
        sharded = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), mesh, [Shard(0)]))
        ConflictAverseOptimizer(torch.optim.SGD([sharded], lr=0.1))  # the supported layout


@pytest.mark.skipif(not fsdp_available(), reason="needs torch.distributed (gloo) and DTensor")
def test_dtensor_parameters_on_a_torch_older_than_the_fsdp2_floor_are_refused_up_front(monkeypatch) -> None:
    """The FSDP2 path is tested from torch 2.9 (FSDP2 on CPU/gloo); an older torch is refused at
    construction, naming the release, rather than trusted untested."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        p = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), mesh, [Shard(0)]))
        monkeypatch.setattr(torch, "__version__", "2.8.0")
        with pytest.raises(NotImplementedError, match=r"supports from torch 2\.9 .*torch 2\.8\.0 is installed"):
            ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1))
        plain = nn.Parameter(torch.ones(4, dtype=F64))
        ConflictAverseOptimizer(torch.optim.SGD([plain], lr=0.1))  # plain parameters are not gated
