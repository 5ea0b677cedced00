"""The public solvers on a CPU Gram while torch's default device is elsewhere (``meta`` stands in for
``torch.set_default_device("cuda")`` on a CPU machine).

Every tensor a solve makes must be put on the Gram's device. One made on the default device lands on
``meta``; mixing it with the CPU Gram, or copying it back, raises. On an accelerator the same slip is a
host-device copy per solve, invisible on CPU otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cagrad_clip import combination_coefficients, solve_cagrad
from tests.dual.helpers import random_gradients
from tests.reference import reference_coefficients


@pytest.mark.parametrize("solver", ["auto", "exact", "frank_wolfe"])
@pytest.mark.parametrize("m", [2, 3])
def test_uniform_weights_are_made_on_the_grams_device(solver: str, m: int) -> None:
    """``weights=None`` (uniform) on a CPU Gram under a ``meta`` default device: the coefficients are on
    the CPU and match the scipy reference for ``w = 1/m``."""
    rng = np.random.default_rng(5 + m)
    G = random_gradients(rng, m, 6)
    H = G.T @ G
    gram = torch.tensor(H)
    with torch.device("meta"):
        coefficients = solve_cagrad(gram, None, c=0.5, solver=solver).coefficients
    assert coefficients.device == torch.device("cpu")
    expected = reference_coefficients(H, np.full(m, 1.0 / m), 0.5)
    np.testing.assert_allclose(coefficients.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_a_batch_of_grams_with_uniform_weights_stays_on_the_grams_device() -> None:
    """A batch of two CPU Grams, ``weights=None``, under a ``meta`` default device: each problem's
    coefficients are its own scipy reference solution, on the CPU."""
    rng = np.random.default_rng(11)
    grads = [random_gradients(rng, 3, 5) for _ in range(2)]
    grams = np.stack([G.T @ G for G in grads])
    gram = torch.tensor(grams)
    with torch.device("meta"):
        coefficients = combination_coefficients(gram, c=0.4)
    assert coefficients.device == torch.device("cpu") and coefficients.shape == (2, 3)
    for k in range(2):
        expected = reference_coefficients(grams[k], np.full(3, 1.0 / 3), 0.4)
        np.testing.assert_allclose(coefficients[k].numpy(), expected, rtol=1e-6, atol=1e-9)
