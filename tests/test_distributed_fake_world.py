"""Data parallelism in one process: a faked 2-rank ``torch.distributed`` world, one thread per rank.

The 2-rank tests of ``tests/test_distributed.py`` spawn gloo workers; what runs in them is out of
sight of an in-process tool (coverage, mutation testing). Here ``torch.distributed`` is replaced
(``monkeypatch``) by :class:`FakeWorld`: ``is_initialized`` is true, the world has two ranks, and
``all_reduce`` is a real collective between two Python threads, each running its own optimizer on
its own half of the batch. It checks what a real backend would refuse (an unknown reduction, another
process group, ranks passing tensors of different shapes or dtypes, a tensor off the parameters'
device) and reduces in float64-exact order (``a + b`` for two ranks, as gloo does).

References are independent: per-objective ``torch.autograd.grad`` on the full batch in float64, the
averaged Gram ``G G^T`` by hand, and one process on the concatenated batch.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._distributed import average_across_ranks, check_same_count, reached_on_any_rank, sum_across_ranks
from cagrad_clip._storage import direct, make_store
from tests.models import TwoHeads, make_two_heads

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
SUM, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX
#: The one group collectives may name, created once and kept for the whole session: a backend-less
#: ``ProcessGroup`` freed by the garbage collector in the middle of a later test's real gloo collective
#: crashed the process (seen under mutmut, which runs many test files in one process).
_GROUP = dist.ProcessGroup(0, WORLD) if dist.is_available() else None


class FakeWorld:
    """``size`` ranks, each a thread; ``all_reduce`` exchanges tensors between them through a barrier.

    ``group`` is the only process group collectives may name (a real ``ProcessGroup`` object that
    never communicates); ``default_ok`` also admits ``group=None`` (the default group). ``device`` is
    the device every reduced tensor must live on (NCCL refuses CPU tensors; here: the parameters')."""

    def __init__(self, size: int, group: Any, *, default_ok: bool, device: torch.device) -> None:
        self.size, self.group, self.default_ok, self.device = size, group, default_ok, device
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.local = threading.local()
        self.ops: list[tuple[int, Any, tuple[int, ...], torch.dtype]] = []  # (rank, op, shape, dtype) per call

    @property
    def rank(self) -> int:
        return self.local.rank

    def get_world_size(self, group: Any = None) -> int:
        assert group is self.group or (group is None and self.default_ok), f"unknown process group {group!r}"
        return self.size

    def all_reduce(self, tensor: torch.Tensor, op: Any = SUM, group: Any = None, async_op: bool = False) -> None:
        assert not async_op
        assert isinstance(tensor, torch.Tensor), f"all_reduce of {type(tensor).__name__}"
        assert group is self.group or (group is None and self.default_ok), f"all_reduce over an unknown group {group!r}"
        assert op in (SUM, MAX), f"unsupported reduction {op!r}"
        assert tensor.device == self.device, f"all_reduce of a tensor on {tensor.device}, the parameters are on {self.device}"
        self.ops.append((self.rank, op, tuple(tensor.shape), tensor.dtype))
        self.slots[self.rank] = tensor.detach().clone()
        self.barrier.wait()
        parts = list(self.slots)
        assert all(p is not None and p.shape == tensor.shape and p.dtype == tensor.dtype for p in parts), (
            "the ranks passed tensors of different shapes or dtypes to one all_reduce"
        )
        result = parts[0].clone()
        for p in parts[1:]:
            result = result + p if op == SUM else torch.maximum(result, p)
        self.barrier.wait()  # every rank has read every slot
        tensor.copy_(result)

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """``[fn(0), fn(1), ...]``, each on its own thread; the first error of any rank is raised."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as error:  # noqa: BLE001 - reraised below
                errors.append(error)
                self.barrier.abort()  # the other rank must not wait for this one forever

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a rank hung in a collective"
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeWorld]:
    """``world(default_ok=False, device=cpu)``: install a fresh 2-rank :class:`FakeWorld` and return it."""

    def install(*, default_ok: bool = False, device: torch.device | str = "cpu") -> FakeWorld:
        fake = FakeWorld(WORLD, _GROUP, default_ok=default_ok, device=torch.device(device))
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", fake.get_world_size)
        monkeypatch.setattr(dist, "all_reduce", fake.all_reduce)
        return fake

    return install


# ------------------------------------------------------------------------------------------ collectives
def test_average_across_ranks_is_the_mean_of_every_ranks_tensor_in_place(world):
    fake = world()
    values = [torch.tensor([[1.0, -2.0], [4.0, 0.5]], dtype=torch.float64), torch.tensor([[3.0, 6.0], [-4.0, 1.5]], dtype=torch.float64)]

    def rank_fn(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = values[rank].clone()
        out = average_across_ranks(tensor, fake.group, WORLD)
        return tensor, out

    expected = torch.tensor([[2.0, 2.0], [0.0, 1.0]], dtype=torch.float64)  # (a + b) / 2 by hand
    for tensor, out in fake.run(rank_fn):
        assert out is tensor  # in place
        assert torch.equal(tensor, expected)
    assert len(fake.ops) == WORLD  # one collective per rank


def test_sum_across_ranks_is_the_sum_of_every_ranks_tensor_in_place(world):
    fake = world()
    values = [torch.tensor([1.0, 2.0]), torch.tensor([10.0, -5.0])]

    def rank_fn(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = values[rank].clone()
        return tensor, sum_across_ranks(tensor, fake.group)

    for tensor, out in fake.run(rank_fn):
        assert out is tensor and torch.equal(tensor, torch.tensor([11.0, -3.0]))


def test_reached_on_any_rank_is_the_union_of_the_ranks_masks(world):
    """A parameter some rank reached is reached everywhere; one no rank reached is not (4 cases)."""
    fake = world()
    masks = [[True, True, False, False], [True, False, True, False]]
    results = fake.run(lambda rank: reached_on_any_rank(masks[rank], fake.group, torch.device("cpu")))
    assert results == [[True, True, True, False]] * WORLD
    assert all(isinstance(v, bool) for r in results for v in r)
    assert len(fake.ops) == WORLD  # one collective per rank


def test_reached_on_any_rank_builds_its_mask_on_the_given_device_not_the_default_one(world):
    """The mask is made on the parameters' device even when the default device is another one
    (``torch.set_default_device``): a collective over NCCL takes device tensors only."""
    fake = world()

    def rank_fn(rank: int) -> list[bool]:
        with torch.device("meta"):  # the default device of this thread's factories
            return reached_on_any_rank([rank == 0, False], fake.group, torch.device("cpu"))

    assert fake.run(rank_fn) == [[True, False]] * WORLD


def test_check_same_count_agrees_once_then_skips_the_collective(world):
    """Equal counts are confirmed by one all-reduce and remembered; a count already confirmed costs none."""
    fake = world()

    class Memory:
        ranks_agree_on = None

    memories = [Memory(), Memory()]

    def rank_fn(rank: int) -> None:
        with torch.device("meta"):  # the counts are made on the given device, whatever the default one
            check_same_count(memories[rank], 3, fake.group, torch.device("cpu"))
            check_same_count(memories[rank], 3, fake.group, torch.device("cpu"))

    fake.run(rank_fn)
    assert [m.ranks_agree_on for m in memories] == [3, 3]
    assert len(fake.ops) == WORLD  # one collective per rank, not two


def test_check_same_count_raises_on_every_rank_when_the_counts_differ(world):
    fake = world()

    class Memory:
        ranks_agree_on = None

    outcomes: list[str] = [""] * WORLD

    def rank_fn(rank: int) -> None:
        memory = Memory()
        try:
            check_same_count(memory, 2 + rank, fake.group, torch.device("cpu"))
        except ValueError:
            outcomes[rank] = "refused"
        assert memory.ranks_agree_on is None

    fake.run(rank_fn)
    assert outcomes == ["refused", "refused"]


# ------------------------------------------------------------------------------------------ the optimizer
def make_model() -> TwoHeads:
    """The shared two-head model with ``extra`` (only rank 1's batch reaches it) and ``unused`` (no loss does)."""
    return make_two_heads(0, stray=True)


def make_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    ya = x[:, :1] * 2 + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    yb = -x[:, :1] + x[:, 1:2] ** 2
    return x, ya, yb


def rank_losses(model: TwoHeads, x, ya, yb, *, extra_weight: float) -> list[torch.Tensor]:
    """Mean losses of one rank's half batch; ``extra_weight`` scales the term only rank 1 has."""
    h = model.trunk(x)
    losses = [((model.head_a(h) - ya) ** 2).mean(), ((model.head_b(h) - yb) ** 2).mean()]
    if extra_weight:
        losses[1] = losses[1] + extra_weight * (model.extra * x[:, :2]).square().sum(1).mean()
    return losses


def full_batch_losses(model: TwoHeads, x, ya, yb) -> list[torch.Tensor]:
    """The objective the 2 ranks optimise together: the mean of their losses (rank 1's extra term halved)."""
    half = x.shape[0] // 2
    a = rank_losses(model, x[:half], ya[:half], yb[:half], extra_weight=0.0)
    b = rank_losses(model, x[half:], ya[half:], yb[half:], extra_weight=1.0)
    return [(u + v) / 2 for u, v in zip(a, b)]


def params_of(model: TwoHeads) -> list[nn.Parameter]:
    return list(model.parameters())


def reference_grads(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[list[torch.Tensor | None]]:
    return [list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)) for loss in losses]


def flat_rows(grads: list[list[torch.Tensor | None]], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(row, params)]) for row in grads])


