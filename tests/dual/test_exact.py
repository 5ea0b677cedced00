"""The exact solver (``cagrad_clip._dual.exact``): support enumeration against independent references."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch

from cagrad_clip._dual.exact import face_frame, solve_by_supports
from tests.dual.helpers import check_against_reference, random_gradients
from tests.reference import dual_value, problem_data


@pytest.mark.parametrize("m", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("dim_kind", ["rank1", "deficient", "square", "tall"])
def test_matches_reference(m: int, dim_kind: str) -> None:
    check_against_reference("exact", m, dim_kind, n=2)


@pytest.mark.parametrize(("m", "max_support"), [(3, 3), (5, 2), (6, 6), (13, 1)])
def test_face_frame_lists_every_face_once(m: int, max_support: int) -> None:
    frame = face_frame(m, max_support, torch.device("cpu"), torch.float64)
    k = min(m, max_support)
    expected = {face for size in range(1, k + 1) for face in combinations(range(m), size)}
    got = {tuple(int(v) for v, on in zip(row, mask) if on) for row, mask in zip(frame.vertices.tolist(), frame.support.tolist())}
    assert got == expected and frame.vertices.shape == (len(expected), k)


def test_small_faces_give_the_best_vertex_and_edge() -> None:
    """``max_support = 1``: the best vertex by ``F(e_j) = b_j + s sqrt(H_jj)``; ``max_support = 2``: no
    worse than the best of a fine grid on every edge (both computed here in numpy)."""
    rng = np.random.default_rng(12)
    for _ in range(5):
        m = 5
        G = random_gradients(rng, m, 3)
        H = G.T @ G
        w = rng.dirichlet(np.ones(m))
        Hs, b, s = problem_data(H, w, 0.6)
        Hn = torch.tensor(Hs / Hs.diagonal().max())
        bn, sn = torch.tensor(b / Hs.diagonal().max()), torch.tensor(s / np.sqrt(Hs.diagonal().max()))
        p1, _, _, _ = solve_by_supports(Hn, bn, sn, 1)
        vertex_values = [dual_value(Hs, b, s, np.eye(m)[j]) for j in range(m)]
        assert int(p1.argmax()) == int(np.argmin(vertex_values)) and float(p1.max()) == 1.0
        p2, _, _, _ = solve_by_supports(Hn, bn, sn, 2)
        t = np.linspace(0.0, 1.0, 2001)
        grid = min(dual_value(Hs, b, s, tt * np.eye(m)[i] + (1 - tt) * np.eye(m)[j]) for i, j in combinations(range(m), 2) for tt in t)
        assert dual_value(Hs, b, s, p2.numpy()) <= grid + 1e-12 * Hs.diagonal().max()
