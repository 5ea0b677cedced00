"""The clip's diagnostics on every solve: how much RACO's clip p~ = min(p, w) changes the direction,
against the independent scipy reference, and whether it was active."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cagrad_clip import ConflictAverseOptimizer, solve_cagrad
from tests.reference import reference_coefficients


def _gram(rng: np.random.Generator, m: int) -> np.ndarray:
    G = rng.standard_normal((m + 3, m)) * rng.uniform(0.2, 5.0, size=m)  # full column rank: a unique dual
    return G.T @ G


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_clip_change_is_the_distance_between_the_clipped_and_unclipped_directions_of_the_reference(m, c):
    rng = np.random.default_rng(10 * m + int(10 * c))
    seen_active = 0
    for _ in range(40):
        H, w = _gram(rng, m), rng.dirichlet(np.ones(m) * 0.7)
        delta = reference_coefficients(H, w, c, clip=True) - reference_coefficients(H, w, c, clip=False)
        expected = math.sqrt(max(delta @ H @ delta, 0.0)) / math.sqrt(w @ H @ w)
        for clip in (True, False):
            sol = solve_cagrad(torch.tensor(H), torch.tensor(w), c=c, clip=clip)
            assert float(sol.clip_change) == pytest.approx(expected, rel=1e-5, abs=1e-7)
            assert bool(sol.clip_active) == (clip and expected > 1e-5)  # well clear of the rounding threshold here
        seen_active += expected > 1e-5
    assert 0 < seen_active < 40  # the sample has both active and inert clips


def test_the_clip_acts_in_the_band_of_gradient_norm_ratios_near_the_weight_ratio():
    """w = (0.9, 0.1), c = 0.4, cos = -0.99: at a norm ratio of 1 the dual sits at a corner and the clip is
    inert; near w_heavy / w_light = 9 it changes the direction."""
    w, c, cos = torch.tensor([0.9, 0.1], dtype=torch.float64), 0.4, -0.99

    def gram(ratio: float) -> torch.Tensor:
        return torch.tensor([[1.0, cos * ratio], [cos * ratio, ratio**2]], dtype=torch.float64)

    inert = solve_cagrad(gram(1.0), w, c=c)
    assert not bool(inert.clip_active) and float(inert.clip_change) == 0.0
    active = solve_cagrad(gram(9.0), w, c=c)
    assert bool(active.clip_active) and float(active.clip_change) > 1e-3
    assert not bool(solve_cagrad(gram(9.0), w, c=c, clip=False).clip_active)  # off: never active, the change is still told
    assert float(solve_cagrad(gram(9.0), w, c=c, clip=False).clip_change) == pytest.approx(float(active.clip_change))


def test_rescale_scales_the_change_with_the_direction():
    H, w = torch.tensor([[1.0, -8.9], [-8.9, 81.0]], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    plain, rescaled = solve_cagrad(H, w, c=0.4), solve_cagrad(H, w, c=0.4, rescale="1+c")
    assert float(rescaled.clip_change) == pytest.approx(float(plain.clip_change) / 1.4, rel=1e-12)


def test_a_batch_and_a_non_finite_gram():
    H = torch.tensor([[[1.0, -8.9], [-8.9, 81.0]], [[1.0, 0.0], [0.0, float("nan")]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    sol = solve_cagrad(H, torch.tensor([0.9, 0.1], dtype=torch.float64), c=0.4)
    assert sol.clip_change.shape == (3,) and sol.clip_active.dtype == torch.bool
    assert bool(sol.clip_active[0]) and math.isnan(float(sol.clip_change[1])) and not bool(sol.clip_active[1])
    assert float(sol.clip_change[2]) == 0.0 and not bool(sol.clip_active[2])  # g0 = 0: nothing to change


def test_the_optimizer_reports_the_clip_of_its_last_step():
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = ConflictAverseOptimizer(torch.optim.SGD([x], lr=0.1), weights=[0.9, 0.1], c=0.4)
    opt.step([(x[0] - x[1]) ** 2, 40.5 * (x[0] + 0.99 * x[1]) ** 2])
    last = opt.last
    again = solve_cagrad(last.gram, last.weights, c=0.4)
    assert last.clip_change.dim() == 0 and last.clip_change.device == x.device
    assert torch.equal(last.clip_change, again.clip_change) and torch.equal(last.clip_active, again.clip_active)
