"""Exact data parallelism: 2 gloo ranks (spawned CPU processes) against one process on the full batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from tests.models import TwoHeads, make_two_heads

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
STEPS = 3
BATCH = 16  # full batch; each rank gets BATCH // WORLD rows
WEIGHTS = [0.8, 0.2]


def make_model() -> TwoHeads:
    return make_two_heads(0)


def make_data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
        ya = x[:, :1] * 2 + 0.1 * torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
        yb = -x[:, :1] + x[:, 1:2] ** 2  # conflicts with ya on the shared trunk
        out.append((x, ya, yb))
    return out


def losses_of(model: nn.Module, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
    a, b = model(x)
    return [((a - ya) ** 2).mean(), ((b - yb) ** 2).mean()]


def train(
    model: nn.Module,
    params,
    batches,
    *,
    distributed: bool = True,
    micro: int = 1,
    combine_each: bool = False,
    ddp: nn.Module | None = None,
    no_sync: bool = True,
    sgd: bool = False,
):
    """3 AdamW (or plain SGD) steps; ``micro`` micro-batches per step; returns (parameters, coefficients per step)."""
    base = torch.optim.SGD(params, lr=0.05) if sgd else torch.optim.AdamW(params, lr=0.05)
    opt = ConflictAverseOptimizer(base, weights=WEIGHTS, c=0.4, distributed=distributed)
    coefs = []
    for x, ya, yb in batches:
        opt.zero_grad()
        n = x.shape[0] // micro
        for k in range(micro):
            sl = slice(k * n, (k + 1) * n)
            if ddp is not None and no_sync:
                with ddp.no_sync():  # the optimizer averages; DDP's reducer must stay out of it
                    losses = losses_of(ddp, x[sl], ya[sl], yb[sl])
            else:
                losses = losses_of(ddp if ddp is not None else model, x[sl], ya[sl], yb[sl])
            # Each loss is a mean over its micro-batch; scale so the sum over micro-batches is the batch mean.
            opt.backward([loss / micro for loss in losses], combine=combine_each or k == micro - 1)
        if not sgd:  # clipping sees the combined, averaged direction (it would hide the scale SGD checks)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
        coefs.append(opt.last.coefficients.clone())
    return [p.detach().clone() for p in params], torch.stack(coefs)


SCENARIOS = {
    "plain": dict(),
    "ddp": dict(ddp=True),
    "accumulate_combine_each": dict(micro=2, combine_each=True),
    "ddp_accumulate": dict(ddp=True, micro=2),
    # SGD sees the scale of the averaged gradients (AdamW and the coefficients do not): a sum over
    # ranks instead of a mean would double every step here.
    "sgd": dict(sgd=True),
    "off": dict(distributed=False),
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        per = BATCH // WORLD
        shards = [
            (x[rank * per : (rank + 1) * per], ya[rank * per : (rank + 1) * per], yb[rank * per : (rank + 1) * per])
            for x, ya, yb in make_data()
        ]
        results = {}
        for name, cfg in SCENARIOS.items():
            cfg = dict(cfg)
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model) if cfg.pop("ddp", False) else None
            results[name] = train(model, list(model.parameters()), shards, ddp=ddp, **cfg)
        # Without no_sync() DDP's reducer would sync (and refuse) the per-objective passes: a clear error.
        model = make_model()
        try:
            train(model, list(model.parameters()), shards, ddp=nn.parallel.DistributedDataParallel(model), no_sync=False)
            results["ddp_without_no_sync"] = "no error"
        except RuntimeError as error:
            results["ddp_without_no_sync"] = str(error)
        # Ranks that pass different numbers of losses get a clear error on every rank (not a gloo abort).
        model = make_model()
        opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        x, ya, yb = shards[0]
        losses = losses_of(model, x, ya, yb)
        try:
            opt.step(losses if rank == 0 else losses + [losses[0] * 2])
            results["count_mismatch"] = "no error"
        except ValueError as error:
            results["count_mismatch"] = str(error)
        # A parameter only rank 1's micro-batch reaches: every rank must still write the same direction.
        model = make_model()
        extra = nn.Parameter(torch.ones((), dtype=torch.float64))
        opt = ConflictAverseOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=0.1), weights=WEIGHTS, c=0.4)
        losses = losses_of(model, x, ya, yb)
        if rank == 1:
            losses[1] = losses[1] + (extra * x.mean()) ** 2
        opt.step(losses)
        results["reached_on_one_rank"] = [p.detach().clone() for p in [*model.parameters(), extra]]
        for store, options in STORES.items():
            results[f"partly_reached_{store}"] = partly_reached(options, x, ya, yb, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


STORES = {"default": {}, "accumulator": {"accumulate_dtype": torch.float64}}


def partly_reached(options, x, ya, yb, rank: int | None):
    """Two AdamW steps where ``extra`` only rank 1's micro-batch reaches (``rank=None``: one process on
    the concatenated batch, the same objective) and ``unused`` no loss reaches; returns the
    parameters and whether ``unused.grad`` is None after each step."""
    model = make_model()
    extra = nn.Parameter(torch.ones((), dtype=torch.float64))
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = [*model.parameters(), extra, unused]
    opt = ConflictAverseOptimizer(torch.optim.AdamW(params, lr=0.05), weights=WEIGHTS, c=0.4, **options)
    per = BATCH // WORLD
    unused_none = []
    for _ in range(2):
        opt.zero_grad()
        losses = losses_of(model, x, ya, yb)
        if rank is None:  # one process: rank 1's term, averaged over the two ranks
            losses[1] = losses[1] + 0.5 * (extra * x[per:].mean()) ** 2
        elif rank == 1:
            losses[1] = losses[1] + (extra * x.mean()) ** 2
        opt.step(losses)
        unused_none.append(unused.grad is None)
    return [p.detach().clone() for p in params], unused_none


@pytest.fixture(scope="module")
def runs():
    # The single-process reference first.
    model = make_model()
    single = train(model, list(model.parameters()), make_data())
    model = make_model()
    single_sgd = train(model, list(model.parameters()), make_data(), sgd=True)
    # spawn, never fork: once anything in this process has used autograd's threads (or torch.compile), a
    # forked rank can fail ("Unable to handle autograd's threading in combination with fork-based
    # multiprocessing", torch 2.10 and later); a fresh interpreter per rank costs a few seconds once.
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    return ranks, single, single_sgd


def assert_ranks_match_one_process(ranks, scenario, single_params, single_coefs) -> None:
    """Every rank's parameters and coefficients equal the 1-process run (1e-6), and the ranks agree bit for bit."""
    for rank in ranks:
        params, coefs = rank[scenario][:2]
        for p, q in zip(params, single_params):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(coefs, single_coefs, rtol=0, atol=1e-6)
    assert torch.equal(ranks[0][scenario][1], ranks[1][scenario][1])
    for p, q in zip(ranks[0][scenario][0], ranks[1][scenario][0]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("scenario", ["plain", "ddp", "accumulate_combine_each", "ddp_accumulate"])
def test_two_ranks_equal_one_process_on_the_full_batch(runs, scenario):
    ranks, (single_params, single_coefs), _ = runs
    assert_ranks_match_one_process(ranks, scenario, single_params, single_coefs)


def test_two_ranks_average_not_sum_the_gradients_under_sgd(runs):
    """a sum instead of a mean is invisible to AdamW and to the coefficients; SGD sees it."""
    ranks, _, (single_params, single_coefs) = runs
    assert_ranks_match_one_process(ranks, "sgd", single_params, single_coefs)


def test_ranks_passing_different_numbers_of_losses_all_get_a_clear_error(runs):
    """gloo aborted (SIGABRT) and NCCL would hang or corrupt."""
    ranks, _, _ = runs
    for rank in ranks:
        assert "the ranks passed different numbers of losses" in rank["count_mismatch"]


def test_ddp_without_no_sync_is_refused_clearly(runs):
    """DDP's reducer must stay out of the m backward passes: the error says what to do."""
    ranks, _, _ = runs
    for rank in ranks:
        assert "model.no_sync()" in rank["ddp_without_no_sync"]


def test_a_parameter_reached_on_one_rank_only_gets_the_same_direction_on_every_rank(runs):
    """Rank 0 never reaches ``extra``; its averaged gradient is still non-zero there, so rank 0 must
    combine it like rank 1 does (writing the averaged home gradient instead split the ranks)."""
    ranks, _, _ = runs
    first, second = (rank["reached_on_one_rank"] for rank in ranks)
    for p, q in zip(first, second):
        assert torch.equal(p, q)
    assert first[-1].item() != 1.0  # extra moved on both ranks


def test_without_averaging_ranks_disagree(runs):
    """``distributed=False`` reproduces the bug of combining per-rank gradients: coefficients differ."""
    ranks, _, _ = runs
    assert not torch.allclose(ranks[0]["off"][1], ranks[1]["off"][1])


def test_distributed_arguments_are_validated():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        ConflictAverseOptimizer(base, distributed="yes")
    with pytest.raises(ValueError, match="distributed=False"):
        ConflictAverseOptimizer(base, distributed=False, process_group=object())
    with pytest.raises(TypeError, match="ProcessGroup"):
        ConflictAverseOptimizer(base, process_group=object())


def test_active_group_is_the_users_process_group_with_its_world_size(monkeypatch):
    """A user's ``process_group`` is the group every collective of the step runs over: with a faked
    initialised world, ``active_group`` returns that very group and *its* size (4 ranks), and the
    default group (``None``) with the default world's size (8 ranks); nothing with one rank."""
    from cagrad_clip._distributed import active_group

    group = object()  # stands for a ProcessGroup of 4 of the 8 ranks
    sizes = {id(group): 4, id(None): 8}
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: sizes[id(group)])
    chosen, world = active_group(True, group)
    assert chosen is group and world == 4
    assert active_group(True, None) == (None, 8)
    assert active_group(False, None) == (None, 1)
    sizes[id(group)] = 1
    assert active_group(True, group) == (None, 1)


