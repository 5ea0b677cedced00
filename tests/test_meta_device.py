"""Every gradient path's step on the ``meta`` device: no host read, no tensor left on another device.

A meta tensor has a shape and a dtype but no values. Every operation on it runs; any read of a value
(``.item()``, ``bool(t)``, ``.tolist()``, a copy to the host) raises, and so does mixing it with a CPU
tensor. A whole step on a model moved to ``meta`` therefore finishes only if (1) nothing in it reads a
value on the host (the step path is sync-free) and (2) every tensor it makes is put on the gradients'
device. On a CPU-only machine a forgotten ``device=`` is otherwise invisible; on an accelerator it is a
host-device copy, or an error. With ``nonfinite="ignore"`` the step must finish; with a checking policy
it stops at its one host read, the finiteness check of the finished direction (``test_optimizer.py``
covers what that check does).
"""

from __future__ import annotations

import pytest
import torch

from cagrad_clip import ConflictAverseOptimizer
from tests.contract.cases import MICRO, WEIGHTS, losses_of, make_data, make_model
from tests.contract.paths import PATHS, GradientPath, dtype_name

# every path the contract suite registers that runs in one process without a process group (FSDP2 needs one)
ONE_PROCESS = [path for path in PATHS if not path.fsdp and 1 in path.procs]
VARIANTS = ("step", "backward_then_step", "accumulate")


def _meta_model(path: GradientPath, dtype: torch.dtype):
    model = make_model(path.m, dtype, path.head_dtype(dtype)).to("meta")
    x, y = make_data(path.m, (dtype, path.head_dtype(dtype)))
    return model, x.to("meta"), y.to("meta")


def _refused(path: GradientPath, variant: str) -> bool:
    return variant == "accumulate" and "accumulate_combine_false" in path.refuses


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("path", ONE_PROCESS, ids=lambda p: p.name)
def test_a_step_on_meta_parameters_reads_nothing_on_the_host(path: GradientPath, dtype: torch.dtype, variant: str) -> None:
    if dtype not in path.dtypes:
        pytest.skip(f"the {path.name} path does not run {dtype_name(dtype)}")
    if _refused(path, variant):
        pytest.skip(f"the {path.name} path refuses accumulation over several backward calls (the contract suite checks that)")
    model, x, y = _meta_model(path, dtype)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ConflictAverseOptimizer(base, weights=WEIGHTS[path.m], c=0.8, nonfinite="ignore", **path.build(model))
    opt.zero_grad()
    if variant == "step":
        opt.step(losses_of(model, x, y))
    elif variant == "backward_then_step":
        opt.backward(losses_of(model, x, y))
        opt.step()
    else:
        half = x.shape[0] // MICRO
        for k in range(MICRO):
            rows = slice(k * half, (k + 1) * half)
            opt.backward([loss / MICRO for loss in losses_of(model, x[rows], y[rows])], combine=False)
        opt.step()
    assert opt.last is not None
    assert opt.last.coefficients.device.type == "meta"
    assert opt.last.coefficients.shape == (path.m,)
    for name, p in model.named_parameters():
        assert p.device.type == "meta", name
        assert p.grad is not None and p.grad.device.type == "meta", name


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_each_solver_runs_on_meta(solver: str) -> None:
    """The default path above solves with ``auto``; the two solvers it picks from, each forced."""
    path = PATHS[0]
    model, x, y = _meta_model(path, torch.float32)
    opt = ConflictAverseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), weights=WEIGHTS[path.m], c=0.8, solver=solver, nonfinite="ignore"
    )
    opt.step(losses_of(model, x, y))
    assert opt.last is not None and opt.last.coefficients.device.type == "meta"


def test_a_checking_policy_stops_at_its_one_host_read() -> None:
    """The default policy reads one flag on the host once the direction is formed: on meta that read
    raises, and it is the only one (the same step with ``nonfinite="ignore"`` finishes, above)."""
    path = PATHS[0]
    model, x, y = _meta_model(path, torch.float32)
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=WEIGHTS[path.m], c=0.8)
    with pytest.raises(RuntimeError, match="meta tensors"):
        opt.step(losses_of(model, x, y))
