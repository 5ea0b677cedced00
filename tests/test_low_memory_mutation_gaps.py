"""Behaviours of ``cagrad_clip._low_memory`` that surviving mutants showed no test pinned down.

Each test compares against a hand computation on small exact inputs (integers, a closed form), never
against another call of the library that the same mutant would change.
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cagrad_clip import _low_memory as low_memory
from cagrad_clip._low_memory import AutogramEngine, gram_of_rows, low_memory_backward
from cagrad_clip._settings import CAGradSettings

needs_torchjd = pytest.mark.skipif(importlib.util.find_spec("torchjd") is None, reason="needs torchjd (the autogram route)")


class _NoGradForSecondInput(torch.autograd.Function):
    """``x`` unchanged; its backward gives ``leaf`` no gradient (``None``), though the graph reaches it."""

    @staticmethod
    def forward(ctx: object, x: Tensor, leaf: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


@pytest.mark.parametrize("gated_first", [True, False])
def test_hooks_route_gives_every_leaf_outside_params_its_sum_when_another_gets_none_from_the_second_objective(
    gated_first: bool,
) -> None:
    """Two trainable leaves outside ``params``: ``a`` is reached by the second objective only through a
    function that gives it no gradient (autograd's ``None``), ``b`` only by the second objective. Each
    gets ``sum_i dL_i/dx``: ``a`` keeps ``dL_1/da = s``, ``b`` (``.grad`` None on entry) gets ``dL_2/db = s``,
    whatever order the graph lists them in (both orders of the sum are taken)."""
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    a = nn.Parameter(torch.tensor([3.0, 5.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([7.0, 11.0], dtype=torch.float64))
    gated, product = _NoGradForSecondInput.apply(s, a), s * b
    losses = [(s * a).sum(), (gated + product if gated_first else product + gated).sum()]
    settings = CAGradSettings()
    low_memory_backward(losses, [s], 1, settings.weights_tensor(2), settings, route="hooks")
    assert a.grad is not None and b.grad is not None, "a leaf outside params reached by an objective got no gradient"
    assert torch.equal(a.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(b.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_hooks_route_reduces_bf16_gradients_of_parameters_one_objective_misses_in_float32() -> None:
    """bf16 shared parameters each reached by one objective only (``q`` by the first, ``p`` by the
    second), each gradient 257 ones: the Gram is ``diag(257, 257)`` exactly in float32, where a bf16
    reduction would give 256 (bf16 has 8 significant bits)."""
    p = nn.Parameter(torch.zeros(257, dtype=torch.bfloat16))
    q = nn.Parameter(torch.zeros(257, dtype=torch.bfloat16))
    losses = [q.float().sum(), p.float().sum()]
    settings = CAGradSettings()
    result = low_memory_backward(losses, [q, p], 2, settings.weights_tensor(2), settings, route="hooks")
    assert result.gram.dtype == torch.float32
    assert torch.equal(result.gram, torch.tensor([[257.0, 0.0], [0.0, 257.0]]))


def test_hooks_route_frees_the_graph_with_its_last_backward_for_one_objective() -> None:
    """With one objective, the one backward pass is the last: it frees the graph (its saved tensors), so
    a second backward through the loss fails as after a plain ``loss.backward()``."""
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    loss = (s * s).sum()
    settings = CAGradSettings()
    low_memory_backward([loss], [s], 1, settings.weights_tensor(1), settings, route="hooks")
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def _two_rank_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.distributed`` initialised with 2 ranks, as far as the low-memory mode asks."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)


def _orthogonal_case() -> tuple[list[Tensor], nn.Parameter]:
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    return [(s * torch.tensor([3.0, 0.0], dtype=torch.float64)).sum(), (s * torch.tensor([0.0, 4.0], dtype=torch.float64)).sum()], s


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_low_memory_backward_refuses_several_ranks_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.distributed`` with several ranks the default (``distributed=True``, and ``True`` passed)
    asks for gradients averaged across ranks, which the low-memory mode cannot give: refused, ``.grad`` untouched."""
    _two_rank_world(monkeypatch)
    settings = CAGradSettings()
    for kwargs in ({}, {"distributed": True}):
        losses, s = _orthogonal_case()
        with pytest.raises(NotImplementedError, match="distributed=False"):
            low_memory_backward(losses, [s], 1, settings.weights_tensor(2), settings, **kwargs)
        assert s.grad is None


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_low_memory_backward_with_distributed_false_combines_each_ranks_own_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """``distributed=False`` under several ranks: no refusal; the Gram is this rank's own (``g_1 = (3, 0)``,
    ``g_2 = (0, 4)``: ``diag(9, 16)``) and ``.grad = a_1 g_1 + a_2 g_2``."""
    _two_rank_world(monkeypatch)
    settings = CAGradSettings()
    losses, s = _orthogonal_case()
    result = low_memory_backward(losses, [s], 1, settings.weights_tensor(2), settings, distributed=False)
    assert torch.equal(result.gram, torch.tensor([[9.0, 0.0], [0.0, 16.0]], dtype=torch.float64))
    a = result.solution.coefficients.double()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, torch.stack([3.0 * a[0], 4.0 * a[1]]), rtol=1e-15, atol=0.0)


