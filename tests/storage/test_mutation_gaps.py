"""Store behaviours the full mutation run found unpinned, each against a hand-computed reference.

* Gram blocks: a half-precision Gram chunk is the largest whole number of Gram blocks whose float32
  transient ``(m + 1) * columns * 4`` bytes stays within 1/16 of a float32 row (an ``int``), and bf16
  rows are upcast chunk by chunk at that size; a bf16 Gram over no column is float32 zeros on the
  rows' device, over one column that column's outer product.
* ``memory="low"``: a window whose solve raised is discarded by ``zero_grad()``, which can be repeated.
* FSDP2 (one gloo rank, ``fully_shard``): the rows of bf16 shards stay bf16; the Gram covers only the
  shared parameters and is summed over the mesh's process group; the graph is freed after the last
  objective's pass; a backward that fails half-way leaves ``.grad`` as it was; wider rows are written
  back in the parameters' dtype and placements; the weights can change while a window accumulates;
  a gradient that is not a DTensor is refused.
* Every store refuses a float16 direction that overflows; the accumulator and FSDP2 stores leave in
  ``.grad``, after an uncombined backward, the tensor it held when the window began.
* Finiteness: squared norms are taken in float32 or better (float16 heads, float64 heads beyond
  float32), each column counted once; a one-element head's Inf names its objective.
* Default store: a zero Gram is in the parameters' dtype and on their device; a parameter only a
  non-home objective reaches gets exactly ``a_i g_i`` over combined micro-batches; chunks of unequal
  length warn nothing; losses that reach no parameter leave ``.grad`` ``None``.
* The fingerprint of ``.grad`` is its float32 (or better) 2-norm: in-place edits below half
  precision's resolution, or that keep the sum of cubes, are caught.
* DDP's "mark a variable ready only once" error in an objective's pass is explained (``no_sync()``),
  chained from DDP's; a zeroed ``.grad`` no objective reaches stays zero under a NaN direction.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import cagrad_clip._distributed as distributed
from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage.blocks import CHUNK, GRAM_BLOCK, chunk_columns
from tests.process_groups import fsdp2_missing, one_rank_group

F64 = torch.float64
needs_fsdp2 = pytest.mark.skipif(fsdp2_missing() is not None, reason=fsdp2_missing() or "")


# ------------------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize(
    ("m", "n", "expected"),
    [
        (1, 32 * 5 * GRAM_BLOCK, 5 * GRAM_BLOCK),  # n / (16 * 2) = 5 blocks exactly
        (1, 32 * 5 * GRAM_BLOCK - 1, 4 * GRAM_BLOCK),  # one column short of 5 blocks
        (2, 48 * 7 * GRAM_BLOCK + 12345, 7 * GRAM_BLOCK),  # n / 48 = 7.0something blocks
        (4, 80 * 3 * GRAM_BLOCK, 3 * GRAM_BLOCK),  # n / (16 * 5) = 3 blocks
        (2, 1000, GRAM_BLOCK),  # under one block: one block
        (2, 1 << 34, CHUNK),  # n / 48 is far beyond CHUNK = 64 blocks
    ],
)
def test_a_half_precision_gram_chunk_is_the_most_whole_blocks_within_a_sixteenth_of_a_float32_row(m, n, expected):
    """``chunk_columns(m, n, upcast=True)``: ``(m + 1) * columns * 4`` bytes (the chunk upcast to float32
    and its result) at most ``n * 4 / 16``, rounded down to whole Gram blocks, between one block and
    ``CHUNK``; an ``int`` (it is the step of a ``range``)."""
    columns = chunk_columns(m, n, upcast=True)
    assert type(columns) is int
    assert columns == expected


# ------------------------------------------------------------------------------------------ memory="low"
def test_the_low_memory_window_of_a_refused_solve_is_discarded_and_zero_grad_can_repeat() -> None:
    """``memory="low"``, 13 objectives and ``solver="exact"`` (limited to 12): the solve raises after the
    Gram's passes. ``zero_grad()`` then ends the window (``.grad`` stays ``None``), and calling it
    again (as a training loop does at its next iteration) is harmless."""
    pytest.importorskip("torchjd")
    from cagrad_clip import AutogramEngine

    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 13)
    params = [*trunk.parameters(), *head.parameters()]
    opt = ConflictAverseOptimizer(
        torch.optim.SGD(params, lr=0.1), shared=list(trunk.parameters()), memory="low", engine=AutogramEngine(trunk), solver="exact"
    )
    losses = list(head(trunk(torch.randn(5, 3))).square().mean(0))
    with pytest.raises(ValueError):
        opt.step(losses)
    opt.zero_grad()
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# ------------------------------------------------------------------------------------------ FSDP2 (one rank)
class Net(nn.Module):
    """A shared layer ``lin`` and a head ``b``; ``forward(None)`` is a regulariser on ``lin.weight``."""

    def __init__(self, dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4, dtype=dtype)
        self.b = nn.Parameter(torch.tensor([0.5, -1.5], dtype=dtype))

    def forward(self, x: torch.Tensor | None) -> list[torch.Tensor] | torch.Tensor:
        if x is None:
            return 0.1 * self.lin.weight.square().sum()
        h = torch.tanh(self.lin(x))
        return [(h.sum(1) - 1.0).square().mean() + (self.b * h[:, :2]).sum(1).mean(), (2 * h[:, 0] + self.b.square().sum()).square().mean()]


def batch(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype)


def sharded(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, **kwargs)
    return model


@needs_fsdp2
def test_fsdp_rows_of_bfloat16_shards_stay_bfloat16() -> None:
    """One dtype of shards and no ``accumulate_dtype``: the per-objective rows are in the shards' dtype
    (bf16: 2 bytes per value and objective, no float32 copy)."""
    with one_rank_group():
        model = sharded(Net(torch.bfloat16))
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.5, 0.5])
        opt.backward(model(batch(torch.bfloat16)), combine=False)
        assert opt._store.rows.dtype == torch.bfloat16
        assert opt._store.rows.shape == (2, 3 * 4 + 4 + 2)


@needs_fsdp2
def test_fsdp_gram_covers_the_shared_parameters_only_and_is_summed_over_the_mesh_group(monkeypatch) -> None:
    """``shared=`` the layer ``lin``: the Gram is ``G G^T`` over ``lin``'s gradients only (per-objective
    ``autograd.grad`` on an unsharded copy, float64), and every collective the library issues names
    the device mesh's process group (on more ranks the mesh may be a sub-group of the world)."""
    torch.manual_seed(0)
    reference = Net()
    x = batch()
    losses = reference(x)
    shared = list(reference.lin.parameters())
    rows = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses])
    groups = []

    class Recording:
        """``torch.distributed`` as the library sees it, recording the group of every ``all_reduce``."""

        def __getattr__(self, name):
            return getattr(dist, name)

        def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            groups.append(group)
            return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)

    with one_rank_group():
        model = sharded(copy.deepcopy(reference))
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), shared=list(model.lin.parameters()), weights=[0.5, 0.5])
        monkeypatch.setattr(distributed, "dist", Recording())
        opt.backward(model(x))
        mesh_group = model.lin.weight.device_mesh.get_group()
    torch.testing.assert_close(opt.last.gram, rows @ rows.T, rtol=1e-12, atol=1e-14)
    assert groups and all(g is mesh_group for g in groups)


