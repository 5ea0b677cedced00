"""FSDP2 (``fully_shard``, DTensor shards): 2 gloo ranks (spawned CPU processes) against one process."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from tests.process_groups import fsdp2_missing

pytestmark = pytest.mark.skipif(fsdp2_missing() is not None, reason=fsdp2_missing() or "")
fsdp = pytest.importorskip("torch.distributed.fsdp")

from tests.test_distributed import (  # noqa: E402 - after the skip: same data as DDP
    BATCH,
    WEIGHTS,
    WORLD,
    assert_ranks_match_one_process,
    make_data,
)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        f64 = dict(dtype=torch.float64)
        # 7 outputs: the (7, 8) weight and (7,) bias do not split evenly over 2 ranks (FSDP pads).
        self.l1 = nn.Linear(5, 8, **f64)
        self.l2 = nn.Linear(8, 7, **f64)
        self.head_a = nn.Linear(7, 1, **f64)
        self.head_b = nn.Linear(7, 1, **f64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return self.head_a(h), self.head_b(h)


def make_model() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads()


def train(model: nn.Module, batches, *, micro: int = 1, combine_each: bool = False, keep_grad: bool = False):
    """3 AdamW steps with max-norm clipping; returns (full parameters, coefficients, Grams).

    ``combine_each``: every micro-batch's ``backward`` combines (each further one takes the direction
    back out of ``.grad`` first). ``keep_grad``: no ``zero_grad`` between steps, so every window after
    the first starts with ``.grad`` holding the last step's clipped direction, which it keeps and adds to.
    """
    params = list(model.parameters())
    opt = ConflictAverseOptimizer(torch.optim.AdamW(params, lr=0.05), weights=WEIGHTS, c=0.4)
    coefs, grams = [], []
    for x, ya, yb in batches:
        if not keep_grad:
            opt.zero_grad()
        n = x.shape[0] // micro
        for k in range(micro):
            sl = slice(k * n, (k + 1) * n)
            a, b = model(x[sl])
            losses = [((a - ya[sl]) ** 2).mean() / micro, ((b - yb[sl]) ** 2).mean() / micro]
            opt.backward(losses, combine=combine_each or k == micro - 1)
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
        coefs.append(opt.last.coefficients.clone())
        grams.append(opt.last.gram.clone())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
    return [p.detach().clone() for p in full], torch.stack(coefs), torch.stack(grams)


SCENARIOS = {
    "fsdp": dict(),
    "fsdp_accumulate": dict(micro=2),
    "fsdp_keep_grad_combine_each": dict(micro=2, combine_each=True, keep_grad=True),
}
#: The one-process reference of each scenario: the full batch, one backward per step.
SINGLE = {name: dict(keep_grad=cfg.get("keep_grad", False)) for name, cfg in SCENARIOS.items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        per = BATCH // WORLD
        shards = [tuple(t[rank * per : (rank + 1) * per] for t in batch) for batch in make_data()]
        results = {}
        for name, cfg in SCENARIOS.items():
            model = make_model()
            for layer in (model.l1, model.l2):
                fsdp.fully_shard(layer)
            fsdp.fully_shard(model)
            results[name] = train(model, shards, **cfg)
        # Unsupported mixes fail at construction with a message naming the problem.
        model = make_model()
        fsdp.fully_shard(model)
        errors = []
        for kwargs in (dict(distributed=False), dict(process_group=dist.group.WORLD)):
            try:
                ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
            except ValueError as e:
                errors.append(str(e))
        model = make_model()
        fsdp.fully_shard(model.l1)
        try:
            ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        except ValueError as e:
            errors.append(str(e))
        results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    single = {name: train(make_model(), make_data(), **cfg) for name, cfg in SINGLE.items()}
    # spawn, never fork: once anything in this process has used autograd's threads (or torch.compile), a
    # forked rank can fail ("Unable to handle autograd's threading in combination with fork-based
    # multiprocessing", torch 2.10 and later); a fresh interpreter per rank costs a few seconds once.
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    return ranks, single


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fsdp_two_ranks_equal_one_process_on_the_full_batch(runs, scenario):
    """Also with ``.grad`` kept from the last step and a combination after every micro-batch: each
    further micro-batch takes the direction back out of the kept shards before adding its gradients."""
    ranks, single = runs
    single_params, single_coefs, single_grams = single[scenario]
    # Both ranks solved the same all-reduced Gram: bit-identical coefficients and parameters.
    assert_ranks_match_one_process(ranks, scenario, single_params, single_coefs)
    for rank in ranks:
        grams = rank[scenario][2]
        # The first Gram is of the same parameters: equal up to the order of float64 sums. Later Grams
        # follow parameters that may differ from the 1-process run by the parameters' own tolerance (torch's
        # clip_grad_norm_ sums sharded squares in another order: 1.6e-9 on torch 2.7 and 2.8).
        torch.testing.assert_close(grams[0], single_grams[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grams, single_grams, rtol=1e-6, atol=1e-8)


def test_fsdp_unsupported_mixes_are_rejected(runs):
    ranks, _ = runs
    errors = ranks[0]["errors"]
    assert len(errors) == 3
    assert "distributed=False" in errors[0]
    assert "drop process_group" in errors[1]
    assert "plain tensor but others are DTensors" in errors[2]


if __name__ == "__main__":  # python -m tests.test_fsdp: print the measured differences
    (ranks, single) = runs.__wrapped__()
    for name in SCENARIOS:
        diffs = [
            max((p - q).abs().max().item() for r in ranks for p, q in zip(r[name][k], single[name][k]))
            if k == 0
            else max((r[name][k] - single[name][k]).abs().max().item() for r in ranks)
            for k in range(3)
        ]
        same = torch.equal(ranks[0][name][1], ranks[1][name][1])
        print(
            f"{name}: max |diff| params {diffs[0]:.1e}, coefficients {diffs[1]:.1e}, Gram {diffs[2]:.1e}; "
            f"coefficients identical across ranks: {same}"
        )
