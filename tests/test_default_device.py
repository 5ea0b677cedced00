"""Steps on CPU parameters while torch's default device is ``meta``: the paths the contract suite's
``default_device_elsewhere`` case does not take.

``meta`` stands in for ``torch.set_default_device("cuda")`` on a CPU machine: a tensor the optimizer
makes without naming the gradients' device lands on ``meta``, and mixing it with the CPU gradients (or
copying it back) raises. On an accelerator the same slip is a host-device copy, invisible on CPU
otherwise. Each test checks the step against plain autograd and the scipy reference of the dual.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cagrad_clip import AutogramEngine, ConflictAverseOptimizer
from tests.reference import reference_coefficients

F64 = torch.float64
C = 0.5
LR = 0.1


def _torchjd_missing() -> bool:
    try:
        import torchjd.autogram  # noqa: F401
    except ImportError:
        return True
    return False


def _gradients(losses: list[torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
    """``(m, D)``: each loss's float64 gradient over ``params``, flattened (plain autograd)."""
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    return torch.stack(rows)


@pytest.mark.skipif(_torchjd_missing(), reason="torchjd (autogram) is not installed")
def test_the_autogram_routes_exact_pass_runs_under_a_meta_default_device() -> None:
    """A float64 ``Linear(3, 2)`` also in an L2 penalty (which takes it out of TorchJD's pass into the
    exact pass), three objectives, ``memory="low"`` with an ``AutogramEngine``, stepped under a ``meta``
    default device: the Gram is the plain autograd Gram and the step is ``p - lr sum_i a_i g_i`` with
    ``a`` the scipy reference coefficients, all on the CPU."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    params = list(lin.parameters())
    weights = [1.0, 2.0, 1.0]

    def losses() -> list[torch.Tensor]:
        out = lin(x)
        penalty = sum(p.pow(2).sum() for p in params)
        return [out[:, 0].sum() + penalty, out[:, 1].pow(2).sum() - 2 * penalty, 2 * out.sum() + 3 * penalty]

    grads = _gradients(losses(), params)
    gram = (grads @ grads.T).numpy()
    a = reference_coefficients(gram, np.asarray(weights) / sum(weights), C)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    expected = flat - LR * (torch.tensor(a) @ grads)

    engine = AutogramEngine(lin)
    try:
        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=LR), weights=weights, c=C, memory="low", engine=engine, shared=params)
        batch = losses()
        with torch.device("meta"):
            opt.step(batch)
    finally:
        engine.close()
    assert opt.last is not None and opt.last.gram.device == torch.device("cpu")
    np.testing.assert_allclose(opt.last.gram.numpy(), gram, rtol=1e-12, atol=1e-12)
    after = torch.cat([p.detach().reshape(-1) for p in params])
    np.testing.assert_allclose(after.numpy(), expected.numpy(), rtol=1e-9, atol=1e-12)


def test_a_window_continued_after_a_failed_combination_accumulates_under_a_meta_default_device() -> None:
    """``solver="exact"`` refuses ``m = 13`` objectives when it combines, after the window holds the first
    micro-batch; a further ``backward(..., combine=False)`` under a ``meta`` default device continues that
    window, and with ``c = 0`` (``solver="frank_wolfe"``) the step is the weighted sum of both micro-batches'
    gradients: objective ``k`` (weight ``1/13``) is ``(k + 1) sum(p)``, so ``d = 2 * 7 = 14`` per element."""
    m = 13
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=LR), solver="exact", c=C)

    def losses() -> list[torch.Tensor]:
        return [(k + 1) * p.sum() for k in range(m)]

    with pytest.raises(ValueError, match="limited to m <= 12"):
        opt.backward(losses())
    batch = losses()
    with torch.device("meta"):
        opt.backward(batch, combine=False)
    opt.configure(c=0.0, solver="frank_wolfe")
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 2.0, 3.0], dtype=F64) - LR * 14.0, rtol=1e-12, atol=1e-12)
