"""The contract matrix: gradient paths x usage cases x dtypes x process counts.

``test_contract[<path>-<case>-<dtype>-<n>proc]`` runs one case of :mod:`tests.contract.cases` on one
path of :mod:`tests.contract.paths` and checks it against the float64 oracle of
:mod:`tests.contract.oracle` (tolerances: ``oracle.RTOL``). A combination the path lists in
``refuses`` must fail with that error and message before any parameter moves. On 2 ranks the
outcomes come from one pair of spawned gloo workers (``conftest.py``); every rank must also end
with the very same parameters.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from tests.process_groups import one_rank_group
from tests.reference import reference_coefficients

from .cases import BATCH, CASES, CLIP_MAX_NORM, MICRO, SCALER_INIT, TRUST_RADIUS, WEIGHTS, Case, execute, losses_of, make_data, make_model
from .oracle import RTOL, UNIT_ROUNDOFF, Expected, Problem, expected, tolerance
from .paths import PATHS, WORLDS, GradientPath, dtype_name


# --------------------------------------------------------------------------- the matrix
def _matrix() -> Iterator[Any]:
    for path in PATHS:
        for case in CASES:
            for dtype in path.dtypes:
                for world in case.procs:
                    yield pytest.param(path, case, dtype, world, id=f"{path.name}-{case.name}-{dtype_name(dtype)}-{world}proc")


@pytest.mark.parametrize(("path", "case", "dtype", "world"), list(_matrix()))
def test_contract(path: GradientPath, case: Case, dtype: torch.dtype, world: int, two_rank_outcomes: Callable[..., Any]) -> None:
    reason = path.missing(world, case.name, dtype)
    if reason is not None:
        pytest.skip(reason)
    if world == 1:
        with one_rank_group() if path.fsdp else contextlib.nullcontext():
            outcomes = [execute(path, case, dtype)]
    else:
        outcomes = two_rank_outcomes(path, dtype)[case.name]
    refusals = path.refusals(case.name, dtype, world)
    if refusals:
        _assert_refused(outcomes, refusals)
        return
    results = [_succeeded(outcome, rank, world) for rank, outcome in enumerate(outcomes)]
    CHECKS[case.name](Setting(path, dtype, world), results)
    if world > 1:
        _assert_ranks_identical(results)


def _first_line(error: dict[str, Any]) -> str:
    return f"{error['type']}: {error['message'].splitlines()[0] if error['message'] else ''}"


def _succeeded(outcome: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    if not outcome["ok"]:
        where = f" on rank {rank}" if world > 1 else ""
        pytest.fail(f"{_first_line(outcome['error'])}{where}\n\n{outcome['error']['traceback']}", pytrace=False)
    return outcome["result"]


def _assert_refused(outcomes: list[dict[str, Any]], refusals: list[tuple[type[BaseException], str]]) -> None:
    wanted = " or ".join(f"{kind.__name__} matching {pattern!r}" for kind, pattern in refusals)
    for rank, outcome in enumerate(outcomes):
        assert not outcome["ok"], f"rank {rank}: the path declares a refusal ({wanted}) but the case ran through"
        error = outcome["error"]
        assert any(kind.__name__ in error["mro"] and re.search(pattern, error["message"]) for kind, pattern in refusals), (
            f"rank {rank}: expected {wanted}, got {_first_line(error)}\n\n{error['traceback']}"
        )
        assert outcome["unchanged"] is not False, f"rank {rank}: refused ({_first_line(error)}) only after parameters had moved"


def _assert_ranks_identical(results: list[dict[str, Any]]) -> None:
    first = results[0]["params"]
    for rank, result in enumerate(results[1:], start=1):
        differ = [n for n in first if not torch.equal(first[n], result["params"][n])]
        assert not differ, f"rank {rank} ended with parameters other than rank 0's: {differ}"


# --------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Setting:
    path: GradientPath
    dtype: torch.dtype
    world: int

    def problem(self, *, scales: tuple[float, ...] | None = None, **changes: Any) -> Problem:
        """The oracle's problem: each rank's rows (``scales``: one scale per micro-batch of them)
        averaged over the ranks, as one process on the concatenated batch computes it."""
        per = BATCH // self.world
        if scales is None:
            terms = tuple((r * per, (r + 1) * per, 1.0 / self.world, False) for r in range(self.world))
        else:
            size = per // len(scales)
            terms = tuple(
                (r * per + k * size, r * per + (k + 1) * size, s / self.world, False)
                for r in range(self.world)
                for k, s in enumerate(scales)
            )
        fields: dict[str, Any] = {
            "m": self.path.m,
            "trunk_dtype": self.dtype,
            "head_dtype": self.path.head_dtype(self.dtype),
            "terms": terms,
            "shared": self.path.shared,
        }
        fields.update(changes)
        return Problem(**fields)


def _rounding_allowance(values: dict[str, torch.Tensor | None], dtypes: dict[str, torch.dtype]) -> float:
    """What storing ``values`` in their parameters' dtypes may cost, in norm."""
    return math.sqrt(sum((UNIT_ROUNDOFF[dtypes[n]] * float(v.norm())) ** 2 for n, v in values.items() if v is not None))


