"""Tests for the speed benchmark's building blocks (``python -m benchmarks.speed``) and the step path.

No torch.compile here: the suite's one compile of the solver lives in ``tests/dual/test_kernel.py``.
CUDA tests skip cleanly without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchjd", reason='needs the bench extra: pip install -e ".[bench]"')

from benchmarks.speed import levers, models, peers, step
from benchmarks.speed.common import C
from benchmarks.speed.solver import closed_form_m2, random_grams, solve
from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage.blocks import GRAM_BLOCK, gram_of_block


def test_closed_form_m2_matches_solver_batched() -> None:
    H = torch.from_numpy(random_grams(2, 64, seed=3))
    w = torch.full((2,), 0.5, dtype=torch.float64)
    ours = solve(H, w, clip=False, max_iter=1).dual
    closed = closed_form_m2(H)
    for j in range(H.shape[0]):
        h = H[j].numpy()
        assert peers.dual_value(h, closed[j].numpy()) <= peers.dual_value(h, ours[j].numpy()) + 1e-12 * h.diagonal().max()
    assert torch.allclose(closed.sum(-1), torch.ones(64, dtype=torch.float64))


def test_slsqp_official_is_feasible_and_not_better_than_ours() -> None:
    H = random_grams(4, 1, seed=5)[0]
    p = peers.slsqp_official(H)
    assert p.min() >= 0 and abs(p.sum() - 1) < 1e-12
    ours = solve(torch.from_numpy(H), torch.full((4,), 0.25, dtype=torch.float64), clip=False, max_iter=12).dual.numpy()
    assert peers.dual_value(H, ours) <= peers.dual_value(H, p) + 1e-10 * H.diagonal().max()


def test_tight_reference_and_accuracy_measure() -> None:
    H = random_grams(3, 1, seed=7)[0]
    ref = peers.tight_reference(H)
    assert ref is not None and abs(ref.sum() - 1) < 1e-9
    ours = solve(torch.from_numpy(H), torch.full((3,), 1 / 3, dtype=torch.float64), clip=False, max_iter=11).dual.numpy()
    assert peers.dual_value(H, ours) - peers.dual_value(H, ref) <= 1e-9 * H.diagonal().max()


@pytest.mark.parametrize("kind", ["mlp-512", "transformer"])
def test_graph_is_freed_after_the_last_objective(kind: str) -> None:
    _, (opt, case) = step.step_variants(kind, 2)
    assert step.graph_freed_after_step(opt, case)


def test_step_variants_all_run_and_ours_matches_the_floor_gradients_at_c0() -> None:
    variants, (opt, case) = step.step_variants("mlp-512", 2)
    for fn in variants.values():
        fn()
    assert step.combine_only_ms(opt, case, repeats=1, warmup=0) > 0
    top = step.combine_profile(opt, case)
    ops = step.combine_op_count(opt, case)
    assert ops > 10  # the Gram, the solve and the write each dispatch several ops
    assert top and all(name.startswith("aten::") and 0 < share <= 1 for name, share in top)
    # at c = 0 our direction is the weighted sum: it must equal the plain summed gradient / m
    case = models.make_step_case("mlp-512", 2)
    opt = ConflictAverseOptimizer(torch.optim.SGD(case.model.parameters(), lr=0.0), c=0.0)
    losses, _ = case.model.losses(case.x, case.y)
    opt.backward(losses)
    ours = [p.grad.clone() for p in case.model.parameters()]
    case.model.zero_grad()
    losses, _ = case.model.losses(case.x, case.y)
    (0.5 * (losses[0] + losses[1])).backward()
    for a, p in zip(ours, case.model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_has_no_host_sync() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).cuda()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), c=C, nonfinite="ignore")
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 3, device="cuda")
    for warm in (True, False):  # the first step builds device-side caches (weights, the solver's face index)
        opt.zero_grad()
        losses = list(((model(x) - y) ** 2).mean(0).unbind())
        torch.cuda.set_sync_debug_mode("default" if warm else "error")
        try:
            opt.step(losses)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.last is not None and np.isfinite(opt.last.coefficients.cpu().numpy()).all()


def test_lever_section_measures_both_ways_and_the_blocked_gram_is_accurate() -> None:
    """The lever's "blocked (kept)" Gram is the library's (``cagrad_clip._storage.blocks.gram_of_block``),
    bit for bit, and the library's is accurate to float32 against float64 over three tiles and a remainder."""
    numel = 3 * GRAM_BLOCK + 123
    rows = levers.lever_section(numel, [2], repeats=1, log=lambda msg: None)
    assert [r["variant"] for r in rows] == list(levers.LEVER_VARIANTS)
    assert all(r["ms"] > 0 for r in rows)
    assert rows[1]["rel_error"] <= 1e-6
    G = torch.randn(2, numel, generator=torch.Generator().manual_seed(2))
    exact = G.double() @ G.double().T
    library = gram_of_block(G)
    assert float((library.double() - exact).abs().max() / exact.abs().max()) <= 1e-6
    assert torch.equal(levers.blocked_gram(G), library)  # the lever times what the library runs