@needs_fsdp2
def test_fsdp_frees_the_graph_after_the_last_objectives_pass() -> None:
    """As ``sum(losses).backward()`` would: once the objectives' passes are done, the graph is freed, so
    another backward through it fails (and holds no activations meanwhile)."""
    with one_rank_group():
        model = sharded(Net())
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.5, 0.5])
        losses = model(batch())
        opt.backward(losses, combine=False)
        with pytest.raises(RuntimeError, match="second time"):
            losses[1].backward()


class Boom(Exception):
    pass


@needs_fsdp2
def test_fsdp_a_backward_that_fails_half_way_leaves_grad_as_it_was() -> None:
    """``.grad`` of ``lin.weight`` holds a regulariser's gradient; the second objective's backward raises
    (a tensor hook): the error comes through and every ``.grad`` is the very tensor it held before,
    with its values (``None`` where it was ``None``)."""
    with one_rank_group():
        model = sharded(Net())
        params = list(model.parameters())
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1), weights=[0.3, 0.7])
        model(None).backward()
        before = [p.grad for p in params]
        values = [None if g is None else g.full_tensor().clone() for g in before]
        losses = model(batch())

        def boom(grad: torch.Tensor) -> torch.Tensor:
            raise Boom

        losses[1].register_hook(boom)
        with pytest.raises(Boom):
            opt.backward(losses)
        assert [g is not None for g in before] == [False, True, False]  # b, lin.weight, lin.bias
        for p, g, v in zip(params, before, values):
            assert p.grad is g
            assert v is None or torch.equal(p.grad.full_tensor(), v)


@needs_fsdp2
def test_fsdp_float64_rows_write_the_direction_in_the_parameters_dtype_and_placements() -> None:
    """float32 shards with ``accumulate_dtype=torch.float64``: ``.grad`` is a float32 DTensor laid out as
    its parameter, equal to ``sum_i a_i g_i`` of the per-objective gradients (``autograd.grad`` on an
    unsharded float64 copy of the same float32 values; the coefficients are read from the step)."""
    torch.manual_seed(0)
    reference = Net(torch.float32)
    x = batch(torch.float32)
    wide = copy.deepcopy(reference).double()
    wide_losses = wide(x.double())
    grads = [torch.autograd.grad(loss, list(wide.parameters()), retain_graph=True) for loss in wide_losses]
    with one_rank_group():
        model = sharded(copy.deepcopy(reference))
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.5, 0.5], accumulate_dtype=F64)
        opt.backward(model(x))
        a = opt.last.coefficients
        assert a.dtype == F64
        for j, p in enumerate(model.parameters()):
            assert p.grad.dtype == torch.float32 and p.grad.placements == p.placements
            expected = (a[0] * grads[0][j] + a[1] * grads[1][j]).float()
            torch.testing.assert_close(p.grad.full_tensor(), expected, rtol=1e-5, atol=1e-6)