# --------------------------------------------------------------------------- gram_of_rows (public)
def test_gram_of_rows_adds_every_upcast_chunk_of_half_precision_rows() -> None:
    """bf16 rows longer than ``UPCAST_CHUNK`` are upcast and reduced chunk by chunk; every chunk counts once:
    rows of ``UPCAST_CHUNK + 3`` ones and minus ones give ``n * [[1, -1], [-1, 1]]`` exactly (``n < 2**24``)."""
    n = low_memory.UPCAST_CHUNK + 3
    rows = [torch.ones(n, dtype=torch.bfloat16), -torch.ones(n, dtype=torch.bfloat16)]
    gram = gram_of_rows(rows, torch.float32)
    assert torch.equal(gram, torch.tensor([[n, -n], [-n, n]], dtype=torch.float32))


def test_gram_of_rows_upcasts_half_precision_at_most_upcast_chunk_elements_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented bound on the transient: a half-precision row is upcast in pieces of at most
    ``UPCAST_CHUNK`` elements (here patched to 8, rows of 20 integers), and the Gram stays exact."""
    monkeypatch.setattr(low_memory, "UPCAST_CHUNK", 8)
    seen: list[tuple[int, torch.dtype]] = []
    real = low_memory.blocked_dot

    def spy(x: Tensor, y: Tensor) -> Tensor:
        seen.append((x.numel(), x.dtype))
        return real(x, y)

    monkeypatch.setattr(low_memory, "blocked_dot", spy)
    ints = torch.arange(40).reshape(2, 20) % 7 - 3
    gram = gram_of_rows(list(ints.to(torch.bfloat16)), torch.float32)
    assert torch.equal(gram, (ints @ ints.T).to(torch.float32))
    assert seen and all(numel <= 8 and dtype == torch.float32 for numel, dtype in seen), seen


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_of_rows_of_empty_rows_is_a_k_by_k_zero_gram_in_dtype(k: int, dtype: torch.dtype) -> None:
    """Empty rows (a parameter with no elements) give the ``(k, k)`` zero Gram in the requested dtype."""
    gram = gram_of_rows([torch.empty(0, dtype=dtype) for _ in range(k)], dtype)
    assert gram.dtype == dtype and torch.equal(gram, torch.zeros((k, k), dtype=dtype))


def test_gram_of_rows_of_empty_rows_is_on_the_rows_device() -> None:
    """The zero Gram of empty rows is made on the rows' device (``meta`` here stands for an accelerator)."""
    gram = gram_of_rows([torch.empty(0, device="meta") for _ in range(2)], torch.float32)
    assert gram.device.type == "meta" and gram.shape == (2, 2)


