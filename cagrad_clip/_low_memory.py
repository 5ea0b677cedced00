"""Low-memory CAGrad-Clip for the largest models: no stored per-objective gradients.

One step of RACO's Algorithm 1 (arXiv 2602.02495) needs only the Gram ``H_ij = <g_i, g_j>`` of the
objectives' gradients on the shared parameters and then the combination ``d = sum_i a_i g_i``. The
default path stores the ``m`` gradients to get both; :func:`low_memory_backward` gets them without
storing any, by one of two routes (``docs/low_memory.md`` has the measurements):

``"hooks"`` (``m <= 2``, any model)
    backward of ``L_1`` into ``.grad`` (``g_1``); a second backward of ``L_2`` whose per-parameter
    hooks add ``<g_1, g_2>`` and ``<g_2, g_2>`` into an on-device float32 Gram as each piece of
    ``g_2`` is produced and drop the piece; solve; ``.grad *= a_1`` in place; a third backward of
    ``a_2 L_2`` accumulates into ``.grad``. Three backward passes, no gradient copy.
``"autogram"`` (any ``m``, models without tied weights across modules)
    TorchJD's autogram ``Engine`` gives the Gramian of the losses without the Jacobian (its
    per-module Jacobians are reduced to float32 Grams one module at a time); solve; one backward of
    ``sum_i a_i L_i``. A module that TorchJD's forward hooks cannot account for exactly (called
    more than once, or with a parameter used outside its own call) gets its Jacobian from a
    backward vmapped over the ``m`` losses instead. TorchJD is an optional dependency
    (``pip install torchjd``).

Before anything changes, a host-side walk of the losses' autograd graph (no sync) finds the
trainable leaves outside ``params`` (they get ``sum_i dL_i/dx``, as in the default mode) and refuses
what neither route computes as the default mode does: user hooks on a reached leaf, sparse
gradients, reentrant activation checkpointing.

Everything on the step path is sync-free (no ``.item()``, no Python branch on a tensor value) and the
reductions run in float32 or better, outside any autocast region of the caller.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from . import _dual
from ._dual import CAGradSolution
from ._loss_checks import check_losses
from ._numerics import blocked_dot, no_autocast, reduction_dtype
from ._settings import CAGradSettings

__all__ = ["ROUTES", "AutogramEngine", "LowMemoryResult", "Route", "gram_of_rows", "low_memory_backward", "low_memory_passes"]

Route = Literal["auto", "hooks", "autogram"]

#: Accepted values of ``route`` and where each applies.
ROUTES: dict[str, str] = {
    "auto": "'autogram' for every m when an AutogramEngine is given (it recorded the forward), else 'hooks' for m <= 2",
    "hooks": "per-parameter hooks during a second backward, then a third weighted backward; m <= 2, any model",
    "autogram": "TorchJD autogram Gramian, then one weighted backward; any m, no weights tied across modules",
}

#: Elements upcast at a time: bounds the transient float32 copy of a half-precision gradient piece.
UPCAST_CHUNK = 1 << 22

_REACHES_NONE = (
    "reaches none of the parameters: check that it is computed from the model being trained. Reentrant activation "
    "checkpointing (use_reentrant=True) hides the parameters from backward(inputs=...): use use_reentrant=False"
)
_INSTALL_HINT = "route='autogram' needs TorchJD's autogram engine: pip install torchjd  (version 0.18 or later)"
_REENTRANT = (
    "the losses' graph contains reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), "
    "which hides the parameters inside it from the graph and from backward(inputs=...), so their gradients could be "
    "missed or accumulated twice: use use_reentrant=False, or the default memory mode"
)
_SPARSE = (
    "gets a sparse gradient (nn.Embedding(sparse=True) or nn.EmbeddingBag(sparse=True)): the low-memory routes reduce and "
    "combine dense gradients only. Use sparse=False, or the default memory mode, which handles sparse gradients densely"
)


class LowMemoryResult(NamedTuple):
    """What one :func:`low_memory_backward` computed; on-device tensors, read them without a sync cost."""

    gram: Tensor
    """``(m, m)`` Gram of the objectives' gradients on the shared parameters, float32 or float64.
    A non-finite diagonal entry means that objective's gradient was not finite."""
    solution: CAGradSolution
    """The dual solve; ``.grad`` holds ``sum_i solution.coefficients[i] * g_i``."""
    route: str
    """The route taken: ``"hooks"`` or ``"autogram"``."""


