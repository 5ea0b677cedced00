"""Tests for the speed benchmark's building blocks (``python -m benchmarks.speed``) and the step path.

No torch.compile here: the suite's one compile of the solver lives in ``tests/test_dual.py``.
CUDA tests skip cleanly without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import speed
from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip.dual import _solve


def test_closed_form_m2_matches_solver_batched() -> None:
    H = torch.from_numpy(speed.random_grams(2, 64, seed=3))
    w = torch.full((2,), 0.5, dtype=torch.float64)
    ours = _solve(H, w, speed.C, False, 1.0, 1).dual
    closed = speed.closed_form_m2(H)
    for j in range(H.shape[0]):
        h = H[j].numpy()
        assert speed.dual_value(h, closed[j].numpy()) <= speed.dual_value(h, ours[j].numpy()) + 1e-12 * h.diagonal().max()
    assert torch.allclose(closed.sum(-1), torch.ones(64, dtype=torch.float64))


def test_slsqp_official_is_feasible_and_not_better_than_ours() -> None:
    H = speed.random_grams(4, 1, seed=5)[0]
    p = speed.slsqp_official(H)
    assert p.min() >= 0 and abs(p.sum() - 1) < 1e-12
    ours = _solve(torch.from_numpy(H), torch.full((4,), 0.25, dtype=torch.float64), speed.C, False, 1.0, 12).dual.numpy()
    assert speed.dual_value(H, ours) <= speed.dual_value(H, p) + 1e-10 * H.diagonal().max()


def test_tight_reference_and_accuracy_measure() -> None:
    H = speed.random_grams(3, 1, seed=7)[0]
    ref = speed.tight_reference(H)
    assert ref is not None and abs(ref.sum() - 1) < 1e-9
    ours = _solve(torch.from_numpy(H), torch.full((3,), 1 / 3, dtype=torch.float64), speed.C, False, 1.0, 11).dual.numpy()
    assert speed.dual_value(H, ours) - speed.dual_value(H, ref) <= 1e-9 * H.diagonal().max()


@pytest.mark.parametrize("kind", ["mlp-512", "transformer"])
def test_graph_is_freed_after_the_last_objective(kind: str) -> None:
    _, info = speed.step_variants(kind, 2)
    assert speed.graph_freed_after_step(info["ours_opt"], *info["ours_model"])


def test_peak_memory_sees_an_allocation() -> None:
    def alloc() -> None:
        x = torch.empty(1 << 20)  # 4 MiB
        x.fill_(1.0)

    assert speed.peak_memory_bytes(alloc) >= 4 * 2**20


def test_step_variants_all_run_and_ours_matches_the_floor_gradients_at_c0() -> None:
    variants, info = speed.step_variants("mlp-512", 2)
    for fn in variants.values():
        fn()
    # at c = 0 our direction is the weighted sum: it must equal the plain summed gradient / m
    model, x, y, shared, _ = speed.make_case("mlp-512", 2)
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), c=0.0)
    losses, _ = model.losses(x, y)
    opt.backward(losses)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    losses, _ = model.losses(x, y)
    (0.5 * (losses[0] + losses[1])).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_has_no_host_sync() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).cuda()
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), c=0.4, nonfinite="ignore")
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 3, device="cuda")
    for warm in (True, False):  # the first step builds device-side caches (weights, the solver's face index)
        opt.zero_grad()
        losses = list(((model(x) - y) ** 2).mean(0).unbind())
        torch.cuda.set_sync_debug_mode("default" if warm else "error")
        try:
            opt.step(losses)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(opt.last.coefficients.cpu().numpy()).all()


def test_lever_section_measures_both_ways_and_the_blocked_gram_is_accurate() -> None:
    rows = speed.lever_section(3 * 16384 + 123, [2], repeats=1, log=lambda msg: None)
    assert [r["variant"] for r in rows] == [
        "Gram: one GEMM",
        "Gram: blocked (kept)",
        "write-back: a @ buffer, fresh tensor",
        "write-back: mv into reused buffer (kept)",
    ]
    assert all(r["ms"] > 0 for r in rows)
    assert rows[1]["rel_error"] <= 1e-6
