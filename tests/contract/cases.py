"""The usage cases of the contract suite, and the small multi-task model they train.

Each case is a function of a :class:`Ctx` (the path record, the dtype, the process count and this
process's rank) that builds the model and the optimizer through ``ctx.build`` and returns the final
parameters and whatever diagnostics its check in ``test_contract.py`` needs (:meth:`Ctx.result`).
On 2 ranks every rank runs the case on its half of the batch. Expected values never come from
here: ``tests/contract/oracle.py`` computes them independently in float64.

Importable without pytest or scipy: the 2-rank workers import it.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cagrad_clip import ConflictAverseOptimizer

from .paths import GradientPath

__all__ = ["BATCH", "CASES", "Case", "Ctx", "Net", "execute", "losses_of", "make_data", "make_model"]

BATCH = 8  # the full batch; rank r of 2 gets rows [4r, 4r + 4), micro-batch k of those its k-th half
MICRO = 2  # micro-batches per step in the accumulation cases
FEATURES, HIDDEN = 6, 8
WEIGHTS = {2: [0.7, 0.3], 3: [0.5, 0.3, 0.2]}
TRUST_RADIUS = 0.8  # with these weights and data the clip p~ = min(p, w) changes the direction (test_contract checks it)
SGD_LR = 1.0  # SGD with lr = 1 (no momentum): the step is exactly p - d
ADAMW = {"lr": 0.1, "weight_decay": 0.1}  # weight decay moves every parameter that has a .grad, even a zero one
CLIP_MAX_NORM = 1.0  # about half the direction's norm on the suite's problem (test_contract checks the clip is active)
NOOP_MAX_NORM = 1e9
SCALER_INIT = 1024.0


# --------------------------------------------------------------------------- the model
class Net(nn.Module):
    """A trunk ``Linear(6, 8)`` + tanh + a shared offset ``shift``, and one ``Linear(8, 1)`` head per objective.

    ``unused`` adds a module no loss reaches; ``extra`` a head that ``losses_of(..., extra=True)``
    adds to the last objective (the cases reach it on rank 0 only).
    """

    def __init__(self, m: int, unused: bool = False, extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(FEATURES, HIDDEN)
        self.shift = nn.Parameter(0.1 * torch.randn(HIDDEN))
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(m))
        torch.manual_seed(1)  # the optional modules never change the others' initial values
        self.unused = nn.Linear(3, 3) if unused else None
        self.extra = nn.Linear(HIDDEN, 1) if extra else None
        self.trunk_dtype = self.head_dtype = torch.float32
        self.loss_dtype = torch.float32

    def cast(self, trunk_dtype: torch.dtype, head_dtype: torch.dtype, loss_dtype: torch.dtype = torch.float32) -> Net:
        self.trunk.to(trunk_dtype)
        self.shift = nn.Parameter(self.shift.detach().to(trunk_dtype))
        for module in (self.heads, self.unused, self.extra):
            if module is not None:
                module.to(head_dtype)
        self.trunk_dtype, self.head_dtype, self.loss_dtype = trunk_dtype, head_dtype, loss_dtype
        return self

    def forward(self, x: Tensor, extra: bool = False) -> tuple[list[Tensor], Tensor | None]:
        """Every head's prediction and, with ``extra``, the extra head's (in ``loss_dtype``). One call of
        the root module's forward, so FSDP2 gathers the shards around it."""
        h = torch.tanh(self.trunk(x.to(self.trunk_dtype))) + self.shift
        h = h.to(self.head_dtype)
        preds = [head(h).to(self.loss_dtype).squeeze(-1) for head in self.heads]
        if not extra:
            return preds, None
        assert self.extra is not None
        return preds, self.extra(h).to(self.loss_dtype).squeeze(-1)


def make_model(m: int, trunk_dtype: torch.dtype, head_dtype: torch.dtype, *, unused: bool = False, extra: bool = False) -> Net:
    return Net(m, unused=unused, extra=extra).cast(trunk_dtype, head_dtype)


