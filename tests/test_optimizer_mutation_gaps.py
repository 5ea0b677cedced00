"""Behaviours of the optimizer core that surviving mutants showed no test pinned.

Each test names what a user relies on and checks it against an independent reference: a hand
computation, plain torch autograd, or the documented type and device of a value.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from cagrad_clip import CAGradSettings, ConflictAverseOptimizer
from cagrad_clip._torch_version import torch_at_least
from tests.process_groups import fsdp2_missing, one_rank_group


# ----------------------------------------------------------------------------------- default device
def test_settings_made_under_another_default_device_keep_their_weights_on_the_host() -> None:
    """The normalised weights are float64 on the CPU (documented), also when the user has set torch's
    default device elsewhere (``torch.set_default_device("cuda")``; ``meta`` stands in for it on a CPU
    machine: a value on ``meta`` cannot be read)."""
    with torch.device("meta"):
        given = CAGradSettings(weights=[1.0, 3.0])
        given_tensor = given.weights_tensor(2)
        uniform_tensor = CAGradSettings().weights_tensor(4)
    assert given.weights == (0.25, 0.75)
    for tensor, expected in ((given_tensor, [0.25, 0.75]), (uniform_tensor, [0.25] * 4)):
        assert tensor.device == torch.device("cpu")
        assert tensor.dtype == torch.float64
        assert tensor.tolist() == expected


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]], ids=["uniform", "given"])
def test_an_optimizer_built_and_stepped_under_another_default_device_takes_the_weighted_step(weights: list[float] | None) -> None:
    """Built and stepped with torch's default device on ``meta`` (parameters on the CPU): with ``c = 0``
    the direction is the weighted-sum gradient ``sum_i w_i g_i``, computed here by plain autograd."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    a = torch.randn(5, dtype=torch.float64)

    def losses() -> list[torch.Tensor]:
        return [(p * a).sum() ** 2, (p - 1.0).pow(2).sum()]

    w = [0.5, 0.5] if weights is None else [0.25, 0.75]
    expected = p.detach() - 0.1 * torch.autograd.grad(w[0] * losses()[0] + w[1] * losses()[1], p)[0]
    with torch.device("meta"):
        opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), weights=weights, c=0.0)
        opt.step(losses())
    assert p.device == torch.device("cpu")
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- settings
def test_one_objective_is_a_valid_weighting() -> None:
    """``m >= 1``: a single weight is accepted and normalised to 1."""
    assert CAGradSettings(weights=[5.0]).weights == (1.0,)
    assert CAGradSettings(weights=torch.tensor([2.0])).weights == (1.0,)


def test_max_iter_is_stored_as_a_python_int_so_a_checkpoint_loads_with_weights_only() -> None:
    """An integral ``max_iter`` of another type (a NumPy integer) is stored as a plain ``int``: the
    ``state_dict`` then loads with ``torch.load(weights_only=True)`` (which refuses NumPy scalars)."""
    assert type(CAGradSettings(max_iter=np.int64(7)).max_iter) is int
    p = torch.nn.Parameter(torch.ones(2))
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), weights=[0.5, 0.5], max_iter=np.int64(7))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded[ConflictAverseOptimizer.STATE_KEY]["max_iter"] == 7


# ----------------------------------------------------------------------------------- torch version gates
@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.9.0", True), ("2.9.0a0+git3bcc3cd", True), ("2.9.1+cu126", True), ("2.10.0", True), ("2.8.1", False), ("1.13.0", False)],
)
def test_a_feature_gate_opens_at_its_own_release(monkeypatch: pytest.MonkeyPatch, version: str, expected: bool) -> None:
    """``torch_at_least((2, 9))`` is true from 2.9 on, its pre-releases included, and false before."""
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_at_least((2, 9)) is expected