# --------------------------------------------------------------------------- AutogramEngine
@needs_torchjd
@pytest.mark.parametrize("modules", [(), (torch.zeros(1),)], ids=["none", "a_tensor"])
def test_autogram_engine_refuses_anything_but_modules_with_a_type_error(modules: tuple) -> None:
    with pytest.raises(TypeError):
        AutogramEngine(*modules)


@needs_torchjd
def test_autogram_engine_names_both_modules_holding_a_tied_weight() -> None:
    """Tied weights across two modules given to the engine: the refusal names them ``modules[0]`` and ``modules[1]``."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError) as error:
        AutogramEngine(a, b)
    assert "'modules[0]' and 'modules[1]'" in str(error.value), str(error.value)


@needs_torchjd
def test_autogram_engine_covers_the_trainable_parameters_after_a_frozen_one() -> None:
    """A module whose first parameter is frozen: the engine's Gram covers the trainable ones that follow."""
    lin = nn.Linear(3, 2)
    lin.weight.requires_grad_(False)
    engine = AutogramEngine(lin)
    try:
        assert [id(p) for p in engine.params] == [id(lin.bias)]
    finally:
        engine.close()


@needs_torchjd
def test_autogram_engine_refuses_a_torchjd_without_per_module_gram_computers_with_our_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TorchJD engine with no ``_gramian_computers``: our ``ValueError`` (use torchjd 0.18), not an internal error."""

    class Moved:
        def __init__(self, *modules: nn.Module, gram_dtype: torch.dtype) -> None:
            pass

    monkeypatch.setattr(low_memory, "_engine_class", lambda: Moved)
    with pytest.raises(ValueError, match="torchjd 0.18"):
        AutogramEngine(nn.Linear(2, 2))


def _bf16_ones_case(irregular: bool) -> tuple[AutogramEngine, list[Tensor], nn.Linear]:
    """A bf16 ``Linear(257, 1)`` of zero weight on an input of ones: each loss's gradient is 257 (minus) ones.
    ``irregular`` adds an L2 penalty (zero gradient at zero weight) that takes the module to an exact pass."""
    lin = nn.Linear(257, 1, bias=False).to(torch.bfloat16)
    nn.init.zeros_(lin.weight)
    engine = AutogramEngine(lin)
    out = lin(torch.ones(1, 257, dtype=torch.bfloat16)).float().sum()
    penalty = lin.weight.float().pow(2).sum() if irregular else torch.zeros(())
    return engine, [out + penalty, -out + penalty], lin


@needs_torchjd
@pytest.mark.parametrize("irregular", [False, True], ids=["torchjd_pass", "exact_pass"])
def test_autogram_reduces_bf16_jacobians_in_float32(irregular: bool) -> None:
    """The autogram route's Gram of bf16 parameters is reduced in float32 in TorchJD's pass and in the exact
    pass alike: ``257 * [[1, -1], [-1, 1]]`` exactly, where a bf16 reduction gives 256."""
    engine, losses, lin = _bf16_ones_case(irregular)
    settings = CAGradSettings()
    try:
        result = low_memory_backward(losses, [lin.weight], 1, settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
    assert result.route == "autogram"
    assert torch.equal(result.gram, torch.tensor([[257.0, -257.0], [-257.0, 257.0]]))


@needs_torchjd
def test_autogram_gramian_of_losses_reaching_no_engine_module_is_zero_in_the_engine_dtype() -> None:
    """``gramian`` of losses that reach none of the engine's (float64) modules: the zero ``(m, m)`` Gram, float64."""
    engine = AutogramEngine(nn.Linear(2, 1).double())
    other = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    try:
        gram = engine.gramian(torch.stack([(other * 2).sum(), (other * 3).sum()]))
    finally:
        engine.close()
    assert gram.dtype == torch.float64 and torch.equal(gram, torch.zeros((2, 2), dtype=torch.float64))