def make_data(m: int, dtypes: tuple[torch.dtype, ...]) -> tuple[Tensor, Tensor]:
    """``x`` (8, 6), rounded through the lowest precision among ``dtypes`` (so every model sees the same
    values), and ``m`` targets that pull the shared trunk in different directions."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, FEATURES, generator=g)
    if torch.bfloat16 in dtypes:
        x = x.bfloat16().float()
    targets = [2 * x[:, 0] + x[:, 1], -2 * x[:, 0] + x[:, 2], x[:, 3] - x[:, 0]]
    return x, torch.stack(targets[:m], dim=1)


def losses_of(model: Net, x: Tensor, y: Tensor, *, extra: bool = False, constant: str | None = None) -> list[Tensor]:
    """One mean-squared-error loss per head; ``extra`` adds ``mean(extra(h)^2)`` to the last objective;
    ``constant`` replaces the last objective by a loss with zero gradient: ``"zero_times"``
    (``0.0 * loss``, which still reaches the parameters) or ``"detached"`` (reaches no parameter)."""
    preds, extra_pred = model(x, extra=extra)
    y = y.to(model.loss_dtype)
    losses = [((pred - y[:, i]) ** 2).mean() for i, pred in enumerate(preds)]
    if extra_pred is not None:
        losses[-1] = losses[-1] + (extra_pred**2).mean()
    if constant == "zero_times":
        losses[-1] = 0.0 * losses[-1]
    elif constant == "detached":
        losses[-1] = torch.zeros((), dtype=model.loss_dtype, requires_grad=True) * 2.0
    elif constant is not None:
        raise ValueError(constant)
    return losses


# --------------------------------------------------------------------------- DTensor helpers
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard, or ``t``."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (a DTensor gathered: a collective), detached, float64, on the CPU."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float64).clone()


def as_grad_of(p: Tensor, view: Tensor) -> Tensor:
    """``view`` (local storage) as a gradient for ``p``: a DTensor with ``p``'s layout for a DTensor ``p``."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(p, dtensor):
        return dtensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return view


def describe(error: BaseException) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "mro": [c.__name__ for c in type(error).__mro__],
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }


# --------------------------------------------------------------------------- the context of one run
@dataclass
class Ctx:
    path: GradientPath
    dtype: torch.dtype
    world: int = 1
    rank: int = 0
    model: Net | None = None
    initial_local: dict[str, Tensor] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return self.path.m

    def new_model(self, *, unused: bool = False, extra: bool = False) -> Net:
        model = make_model(self.m, self.dtype, self.path.head_dtype(self.dtype), unused=unused, extra=extra)
        if self.path.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.trunk)
            fully_shard(model)
        return model

    def build(
        self, *, unused: bool = False, extra: bool = False, exclude: tuple[str, ...] = (), optimizer: str = "sgd"
    ) -> tuple[Net, ConflictAverseOptimizer]:
        """The model (sharded for FSDP2), and the optimizer over its parameters except ``exclude``."""
        model = self.model = self.new_model(unused=unused, extra=extra)
        self.initial_local = {n: local(p).detach().clone() for n, p in model.named_parameters()}
        params = [p for n, p in model.named_parameters() if n not in exclude]
        base = torch.optim.SGD(params, lr=SGD_LR) if optimizer == "sgd" else torch.optim.AdamW(params, **ADAMW)
        kwargs = {"weights": WEIGHTS[self.m], "c": TRUST_RADIUS, **self.path.build(model)}
        return model, ConflictAverseOptimizer(base, **kwargs)

    def unchanged(self) -> bool | None:
        """Whether every parameter (this rank's shard) still holds its initial value, bit for bit."""
        if self.model is None:
            return None
        return all(torch.equal(local(p).detach(), self.initial_local[n]) for n, p in self.model.named_parameters())

    def rows(self, k: int | None = None) -> slice:
        per = BATCH // self.world
        start = self.rank * per
        if k is None:
            return slice(start, start + per)
        return slice(start + k * per // MICRO, start + (k + 1) * per // MICRO)

    def batch(self) -> tuple[Tensor, Tensor]:
        x, y = make_data(self.m, (self.dtype, self.path.head_dtype(self.dtype)))
        return x[self.rows()], y[self.rows()]

    def micro_batches(self) -> list[tuple[Tensor, Tensor]]:
        x, y = make_data(self.m, (self.dtype, self.path.head_dtype(self.dtype)))
        return [(x[self.rows(k)], y[self.rows(k)]) for k in range(MICRO)]

    @staticmethod
    def params(opt: torch.optim.Optimizer) -> list[Tensor]:
        return [p for group in opt.param_groups for p in group["params"]]

    def grads(self, model: nn.Module) -> dict[str, Tensor | str | None]:
        """Every parameter's whole ``.grad`` (``None`` where it is None). A DTensor gradient is gathered only
        if no rank has ``None`` there (else the gather would not match up); otherwise the entry says so."""
        named = list(model.named_parameters())
        present = [p.grad is not None for _, p in named]
        if self.world > 1:
            everyone: list[Any] = [None] * self.world
            dist.all_gather_object(everyone, present)
        else:
            everyone = [present]
        out: dict[str, Tensor | str | None] = {}
        for j, (name, p) in enumerate(named):
            flags = [r[j] for r in everyone]
            if p.grad is None:
                out[name] = None
            elif all(flags) or local(p.grad) is p.grad:
                out[name] = full(p.grad)
            else:
                out[name] = f".grad is None on rank(s) {[r for r, f in enumerate(flags) if not f]} only"
        return out

    def result(self, model: Net, opt: ConflictAverseOptimizer, **extra: Any) -> dict[str, Any]:
        last = opt.last
        return {
            "params": {n: full(p) for n, p in model.named_parameters()},
            "grads": self.grads(model),
            "coefficients": None if last is None else last.coefficients.detach().to("cpu", torch.float64).clone(),
            **extra,
        }


# --------------------------------------------------------------------------- the cases
def one_step(ctx: Ctx) -> dict[str, Any]:
    model, opt = ctx.build()
    x, y = ctx.batch()
    opt.zero_grad()
    opt.step(losses_of(model, x, y))
    return ctx.result(model, opt)


def _accumulate(ctx: Ctx, combine: bool) -> dict[str, Any]:
    model, opt = ctx.build()
    opt.zero_grad()
    for x, y in ctx.micro_batches():
        opt.backward([loss / MICRO for loss in losses_of(model, x, y)], combine=combine)
    opt.step()
    return ctx.result(model, opt)


def accumulate_combine_false(ctx: Ctx) -> dict[str, Any]:
    return _accumulate(ctx, combine=False)


def accumulate_combine_true(ctx: Ctx) -> dict[str, Any]:
    return _accumulate(ctx, combine=True)


def default_device_elsewhere(ctx: Ctx) -> dict[str, Any]:
    """One backward and the step, with torch's default device set to ``meta`` once the model and data
    exist: every tensor the optimizer makes must name the device of the gradients it serves. One that
    relies on the default lands on ``meta``, and mixing it with the CPU gradients raises. On CPU this is how
    a test sees a placement that only an accelerator would otherwise show (a buffer left on the host)."""
    model, opt = ctx.build()
    x, y = ctx.batch()
    with torch.device("meta"):
        opt.zero_grad()
        opt.backward(losses_of(model, x, y))
        opt.step()
    return ctx.result(model, opt)


def _grad_scaler(ctx: Ctx, overflow: bool) -> dict[str, Any]:
    model, opt = ctx.build()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALER_INIT)
    opt.zero_grad()
    for k, (x, y) in enumerate(ctx.micro_batches()):
        losses = [loss / MICRO for loss in losses_of(model, x, y)]
        if overflow and k == 0 and ctx.rank == 0:  # the lowest-weight objective, first micro-batch, rank 0 only
            losses[-1] = losses[-1] * math.inf
        opt.backward([scaler.scale(loss) for loss in losses], combine=False)
    scaler.step(opt)
    scaler.update()
    return ctx.result(model, opt, scale=float(scaler.get_scale()))


def grad_scaler(ctx: Ctx) -> dict[str, Any]:
    return _grad_scaler(ctx, overflow=False)


def unscale_early_overflow(ctx: Ctx) -> dict[str, Any]:
    """``scaler.unscale_(opt)`` before ``scaler.step(opt)`` on a window of ``combine=False`` micro-batches,
    at scale 1 (so the unscale is a no-op in value); the lowest-weight objective is infinite in the last
    micro-batch on rank 0. ``.grad`` then shows the other objective's finite gradient only, so the early
    unscale finds nothing: the step must still be skipped and the scale backed off."""
    model, opt = ctx.build()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    opt.zero_grad()
    for k, (x, y) in enumerate(ctx.micro_batches()):
        losses = [loss / MICRO for loss in losses_of(model, x, y)]
        if k == MICRO - 1 and ctx.rank == 0:
            losses[-1] = losses[-1] * math.inf
        opt.backward([scaler.scale(loss) for loss in losses], combine=False)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    return ctx.result(model, opt, scale=float(scaler.get_scale()))