STORES = {"direct": {}, "direct_small_chunks": {}, "accumulator": {"accumulate_dtype": torch.float64}}


def run_ranks(fake: FakeWorld, options: dict[str, Any], *, process_group: Any, steps: int = 2, micro: int = 1, combine_each: bool = False):
    """Each rank: ``steps`` SGD steps on its half batch (``micro`` micro-batches per step); returns per rank
    the Gram, coefficients and ``.grad`` of the last combination, and the parameters after every step."""
    x, ya, yb = make_batch()
    half = x.shape[0] // 2
    models = [make_model() for _ in range(WORLD)]  # here: the threads would share the global RNG

    def rank_fn(rank: int) -> dict[str, Any]:
        model = models[rank]
        params = params_of(model)
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.7, 0.3], c=0.4, process_group=process_group, **options)
        sl = slice(rank * half, (rank + 1) * half)
        after = []
        for _ in range(steps):
            opt.zero_grad()
            n = half // micro
            for k in range(micro):
                part = slice(sl.start + k * n, sl.start + (k + 1) * n)
                losses = rank_losses(model, x[part], ya[part], yb[part], extra_weight=float(rank))
                opt.backward([loss / micro for loss in losses], combine=combine_each or k == micro - 1)
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            opt.step()
            after.append([p.detach().clone() for p in params])
        return {"gram": opt.last.gram.clone(), "coefficients": opt.last.coefficients.clone(), "grads": grads, "after": after}

    return fake.run(rank_fn)