def test_not_initialised_is_a_no_op():
    """Without an initialised process group the optimizer behaves exactly as on one process."""
    assert not dist.is_initialized()
    model = make_model()
    params, coefs = train(model, list(model.parameters()), make_data())
    model2 = make_model()
    params2, coefs2 = train(model2, list(model2.parameters()), make_data(), distributed=False)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


@pytest.mark.parametrize("store", list(STORES))
def test_a_parameter_reached_on_some_ranks_equals_one_process_and_one_no_rank_reaches_stays_none(runs, store):
    """Conditional computation under ``torch.distributed``, every store: ``extra`` (rank 1 only) is
    combined identically on both ranks and equals one process on the full batch; ``unused`` (no rank)
    keeps ``.grad = None`` so AdamW leaves it alone, as in one process."""
    ranks, _, _ = runs
    x, ya, yb = make_data()[0]
    single, single_none = partly_reached(STORES[store], x, ya, yb, rank=None)
    assert single_none == [True, True]
    for rank in ranks:
        params, unused_none = rank[f"partly_reached_{store}"]
        assert unused_none == [True, True]
        for p, q in zip(params, single):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-9)
        assert torch.equal(params[-1], torch.ones(3, dtype=torch.float64))
    for p, q in zip(ranks[0][f"partly_reached_{store}"][0], ranks[1][f"partly_reached_{store}"][0]):
        assert torch.equal(p, q)