@needs_fsdp2
def test_fsdp_weights_can_change_while_a_window_accumulates() -> None:
    """``configure(weights=..., c=0)`` between ``backward(..., combine=False)`` and ``step()``: accepted
    (no weight is 0), and the combination uses the new weights (with ``c = 0`` the coefficients are
    the normalised weights)."""
    with one_rank_group():
        model = sharded(Net())
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.5, 0.5])
        opt.backward(model(batch()), combine=False)
        opt.configure(weights=[1.0, 3.0], c=0.0)
        opt.step()
        torch.testing.assert_close(opt.last.coefficients, torch.tensor([0.25, 0.75], dtype=F64), rtol=1e-12, atol=1e-12)


@needs_fsdp2
def test_a_dtensor_parameter_whose_gradient_arrives_as_a_plain_tensor_is_refused() -> None:
    """A ``Shard(0)`` DTensor parameter whose ``.grad`` arrives as a plain tensor (a tensor hook returns
    its local values): not a shard of the averaged gradient, so a ``RuntimeError`` before anything is
    accumulated, and ``.grad`` is ``None`` as before the call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        w = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), mesh, [Shard(0)]))
        w.register_hook(lambda g: g.to_local())
        opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), weights=[0.5, 0.5])
        with pytest.raises(RuntimeError):
            opt.backward([(w * 2).sum(), (w * w).sum()])
        assert w.grad is None


STORES = {"direct": {}, "accumulator": {"accumulate_dtype": torch.float32}, "low": {"memory": "low"}, "fsdp2": {}}


def store_param(name: str):
    return pytest.param(name, marks=[needs_fsdp2] if name == "fsdp2" else [], id=name)


def _float16_unit_weight(store: str) -> nn.Linear:
    """A bias-free ``Linear(1, 1)`` in float16 with weight 1 (sharded for the FSDP2 store: call it inside
    ``one_rank_group()``)."""
    model = nn.Linear(1, 1, bias=False, dtype=torch.float16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    if store == "fsdp2":
        sharded(model)
    return model


@pytest.mark.parametrize("store", [store_param(s) for s in STORES])
def test_every_store_refuses_a_float16_direction_that_overflows(store) -> None:
    """float16 weight, two identical gradients ``g = 49152`` (finite, their squares finite in float32):
    CAGrad with ``c = 0.4`` writes ``(1 + c) g = 68812.8``, above float16's 65504, so the direction is
    Inf. The step is refused and the weight is left as it was."""
    with one_rank_group() if store == "fsdp2" else contextlib.nullcontext():
        model = _float16_unit_weight(store)
        opt = ConflictAverseOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-6), weights=[0.5, 0.5], c=0.4, nonfinite="raise", **STORES[store]
        )
        out = model(torch.ones(1, 1, dtype=torch.float16))
        with pytest.raises(FloatingPointError):
            opt.step([(out * 49152.0).sum(), (out * 49152.0).sum()])
        weight = model.weight.full_tensor() if store == "fsdp2" else model.weight
        assert weight.tolist() == [[1.0]]


@pytest.mark.parametrize("store", [store_param("accumulator"), store_param("fsdp2")])
def test_an_uncombined_backward_leaves_in_grad_the_tensor_it_held_when_the_window_began(store) -> None:
    """``lin.weight.grad`` holds a regulariser's gradient; after ``backward(losses, combine=False)`` it is
    still that very tensor with its values (the objectives' gradients wait in the rows), and the step
    adds the combination to it."""
    options = {"accumulate_dtype": F64} if store == "accumulator" else {}
    context = one_rank_group() if store == "fsdp2" else contextlib.nullcontext()
    with context:
        model = Net()
        if store == "fsdp2":
            sharded(model)
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.5, 0.5], **options)
        model(None).backward()
        kept = model.lin.weight.grad
        value = kept.full_tensor().clone() if store == "fsdp2" else kept.clone()
        opt.backward(model(batch()), combine=False)
        assert model.lin.weight.grad is kept
        assert torch.equal(kept.full_tensor() if store == "fsdp2" else kept, value)


@pytest.mark.parametrize("options", [{}, {"accumulate_dtype": F64}, {"memory": "low"}], ids=["direct", "accumulator", "low"])
def test_every_store_frees_the_graph_after_the_last_objectives_pass(options) -> None:
    """As ``sum(losses).backward()`` would: once the objectives' passes are done the graph is freed (it
    holds no activations until the losses go out of scope), so another backward through it fails."""
    model = Net()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.5, 0.5], **options)
    losses = model(batch())
    opt.backward(losses)
    for loss in losses:
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()


def integer_rows(m: int, n: int) -> torch.Tensor:
    """``m`` rows of ``n`` integers in ``[-3, 3]``: exact in bf16, and every dot product (at most ``9 n``
    below ``2**24``) exact in float32."""
    return torch.randint(-3, 4, (m, n), generator=torch.Generator().manual_seed(5))


def test_a_bfloat16_gram_is_upcast_one_sixteenth_of_a_float32_row_at_a_time(monkeypatch) -> None:
    """``m = 2`` bf16 rows of ``n = 48 * 2 * GRAM_BLOCK + 5`` columns: each chunk upcast to float32 has
    ``n / (16 * 3)`` columns rounded down to whole Gram blocks (2 blocks; the last chunk the rest), so
    the float32 transient stays near 1/16 of a float32 row; the Gram equals the int64 Gram exactly."""
    import cagrad_clip._storage.blocks as blocks

    m, n = 2, 48 * 2 * GRAM_BLOCK + 5
    seen = []
    real = blocks.gram_of_block

    def spy(rows: torch.Tensor) -> torch.Tensor:
        seen.append((rows.dtype, rows.shape[1]))
        return real(rows)

    monkeypatch.setattr(blocks, "gram_of_block", spy)
    ints = integer_rows(m, n)
    gram = blocks.blocked_gram(ints.to(torch.bfloat16), n)
    assert seen == [(torch.float32, 2 * GRAM_BLOCK)] * 48 + [(torch.float32, 5)]
    assert torch.equal(gram, (ints @ ints.T).float())


def test_a_bfloat16_gram_over_no_column_is_float32_zeros_on_the_rows_device_and_over_one_its_outer_product() -> None:
    """``blocked_gram`` of 3 bf16 rows over their first 0 columns: ``(3, 3)`` float32 zeros on the rows'
    device, whatever torch's default dtype (float64 here) and device (meta here); over their first
    column ``v``: ``v v^T``."""
    from cagrad_clip._storage.blocks import blocked_gram

    ints = integer_rows(3, 10)
    rows = ints.to(torch.bfloat16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            zero = blocked_gram(rows, 0)
    finally:
        torch.set_default_dtype(previous)
    assert zero.dtype == torch.float32 and zero.device == rows.device
    assert torch.equal(zero, torch.zeros(3, 3))
    v = ints[:, 0].float()
    assert torch.equal(blocked_gram(rows, 1), torch.outer(v, v))


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_finite_gradients_whose_shared_and_head_squares_add_up_to_under_float32_max_are_stepped(store) -> None:
    """float32, shared ``w`` (one element) and a head ``h`` (4 elements), ``c = 0.4``, weights ``0.5, 0.5``:
    both objectives' ``w`` gradient is ``1e19`` (the Gram is ``1e38`` everywhere: the coefficients are
    ``0.7, 0.7``), objective 0's head gradient is ``6.25e18`` per element. Its squared norm, shared
    ``1e38`` plus head ``4 * 3.90625e37 = 1.5625e38``, is finite in float32 (so is every square, not
    every cube), so the step is taken: ``w -= lr * 1.4e19``, ``h -= lr * 0.7 * 6.25e18`` (each column
    counted once, squared, in the finiteness bound)."""
    options = {"accumulate_dtype": torch.float32} if store == "accumulator" else {}
    w, head = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(4))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, head], lr=1e-20), shared=[w], nonfinite="raise", weights=[0.5, 0.5], c=0.4, **options)
    opt.step([(w * 1e19).sum() + (head * 6.25e18).sum(), (w * 1e19).sum()])
    torch.testing.assert_close(w.detach(), torch.tensor([-0.14]), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(head.detach(), torch.full((4,), -0.04375), rtol=1e-6, atol=0.0)


def test_float64_head_gradients_whose_squares_exceed_float32_are_finite() -> None:
    """``accumulate_dtype=torch.float64``: head gradients ``+-1e30`` (squares ``1e60``, beyond float32 but
    not float64) are finite gradients; the step is taken and every objective is reported finite."""
    w, head = nn.Parameter(torch.ones(2, dtype=F64)), nn.Parameter(torch.zeros(3, dtype=F64))
    opt = ConflictAverseOptimizer(
        torch.optim.SGD([w, head], lr=0.1), shared=[w], accumulate_dtype=F64, nonfinite="raise", weights=[0.5, 0.5]
    )
    opt.step([(w * 2).sum() + (head * 1e30).sum(), (w * w).sum() - (head * 1e30).sum()])
    assert opt.last.finite.tolist() == [True, True]
    assert not torch.equal(w.detach(), torch.ones(2, dtype=F64))


def test_a_one_element_head_with_an_infinite_gradient_names_its_objective() -> None:
    """Accumulator store, a one-element head whose gradient is Inf for objective 1 only: the step is
    refused and the diagnostics flag objective 1 (not 0) as non-finite."""
    w, head = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(1))
    opt = ConflictAverseOptimizer(
        torch.optim.SGD([w, head], lr=0.1), shared=[w], accumulate_dtype=F64, nonfinite="raise", weights=[0.5, 0.5]
    )
    with pytest.raises(FloatingPointError):
        opt.step([(w * 2).sum() + head.sum(), (w * w).sum() + (head * float("inf")).sum()])
    assert opt.last.finite.tolist() == [True, False]
    assert torch.equal(w.detach(), torch.ones(2))


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_the_squared_norm_of_float16_head_gradients_is_taken_in_float32(store) -> None:
    """float16 shared ``w`` (both objectives' gradient ``2``: the coefficients are ``0.7, 0.7``) and head
    ``h`` of 4 elements whose gradient is ``200`` for objective 0: norm 400, finite in float16, its
    square 160000 is not (float16 ends at 65504), in float32 it is. The step is taken:
    ``h = 1 - lr * 0.7 * 200`` (lr ``1e-4``)."""
    options = {"accumulate_dtype": torch.float32} if store == "accumulator" else {}
    w, head = nn.Parameter(torch.ones(2, dtype=torch.float16)), nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, head], lr=1e-4), shared=[w], nonfinite="raise", weights=[0.5, 0.5], c=0.4, **options)
    opt.step([(w * 2).sum() + (head * 200.0).sum(), (w * 2).sum()])
    assert opt.last.finite.tolist() == [True, True]
    torch.testing.assert_close(head.detach().float(), torch.full((4,), 1 - 1e-4 * 0.7 * 200), rtol=0.0, atol=1e-3)


def test_a_zero_gram_of_empty_shared_parameters_is_in_their_dtype_on_their_device() -> None:
    """float64 parameters, every shared one empty, the step run under a ``meta`` default device: the Gram
    is the float64 ``(2, 2)`` zero matrix on the parameters' device (CPU), the coefficients are the
    weights and the head steps as the weighted sum of its gradients, by hand."""
    empty = nn.Parameter(torch.zeros(0, dtype=F64))
    head = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = ConflictAverseOptimizer(torch.optim.SGD([empty, head], lr=1.0), weights=[0.25, 0.75], c=0.5, shared=[empty])
    losses = [(head * 2).sum() + empty.sum(), (head * head).sum() + empty.sum()]
    with torch.device("meta"):
        opt.step(losses)
    gram = opt.last.gram
    assert gram.dtype == F64 and gram.device == head.device and torch.equal(gram, torch.zeros(2, 2, dtype=F64))
    assert head.detach().tolist() == [1.0 - (0.25 * 2 + 0.75 * 2), -2.0 - (0.25 * 2 + 0.75 * -4)]


def test_a_parameter_only_a_non_home_objective_reaches_gets_exactly_its_coefficient_times_its_gradient() -> None:
    """Default store, weights ``0.3, 0.7`` (objective 1 is the home one, kept in ``.grad``), three
    micro-batches each combined: ``b`` is reached by objective 0 only, so after the last ``backward``
    its ``.grad`` is exactly ``a_0 * G_0`` (one float32 rounding), ``G_0`` objective 0's gradient of
    ``b`` summed over the micro-batches in order (``autograd.grad``); nothing of the home objective
    (which has no gradient there) is carried from one combination to the next."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(50))
    xs = [torch.randn(3) for _ in range(3)]

    def losses(x: torch.Tensor) -> list[torch.Tensor]:
        return [(w * x).sum().sin() + (b * b).sum() * 0.37, (w * w * x).sum()]

    total = torch.zeros(50)
    for x in xs:
        total += torch.autograd.grad(losses(x)[0], b)[0]
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, b], lr=0.1), weights=[0.3, 0.7], c=0.5)
    for x in xs:
        opt.backward(losses(x))
    assert torch.equal(b.grad, opt.last.coefficients[0] * total)