def one_process(steps: int = 2) -> dict[str, Any]:
    """The reference: one process on the full batch, each objective's gradient and the Gram by hand."""
    model = make_model()
    params = params_of(model)
    x, ya, yb = make_batch()
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.7, 0.3], c=0.4, distributed=False)
    after = []
    for _ in range(steps):
        opt.zero_grad()
        losses = full_batch_losses(model, x, ya, yb)
        grads = reference_grads(losses, params)
        opt.backward(losses)
        G = flat_rows(grads, params)
        torch.testing.assert_close(opt.last.gram, G @ G.T, rtol=1e-12, atol=1e-14)
        a = opt.last.coefficients
        direction = []
        for j in range(len(params)):
            parts = [a[i] * row[j] for i, row in enumerate(grads) if row[j] is not None]
            direction.append(sum(parts) if parts else None)
        last = {"gram": G @ G.T, "coefficients": a.clone(), "grads": direction}
        opt.step()
        after.append([p.detach().clone() for p in params])
    last["after"] = after
    return last


@pytest.mark.parametrize("store", list(STORES))
def test_two_faked_ranks_write_the_full_batch_direction_on_every_rank(world, monkeypatch, store):
    """Every store, an explicit process group, a parameter only rank 1 reaches and one no rank reaches:
    both ranks solve on the Gram of the full-batch (rank-averaged) gradients, write the same direction
    ``sum_i a_i g_i`` of the full batch (``.grad`` of the unreached parameter stays ``None``) and take the
    same SGD step as one process on the concatenated batch."""
    if store == "direct_small_chunks":  # several chunks per all-reduce, parameters split across them
        monkeypatch.setattr(direct, "gather_columns", lambda m, n, itemsize: 7)
    fake = world()
    ranks = run_ranks(fake, STORES[store], process_group=fake.group)
    ref = one_process()
    for result in ranks:
        torch.testing.assert_close(result["gram"], ref["gram"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result["coefficients"], ref["coefficients"], rtol=1e-10, atol=1e-12)
        for got, want in zip(result["grads"], ref["grads"]):
            if want is None:
                assert got is None  # no rank reached it: .grad stays None, as in one process
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for step_got, step_want in zip(result["after"], ref["after"]):
            for p, q in zip(step_got, step_want):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    names = [name for name, _ in make_model().named_parameters()]
    assert ref["grads"][names.index("unused")] is None and ref["grads"][names.index("extra")] is not None  # both kinds
    for g0, g1 in zip(ranks[0]["grads"], ranks[1]["grads"]):  # the ranks agree bit for bit
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    for p0, p1 in zip(ranks[0]["after"][-1], ranks[1]["after"][-1]):
        assert torch.equal(p0, p1)
    assert {op for _, op, _, _ in fake.ops} <= {SUM, MAX}


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_the_default_group_and_micro_batches_combined_each_time_equal_one_process(world, store):
    """``process_group=None`` (the default group) and two micro-batches per step, each combined
    (the second takes the first direction back out and averages again): still one process's steps."""
    fake = world(default_ok=True)
    ranks = run_ranks(fake, STORES[store], process_group=None, micro=2, combine_each=True)
    ref = one_process()
    for result in ranks:
        torch.testing.assert_close(result["gram"], ref["gram"], rtol=1e-10, atol=1e-12)
        for step_got, step_want in zip(result["after"], ref["after"]):
            for p, q in zip(step_got, step_want):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_parameter_every_rank_reaches_is_averaged_once_per_combination(world):
    """Direct store, every parameter reached on every rank: one all-reduce of the rows per chunk and
    the reach mask, of the right shapes (``m`` rows of the chunk's columns; one int per parameter)."""
    fake = world()
    x, ya, yb = make_batch()
    torch.manual_seed(0)
    lin0 = nn.Linear(5, 2, dtype=torch.float64)
    models = [lin0, copy.deepcopy(lin0)]

    def rank_fn(rank: int) -> torch.Tensor:
        lin = models[rank]
        opt = ConflictAverseOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), process_group=fake.group)
        xs = x[rank * 4 : (rank + 1) * 4]
        out = lin(xs)
        opt.backward([(out[:, 0] - ya[rank * 4 : (rank + 1) * 4, 0]).square().mean(), out[:, 1].square().mean()])
        return lin.weight.grad.clone()

    g0, g1 = fake.run(rank_fn)
    assert torch.equal(g0, g1)
    calls = [(op, shape, dtype) for rank, op, shape, dtype in fake.ops if rank == 0]
    # the count check ([m, -m]), the reach mask (one flag per parameter: weight, bias), the rows (2 x 12 float64)
    assert len(calls) == 3
    (_, count_shape, count_dtype), (_, mask_shape, mask_dtype), rows = calls
    assert (count_shape, mask_shape) == ((2,), (2,))
    assert not count_dtype.is_floating_point and not mask_dtype.is_floating_point
    assert rows == (SUM, (2, 12), torch.float64)