def gram_of_rows(rows: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The ``(k, k)`` Gram of ``k`` equally sized tensors, reduced in ``dtype`` (float32 or float64).

    Rows already in ``dtype`` are reduced in place (no copy); others are upcast ``UPCAST_CHUNK``
    columns at a time (a transient of ``k x UPCAST_CHUNK`` elements of ``dtype``). Dot products
    are ``GRAM_BLOCK``-long chains whose sums are added pairwise, as the default path's blocked
    Gram does. Shapes alone decide the loops: no host sync.
    """
    flat = [r.reshape(-1) for r in rows]
    k, n = len(flat), flat[0].numel()
    same = all(f.dtype == dtype for f in flat)
    step = max(n, 1) if same else UPCAST_CHUNK
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    with torch.no_grad(), no_autocast(flat[0].device):
        total: Tensor | None = None
        for start in range(0, n, step):
            pieces = [f[start : start + step] for f in flat]
            if not same:
                pieces = [p.to(dtype) for p in pieces]
            values = torch.stack([blocked_dot(pieces[i], pieces[j]) for i, j in pairs])
            total = values if total is None else total + values
        if total is None:  # empty tensors
            return torch.zeros((k, k), dtype=dtype, device=flat[0].device)
        where = {pair: n for n, pair in enumerate(pairs)}  # (i, j) -> entry of total; Python ints only (no copy to the device)
        return torch.stack([torch.stack([total[where[min(i, j), max(i, j)]] for j in range(k)]) for i in range(k)])


# --------------------------------------------------------------------------- the graph walk
class _Graph(NamedTuple):
    """What one host-side walk of the losses' autograd graph found (nodes and Python attributes only: no sync)."""

    leaves: dict[int, Tensor]
    """Every trainable leaf the losses reach (``id`` -> tensor): the variables of the AccumulateGrad nodes."""
    sparse: set[int]
    """``id`` of the leaves below an embedding with ``sparse=True`` (they get a sparse gradient)."""
    reentrant: bool
    """Whether reentrant activation checkpointing (``CheckpointFunctionBackward``) hides part of the graph."""
    gates: dict[Any, list[Any]]
    """The engine's AutogramNode nodes (one per recorded call of a hooked module), by their Gram computer."""
    regions: list[tuple[Any, frozenset[int]]]
    """For the losses (computer ``None``) and for each gate: the ``id`` of the tracked parameters that the
    graph reaches from there without crossing another gate."""


_EMPTY: frozenset[int] = frozenset()


def _walk_graph(roots: Sequence[Any], computers: Any = (), tracked: frozenset[int] = _EMPTY) -> _Graph:
    """Walk the autograd graph below ``roots`` once, host-side (no tensor is read).

    ``computers`` are the Gram computers of an :class:`AutogramEngine`: their AutogramNode nodes are
    the gates that split the graph into regions, and ``tracked`` the ``id`` of the parameters whose
    regions are wanted. Iterative (deep graphs), each node visited once.
    """
    children: dict[Any, list[Any]] = {}
    order: list[Any] = []  # post-order: every node after the nodes it leads to
    leaves: dict[int, Tensor] = {}
    gates: dict[Any, list[Any]] = {}
    gate_nodes: set[Any] = set()
    sparse_nodes: list[Any] = []
    reentrant = False
    stack: list[tuple[Any, bool]] = [(root, False) for root in roots if root is not None]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in children:
            continue
        kids = [child for child, _ in node.next_functions if child is not None]
        children[node] = kids
        stack.append((node, True))
        stack.extend((child, False) for child in kids if child not in children)
        name = type(node).__name__
        if name == "AccumulateGrad":
            if node.variable.requires_grad:  # one frozen after the forward: a plain backward skips it too
                leaves[id(node.variable)] = node.variable
        elif name == "AutogramNodeBackward":
            computer = getattr(node, "gramian_computer", None)
            if computer is not None and computer in computers:
                gates.setdefault(computer, []).append(node)
                gate_nodes.add(node)
        elif name.startswith("Embedding") and getattr(node, "_saved_sparse", False) is True:
            sparse_nodes.append(node)
        elif name == "CheckpointFunctionBackward":
            reentrant = True
    sparse: set[int] = set()
    below = [child for node in sparse_nodes for child in children[node]]
    seen: set[Any] = set()
    while below:
        node = below.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            sparse.add(id(node.variable))
        below.extend(children[node])
    regions: list[tuple[Any, frozenset[int]]] = []
    if tracked:
        reach: dict[Any, frozenset[int]] = {}
        for node in order:
            if type(node).__name__ == "AccumulateGrad":
                reach[node] = frozenset((id(node.variable),)) if id(node.variable) in tracked else _EMPTY
                continue
            found = _EMPTY
            for child in children[node]:
                if reach[child]:
                    found = found | reach[child]
            if node in gate_nodes:
                regions.append((node.gramian_computer, found))
                found = _EMPTY  # what lies below a gate is that gate's region
            reach[node] = found
        root_found = _EMPTY
        for root in roots:
            if root is not None and reach[root]:
                root_found = root_found | reach[root]
        regions.append((None, root_found))
    return _Graph(leaves, sparse, reentrant, gates, regions)


def _loss_roots(losses: Sequence[Tensor]) -> list[Any]:
    return [get_gradient_edge(loss).node for loss in losses]


def _describe(leaf: Tensor, index: dict[int, int]) -> str:
    i = index.get(id(leaf))
    where = f"params[{i}]" if i is not None else "a trainable leaf tensor outside params"
    return f"{where} (shape {tuple(leaf.shape)})"


def _refuse_graph(graph: _Graph, params: Sequence[Tensor]) -> None:
    """Refuse, before anything changes, what neither route computes as the default mode does."""
    if graph.reentrant:
        raise ValueError(_REENTRANT)
    index = {id(p): i for i, p in enumerate(params)}
    for leaf_id in graph.sparse:
        if leaf_id in index:
            raise ValueError(f"{_describe(params[index[leaf_id]], index)} {_SPARSE}")
    for leaf in graph.leaves.values():
        registered = (("tensor", leaf._backward_hooks), ("post-accumulate-grad", leaf._post_accumulate_grad_hooks))
        kinds = [kind for kind, hooks in registered if hooks]
        if kinds:
            raise ValueError(
                f"{_describe(leaf, index)} has a {' and a '.join(kinds)} hook registered (register_hook / "
                "register_post_accumulate_grad_hook): the low-memory routes run their backward passes on other combinations "
                "of the objectives than the default mode (the hooks route on L_2 twice and on a_2 L_2, the autogram route on "
                "sum_i a_i L_i), so the hook would see other gradients, and .grad would differ. Remove the hook, or use the "
                "default memory mode (memory='default'), which runs one backward per objective"
            )


# --------------------------------------------------------------------------- route "autogram"
def _hooked_modules(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules TorchJD's Engine hooks: the outermost ones with a direct trainable parameter."""
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        yield name, module
        return
    for child_name, child in module.named_children():
        yield from _hooked_modules(child, f"{name}.{child_name}" if name else child_name)


@functools.cache
def _engine_class() -> Any:
    """TorchJD's ``Engine`` subclassed so each module's Jacobian is reduced to a Gram in float32+.

    TorchJD reduces in the parameters' dtype (a bf16 Gram for a bf16 model); the subclass replaces
    the per-module Gram computer (private API of torchjd 0.18). Imported lazily.
    """
    try:
        autogram = importlib.import_module("torchjd.autogram")
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    try:
        computers = importlib.import_module("torchjd.autogram._gramian_computer")
    except ImportError:
        computers = None
    base_computer: Any = getattr(computers, "JacobianBasedGramianComputerWithCrossTerms", None)
    if base_computer is None or not hasattr(autogram.Engine, "_make_gramian_computer"):
        return autogram.Engine  # a TorchJD whose internals moved: its own Gram (AutogramEngine checks the dtype)

    class _Float32Computer(base_computer):
        def __init__(self, jacobian_computer: Any, dtype: torch.dtype) -> None:
            super().__init__(jacobian_computer)
            self.dtype = dtype
            self.summed_jacobian: Tensor | None = None
            #: set for one compute_gramian when this module's Jacobian is taken by another pass (see AutogramEngine._plan)
            self.skip = False
            #: the calls that computed a Jacobian since AutogramEngine._gram set it to 0 (TorchJD's reset leaves it)
            self.calls = 0

        def __call__(self, rg_outputs: Any, grad_outputs: Any, args: Any, kwargs: Any) -> Tensor | None:
            if self.skip:
                self.remaining_counter -= 1
                return None
            self.calls += 1
            jacobian: Tensor = self.jacobian_computer(rg_outputs, grad_outputs, args, kwargs)  # (m, module numel)
            summed = jacobian if self.summed_jacobian is None else self.summed_jacobian + jacobian
            self.remaining_counter -= 1
            if self.remaining_counter != 0:  # the module is used again further back: wait for all its uses
                self.summed_jacobian = summed
                return None
            self.summed_jacobian = None
            return gram_of_rows(list(summed.unbind(0)), self.dtype)

    engine_base: Any = autogram.Engine

    class _Float32Engine(engine_base):
        def __init__(self, *modules: nn.Module, gram_dtype: torch.dtype) -> None:
            self.gram_dtype = gram_dtype  # read by _make_gramian_computer during super().__init__
            super().__init__(*modules, batch_dim=None)

        def _make_gramian_computer(self, module: nn.Module) -> Any:
            return _Float32Computer(super()._make_gramian_computer(module).jacobian_computer, self.gram_dtype)

    return _Float32Engine


class _Plan(NamedTuple):
    """How one step takes the Gram on an engine's modules (host-side ints and references only)."""

    counts: dict[Any, int]
    """Recorded calls of each module in this step's graph (TorchJD's counters are set to these)."""
    regular: set[Any]
    """The modules whose Jacobian TorchJD's hooks give exactly: one call, parameters reached from that call only."""
    exact: list[list[Tensor]]
    """The parameters of the other modules, in groups: one backward vmapped over the losses per group."""


class AutogramEngine:
    """TorchJD's autogram ``Engine`` on the modules that hold the shared parameters.

    Create it **once, before the forward pass** (it records the forward through module hooks) and
    pass it to :func:`low_memory_backward` as ``engine=``. Its Gram covers every trainable
    parameter of ``modules`` (which must be exactly the ``shared`` parameters of the step).

    TorchJD's hooks see module calls only. Each step therefore walks the losses' graph (host-side,
    no sync) and gives the Jacobian of a module that they cannot account for exactly (one called
    several times, as an RNN cell over time steps; or one whose parameter is used outside its own
    call, as in an L2 penalty ``(layer.weight ** 2).sum()`` added to a loss) by one backward vmapped
    over the ``m`` losses, grouped so that each such pass holds at most ``m`` times the largest
    hooked module's parameters. Forwards recorded but not part of the step's graph (an evaluation
    forward with grad enabled) are ignored.

    Refused, with a ``ValueError``: a parameter held by two modules the engine hooks, i.e. tied
    weights such as tied input/output embeddings (``tie_word_embeddings=True``, the default of GPT-2,
    Gemma and small Qwen3), which TorchJD cannot differentiate; nested or repeated ``modules``.
    Activation checkpointing (a second forward during backward) is not supported. :meth:`close`
    removes the hooks.
    """

    def __init__(self, *modules: nn.Module) -> None:
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise TypeError("AutogramEngine(*modules) takes one or more torch.nn.Module instances (those holding the shared parameters)")
        engine_class = _engine_class()
        for i, a in enumerate(modules):
            for j, b in enumerate(modules):
                if i != j and any(sub is b for sub in a.modules()):
                    raise ValueError(f"modules[{j}] is modules[{i}] or one of its submodules; pass each module once, none inside another")
        owner: dict[int, str] = {}
        params: list[Tensor] = []
        hooked: list[tuple[str, nn.Module, list[Tensor]]] = []
        for k, root in enumerate(modules):
            for name, module in _hooked_modules(root, f"modules[{k}]" if len(modules) > 1 else ""):
                held: list[Tensor] = []
                for p in module.parameters():
                    if not p.requires_grad:
                        continue
                    if id(p) in owner:
                        raise ValueError(
                            f"the parameter of shape {tuple(p.shape)} is held by two modules, {owner[id(p)] or '(root)'!r} and "
                            f"{name or '(root)'!r} (tied weights, e.g. tied input/output embeddings: tie_word_embeddings=True). "
                            "TorchJD's autogram engine cannot take the Gramian of tied weights. Use route='hooks' (m <= 2), "
                            "untie the weights (e.g. config.tie_word_embeddings=False), or the default memory mode"
                        )
                    owner[id(p)] = name
                    params.append(p)
                    held.append(p)
                hooked.append((name, module, held))
        if not params:
            raise ValueError("modules hold no parameter with requires_grad=True; the Gram would be empty")
        #: the parameters the Gram covers, in the engine's order.
        self.params = params
        #: the Gram's dtype: float32, or float64 if a parameter is float64.
        self.dtype = reduction_dtype(*(p.dtype for p in params))
        if engine_class is importlib.import_module("torchjd.autogram").Engine:  # TorchJD reduces in the parameters' dtype
            if any(p.dtype != self.dtype for p in params):
                raise ValueError(
                    "this TorchJD version reduces the Gramian in the parameters' dtype, and the low-memory mode needs float32 "
                    "reductions for half-precision parameters: use torchjd 0.18 or route='hooks'"
                )
            self._engine = engine_class(*modules, batch_dim=None)
        else:
            self._engine = engine_class(*modules, gram_dtype=self.dtype)
        by_module: dict[Any, Any] = getattr(self._engine, "_gramian_computers", {})
        if not all(module in by_module for _, module, _ in hooked):
            raise ValueError(
                "this TorchJD version's internals differ from torchjd 0.18 (no per-module Gram computers), so the checks that "
                "keep the autogram route exact cannot run: use torchjd 0.18, route='hooks' (m <= 2), or the default memory mode"
            )
        #: each hooked module's Gram computer -> (its name, its trainable parameters)
        self._computers: dict[Any, tuple[str, list[Tensor]]] = {by_module[module]: (name, held) for name, module, held in hooked}
        self._owner: dict[int, Any] = {id(p): computer for computer, (_, held) in self._computers.items() for p in held}
        #: parameters per exact pass: the largest hooked module's (TorchJD's own transient is one module's Jacobian)
        self._group_numel = max(sum(p.numel() for p in held) for _, _, held in hooked)

    def _plan(self, graph: _Graph) -> _Plan:
        """Which modules TorchJD's hooks account for exactly in ``graph``; the others' parameters, grouped."""
        counts = {computer: len(nodes) for computer, nodes in graph.gates.items()}
        irregular = {computer for computer, n in counts.items() if n > 1}  # a module called more than once
        for region, found in graph.regions:  # a parameter reached from outside its module's one call
            irregular.update(self._owner[i] for i in found if self._owner[i] is not region)
        registered: set[GradientEdge] = getattr(getattr(self._engine, "_target_edges", None), "_edges", set())
        for computer, nodes in graph.gates.items():
            # TorchJD reaches a call through the edge its hook registered, compared as it compares them: not after
            # engine.reset(), nor when the module's output comes straight from a custom autograd.Function (whose edge
            # carries an ownership token under torch >= 2.6, so that TorchJD 0.18 never finds it)
            if not any(GradientEdge(child, nr) in registered for child, nr in nodes[0].next_functions if child is not None):
                irregular.add(computer)
        can_skip = all(hasattr(computer, "skip") for computer in irregular)
        if irregular and not can_skip:
            names = sorted(self._computers[c][0] or "(root)" for c in irregular if c in self._computers)
            raise ValueError(
                f"module(s) {names} are called more than once or have a parameter used outside their own call (e.g. an L2 "
                "penalty on a weight added to a loss), which TorchJD's hooks do not see, and this TorchJD version's internals "
                "differ from torchjd 0.18, whose engine this module extends to take those exactly: use torchjd 0.18, "
                "route='hooks' (m <= 2), or the default memory mode"
            )
        groups: list[list[Tensor]] = []
        sizes: list[int] = []
        position = {computer: k for k, computer in enumerate(self._computers)}  # a deterministic order (no id())
        for computer in sorted(irregular, key=lambda c: (-sum(p.numel() for p in self._computers[c][1]), position[c])):
            held = self._computers[computer][1]
            numel = sum(p.numel() for p in held)
            for g, size in enumerate(sizes):
                if size + numel <= self._group_numel:
                    groups[g].extend(held)
                    sizes[g] += numel
                    break
            else:
                groups.append(list(held))
                sizes.append(numel)
        return _Plan(counts, set(counts) - irregular, groups)

    def _gram(self, losses: Tensor, plan: _Plan) -> Tensor:
        """The ``(m, m)`` Gram of the 1-D ``losses`` over :attr:`params` as ``plan`` says (retains the graph)."""
        m = losses.shape[0]
        gram = torch.zeros((m, m), dtype=self.dtype, device=losses.device)
        exact = list(plan.exact)
        if plan.regular:
            for computer in self._computers:  # forwards not in this graph (e.g. an evaluation forward) do not count
                computer.remaining_counter = plan.counts.get(computer, 0)
                if hasattr(computer, "skip"):
                    computer.skip = computer not in plan.regular
                    computer.calls = 0
            try:
                part = self._engine.compute_gramian(losses)
            except ValueError as error:
                if "without an associated backward pass" not in str(error):
                    raise
                raise ValueError(
                    "TorchJD's autogram engine saw a recorded call of a hooked module that its backward did not reach, "
                    "which the graph walk did not foresee (activation checkpointing, which recomputes the forward during "
                    "backward, is not supported by this route): use route='hooks' (m <= 2) or the default memory mode"
                ) from error
            except RuntimeError as error:
                if "doesn't match the broadcast shape" not in str(error):
                    raise
                raise RuntimeError(
                    f"TorchJD's autogram engine could not accumulate the Gramian ({error}). A known cause: a module of the "
                    "engine whose output reaches a loss only through a function that gives it no gradient (a custom "
                    "autograd.Function whose backward returns None). Use route='hooks' (m <= 2) or the default memory mode"
                ) from error
            finally:
                for computer in self._computers:
                    if hasattr(computer, "skip"):
                        computer.skip = False
            gram = gram + part.to(self.dtype)
            for computer in plan.regular:  # what the plan expected of TorchJD's pass (host-side ints)
                calls = getattr(computer, "calls", 1)
                if calls > 1:  # a Jacobian counted twice: the Gram cannot be repaired
                    raise RuntimeError(
                        f"TorchJD's autogram pass computed the Jacobian of module {self._computers[computer][0] or '(root)'!r} "
                        f"{calls} times for one recorded call (a case the graph walk did not foresee; please report it): use "
                        "route='hooks' (m <= 2) or the default memory mode"
                    )
                if calls == 0:  # never reached: its Jacobian comes from an exact pass instead
                    exact.append(list(self._computers[computer][1]))
        else:
            self.reset()  # nothing for TorchJD's pass: forget the recorded forwards
        if exact:
            eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
            for group in exact:
                jacobians = torch.autograd.grad(
                    losses, group, eye, retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True
                )  # each (m, *shape): what the default mode's m backward passes give these parameters
                for jacobian in jacobians:
                    gram = gram + gram_of_rows(list(jacobian.unbind(0)), self.dtype)
                del jacobians
        return gram

    def gramian(self, losses: Tensor) -> Tensor:
        """The ``(m, m)`` Gramian of the 1-D tensor ``losses`` over :attr:`params` (retains the graph)."""
        graph = _walk_graph(_loss_roots([losses]), self._computers, frozenset(self._owner))
        return self._gram(losses, self._plan(graph))

    def reset(self) -> None:
        """Forget forwards recorded since the last step (and the graph nodes they hold)."""
        engine = self._engine
        for name in ("_gramian_accumulator", "_target_edges"):
            part = getattr(engine, name, None)
            if part is not None:
                part.reset()
        for computer in getattr(engine, "_gramian_computers", {}).values():
            computer.reset()

    def close(self) -> None:
        """Remove the engine's forward hooks from the modules."""
        manager = getattr(self._engine, "_module_hook_manager", None)
        finalizer = getattr(manager, "_finalizer", None)
        if finalizer is not None:
            finalizer()


# --------------------------------------------------------------------------- route "hooks"
def _graph_reaches(loss: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether ``loss``'s autograd graph reaches one of ``params`` (a host-side walk, no sync)."""
    wanted = {id(p) for p in params}
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in wanted:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _accumulate(leaves: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``leaf.grad += grad`` as autograd's AccumulateGrad does it (for the leaves outside ``params``)."""
    with torch.no_grad():
        for leaf, grad in zip(leaves, grads):
            if grad is None:
                continue
            if leaf.grad is None:
                leaf.grad = grad
            elif leaf.grad.layout == torch.strided and not leaf.grad.requires_grad:
                leaf.grad.add_(grad)
            else:
                leaf.grad = leaf.grad + grad


def _hooks_gram(
    losses: Sequence[Tensor], params: Sequence[Tensor], shared_count: int, dtype: torch.dtype, outside: Sequence[Tensor]
) -> Tensor:
    """Passes 1 and 2 of the hooks route: ``.grad = g_1`` and the Gram, with no copy of ``g_2`` kept.

    The trainable leaves ``outside`` params get ``g_1`` in pass 1 and ``g_2`` from pass 2 (as the
    default mode's two backward passes give them), and nothing from pass 3.
    """
    m = len(losses)
    shared = list(params[:shared_count])
    torch.autograd.backward(losses[0], inputs=[*params, *outside], retain_graph=m > 1)
    if all(p.grad is None for p in params):
        raise ValueError(f"loss 0 {_REACHES_NONE}")
    for i, p in enumerate(params):
        if p.grad is not None and p.grad.layout != torch.strided:  # a sparse gradient the graph walk did not foresee
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) {_SPARSE}")
    gram = torch.zeros((m, m), dtype=dtype, device=shared[0].device)
    fired: set[int] = set()
    if m == 2:

        def make_hook(i: int, p: Tensor) -> Any:
            def hook(g2: Tensor | None) -> Tensor | None:
                if g2 is None:  # reached only through a function whose backward gives p no gradient: g2 = 0
                    return None
                if g2.layout != torch.strided:
                    raise ValueError(f"shared parameter {i} (shape {tuple(p.shape)}) {_SPARSE}")
                g1 = p.grad
                if g1 is None:  # loss 0 does not reach p: only <g2, g2>
                    gram[1:, 1:] += gram_of_rows([g2], dtype)
                else:
                    gram.add_(gram_of_rows([g1, g2], dtype))
                fired.add(i)
                return g2.new_zeros(()).expand_as(g2)  # what autograd.grad returns for p: no storage

            return hook

        handles = []
        try:
            for i, p in enumerate(shared):
                handles.append(p.register_hook(make_hook(i, p)))
            reached = torch.autograd.grad(losses[1], [*shared, *outside], retain_graph=True, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        if all(g is None for g in reached[: len(shared)]) and not _graph_reaches(losses[1], [*params[shared_count:], *outside]):
            raise ValueError(f"loss 1 {_REACHES_NONE}")
        _accumulate(outside, reached[len(shared) :])
        del reached
    rest = [p.grad for i, p in enumerate(shared) if i not in fired and p.grad is not None]
    for g1 in rest:  # parameters loss 1 did not reach (or m = 1): <g1, g1> only
        gram[:1, :1] += gram_of_rows([g1], dtype)
    return gram


# --------------------------------------------------------------------------- the entry point
def _check_inputs(losses: Sequence[Tensor], params: Sequence[Tensor], shared_count: int) -> tuple[list[Tensor], list[Tensor]]:
    losses = [
        loss.reshape(()) if loss.dim() else loss for loss in check_losses(losses)
    ]  # one-element losses of any shape, as the default mode
    params = list(params)
    if not params or not all(isinstance(p, Tensor) for p in params):
        raise TypeError("params must be a non-empty sequence of parameter tensors")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params lists a parameter twice")
    for i, p in enumerate(params):
        if not (p.requires_grad and p.is_leaf):
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a leaf tensor with requires_grad=True")
        if hasattr(p, "placements"):
            raise NotImplementedError("the low-memory mode does not support sharded (FSDP2 / DTensor) parameters; use the default mode")
        if p.grad is not None:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) already has a .grad. The low-memory mode writes the combined direction "
                "into .grad that must be None on entry: call zero_grad(set_to_none=True) before each step. Gradient "
                "accumulation over several backward calls is not supported: no per-objective gradients are stored to "
                "accumulate (use the default memory mode)"
            )
    if len({p.device for p in params}) > 1:
        raise ValueError(f"all parameters must be on one device, found {sorted({str(p.device) for p in params})}")
    if isinstance(shared_count, bool) or not isinstance(shared_count, int) or not 1 <= shared_count <= len(params):
        raise ValueError(f"shared_count must be an int in [1, {len(params)}] (the shared parameters come first), got {shared_count!r}")
    return losses, params


def _check_solve_inputs(m: int, weights: Tensor, settings: CAGradSettings) -> None:
    if not isinstance(settings, CAGradSettings):
        raise TypeError(f"settings must be a CAGradSettings, got {type(settings).__name__}")
    if settings.num_objectives is not None and settings.num_objectives != m:
        raise ValueError(f"got {m} losses but settings has {settings.num_objectives} weights")
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (m,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape ({m},), the normalised user weights, got {shape}")


def _solve(gram: Tensor, weights: Tensor, settings: CAGradSettings) -> CAGradSolution:
    w = weights.to(device=gram.device, dtype=gram.dtype)
    with torch.no_grad(), no_autocast(gram.device):
        return _dual.solve_with_settings(gram, w, settings)


def low_memory_backward(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    shared_count: int,
    weights: Tensor,
    settings: CAGradSettings,
    *,
    route: Route = "auto",
    engine: AutogramEngine | None = None,
    distributed: bool = True,
) -> LowMemoryResult:
    """One CAGrad-Clip direction (RACO Algorithm 1) written into ``.grad`` without storing any gradient.

    Args:
        losses: one scalar (or one-element) loss per objective, from one forward pass (the graph
            is retained between the backward passes and freed by the last one).
        params: the trainable parameters, the ``shared_count`` shared ones first. Every ``.grad``
            must be ``None`` on entry (``ValueError`` otherwise; so gradient accumulation over
            several calls is refused).
        shared_count: the Gram is taken over ``params[:shared_count]``; the combination covers all.
        weights: the normalised user weights ``w``, shape ``(m,)``, any dtype; on the parameters' device
            (from the CPU, the copy to the device would wait for it).
        settings: ``c``, ``clip``, ``rescale``, ``solver``, ``max_iter`` of the solve.
        route: ``"hooks"`` (``m <= 2``), ``"autogram"`` (needs ``engine``) or ``"auto"``:
            autogram for every ``m`` when ``engine`` is given (it recorded the forward), else hooks
            for ``m <= 2``. See :data:`ROUTES`.
        engine: an :class:`AutogramEngine` on the modules holding exactly the shared parameters,
            created before the forward pass; needed by the autogram route.
        distributed: as the optimizer's ``distributed=``: under ``torch.distributed`` with several
            ranks, ``True`` (default) asks for gradients averaged across ranks, which needs them
            stored: ``NotImplementedError``; ``False`` lets each rank combine its own gradients.
            Not for modules wrapped in DDP/FSDP.

    Returns:
        A :class:`LowMemoryResult`. Afterwards every parameter an objective reaches has
        ``.grad = sum_i a_i g_i`` (in the parameter's dtype); the others keep ``.grad = None``.
        A trainable leaf outside ``params`` that the losses reach gets ``sum_i dL_i/dx`` added to
        its ``.grad``, as the default mode's ``m`` backward passes give it. Nothing is checked for
        Inf/NaN (no sync): a non-finite ``gram`` diagonal entry says which objective's gradient
        was not finite.

    Raises:
        ValueError: before anything changes, for what neither route computes as the default mode
            does: a tensor or post-accumulate-grad hook on a leaf the losses reach, a sparse
            gradient into ``params``, reentrant activation checkpointing (and the misuses checked
            above). On any exception every ``.grad`` of ``params`` is ``None`` again, as on entry.
    """
    losses, params = _check_inputs(losses, params, shared_count)
    _check_solve_inputs(len(losses), weights, settings)
    passes = low_memory_passes(losses, params, shared_count, route=route, engine=engine, distributed=distributed)
    gram = next(passes)
    solution = _solve(gram, weights, settings)
    try:
        passes.send(solution.coefficients)
    except StopIteration as done:
        return LowMemoryResult(gram=gram, solution=solution, route=done.value)
    raise AssertionError("low_memory_passes yields once")  # pragma: no cover


def low_memory_passes(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    shared_count: int,
    *,
    route: Route = "auto",
    engine: AutogramEngine | None = None,
    distributed: bool = True,
) -> Generator[Tensor, Tensor, str]:
    """The backward passes of :func:`low_memory_backward`, in two phases around the solve.

    ``gram = next(passes)`` validates everything, runs the passes that give the ``(m, m)`` Gram and
    yields it; ``passes.send(coefficients)`` runs the passes that write ``sum_i a_i g_i`` into
    ``.grad`` and ends (``StopIteration.value`` is the route taken). Closing the generator in
    between (or any error) leaves every ``.grad`` of ``params`` ``None``, as on entry. The
    arguments are those of :func:`low_memory_backward`.
    """
    losses, params = _check_inputs(losses, params, shared_count)
    m = len(losses)
    if route not in ROUTES:
        raise ValueError(f"unknown route={route!r}; choose one of {list(ROUTES)}")
    if route == "auto":  # with an engine, the step's forward was recorded: take it whatever m is
        route = "autogram" if engine is not None or m > 2 else "hooks"
    if route == "hooks" and m > 2:
        raise ValueError(
            f"route='hooks' keeps one gradient in .grad and measures one more while it is produced, so it applies to m <= 2 "
            f"objectives, got m = {m}: use route='autogram' with an AutogramEngine, or the default memory mode"
        )
    if route == "autogram":
        if not isinstance(engine, AutogramEngine):
            raise ValueError(
                f"route='autogram' (m = {m}) needs engine=AutogramEngine(*shared_modules), created before the forward pass"
                + ("; for m <= 2, route='hooks' needs none" if m <= 2 else "")
            )
        shared_ids = {id(p) for p in params[:shared_count]}
        covered = {id(p) for p in engine.params}
        if covered != shared_ids:
            raise ValueError(
                f"the engine's modules hold {len(covered - shared_ids)} trainable parameter(s) outside params[:shared_count] and "
                f"miss {len(shared_ids - covered)} of them: create the AutogramEngine on exactly the modules of the shared parameters"
            )
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise NotImplementedError(
                "the low-memory mode stores no per-objective gradient, so it cannot average them across ranks before the Gram; "
                "pass distributed=False to let each rank combine its own gradients, or use the default memory mode"
            )
    if route == "autogram":
        assert engine is not None
        graph = _walk_graph(_loss_roots(losses), engine._computers, frozenset(engine._owner))
    else:
        graph = _walk_graph(_loss_roots(losses))
    try:
        _refuse_graph(graph, params)
        plan = engine._plan(graph) if route == "autogram" and engine is not None else None
    except BaseException:
        if isinstance(engine, AutogramEngine):
            engine.reset()  # this step's forward is abandoned
        raise
    param_ids = {id(p) for p in params}
    outside = [leaf for i, leaf in graph.leaves.items() if i not in param_ids]  # trainable leaves outside params
    del graph
    dtype = reduction_dtype(*(p.dtype for p in params))
    try:
        if route == "hooks":
            gram = _hooks_gram(losses, params, shared_count, dtype, outside)
        else:
            assert engine is not None and plan is not None
            loss_dtype = reduction_dtype(*(loss.dtype for loss in losses))
            stacked = torch.stack([loss.to(loss_dtype) for loss in losses])
            gram = engine._gram(stacked, plan).to(dtype)
        a = yield gram  # the caller solves the dual on the Gram and sends the coefficients
        if route == "hooks":
            with torch.no_grad():
                grads = [p.grad for p in params if p.grad is not None]
                torch._foreach_mul_(grads, a[0])
            if m == 2:
                torch.autograd.backward(losses[1], grad_tensors=a[1].to(losses[1].dtype), inputs=params)
        else:
            if outside:  # the default mode gives them sum_i dL_i/dx: one more backward, to them only
                torch.autograd.backward(stacked, grad_tensors=torch.ones_like(stacked), inputs=outside, retain_graph=True)
            torch.autograd.backward(stacked, grad_tensors=a.to(stacked.dtype), inputs=params)
            if all(p.grad is None for p in params):
                raise ValueError(f"the losses {_REACHES_NONE}")
    except BaseException:
        for p in params:  # as on entry
            p.grad = None
        raise
    finally:
        if isinstance(engine, AutogramEngine):
            engine.reset()  # the route consumed the forward the engine recorded (the autogram pass already reset it)
    return route