def test_a_step_over_chunks_of_unequal_length_warns_nothing(monkeypatch) -> None:
    """Default store, the shared gradients gathered 7 columns at a time (20 columns: chunks of 7, 7 and
    6): no warning is emitted (each chunk is gathered into a buffer of its own size; torch warns when
    an ``out=`` tensor must be resized), and the Gram is ``G G^T`` of the per-objective gradients."""
    import warnings

    import cagrad_clip._storage.direct as direct

    monkeypatch.setattr(direct, "gather_columns", lambda m, n, itemsize: 7)
    torch.manual_seed(0)
    w, head = nn.Parameter(torch.randn(20, dtype=F64)), nn.Parameter(torch.randn(3, dtype=F64))
    x = torch.randn(20, dtype=F64)
    losses = [(w * x).sum().sin() + head.sum(), (w * w).sum() * (head * head).sum()]
    rows = torch.stack([torch.autograd.grad(loss, w, retain_graph=True)[0] for loss in losses])
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, head], lr=0.1), shared=[w], weights=[0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(losses)
    torch.testing.assert_close(opt.last.gram, rows @ rows.T, rtol=1e-12, atol=1e-14)


def _assert_an_edited_window_is_refused(dtype: torch.dtype, grad: list[float], edit) -> None:
    """``.grad = grad`` after ``backward(..., combine=False)``, then ``edit(w.grad)`` in place: ``step()``
    refuses the edited window (``RuntimeError``) and the weight is left as it was."""
    w = nn.Parameter(torch.zeros(2, dtype=dtype))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), weights=[0.25, 0.75])
    t = torch.tensor(grad, dtype=dtype)
    opt.backward([(w * t).sum(), (w * t).sum()], combine=False)
    assert torch.equal(w.grad, t)
    with torch.no_grad():
        edit(w.grad)
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.equal(w.detach(), torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_an_in_place_edit_of_a_half_precision_grad_is_caught_even_below_its_norms_half_precision(dtype) -> None:
    """Half-precision ``.grad = [1000, 1]``; its second element is set to 2 in place: the norm goes from
    ``1000.0005`` to ``1000.002``, the same number in float16 or bfloat16 but not in float32, where the
    fingerprint of ``.grad`` is taken. The edited window is refused."""
    _assert_an_edited_window_is_refused(dtype, [1000.0, 1.0], lambda g: g.__setitem__(1, 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_an_in_place_edit_that_keeps_the_sum_of_cubes_is_caught(dtype) -> None:
    """``.grad = [1, 12]`` is edited in place to ``[9, 10]``: the sum of cubes is 1729 either way (the
    taxicab number), the sum of squares goes from 145 to 181. The fingerprint of ``.grad`` is its 2-norm,
    so the edited window is refused."""
    _assert_an_edited_window_is_refused(dtype, [1.0, 12.0], lambda g: g.copy_(torch.tensor([9.0, 10.0], dtype=dtype)))


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_losses_that_reach_no_parameter_leave_every_grad_none_under_a_meta_default_device(store) -> None:
    """Both objectives reach only a leaf ``v`` outside the optimizer: two ``backward(..., combine=False)``
    and a ``step()``, all under a ``meta`` default device, finish with the ``(2, 2)`` zero Gram on
    the parameters' device, ``w.grad`` still ``None`` (nothing to fingerprint, nothing edited) and
    ``v.grad`` the plain sum of the objectives' gradients: ``2 * (2 + 2 v) = 8``."""
    options = {"accumulate_dtype": F64} if store == "accumulator" else {}
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), weights=[0.5, 0.5], **options)
    with torch.device("meta"):
        for _ in range(2):
            opt.backward([(v * 2).sum(), (v * v).sum()], combine=False)
        opt.step()
    assert w.grad is None and torch.equal(w.detach(), torch.ones(2))
    assert opt.last.gram.device == w.device and torch.equal(opt.last.gram, torch.zeros(2, 2, dtype=opt.last.gram.dtype))
    assert torch.equal(v.grad, torch.full((3,), 8.0))


@pytest.mark.parametrize("store", [store_param(s) for s in ("direct", "accumulator", "fsdp2")])
def test_a_direction_that_overflows_once_added_to_the_kept_float16_grad_is_refused(store) -> None:
    """float16 weight whose ``.grad`` holds ``40000`` (another loss's backward) when the window begins; the
    two objectives' gradient ``20000`` gives the direction ``(1 + c) 20000 = 28000`` (``c = 0.4``),
    finite, but the kept ``.grad`` it is added to becomes ``68000``, beyond float16: the step is
    refused and the weight is left as it was."""
    options = {"accumulate_dtype": torch.float32} if store == "accumulator" else {}
    with one_rank_group() if store == "fsdp2" else contextlib.nullcontext():
        model = _float16_unit_weight(store)
        one = torch.ones(1, 1, dtype=torch.float16)
        (model(one) * 40000.0).sum().backward()
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), weights=[0.5, 0.5], c=0.4, nonfinite="raise", **options)
        out = model(one)
        with pytest.raises(FloatingPointError):
            opt.step([(out * 20000.0).sum(), (out * 20000.0).sum()])
        weight = model.weight.full_tensor() if store == "fsdp2" else model.weight
        assert weight.tolist() == [[1.0]]