# ------------------------------------------------------------------------------------------ the stores' average
@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": torch.float64}], ids=["direct", "accumulator"])
def test_a_stores_average_is_each_objectives_mean_over_the_ranks_on_the_parameters_device(world, options):
    """``store.average``: every objective's gradient becomes its mean over the ranks; a parameter one
    rank reached gets that rank's gradient halved on both (zeros stand for the other's), one no rank
    reached stays without a gradient; the reach mask is their union. The collectives are built on the
    parameters' device even when the default device is another one (here ``meta``)."""
    fake = world()
    c = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], [[3.0, -2.0, 1.0], [5.0, 1.5, -2.0]]], dtype=torch.float64)  # [rank][i]
    d = torch.tensor([4.0, -6.0], dtype=torch.float64)  # rank 1, objective 0, on v
    ranks_params = [[nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (3, 2, 2)] for _ in range(WORLD)]

    def rank_fn(rank: int):
        w, v, u = params = ranks_params[rank]
        store = make_store(params, len(params), **options)
        store.start_window(2, 1)
        losses = [(c[rank, i] * w).sum() for i in range(2)]  # u: no loss reaches it
        if rank == 1:
            losses[0] = losses[0] + (d * v).sum()
        store.accumulate(losses)
        with torch.device("meta"):
            store.average(fake.group, WORLD)
        if isinstance(store, direct.DirectStore):
            grads = [[None if g is None else g.clone() for g in row] for row in store.grads]
        else:
            grads = [[g.clone() for g in store.views(row)] for row in store.rows]
        return grads, list(store.recorder.reached), [None if p.grad is None else p.grad.clone() for p in params]

    zeros2 = torch.zeros(2, dtype=torch.float64)
    want = [[(c[0, i] + c[1, i]) / 2, d / 2 if i == 0 else zeros2] for i in range(2)]  # by hand
    for grads, reached, dot_grad in fake.run(rank_fn):
        assert reached == [True, True, False]
        for i in range(2):
            torch.testing.assert_close(grads[i][0], want[i][0], rtol=0, atol=0)
            torch.testing.assert_close(grads[i][1], want[i][1], rtol=0, atol=0)
            assert grads[i][2] is None or torch.equal(grads[i][2], zeros2)  # the accumulator's rows hold zeros
        if not options:  # the default store leaves the home objective's averaged gradients in .grad
            torch.testing.assert_close(dot_grad[0], want[1][0], rtol=0, atol=0)
            torch.testing.assert_close(dot_grad[1], want[1][1], rtol=0, atol=0)
            assert dot_grad[2] is None