def assert_params_close(got: dict[str, torch.Tensor], exp: Expected, what: str = "parameters") -> None:
    """``||got - oracle|| <= rtol ||oracle update|| + rounding of the parameters to their dtypes``."""
    assert set(got) == set(exp.params), f"{what}: parameter names differ"
    errors = {n: float((got[n] - exp.params[n]).norm()) for n in exp.params}
    err = math.sqrt(sum(e * e for e in errors.values()))
    bound = exp.tolerance * exp.update_norm + _rounding_allowance(exp.params, exp.dtypes)  # type: ignore[arg-type]
    worst = max(errors, key=lambda n: errors[n])
    assert err <= bound, (
        f"{what} differ from the float64 oracle: |error| = {err:.3g} > {bound:.3g} "
        f"(|update| = {exp.update_norm:.3g}, rtol {exp.tolerance:g}); worst: {worst} ({errors[worst]:.3g})"
    )


def assert_grads_close(got: dict[str, Any], want: dict[str, torch.Tensor | None], exp: Expected, what: str = ".grad") -> None:
    """The same parameters have ``.grad = None``; the others equal ``want`` to the tolerance (norm-wise)."""
    for n, w in want.items():
        g = got[n]
        assert not isinstance(g, str), f"{what} of {n}: {g}"
        assert (g is None) == (w is None), (
            f"{what} of {n} is {'None' if g is None else 'set'}, expected {'None' if w is None else 'a gradient'}"
        )
    present = {n: w for n, w in want.items() if w is not None}
    err = math.sqrt(sum(float((got[n] - w).norm()) ** 2 for n, w in present.items()))
    norm = math.sqrt(sum(float(w.norm()) ** 2 for w in present.values()))
    bound = exp.tolerance * norm + _rounding_allowance(present, exp.dtypes)  # type: ignore[arg-type]
    assert err <= bound, f"{what} differs from the oracle's direction: |error| = {err:.3g} > {bound:.3g} (|d| = {norm:.3g})"


def assert_coefficients_close(result: dict[str, Any], exp: Expected) -> None:
    a = result["coefficients"]
    assert a is not None, "opt.last is None after a step"
    got, want = a.numpy(), exp.coefficients
    err = float(np.abs(got - want).max())
    assert err <= exp.tolerance * float(np.abs(want).max()), f"opt.last.coefficients {got} differ from the oracle's {want}"


def assert_unchanged(result: dict[str, Any], exp: Expected, what: str) -> None:
    moved = [n for n in exp.initial if not torch.equal(result["params"][n], exp.initial[n])]
    assert not moved, f"{what}, but these parameters moved: {moved}"


def check_step(setting: Setting, results: list[dict[str, Any]], *, grads: bool = True, **problem: Any) -> Expected:
    exp = expected(setting.problem(**problem))
    for result in results:
        assert_params_close(result["params"], exp)
        if grads:
            assert_grads_close(result["grads"], exp.step_direction, exp)
        assert_coefficients_close(result, exp)
    return exp


# --------------------------------------------------------------------------- one check per case
HALVES = (1.0 / MICRO,) * MICRO


def check_one_step(setting: Setting, results: list[dict[str, Any]]) -> None:
    check_step(setting, results)


def check_accumulate(setting: Setting, results: list[dict[str, Any]]) -> None:
    check_step(setting, results, scales=HALVES)