def grad_scaler_overflow(ctx: Ctx) -> dict[str, Any]:
    return _grad_scaler(ctx, overflow=True)


def clip_before_step(ctx: Ctx) -> dict[str, Any]:
    model, opt = ctx.build()
    x, y = ctx.batch()
    opt.zero_grad()
    opt.backward(losses_of(model, x, y), combine=True)
    total = torch.nn.utils.clip_grad_norm_(ctx.params(opt), CLIP_MAX_NORM)
    opt.step()
    return ctx.result(model, opt, total_norm=float(full(total)))


def clip_between_microbatches(ctx: Ctx) -> dict[str, Any]:
    model, opt = ctx.build()
    opt.zero_grad()
    for k, (x, y) in enumerate(ctx.micro_batches()):
        opt.backward([loss / MICRO for loss in losses_of(model, x, y)], combine=False)
        if k == 0:  # multiplies every .grad by 1.0 in place: a no-op in value
            torch.nn.utils.clip_grad_norm_(ctx.params(opt), NOOP_MAX_NORM)
    opt.step()
    return ctx.result(model, opt)


def _halve_grads(opt: torch.optim.Optimizer) -> None:
    for p in Ctx.params(opt):
        if p.grad is not None:
            p.grad.data.mul_(0.5)


def edit_between_microbatches(ctx: Ctx) -> dict[str, Any]:
    """``.grad`` halved in place after the first of two ``backward(combine=False)``; a RuntimeError from
    what follows the edit is an outcome (recorded), not a refusal."""
    model, opt = ctx.build()
    opt.zero_grad()
    (x0, y0), (x1, y1) = ctx.micro_batches()
    opt.backward([loss / MICRO for loss in losses_of(model, x0, y0)], combine=False)
    _halve_grads(opt)
    return _finish_or_refusal(ctx, model, opt, lambda: opt.backward([loss / MICRO for loss in losses_of(model, x1, y1)], combine=False))