def test_low_memory_with_distributed_false_lets_each_rank_combine_its_own_gradients(world):
    """``memory="low"`` cannot average gradients it does not store: on 2 ranks it refuses ``distributed=True``
    up front, and with ``distributed=False`` each rank takes the step of its own half batch, equal to a
    1-process low-memory step on that half (no collective runs)."""
    fake = world(default_ok=True)
    models = [make_model() for _ in range(WORLD)]  # built here: the threads would share the global RNG
    with pytest.raises(NotImplementedError, match="cannot average the objectives' gradients across ranks"):
        fake.run(lambda rank: run_ranks_low(rank, models[rank], distributed=True))
    models = [make_model() for _ in range(WORLD)]
    got = fake.run(lambda rank: run_ranks_low(rank, models[rank], distributed=False))
    for rank in range(WORLD):
        want = run_ranks_low(rank, make_model(), distributed=False)
        # to rounding: two ranks' ops at once may split a reduction over the intra-op threads differently
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got[rank], want))
    assert not all(torch.allclose(a, b) for a, b in zip(got[0], got[1]))  # each rank its own direction


def run_ranks_low(rank: int, model: TwoHeads, *, distributed: bool) -> list[torch.Tensor]:
    x, ya, yb = make_batch()
    half = x.shape[0] // 2
    params = params_of(model)
    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.7, 0.3], c=0.4, memory="low", distributed=distributed)
    part = slice(rank * half, (rank + 1) * half)
    opt.zero_grad()
    opt.step(rank_losses(model, x[part], ya[part], yb[part], extra_weight=float(rank)))
    return [p.detach().clone() for p in params]


def test_low_memory_in_a_one_rank_group_of_a_larger_world_takes_the_one_process_step(monkeypatch):
    """``process_group=`` a group of one rank inside a 2-rank world: there is nothing to average over that
    group, so ``memory="low"`` takes its one-process step (as the default memory mode does) instead of
    refusing because the *world* has two ranks."""
    alone = dist.ProcessGroup(0, 1)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1 if group is alone else WORLD)

    def step(process_group: Any) -> list[torch.Tensor]:
        model = make_model()
        params = params_of(model)
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.7, 0.3], c=0.4, memory="low", process_group=process_group)
        opt.step(rank_losses(model, *make_batch(), extra_weight=0.0))
        return [p.detach().clone() for p in params]

    got = step(alone)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    want = step(None)  # no process group at all: one process
    assert all(torch.equal(a, b) for a, b in zip(got, want))