def check_grad_scaler(setting: Setting, results: list[dict[str, Any]]) -> None:
    check_step(setting, results, scales=HALVES)
    for result in results:
        assert result["scale"] == SCALER_INIT, f"the scale changed to {result['scale']} without an overflow"


def check_grad_scaler_overflow(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = expected(setting.problem(scales=HALVES))
    for result in results:
        assert_unchanged(result, exp, "an objective's gradient overflowed (scaler.step must skip)")
        assert result["scale"] == SCALER_INIT / 2, f"scaler.get_scale() is {result['scale']}, expected the back-off to {SCALER_INIT / 2}"


def check_unscale_early_overflow(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = expected(setting.problem(scales=HALVES))
    for result in results:
        assert_unchanged(result, exp, "an objective's gradient overflowed after an early unscale_ (scaler.step must skip)")
        assert result["scale"] == 0.5, f"scaler.get_scale() is {result['scale']}, expected the back-off from 1 to 0.5"


def check_no_parameter_reached(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = expected(setting.problem())
    for result in results:
        assert_unchanged(result, exp, "no loss reaches a parameter of the optimizer")
        got = {n: g for n, g in result["grads"].items() if g is not None}
        assert not got, f"parameters no loss reaches got a .grad: {sorted(got)}"
        m = setting.path.m
        want = torch.full((4,), m * (m + 1) / 2)  # sum_k (k + 1) d(sum(outside))/d(outside), as sum(losses).backward()
        assert result["outside_grad"] is not None and torch.equal(result["outside_grad"], want), (
            f"the tensor outside the optimizer holds {result['outside_grad']}, expected {want.tolist()}"
        )


def check_clip_before_step(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = expected(setting.problem(max_norm=CLIP_MAX_NORM))
    assert exp.direction_norm > 1.5 * CLIP_MAX_NORM, "the clip would not be active: the case checks nothing"
    for result in results:
        assert_params_close(result["params"], exp)
        assert_grads_close(result["grads"], exp.step_direction, exp, ".grad (clipped)")
        assert result["total_norm"] == pytest.approx(exp.direction_norm, rel=exp.tolerance), "clip_grad_norm_ saw another norm"


def check_clip_between(setting: Setting, results: list[dict[str, Any]]) -> None:
    check_step(setting, results, scales=HALVES)


def _check_edit(setting: Setting, results: list[dict[str, Any]], edited: Problem, kept: Problem) -> None:
    """Refused with a RuntimeError naming ``.grad`` (nothing moved), or the step of the edited
    accumulation: every objective's accumulated gradient halved (``edited``)."""
    exp = expected(edited)
    for result in results:
        raised = result["raised"]
        if raised is not None:
            assert "RuntimeError" in raised["mro"] and ".grad" in raised["message"], f"raised {_first_line(raised)}"
            assert_unchanged(result, exp, f"refused the edit ({_first_line(raised)})")
            continue
        unedited = expected(kept)
        error = float(
            math.sqrt(sum(float((result["params"][n] - unedited.params[n]).norm()) ** 2 for n in unedited.params)) / unedited.update_norm
        )
        try:
            assert_params_close(result["params"], exp, "parameters after the edit")
        except AssertionError as failure:
            raise AssertionError(
                f"{failure}\nthe in-place edit of .grad was neither refused nor applied to every objective's accumulated "
                f"gradient (relative distance to the unedited step: {error:.3g}): a silent mix"
            ) from None


def check_edit_between_microbatches(setting: Setting, results: list[dict[str, Any]]) -> None:
    _check_edit(setting, results, setting.problem(scales=(0.5 / MICRO, 1.0 / MICRO)), setting.problem(scales=HALVES))


def check_edit_before_step(setting: Setting, results: list[dict[str, Any]]) -> None:
    _check_edit(setting, results, setting.problem(scales=(0.5,)), setting.problem())


def check_flat_buffers(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = check_step(setting, results)
    for result in results:
        replaced = [n for n, same in result["same_object"].items() if not same]
        assert not replaced, f"p.grad is no longer the preallocated tensor for {replaced}"
        moved = [n for n, aliased in result["aliases_buffer"].items() if not aliased]
        assert not moved, f"p.grad no longer points into the flat buffer for {moved}"
        assert_grads_close(result["buffer"], {n: exp.direction[n] for n in result["buffer"]}, exp, "the flat buffer")


def check_unreached_params(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = expected(setting.problem(unused=True, optimizer="adamw"))
    for result in results:
        for n in ("unused.weight", "unused.bias"):
            assert result["grads"][n] is None, f"{n} is reached by no objective but its .grad is set"
            assert torch.equal(result["params"][n], exp.initial[n]), f"AdamW moved {n}, which no objective reaches"
        only = {n: exp.direction[n] for n in ("heads.0.weight", "heads.0.bias")}  # reached by objective 0 only
        for n in only:
            assert exp.objective_grads[1][n] is None and exp.objective_grads[0][n] is not None
        assert_grads_close(result["grads"], only, exp, ".grad of the head only objective 0 reaches (a_0 g_0)")
        assert_grads_close(result["grads"], exp.direction, exp)
        assert_params_close(result["params"], exp)
        assert_coefficients_close(result, exp)


def check_partly_reached(setting: Setting, results: list[dict[str, Any]]) -> None:
    per = BATCH // setting.world
    terms = tuple((r * per, (r + 1) * per, 1.0 / setting.world, r == 0) for r in range(setting.world))
    exp = check_step(setting, results, unused=True, extra=True, terms=terms)
    for rank, result in enumerate(results):
        assert result["grads"]["unused.weight"] is None, f"rank {rank}: a parameter no rank reaches got a .grad"
        assert not torch.equal(result["params"]["extra.weight"], exp.initial["extra.weight"]), f"rank {rank}: extra did not move"


def check_leaf_outside_optimizer(setting: Setting, results: list[dict[str, Any]]) -> None:
    exp = expected(setting.problem(exclude=("shift",)))
    for result in results:
        assert_params_close(result["params"], exp)
        assert_coefficients_close(result, exp)
        leaf, want = result["grads"]["shift"], result["twin_leaf_grad"]
        assert leaf is not None and not isinstance(leaf, str), f"the leaf outside the optimizer has .grad {leaf!r}"
        err = float((leaf - want).norm())
        bound = exp.tolerance * float(want.norm()) + UNIT_ROUNDOFF[exp.dtypes["shift"]] * float(want.norm())
        assert err <= bound, (
            f"the leaf outside the optimizer holds {leaf.tolist()}, not the plain sum of the objectives' gradients "
            f"{want.tolist()} (as sum(losses).backward() leaves it): |error| = {err:.3g} > {bound:.3g}"
        )


def check_constant_objective(setting: Setting, results: list[dict[str, Any]]) -> None:
    check_step(setting, results, constant="zero_times")


def check_constant_objective_detached(setting: Setting, results: list[dict[str, Any]]) -> None:
    check_step(setting, results, constant="detached")


CHECKS: dict[str, Callable[[Setting, list[dict[str, Any]]], None]] = {
    "one_step": check_one_step,
    "accumulate_combine_false": check_accumulate,
    "default_device_elsewhere": check_one_step,
    "accumulate_combine_true": check_accumulate,
    "grad_scaler": check_grad_scaler,
    "grad_scaler_overflow": check_grad_scaler_overflow,
    "unscale_early_overflow": check_unscale_early_overflow,
    "clip_before_step": check_clip_before_step,
    "clip_between_microbatches": check_clip_between,
    "edit_between_microbatches": check_edit_between_microbatches,
    "edit_before_step": check_edit_before_step,
    "flat_buffers": check_flat_buffers,
    "unreached_params": check_unreached_params,
    "partly_reached_distributed": check_partly_reached,
    "leaf_outside_optimizer": check_leaf_outside_optimizer,
    "constant_objective": check_constant_objective,
    "constant_objective_detached": check_constant_objective_detached,
    "no_parameter_reached": check_no_parameter_reached,
}


# --------------------------------------------------------------------------- the registry and the oracle themselves
def test_every_case_has_a_check() -> None:
    assert set(CHECKS) == {case.name for case in CASES}


def test_registry_refuses_every_combination_a_path_does_not_run() -> None:
    """A process count outside ``procs`` is in ``refuses`` for every case; each pattern names something."""
    names = [path.name for path in PATHS]
    assert len(names) == len(set(names)), "path names must be unique"
    cases = {case.name for case in CASES}
    for path in PATHS:
        assert set(path.procs) <= set(WORLDS)
        for case in CASES:
            for dtype in path.dtypes:
                for world in case.procs:
                    if world not in path.procs:
                        assert path.refusals(case.name, dtype, world), f"{path.name} does not run {case.name} on {world} processes"
        for pattern in path.refuses:
            assert pattern in cases or any(path.refusals(case.name, d, w) for case in CASES for d in path.dtypes for w in case.procs), (
                f"{path.name}: refusal pattern {pattern!r} matches no combination"
            )


@pytest.mark.parametrize("m", sorted({path.m for path in PATHS}))
@pytest.mark.parametrize("shared", ["all", "trunk"])
def test_the_problem_exercises_the_correction_and_the_clip(m: int, shared: str) -> None:
    """On the suite's problem the CAGrad correction and RACO's clip each move the direction by far more
    than the loosest tolerance, so a weighted sum, or CAGrad without the clip, fails the matrix."""
    exp = expected(Problem(m, torch.float32, torch.float32, shared=shared))
    grads = np.stack(
        [
            np.concatenate([(g if g is not None else torch.zeros_like(exp.initial[n])).numpy().ravel() for n, g in row.items()])
            for row in exp.objective_grads
        ]
    )
    d = exp.coefficients @ grads
    unclipped = reference_coefficients(exp.gram, exp.weights, TRUST_RADIUS, clip=False) @ grads
    loosest = max(RTOL.values())
    assert np.linalg.norm(d - exp.weights @ grads) > 10 * loosest * np.linalg.norm(d)
    assert np.linalg.norm(d - unclipped) > 3 * loosest * np.linalg.norm(d)


def test_oracle_at_c_zero_is_the_weighted_sum_gradient() -> None:
    """The oracle's gradient plumbing: with c = 0 the direction is the gradient of sum_i w_i L_i."""
    exp = expected(Problem(2, torch.float32, torch.float32))
    model = make_model(2, torch.float32, torch.float32).cast(torch.float64, torch.float64, torch.float64)
    x, y = make_data(2, (torch.float32,))
    named = dict(model.named_parameters())
    w = exp.weights
    a0 = reference_coefficients(exp.gram, w, 0.0)
    np.testing.assert_allclose(a0, w, rtol=1e-15)
    losses = losses_of(model, x.double(), y.double())
    grads = torch.autograd.grad(sum(float(wi) * loss for wi, loss in zip(w, losses)), list(named.values()))
    for (n, _), g in zip(named.items(), grads):
        combined = sum(float(w[i]) * gi for i in range(2) if (gi := exp.objective_grads[i][n]) is not None)
        torch.testing.assert_close(combined, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("trunk", "head"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["float32", "bfloat16", "float32+bfloat16", "bfloat16+float32"],
)
@pytest.mark.parametrize("m", sorted({path.m for path in PATHS}))
def test_tolerances_admit_an_ideal_step_in_the_dtype(trunk: torch.dtype, head: torch.dtype, m: int) -> None:
    """The tolerances are not tighter than the dtype allows: per-objective gradients by autograd in the
    dtype, the Gram in float64, the reference coefficients, ``d`` stored in the dtype and ``p - d``
    rounded to it pass ``assert_params_close``."""
    exp = expected(Problem(m, trunk, head))
    model = make_model(m, trunk, head)
    x, y = make_data(m, (trunk, head))
    names, params = zip(*model.named_parameters())
    grads = [
        [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
        ]
        for loss in losses_of(model, x, y)
    ]
    flat = torch.stack([torch.cat([g.double().reshape(-1) for g in row]) for row in grads])
    a = reference_coefficients((flat @ flat.T).numpy(), np.asarray(WEIGHTS[m], dtype=np.float64), TRUST_RADIUS)
    stepped = {}
    for j, (n, p) in enumerate(zip(names, params)):
        d = sum(float(a[i]) * grads[i][j].double() for i in range(m)).to(p.dtype)
        stepped[n] = (p.detach() - d).double()
    assert_params_close(stepped, exp, "an ideal step in the dtype")
    assert exp.tolerance == tolerance({trunk, head})
