"""The solver on a ``meta`` Gram: no host read, and host-side weights moved to the Gram's device.

A meta tensor has no values: reading one on the host raises, and so does mixing it with a CPU tensor.
A solve that finishes on a meta Gram therefore never syncs, and puts everything it makes (and the
weights it is given on the host) on the Gram's device. On a CPU-only machine that is how a test sees
a placement only an accelerator would otherwise show.
"""

from __future__ import annotations

import pytest
import torch

from cagrad_clip import CAGradSettings, solve_cagrad
from cagrad_clip._dual.api import solve_with_settings

HOST_WEIGHTS = {"none": None, "list": [0.7, 0.3, 0.2], "tensor": torch.tensor([0.7, 0.3, 0.2])}


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("weights", list(HOST_WEIGHTS), ids=str)
@pytest.mark.parametrize("batch", [(), (4,)], ids=["one", "batch"])
def test_solve_cagrad_on_a_meta_gram_stays_on_meta(weights: str, validate: bool, solver: str, batch: tuple[int, ...]) -> None:
    gram = torch.empty(*batch, 3, 3, device="meta")
    solution = solve_cagrad(gram, HOST_WEIGHTS[weights], c=0.5, solver=solver, validate=validate)
    for name, value in solution._asdict().items():
        assert value.device.type == "meta", name
    assert solution.coefficients.shape == (*batch, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_hot_path_solve_moves_host_weights_to_the_grams_device(dtype: torch.dtype) -> None:
    gram = torch.empty(2, 2, device="meta", dtype=dtype)
    solution = solve_with_settings(gram, torch.tensor([0.6, 0.4], dtype=torch.float64), CAGradSettings(c=0.5))
    assert solution.coefficients.device.type == "meta"
    assert solution.coefficients.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
