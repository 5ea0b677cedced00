"""The public surface: what ``cagrad_clip`` and its integrations export, and one order of options.

A change here is a change of the public API: it must be deliberate (and documented in docs/guide.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

import cagrad_clip

PUBLIC = {
    "AutogramEngine",
    "CAGradSettings",
    "CAGradSolution",
    "ConflictAverseOptimizer",
    "NONFINITE_POLICIES",
    "NonfinitePolicy",
    "RESCALE_OPTIONS",
    "SOLVER_OPTIONS",
    "StepDiagnostics",
    "combination_coefficients",
    "default_max_iter",
    "solve_cagrad",
}

#: Every option that decides or carries out a step, in the one order all entry points use (each entry
#: point takes a subset of it, keyword-only); the integrations put ``objective_weights`` and
#: ``objective_names`` first and their own options (``signs_column``, ``accumulate_grad_batches``, ...) last.
ORDER = [
    "objective_names",
    "c",
    "clip",
    "rescale",
    "solver",
    "max_iter",
    "shared",
    "memory",
    "engine",
    "accumulate_dtype",
    "nonfinite",
    "distributed",
    "process_group",
    "validate",
]


def test_the_package_exports_exactly_the_public_names() -> None:
    assert set(cagrad_clip.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(cagrad_clip, name) is not None


def _keyword_only(function) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _in_order(names: list[str]) -> list[str]:
    return [n for n in names if n in ORDER]


@pytest.mark.parametrize(
    ("function", "positional"),
    [
        (cagrad_clip.ConflictAverseOptimizer.__init__, ["self", "optimizer", "weights"]),
        (cagrad_clip.solve_cagrad, ["gram", "weights"]),
        (cagrad_clip.combination_coefficients, ["gram", "weights"]),
        (cagrad_clip.CAGradSettings.__init__, ["self", "weights"]),
    ],
    ids=["ConflictAverseOptimizer", "solve_cagrad", "combination_coefficients", "CAGradSettings"],
)
def test_options_after_the_weights_are_keyword_only_in_one_order(function, positional: list[str]) -> None:
    params = inspect.signature(function).parameters.values()
    assert [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY] == positional
    options = _keyword_only(function)
    assert options == sorted(options, key=ORDER.index), f"{options} is not in the order {ORDER}"


def test_the_integrations_take_the_options_in_the_same_order() -> None:
    hf = importlib.import_module("cagrad_clip.integrations.hf")
    mixin = _keyword_only(hf.MultiObjectiveTrainerMixin.__init__)
    assert mixin[0] == "objective_weights"
    assert _in_order(mixin) == sorted(_in_order(mixin), key=ORDER.index)
    pytest.importorskip("pytorch_lightning", reason="needs the lightning extra")
    lightning = importlib.import_module("cagrad_clip.integrations.lightning")
    names = list(inspect.signature(lightning.MultiObjectiveModule.__init__).parameters)
    assert names[:2] == ["self", "objective_weights"] and _keyword_only(lightning.MultiObjectiveModule.__init__) == names[2:]
    assert _in_order(names) == sorted(_in_order(names), key=ORDER.index)


def test_the_trl_config_lists_the_options_in_the_same_order() -> None:
    pytest.importorskip("trl", reason="needs the trl extra")
    trl = importlib.import_module("cagrad_clip.integrations.trl")
    own = [f.name for f in dataclasses.fields(trl.MultiObjectiveDPOConfig) if f.name in {"objective_weights", "signs_column", *ORDER}]
    assert own[0] == "objective_weights" and own[-1] == "signs_column"
    assert _in_order(own) == sorted(_in_order(own), key=ORDER.index)


def test_every_implementation_module_is_private() -> None:
    """Outside ``__init__`` and ``integrations/`` (public), every module and package of ``cagrad_clip`` is
    ``_``-prefixed: what is not exported may change between versions."""
    import pkgutil

    public = [m.name for m in pkgutil.iter_modules(cagrad_clip.__path__) if not m.name.startswith("_") and m.name != "integrations"]
    assert public == []