# ----------------------------------------------------------------------------------- diagnostics
def test_the_cosines_of_an_objective_whose_gradient_is_zero_are_zero() -> None:
    """``last.cosines`` is the Gram normalised by the gradients' norms, 0 for a zero gradient (not 0/0):
    objective 2's loss does not depend on the parameter's values, so its gradient is exactly zero."""
    p = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    a, b = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), c=0.4)
    opt.step([(p * a).sum(), (p * b).sum(), (p * 0.0).sum()])
    assert opt.last is not None
    cos_ab = float(a @ b) / (float(a.norm()) * float(b.norm()))
    expected = torch.tensor([[1.0, cos_ab, 0.0], [cos_ab, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(opt.last.cosines.double(), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "fake",
    [SimpleNamespace(unscale_=lambda optimizer: None), SimpleNamespace(_per_optimizer_states={})],
    ids=["unscale_-only", "states-only"],
)
def test_half_a_grad_scaler_is_refused_before_anything_changes(fake: SimpleNamespace) -> None:
    """``grad_scaler=`` must be a ``GradScaler`` (its per-optimizer states and ``unscale_`` both): an
    object with only one of them is refused with ``TypeError`` and the window is kept for ``step()``."""
    p = nn.Parameter(torch.ones(2))
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=1.0), weights=[0.5, 0.5], c=0.0)
    opt.backward([p.sum(), (p * p).sum()], combine=False)
    with pytest.raises(TypeError, match=r"scaler\.step\(opt\)"):
        opt.step(grad_scaler=fake)
    assert torch.equal(p.detach(), torch.ones(2))
    opt.step()  # c = 0: the weighted sum 0.5 * (1 + 2 p) = 1.5 per entry, lr 1
    assert torch.equal(p.detach(), torch.full((2,), -0.5))


def test_memory_low_refuses_an_engine_that_is_not_an_autogram_engine() -> None:
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="engine= is an AutogramEngine"):
        ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), memory="low", engine=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_memory_low_refuses_an_accumulate_dtype(dtype: torch.dtype) -> None:
    """``memory="low"`` keeps no per-objective gradients: an ``accumulate_dtype`` is refused, not ignored."""
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="accumulate_dtype does not apply"):
        ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), memory="low", accumulate_dtype=dtype)


@pytest.mark.skipif(fsdp2_missing() is not None, reason=str(fsdp2_missing()))
def test_dtensor_parameters_refuse_distributed_false_and_a_process_group_at_construction() -> None:
    """DTensor shards (FSDP2) are averaged over their mesh's group: ``distributed=False`` and a
    ``process_group=`` are both refused when the optimizer is built (a 1-rank gloo group and mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        w = nn.Parameter(distribute_tensor(torch.ones(4, dtype=torch.float64), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="distributed=False"):
            ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), distributed=False)
        with pytest.raises(ValueError, match="drop process_group"):
            ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1), process_group=dist.group.WORLD)
        ConflictAverseOptimizer(torch.optim.SGD([w], lr=0.1))  # the default is accepted


def _two_objective_step_parts() -> tuple[torch.nn.Parameter, list[torch.Tensor]]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    return p, [(p * torch.tensor([1.0, 0.0])).sum(), (p * torch.tensor([0.0, 1.0])).sum()]


@pytest.mark.parametrize("combine", [True, False])
def test_unscale_before_the_windows_backward_is_refused_like_torch_before_anything_moves(combine: bool) -> None:
    """``scaler.unscale_(opt)`` while no ``.grad`` exists records no inf check, and the direction the
    backward then writes is never unscaled: torch's own optimizers refuse that ``scaler.step`` ("No inf
    checks were recorded"). A combined window meets the scaler's own check; an uncombined one reaches
    the wrapper's (the scaler hands itself to ``step``), which refuses too. The parameters stay put."""
    p, losses = _two_objective_step_parts()
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), c=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.zero_grad()
    scaled = [scaler.scale(loss) for loss in losses]
    scaler.unscale_(opt)  # too early: no .grad yet
    opt.backward(scaled, combine=combine)
    before = p.detach().clone()
    with pytest.raises(RuntimeError if not combine else AssertionError, match="(?i)no inf checks"):
        scaler.step(opt)
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("weights", [torch.tensor([True, False]), [True, False], [[True, False]]], ids=["tensor", "list", "nested"])
def test_boolean_weights_are_refused_by_the_optimizer_configure_and_the_settings(weights: object) -> None:
    """``True``/``False`` are not weights (a mask given by mistake): every entry point refuses them."""
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="weights"):
        ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), weights=weights)
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(TypeError, match="weights"):
        opt.configure(weights=weights)
    assert opt.settings.weights is None
    with pytest.raises(TypeError, match="weights"):
        CAGradSettings(weights=weights)


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_a_bad_process_group_is_refused_at_construction() -> None:
    """``process_group=`` must be a ``ProcessGroup``, and only with ``distributed=True``: both are refused
    when the optimizer is built, not at the first step."""
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup, got str"):
        ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), process_group="world")
    group = dist.ProcessGroup(0, 1)
    with pytest.raises(ValueError, match="process_group was given but distributed=False"):
        ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), distributed=False, process_group=group)