def test_every_collective_of_a_two_rank_step_is_on_the_parameters_device(monkeypatch) -> None:
    """A faked 2-rank world (``torch.distributed`` as the library sees it: initialised, two ranks, each
    ``all_reduce`` a no-op that records its tensor's device) and a step run under a ``meta`` default
    device: every tensor handed to a collective (the objective count, the reached mask, the averaged
    gradients) is on the parameters' device, as NCCL requires of CUDA parameters."""
    devices = []

    class TwoRanks:
        def __getattr__(self, name):
            return getattr(dist, name)

        def is_available(self):
            return True

        def is_initialized(self):
            return True

        def get_world_size(self, group=None):
            return 2

        def all_reduce(self, tensor, op=None, group=None, async_op=False):
            devices.append(tensor.device)

    monkeypatch.setattr(distributed, "dist", TwoRanks())
    w, head = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, head], lr=0.1), shared=[w], weights=[0.5, 0.5])
    with torch.device("meta"):
        opt.step([(w * 2).sum() + head.sum(), (w * w).sum()])
    assert len(devices) >= 3 and all(d == w.device for d in devices)


class HookError(RuntimeError):
    pass


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_a_runtime_error_raised_in_an_objectives_backward_comes_through_as_it_was(store) -> None:
    """A tensor hook on the second objective raises a ``RuntimeError`` (not DDP's): the very exception
    object reaches the caller, not one wrapped around it."""
    options = {"accumulate_dtype": F64} if store == "accumulator" else {}
    w = nn.Parameter(torch.ones(3))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), weights=[0.5, 0.5], **options)
    error = HookError("raised by a hook")
    losses = [(w * 2).sum(), (w * w).sum()]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        raise error

    losses[0].register_hook(hook)
    with pytest.raises(RuntimeError) as info:
        opt.backward(losses)
    assert info.value is error


