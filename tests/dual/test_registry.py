"""The solver registry: one registration makes a solver usable everywhere a solver name is accepted."""

from __future__ import annotations

import pytest
import torch

from cagrad_clip import SOLVER_OPTIONS, CAGradSettings, ConflictAverseOptimizer, solve_cagrad
from cagrad_clip._dual import SOLVERS, DualSolver, register
from tests.dual.helpers import SOLVERS as PROPERTY_SOLVERS


def test_the_built_in_solvers_are_registered_and_listed() -> None:
    assert list(SOLVERS) == ["exact", "frank_wolfe"] and PROPERTY_SOLVERS == list(SOLVERS)
    assert list(SOLVER_OPTIONS) == ["auto", *SOLVERS] and SOLVER_OPTIONS["exact"] == SOLVERS["exact"].description
    with pytest.raises(ValueError, match="already registered"):
        register(DualSolver("exact", "again", SOLVERS["exact"].solve))
    with pytest.raises(ValueError, match="already registered"):
        register(DualSolver("auto", "the shape rule's name", SOLVERS["exact"].solve))


def test_a_registered_solver_is_accepted_by_the_settings_the_functions_and_the_optimizer(request) -> None:
    """A solver registered under a new name (here: the exact solve with an m limit of 4, counting its
    calls) is listed, validated, honours its limit, and is what ``solve_cagrad`` and the optimizer run."""
    calls = []

    def counting(problem, **kwargs):
        calls.append(problem.Hn.shape)
        return SOLVERS["exact"].solve(problem, **kwargs)

    solver = DualSolver("counting", "the exact solve, counted", counting, max_m=4)
    request.addfinalizer(lambda: SOLVERS.pop("counting", None))  # the registration is undone after the test
    assert register(solver) is solver and SOLVERS["counting"] is solver
    assert "counting" in SOLVER_OPTIONS and CAGradSettings(solver="counting").solver == "counting"
    torch.manual_seed(0)
    G = torch.randn(3, 7, dtype=torch.float64)
    gram, w = G @ G.T, [0.5, 0.3, 0.2]
    got = solve_cagrad(gram, w, c=0.6, solver="counting").coefficients
    want = solve_cagrad(gram, w, c=0.6, solver="exact").coefficients
    assert torch.equal(got, want) and calls == [(3, 3)]
    with pytest.raises(ValueError, match="solver='counting' is limited to m <= 4 objectives, got m = 5"):
        solve_cagrad(torch.eye(5, dtype=torch.float64), solver="counting")
    p = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    opt = ConflictAverseOptimizer(torch.optim.SGD([p], lr=0.1), w, c=0.6, solver="counting")
    opt.step([(g * p).sum() for g in G])
    assert len(calls) == 2 and torch.allclose(opt.last.coefficients, want)


def test_solver_options_compare_as_the_dict_of_names_and_descriptions() -> None:
    want = {"auto": SOLVER_OPTIONS["auto"], **{name: solver.description for name, solver in SOLVERS.items()}}
    assert SOLVER_OPTIONS == want and not (SOLVER_OPTIONS != want) and SOLVER_OPTIONS != {"auto": "x"}
    assert repr(SOLVER_OPTIONS) == repr(want) and len(SOLVER_OPTIONS) == len(want)