def _four_penalised_modules() -> tuple[list[nn.Linear], AutogramEngine, list[Tensor]]:
    """Modules of 10, 6, 4 and 4 parameters, each also in an L2 penalty (so each needs an exact pass)."""
    torch.manual_seed(0)
    modules = [nn.Linear(4, 2), nn.Linear(2, 2), nn.Linear(3, 1), nn.Linear(3, 1)]
    modules = [mod.double() for mod in modules]
    engine = AutogramEngine(*modules)
    out = sum(mod(torch.randn(5, mod.in_features, dtype=torch.float64)).sum() for mod in modules)
    penalty = sum(p.pow(2).sum() for mod in modules for p in mod.parameters())
    return modules, engine, [out + penalty, 2 * out - 3 * penalty]


def _reference_gram(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    stacked = torch.stack(rows)
    return stacked @ stacked.T


@needs_torchjd
def test_autogram_exact_passes_pack_modules_first_fit_decreasing_up_to_the_largest_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact passes hold at most the largest hooked module's parameter count (10) each, packed first-fit
    in decreasing size: 10 | 6 + 4 (exactly full) | 4, three passes; the Gram is the plain float64 Gram."""
    modules, engine, losses = _four_penalised_modules()
    params = [p for mod in modules for p in mod.parameters()]
    expected = _reference_gram(losses, params)
    passes: list[int] = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        if kwargs.get("is_grads_batched"):
            passes.append(sum(p.numel() for p in inputs))
        return real(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    settings = CAGradSettings()
    try:
        result = low_memory_backward(losses, params, len(params), settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
    assert passes == [10, 10, 4]
    torch.testing.assert_close(result.gram, expected, rtol=1e-12, atol=0.0)


@needs_torchjd
@pytest.mark.parametrize("moved", ["no_target_edges", "no_edge_set"])
def test_autogram_with_a_torchjd_without_edge_registry_takes_every_module_exactly(moved: str) -> None:
    """A TorchJD whose edge registry moved (no ``_target_edges``, or one without ``_edges``): no module can be
    matched to TorchJD's pass, so every module gets an exact pass, and the Gram is the plain float64 Gram."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = AutogramEngine(trunk)
    z = trunk(torch.randn(6, 3, dtype=torch.float64))
    losses = [z[:, 0].pow(2).mean(), z[:, 1].sin().mean()]
    params = list(trunk.parameters())
    expected = _reference_gram(losses, params)
    if moved == "no_target_edges":
        del engine._engine._target_edges
    else:
        engine._engine._target_edges = types.SimpleNamespace(reset=lambda: None)
    settings = CAGradSettings()
    try:
        result = low_memory_backward(losses, params, len(params), settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
    torch.testing.assert_close(result.gram, expected, rtol=1e-12, atol=0.0)


def _trunk_case() -> tuple[nn.Sequential, AutogramEngine, list[Tensor]]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = AutogramEngine(trunk)
    z = trunk(torch.randn(6, 3, dtype=torch.float64))
    return trunk, engine, [z[:, 0].pow(2).mean(), z[:, 1].sin().mean()]


def _engine_step_error(trunk: nn.Module, engine: AutogramEngine, losses: list[Tensor]) -> ValueError:
    """The ``ValueError`` the autogram route raises on ``losses`` (the engine closed afterwards)."""
    params = list(trunk.parameters())
    settings = CAGradSettings()
    try:
        with pytest.raises(ValueError) as error:
            low_memory_backward(losses, params, len(params), settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
    return error.value


@needs_torchjd
@pytest.mark.parametrize("message", ["Some modules had a forward pass without an associated backward pass (e.g. x).", "another"])
def test_autogram_translates_only_torchjds_unmatched_forward_error(message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchJD's "forward pass without an associated backward pass" ``ValueError`` becomes ours (chained from it);
    any other ``ValueError`` of TorchJD passes through unchanged. ``.grad`` is ``None`` afterwards either way."""
    trunk, engine, losses = _trunk_case()
    injected = ValueError(message)

    def fail(output: Tensor) -> Tensor:
        raise injected

    monkeypatch.setattr(engine._engine, "compute_gramian", fail)
    error = _engine_step_error(trunk, engine, losses)
    if message == "another":
        assert error is injected
    else:
        assert error is not injected and error.__cause__ is injected
    assert all(p.grad is None for p in trunk.parameters())


@needs_torchjd
def test_autogram_refuses_a_module_jacobian_torchjd_computed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net: if TorchJD's pass computed a module's Jacobian twice for one recorded call, the Gram
    cannot be repaired: ``RuntimeError``, ``.grad`` ``None`` (simulated by raising the computers' call count to 2)."""
    trunk, engine, losses = _trunk_case()
    real = engine._engine.compute_gramian

    def twice(output: Tensor) -> Tensor:
        gramian = real(output)
        for computer in engine._computers:
            computer.calls = 2
        return gramian

    monkeypatch.setattr(engine._engine, "compute_gramian", twice)
    params = list(trunk.parameters())
    settings = CAGradSettings()
    try:
        with pytest.raises(RuntimeError, match="2 times"):
            low_memory_backward(losses, params, len(params), settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
    assert all(p.grad is None for p in params)


@needs_torchjd
def test_autogram_refusal_on_a_torchjd_without_skip_names_the_irregular_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """On TorchJD's own Engine (no float32 computer that can skip a module), a weight in an L2 penalty is
    refused, naming its module by its path in the engine's root (``'0'``), the other module (``'2'``) not named."""
    from torchjd.autogram import Engine

    monkeypatch.setattr(low_memory, "_engine_class", lambda: Engine)
    trunk, engine, losses = _trunk_case()
    losses = [loss + trunk[0].weight.pow(2).sum() for loss in losses]
    error = _engine_step_error(trunk, engine, losses)
    assert "module(s) ['0']" in str(error), str(error)


# --------------------------------------------------------------------------- the graph walk and the refusals
def _named_identity(name: str) -> type[torch.autograd.Function]:
    """A user ``autograd.Function`` (identity) whose backward node is named ``<name>Backward``."""

    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


@pytest.mark.parametrize("name", ["AutogramNode", "EmbeddingLookup"])
def test_user_functions_named_like_torchjd_or_embedding_nodes_are_ordinary_nodes(name: str) -> None:
    """The walk recognises TorchJD's and embeddings' nodes by their type name, and reads their attributes
    only where present: a user function of such a name (without them) is an ordinary node, not a crash
    nor a sparse gradient. ``s = (1, 2)``, ``g_1 = (3, 3)``, ``g_2 = 2 s``: the Gram ``[[18, 18], [18, 20]]``."""
    fn = _named_identity(name)
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    losses = [fn.apply(3 * s).sum(), fn.apply(s * s).sum()]
    settings = CAGradSettings()
    result = low_memory_backward(losses, [s], 1, settings.weights_tensor(2), settings, route="hooks")
    assert torch.equal(result.gram, torch.tensor([[18.0, 18.0], [18.0, 20.0]], dtype=torch.float64))
    a = result.solution.coefficients
    assert s.grad is not None
    torch.testing.assert_close(s.grad, a[0] * torch.tensor([3.0, 3.0], dtype=torch.float64) + a[1] * 2 * s.detach())


@needs_torchjd
def test_autogram_ignores_the_nodes_of_another_engine_recording_the_same_forward() -> None:
    """A second (stale) AutogramEngine on the heads also inserts its nodes into the forward: the step's
    engine ignores them, and the Gram over the trunk is the plain float64 Gram."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    heads = [nn.Linear(4, 1).double() for _ in range(2)]
    stale = AutogramEngine(*heads)
    engine = AutogramEngine(trunk)
    z = trunk(torch.randn(6, 3, dtype=torch.float64))
    losses = [head(z).pow(2).mean() for head in heads]
    shared = list(trunk.parameters())
    expected = _reference_gram(losses, shared)
    params = shared + [p for head in heads for p in head.parameters()]
    settings = CAGradSettings()
    try:
        result = low_memory_backward(losses, params, len(shared), settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
        stale.close()
    torch.testing.assert_close(result.gram, expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("twice_first", [True, False])
def test_a_sparse_gradient_into_params_is_refused_before_anything_changes_beside_an_embedding_used_twice(twice_first: bool) -> None:
    """Two sparse embeddings: ``a`` (outside params) looked up twice, ``b`` (in params) once. ``b``'s sparse
    gradient is refused before any backward: the leaf outside params keeps ``.grad = None`` (both orders)."""
    torch.manual_seed(0)
    a, b = nn.Embedding(10, 3, sparse=True).double(), nn.Embedding(10, 3, sparse=True).double()
    s = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    i1, i2 = torch.tensor([1, 2]), torch.tensor([3, 4])
    twice, once = a(i1).sum() + a(i2).sum(), b(i1).sum()
    h = twice + once if twice_first else once + twice
    losses = [s * h, (s * s) * h]
    settings = CAGradSettings()
    with pytest.raises(ValueError, match=r"params\[1\]"):
        low_memory_backward(losses, [s, b.weight], 1, settings.weights_tensor(2), settings, route="hooks")
    assert a.weight.grad is None and s.grad is None and b.weight.grad is None


@pytest.mark.parametrize("kinds", [("tensor",), ("post-accumulate-grad",), ("tensor", "post-accumulate-grad")])
def test_hook_refusal_names_the_kind_of_hook(kinds: tuple[str, ...]) -> None:
    """The refusal of a user hook on a reached leaf says which kind(s) it found."""
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    if "tensor" in kinds:
        s.register_hook(lambda g: g)
    if "post-accumulate-grad" in kinds:
        s.register_post_accumulate_grad_hook(lambda p: None)
    settings = CAGradSettings()
    with pytest.raises(ValueError) as error:
        low_memory_backward([(3 * s).sum(), (s * s).sum()], [s], 1, settings.weights_tensor(2), settings)
    assert f"has a {' and a '.join(kinds)} hook registered" in str(error.value), str(error.value)


# --------------------------------------------------------------------------- the checks of the inputs
def _case() -> tuple[list[Tensor], nn.Parameter]:
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    return [(3 * s).sum(), (s * s).sum()], s


@pytest.mark.parametrize("params", [[], "tensor_and_str"])
def test_params_must_be_a_non_empty_sequence_of_tensors(params: object) -> None:
    losses, s = _case()
    given = [s, "weight"] if params == "tensor_and_str" else params
    settings = CAGradSettings()
    with pytest.raises(TypeError, match="params must be"):
        low_memory_backward(losses, given, 1, settings.weights_tensor(2), settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["frozen", "non_leaf"])
def test_params_must_be_trainable_leaves(which: str) -> None:
    """A frozen tensor or a non-leaf (computed) tensor in ``params`` is refused, naming its index."""
    losses, s = _case()
    other = torch.zeros(2, dtype=torch.float64) if which == "frozen" else s * 2
    settings = CAGradSettings()
    with pytest.raises(ValueError, match=r"params\[1\].*not a leaf tensor with requires_grad=True"):
        low_memory_backward(losses, [s, other], 1, settings.weights_tensor(2), settings)
    assert s.grad is None


def test_params_on_two_devices_are_refused() -> None:
    """Parameters on two devices (CPU and ``meta``) are refused up front."""
    losses, s = _case()
    elsewhere = nn.Parameter(torch.zeros(2, device="meta"))
    settings = CAGradSettings()
    with pytest.raises(ValueError, match="one device"):
        low_memory_backward(losses, [s, elsewhere], 1, settings.weights_tensor(2), settings)


@pytest.mark.parametrize("shared_count", [True, 1.0])
def test_shared_count_must_be_an_int_not_a_bool_or_a_float(shared_count: object) -> None:
    losses, s = _case()
    settings = CAGradSettings()
    with pytest.raises(ValueError, match="shared_count must be an int"):
        low_memory_backward(losses, [s], shared_count, settings.weights_tensor(2), settings)  # type: ignore[arg-type]
    assert s.grad is None


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_sharded_dtensor_parameters_are_refused() -> None:
    """A DTensor parameter (FSDP2) in ``params``: ``NotImplementedError`` (the low-memory mode does not shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tests.process_groups import one_rank_group

    losses, s = _case()
    settings = CAGradSettings()
    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.zeros(4, dtype=torch.float64), mesh, [Shard(0)]))
        with pytest.raises(NotImplementedError, match="DTensor"):
            low_memory_backward(losses, [s, sharded], 1, settings.weights_tensor(2), settings)
    assert s.grad is None


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_low_memory_passes_refuses_several_ranks_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``low_memory_passes`` (public) has the same ``distributed=True`` default as ``low_memory_backward``."""
    _two_rank_world(monkeypatch)
    losses, s = _case()
    passes = low_memory.low_memory_passes(losses, [s], 1)
    with pytest.raises(NotImplementedError, match="distributed=False"):
        next(passes)
    assert s.grad is None


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_a_one_rank_world_runs_with_distributed_true(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.distributed`` initialised with one rank: nothing to average, so ``distributed=True`` runs:
    ``g_1 = (3, 3)``, ``g_2 = 2 s = (2, 4)``, the Gram ``[[18, 18], [18, 20]]``."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    losses, s = _case()
    settings = CAGradSettings()
    result = low_memory_backward(losses, [s], 1, settings.weights_tensor(2), settings, distributed=True)
    assert torch.equal(result.gram, torch.tensor([[18.0, 18.0], [18.0, 20.0]], dtype=torch.float64))


@needs_torchjd
def test_autogram_gram_is_float64_when_a_parameter_outside_the_shared_ones_is_float64() -> None:
    """A float32 shared trunk (the engine's, float32 Gram) and a float64 head: the step's Gram is reduced
    and returned in float64, as the hooks route and the default mode do (float64 if any parameter is)."""
    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 2), nn.Linear(2, 1).double()
    engine = AutogramEngine(trunk)
    z = trunk(torch.randn(5, 3)).double()
    losses = [head(z).pow(2).mean(), z.sin().mean()]
    params = [*trunk.parameters(), *head.parameters()]
    settings = CAGradSettings()
    try:
        result = low_memory_backward(losses, params, 2, settings.weights_tensor(2), settings, engine=engine)
    finally:
        engine.close()
    assert result.route == "autogram" and result.gram.dtype == torch.float64


@pytest.mark.parametrize("m", [1, 2])
def test_a_leaf_outside_params_frozen_after_the_forward_is_skipped_like_a_plain_backward(m: int) -> None:
    """``requires_grad_(False)`` on a leaf between the forward and the step: a plain ``backward()`` leaves
    its ``.grad`` None (its node stays in the graph but accumulates nothing), and so does the low-memory
    mode; the other leaves get their gradients."""
    s = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    a = nn.Parameter(torch.tensor([3.0, 5.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([7.0, 11.0], dtype=torch.float64))
    losses = [(s * a).sum() + (s * b).sum()] + [(s * b).sum()] * (m - 1)
    a.requires_grad_(False)
    settings = CAGradSettings()
    low_memory_backward(losses, [s], 1, settings.weights_tensor(m), settings, route="hooks")
    assert a.grad is None
    assert b.grad is not None and torch.equal(b.grad, torch.tensor([float(m), 2.0 * m], dtype=torch.float64))  # sum_i dL_i/db = m s