# what DDP's reducer raises when its gradient hooks fire in more than one backward pass of a step
DDP_READY_TWICE = (
    "Expected to mark a variable ready only once. This error is caused by one of the following reasons: 1) Use of a "
    "module parameter outside the `forward` function."
)


@pytest.mark.parametrize("store", ["direct", "accumulator"])
def test_ddps_ready_only_once_error_in_an_objectives_backward_is_explained(store) -> None:
    """A hook on the first objective raises DDP's "Expected to mark a variable ready only once" (what
    DDP's reducer raises when it syncs inside the per-objective passes): the caller gets a new
    ``RuntimeError`` that tells them to run the forward under ``model.no_sync()``, chained from DDP's."""
    options = {"accumulate_dtype": F64} if store == "accumulator" else {}
    w = nn.Parameter(torch.ones(3))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), weights=[0.5, 0.5], **options)
    error = RuntimeError(DDP_READY_TWICE)
    losses = [(w * 2).sum(), (w * w).sum()]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        raise error

    losses[0].register_hook(hook)
    with pytest.raises(RuntimeError, match=r"model\.no_sync\(\)") as info:
        opt.backward(losses)
    assert info.value is not error and info.value.__cause__ is error
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None


class _TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.u = nn.Parameter(torch.ones(2, dtype=F64)), nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, first: bool) -> list[torch.Tensor]:  # through forward, so FSDP2 gathers and reduce-scatters
        if first:
            return [(self.w * 2).sum() + self.u.sum(), (self.w * self.w).sum()]
        return [(self.w * float("inf")).sum(), (self.w * self.w).sum()]