def _finish_or_refusal(ctx: Ctx, model: Any, opt: Any, before_step: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """Run ``before_step`` and ``step()``; the outcome, with the RuntimeError that refused it if one did."""
    raised = None
    try:
        before_step()
        opt.step()
    except RuntimeError as error:
        raised = describe(error)
    return ctx.result(model, opt, raised=raised)


def edit_before_step(ctx: Ctx) -> dict[str, Any]:
    """``.grad`` halved in place between ``backward(combine=False)`` and ``step()``."""
    model, opt = ctx.build()
    x, y = ctx.batch()
    opt.zero_grad()
    opt.backward(losses_of(model, x, y), combine=False)
    _halve_grads(opt)
    return _finish_or_refusal(ctx, model, opt)


def flat_buffers(ctx: Ctx) -> dict[str, Any]:
    """Every ``.grad`` preallocated as a view into one flat buffer per dtype (this rank's shards for FSDP2)."""
    model, opt = ctx.build()
    params = ctx.params(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    views: dict[str, Tensor] = {}
    for dtype in sorted({local(p).dtype for p in params}, key=str):
        group = [p for p in params if local(p).dtype == dtype]
        buffer = torch.zeros(sum(local(p).numel() for p in group), dtype=dtype)
        offset = 0
        for p in group:
            n = local(p).numel()
            views[names[id(p)]] = buffer[offset : offset + n].view(local(p).shape)
            p.grad = as_grad_of(p, views[names[id(p)]])
            offset += n
    before = {names[id(p)]: p.grad for p in params}
    opt.zero_grad(set_to_none=False)
    x, y = ctx.batch()
    opt.step(losses_of(model, x, y))
    after = {names[id(p)]: p.grad for p in params}
    return ctx.result(
        model,
        opt,
        same_object={n: after[n] is before[n] for n in before},
        aliases_buffer={n: after[n] is not None and local(after[n]).data_ptr() == views[n].data_ptr() for n in before},
        buffer={names[id(p)]: full(as_grad_of(p, views[names[id(p)]])) for p in params},
    )


def unreached_params(ctx: Ctx) -> dict[str, Any]:
    model, opt = ctx.build(unused=True, optimizer="adamw")
    x, y = ctx.batch()
    opt.zero_grad()
    opt.step(losses_of(model, x, y))
    return ctx.result(model, opt)


def partly_reached_distributed(ctx: Ctx) -> dict[str, Any]:
    """``extra`` is reached on rank 0 only (computation conditional on the rank); ``unused`` on no rank."""
    model, opt = ctx.build(unused=True, extra=True)
    x, y = ctx.batch()
    opt.zero_grad()
    opt.step(losses_of(model, x, y, extra=ctx.rank == 0))
    return ctx.result(model, opt)


def leaf_outside_optimizer(ctx: Ctx) -> dict[str, Any]:
    """``shift`` (used by every loss) is left out of the optimizer; a twin model gives what
    ``sum(losses).backward()`` leaves in its ``.grad`` in the same setting."""
    model, opt = ctx.build(exclude=("shift",))
    x, y = ctx.batch()
    opt.zero_grad()
    opt.step(losses_of(model, x, y))
    twin = ctx.new_model()
    torch.stack(losses_of(twin, x, y)).sum().backward()
    assert twin.shift.grad is not None
    return ctx.result(model, opt, twin_leaf_grad=full(twin.shift.grad))


def constant_objective(ctx: Ctx) -> dict[str, Any]:
    model, opt = ctx.build()
    x, y = ctx.batch()
    opt.zero_grad()
    opt.step(losses_of(model, x, y, constant="zero_times"))
    return ctx.result(model, opt)


def constant_objective_detached(ctx: Ctx) -> dict[str, Any]:
    model, opt = ctx.build()
    x, y = ctx.batch()
    opt.zero_grad()
    opt.step(losses_of(model, x, y, constant="detached"))
    return ctx.result(model, opt)


def no_parameter_reached(ctx: Ctx) -> dict[str, Any]:
    """Every objective's loss depends only on a tensor outside the optimizer (under AdamW, whose weight
    decay would move a parameter given even a zero ``.grad``): as a torch optimizer after
    ``sum(losses).backward()``, nothing gets a ``.grad`` and nothing moves."""
    model, opt = ctx.build(optimizer="adamw")
    outside = torch.linspace(1.0, 2.0, 4, requires_grad=True)
    opt.zero_grad()
    opt.step([(k + 1.0) * outside.sum() for k in range(ctx.m)])
    return ctx.result(model, opt, outside_grad=outside.grad)


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Ctx], dict[str, Any]]
    procs: tuple[int, ...] = (1, 2)


CASES: list[Case] = [
    Case("one_step", one_step),
    Case("accumulate_combine_false", accumulate_combine_false),
    Case("accumulate_combine_true", accumulate_combine_true),
    Case("default_device_elsewhere", default_device_elsewhere),
    Case("grad_scaler", grad_scaler),
    Case("grad_scaler_overflow", grad_scaler_overflow),
    Case("unscale_early_overflow", unscale_early_overflow),
    Case("clip_before_step", clip_before_step),
    Case("clip_between_microbatches", clip_between_microbatches),
    Case("edit_between_microbatches", edit_between_microbatches),
    Case("edit_before_step", edit_before_step),
    Case("flat_buffers", flat_buffers),
    Case("unreached_params", unreached_params),
    Case("partly_reached_distributed", partly_reached_distributed, procs=(2,)),
    Case("leaf_outside_optimizer", leaf_outside_optimizer),
    Case("constant_objective", constant_objective),
    Case("constant_objective_detached", constant_objective_detached),
    Case("no_parameter_reached", no_parameter_reached),
]


def execute(path: GradientPath, case: Case, dtype: torch.dtype, world: int = 1, rank: int = 0) -> dict[str, Any]:
    """Run one case; ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": ..., "unchanged": ...}``
    (``unchanged``: no parameter moved before the error). Warnings are recorded, not shown."""
    ctx = Ctx(path, dtype, world, rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.run(ctx)
        except Exception as error:  # noqa: BLE001 - reported to the test, which decides
            return {"ok": False, "error": describe(error), "unchanged": ctx.unchanged(), "warnings": [str(w.message) for w in caught]}
    result["warnings"] = [str(w.message) for w in caught]
    return {"ok": True, "result": result}
