"""Every gradient path's step on the ``meta`` device: no host read, no tensor left on another device.

A meta tensor has a shape and a dtype but no values. Every operation on it runs; any read of a value
(``.item()``, ``bool(t)``, ``.tolist()``, a copy to the host) raises, and so does mixing it with a CPU
tensor. A whole step on a model moved to ``meta`` therefore finishes only if (1) nothing in it reads a
value on the host (the step path is sync-free) and (2) every tensor it makes is put on the gradients'
device. On a CPU-only machine a forgotten ``device=`` is otherwise invisible; on an accelerator it is a
host-device copy, or an error. With ``nonfinite="ignore"`` the step must finish; with a checking policy
it stops at its one host read, the finiteness check of the finished direction (``test_optimizer.py``
covers what that check does).

Also on ``meta``: a step after the first copies nothing from the host; GradScaler's flags from a second
device are gathered on the direction's; the edit guard's flag is on the device asked for; weights given
as a ``meta`` tensor are refused as not real numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cagrad_clip import ConflictAverseOptimizer
from cagrad_clip._storage.base import GradGuard
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


class _HostToDevice(TorchDispatchMode):
    """Records every operation that reads a CPU tensor and returns a ``meta`` one: a host-to-device copy
    (on an accelerator, a transfer from host memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type == "meta" for t in outputs):
            self.copies.append(str(func))
        return out


def test_after_the_first_step_a_step_copies_nothing_from_the_host() -> None:
    """The normalised weights are copied to the parameters' device once (the first step); the second and
    third steps on ``meta`` parameters read no CPU tensor into a device one."""
    path = PATHS[0]
    model, x, y = _meta_model(path, torch.float32)
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=WEIGHTS[path.m], c=0.8, nonfinite="ignore")
    opt.zero_grad()
    opt.step(losses_of(model, x, y))
    for _ in range(2):
        with _HostToDevice() as mode:
            opt.zero_grad()
            opt.step(losses_of(model, x, y))
        assert mode.copies == []


def test_a_grad_scaler_flag_from_a_frozen_host_parameter_joins_the_others_on_the_device() -> None:
    """A frozen CPU parameter that still holds a ``.grad`` gives ``GradScaler`` a second device's Inf flag
    next to the ``meta`` parameters' one: the flags are gathered on the direction's device, so the step
    gets as far as its one host read of the verdict (which raises on ``meta``: ``NotImplementedError``),
    not to a ``torch.stack`` of tensors on two devices."""
    w = nn.Parameter(torch.ones(3, device="meta"))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    frozen.grad = torch.ones(2)
    opt = ConflictAverseOptimizer(torch.optim.SGD([w, frozen], lr=0.1), weights=[0.5, 0.5], nonfinite="ignore")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # the scale lives on the CPU, as when the scaler served CPU losses first
    opt.backward([scaler.scale((w * 2).sum()), scaler.scale((w * w).sum())], combine=False)
    with pytest.raises(NotImplementedError, match="meta"):
        scaler.step(opt)


def test_the_edited_flag_of_a_guard_over_no_grad_is_on_the_requested_device() -> None:
    """``GradGuard.edited`` returns a 0-d bool on the device it is given, also when no parameter has a
    ``.grad`` (its fingerprint, the empty one, is made on the CPU)."""
    params = [nn.Parameter(torch.ones(3, device="meta"))]
    guard = GradGuard()
    guard.record(params)
    guard.seal(params)
    flag = guard.edited(params, torch.device("meta"))
    assert flag.device == torch.device("meta") and flag.dtype == torch.bool and flag.shape == ()


def test_weights_given_as_a_meta_tensor_are_refused_as_not_real_numbers() -> None:
    """User weights are brought to the CPU to be checked: a ``meta`` tensor (no values to copy) is refused
    with the ``TypeError`` that names weights which are not real numbers."""
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="real numbers"):
        ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), weights=torch.ones(2, device="meta"))