@pytest.mark.parametrize("store", ["direct", "accumulator", "low_memory", pytest.param("sharded", marks=needs_fsdp2)])
def test_a_parameter_no_objective_reaches_keeps_its_zeroed_grad_when_the_direction_is_nan(store: str) -> None:
    """Every store that keeps ``.grad`` (``memory="low"`` refuses it), ``nonfinite="ignore"``: ``u`` is reached in a first step, so
    ``zero_grad(set_to_none=False)`` leaves it a zero ``.grad``; the next step's objectives reach only
    ``w`` and one is infinite (NaN coefficients, a NaN direction on ``w``). As with
    ``sum(losses).backward()``, ``u.grad`` stays the zeros and ``u`` does not move. (The accumulator and
    FSDP2 stores used to add the NaN combination, ``a @ 0``, to every kept ``.grad``, reached or not.)"""
    options = {"accumulate_dtype": F64} if store == "accumulator" else {}
    with one_rank_group() if store == "sharded" else contextlib.nullcontext():
        model = _TwoParams()
        if store == "sharded":
            model = sharded(model)
        w, u = model.w, model.u
        opt = ConflictAverseOptimizer(torch.optim.SGD([w, u], lr=0.1), weights=[0.5, 0.5], nonfinite="ignore", **options)
        opt.step(model(True))
        u_before = u.detach().clone()
        opt.zero_grad(set_to_none=False)
        opt.step(model(False))
        local = (lambda t: t.to_local()) if store == "sharded" else (lambda t: t)
        assert local(w.detach()).isnan().all()
        assert torch.equal(local(u.grad), torch.zeros(3, dtype=F64))
        assert torch.equal(local(u.detach()), local(u_before))


@needs_fsdp2
def test_dtensor_parameters_on_two_device_meshes_are_refused_up_front() -> None:
    """Two ``Shard(0)`` DTensor parameters on two different 1-D meshes (named ``a`` and ``b``): one Gram
    cannot be summed over two groups, so the optimizer refuses them at construction
    (``NotImplementedError``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_group():
        a, b = init_device_mesh("cpu", (1,), mesh_dim_names=("a",)), init_device_mesh("cpu", (1,), mesh_dim_names=("b",))
        assert a != b
        params = [nn.Parameter(distribute_tensor(torch.ones(2, dtype=F64), mesh, [Shard(0)])) for mesh in (a, b)]
        with pytest.raises(NotImplementedError):
            ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1))


def test_a_grad_assigned_where_the_window_left_none_counts_as_a_replaced_grad() -> None:
    """``u`` is reached by no objective, so ``backward(..., combine=False)`` leaves ``u.grad = None``;
    assigning a tensor to it before ``step()`` replaces what the window recorded: the step refuses to
    combine (``RuntimeError``) and leaves the parameters and ``.grad`` as they were: ``u.grad`` the
    assigned tensor, ``w.grad`` the home objective's (the last of equal weights) gradient ``2 w``."""
    w, u = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, u], lr=0.1), weights=[0.5, 0.5])
    opt.backward([(w * 2).sum(), (w * w).sum()], combine=False)
    assert u.grad is None
    u.grad = torch.full((3,), 5.0)
    assigned = u.grad
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(2)) and torch.equal(u.detach(), torch.ones(3))
    assert u.grad is assigned and torch.equal(u.grad, torch.full((3,), 5.0))
    assert torch.equal(w.grad, torch.full((2,), 2.0))


def test_parameters_on_two_devices_are_refused_at_construction() -> None:
    """One parameter on the CPU, one on ``meta``: they cannot share a gradient buffer, so the optimizer
    refuses them when it is built (``ValueError``)."""
    params = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="meta"))]
    with pytest.raises(ValueError):
        ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.1))


@needs_fsdp2
def test_the_low_memory_mode_refuses_fsdp2_parameters_at_construction() -> None:
    """``memory="low"`` stores no per-objective gradient, so it cannot sum shard Grams: FSDP2 parameters
    are refused when the optimizer is built (``ValueError``), not silently given the default store."""
    with one_rank_group():
        model = sharded(Net())
        with pytest.raises(ValueError):
            ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), memory="low")


def test_the_low_memory_mode_steps_a_finite_float16_direction_whose_norm_exceeds_float16s_range() -> None:
    """Eight float16 elements, two objectives pulling each by 40000: the direction is finite (40000 per
    element, under float16's 65504) but its norm, about 113000, is not. Its finiteness and its head norms
    are taken in float32, so ``memory="low"`` steps it like the default store does."""
    for memory in ("default", "low"):
        p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
        opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=1e-4), c=0.0, memory=memory)
        opt.zero_grad()
        opt.step([(p.float() * 40000.0).sum(), (p.float() * 40000.0).sum()])
        expected = torch.full((8,), -4.0, dtype=torch.float16)  # -lr * (0.5 * 40000 + 0.5 * 40000)
        assert torch.equal(p.detach(), expected), memory


class _Group:
    """A stand-in for an FSDP2 parameter group: its parameters and whether it reduces its gradients."""

    def __init__(self, params, reduce_grads=None):
        self.fsdp_params = [type("FSDPParam", (), {"sharded_param": p})() for p in params]
        if reduce_grads is not None:
            self.reduce_grads = reduce_grads


@pytest.mark.skipif(fsdp2_missing(), reason="needs FSDP2")
def test_the_fsdp_sync_check_reads_both_layouts_of_fsdps_bookkeeping(monkeypatch):
    """Later torch releases keep a list of groups per module state (``_fsdp_param_groups``, whose
    one-group compatibility property raises for several), torch 2.9 one group (``_fsdp_param_group``,
    ``None`` for a module without parameters). A group that does not say whether it reduces counts as
    reducing. Fake states, so the torch 2.9 layout is read on any torch."""
    import weakref

    import torch.distributed._composable_state as composable
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    from cagrad_clip._storage.sharded import unsynced_parameters

    params = [torch.zeros(1) for _ in range(6)]

    class ListLayout(FSDPState):
        @property
        def _fsdp_param_group(self):
            raise AssertionError("read the list: this property raises for more than one group")

    class OneGroupLayout(FSDPState):
        _fsdp_param_group = None

    several = ListLayout.__new__(ListLayout)
    several._fsdp_param_groups = [_Group(params[0:1], reduce_grads=False), _Group(params[1:2], reduce_grads=True)]
    one = OneGroupLayout.__new__(OneGroupLayout)
    one._fsdp_param_group = _Group(params[2:4], reduce_grads=False)
    empty = OneGroupLayout.__new__(OneGroupLayout)  # torch 2.9, a module without parameters of its own
    silent = OneGroupLayout.__new__(OneGroupLayout)
    silent._fsdp_param_group = _Group(params[4:6])  # no reduce_grads attribute: synced
    modules = [nn.Linear(1, 1) for _ in range(4)]
    states = [several, one, empty, silent]
    mapping = weakref.WeakKeyDictionary({module: weakref.ref(state) for module, state in zip(modules, states)})
    monkeypatch.setattr(composable, "_module_state_mapping", mapping)
    assert unsynced_parameters(params) == [0, 2, 3]
    assert unsynced_parameters(params[2:]) == [0, 1]  # indices into the parameters given


def test_accumulate_dtype_float64_widens_the_rows_of_float32_parameters() -> None:
    """float32 parameters, ``accumulate_dtype=torch.float64``: head gradients ``+-1e30`` fit float32, their
    squares (``1e60``) only float64. The rows are float64 as asked, so the step is taken, every objective
    is finite and the Gram is float64 (rows in the parameters' float32 would call both gradients too
    large to square and refuse the step)."""
    w, head = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(3))
    opt = ConflictAverseOptimizer(
        torch.optim.SGD([w, head], lr=0.1), shared=[w], accumulate_dtype=F64, nonfinite="raise", weights=[0.5, 0.5]
    )
    opt.step([(w * 2).sum() + (head * 1e30).sum(), (w * w).sum() - (head * 1e30).sum()])
    assert opt.last.finite.tolist() == [True, True]
    assert opt.last.gram.dtype == F64
    assert not torch.equal(w.detach(), torch.ones(2))
