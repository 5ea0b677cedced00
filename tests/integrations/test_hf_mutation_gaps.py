"""Behaviours of ``MultiObjectiveTrainerMixin`` and the shared integration helpers that surviving mutants
showed no test pinned: resuming (a custom multi-objective optimizer's state, a changed ``nonfinite``
policy, the one log line and no leaked warning), the reported loss of objectives in different dtypes,
and the module names a refused ``shared_modules`` pattern lists. Each against an independent reference
(a run without a resume, a hand computation, the model's own module names)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations import shared_parameters  # noqa: E402

from . import tiny  # noqa: E402
from .test_hf import HalvesTrainer, args, halves, rows  # noqa: E402
from .test_hf_contracts import WeightedSumSGD  # noqa: E402


# ------------------------------------------------------------------ shared_modules
def test_a_pattern_that_matches_no_module_lists_the_first_eight_module_names():
    """The refusal names the model's modules, the first 8 of them, separated by ", "."""
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])  # modules "0" ... "9"
    with pytest.raises(ValueError) as refused:
        shared_parameters(model, ["decoder.*"])
    assert str(refused.value).endswith("its modules are named like: 0, 1, 2, 3, 4, 5, 6, 7")


# ------------------------------------------------------------------ the reported loss
class MixedDtypeTrainer(HalvesTrainer):
    """The second objective's loss in float64 (one loss computed in another dtype than the other)."""

    def objective_losses(self, model, inputs):
        head, tail = halves(model, inputs["input_ids"])
        return [head, tail.double()]


def test_the_weighted_loss_of_objectives_in_different_dtypes_is_in_the_first_ones_dtype(tmp_path):
    """``compute_loss`` (what evaluation reports) weights the losses in the first loss's dtype, whatever
    the others' dtypes: ``0.8 * head + 0.2 * tail`` here, float32."""
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok).eval()
    trainer = MixedDtypeTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), objective_weights=[0.8, 0.2])
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids})
        head, tail = halves(model, ids)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.8 * head.item() + 0.2 * tail.item(), rel=1e-6)


def test_the_training_steps_reported_loss_of_objectives_in_different_dtypes_is_in_the_first_ones_dtype(tmp_path):
    """``training_step`` returns the same weighted loss as ``compute_loss``: ``0.8 * head + 0.2 * tail`` in
    the first loss's float32, though the second loss is float64."""
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    trainer = MixedDtypeTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), objective_weights=[0.8, 0.2])
    trainer.create_optimizer()
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    with torch.no_grad():
        head, tail = halves(model.eval(), ids)
    model.train()
    loss = trainer.training_step(model, {"input_ids": ids})
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.8 * head.item() + 0.2 * tail.item(), rel=1e-6)


class CombineSpyTrainer(HalvesTrainer):
    """Records the ``combine=`` of every ``backward`` the trainer asks of its optimizer."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.conflict_averse_optimizer
        if not hasattr(self, "combines"):
            self.combines, backward = [], opt.backward
            opt.backward = lambda losses, combine=True: (self.combines.append(combine), backward(losses, combine=combine))[1]
        return super().training_step(model, inputs, num_items_in_batch)


def test_a_window_of_micro_batches_is_combined_once_at_its_last(tmp_path):
    """Gradient accumulation over 2 micro-batches, 2 steps: the optimizer accumulates the first micro-batch
    of each window (``combine=False``: no dual solve, no direction written) and combines at the last."""
    trainer = CombineSpyTrainer(
        model=tiny.no_dropout_gpt2(tiny.tokenizer()),
        args=args(tmp_path, gradient_accumulation_steps=2, max_steps=2),
        train_dataset=rows(8),
    )
    trainer.train()
    assert trainer.combines == [False, True, False, True]


def test_the_trainers_objective_settings_default_to_the_optimizers_defaults(tmp_path):
    """A trainer given no objective settings builds the optimizer a bare ``ConflictAverseOptimizer(base)``
    would be: the same ``c``, ``clip``, ``rescale``, ``solver`` and ``max_iter``."""
    trainer = HalvesTrainer(model=tiny.no_dropout_gpt2(tiny.tokenizer()), args=args(tmp_path), train_dataset=rows(2))
    trainer.create_optimizer()
    bare = ConflictAverseOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert trainer.conflict_averse_optimizer.settings.to_dict() == bare.settings.to_dict()


class OnlyConflictAverseTrainer(HalvesTrainer):
    multi_objective_types = (ConflictAverseOptimizer,)


def test_an_optimizer_outside_the_trainers_multi_objective_types_is_wrapped_as_a_base_optimizer(tmp_path):
    """``multi_objective_types`` names what the trainer takes as it is; any other optimizer is a base
    optimizer to wrap, even one shaped like a multi-objective optimizer (``backward``, ``weights``, ``last``)."""
    model = tiny.no_dropout_gpt2(tiny.tokenizer())
    base = WeightedSumSGD(model.parameters(), lr=0.1, weights=[1.0, 3.0])
    trainer = OnlyConflictAverseTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), optimizers=(base, None))
    for _ in ("constructed", "create_optimizer"):  # wrapped at once, and create_optimizer keeps that wrapper
        assert isinstance(trainer.optimizer, ConflictAverseOptimizer)
        assert trainer.optimizer.optimizer is base
        trainer.create_optimizer()


# ------------------------------------------------------------------ a KeyError inside objective_losses
class KeyErrorTrainer(HalvesTrainer):
    """``objective_losses`` fails with the ``KeyError`` it is given (a bug of the user's own code)."""

    error: KeyError = KeyError()

    def objective_losses(self, model, inputs):
        raise self.error


@pytest.mark.parametrize(
    ("error", "inputs"),
    [
        (KeyError(), {"input_ids": None}),  # no key at all
        (KeyError("input_ids"), {"input_ids": None}),  # a key the batch has: the lookup failed elsewhere
        (KeyError(("input_ids", 0)), {}),  # not a column name
    ],
    ids=["bare", "present_column", "not_a_string"],
)
def test_a_key_error_that_is_not_a_removed_column_reaches_the_user_unchanged(tmp_path, error, inputs):
    """With ``remove_unused_columns=True`` a ``KeyError`` naming a column the batch lacks is explained
    (the Trainer removed it; see ``test_hf.py``); any other ``KeyError`` is the user's own bug and is
    raised as it is: the same exception object, not an explanation of columns."""
    tok = tiny.tokenizer()
    trainer = KeyErrorTrainer(model=tiny.no_dropout_gpt2(tok), args=args(tmp_path, remove_unused_columns=True), train_dataset=rows(2))
    trainer.error = error
    with pytest.raises(KeyError) as raised:
        trainer.compute_loss(trainer.model, inputs)
    assert raised.value is error


# ------------------------------------------------------------------ resuming
class WeightedMomentumSGD(WeightedSumSGD):
    """A multi-objective rule that is not a ConflictAverseOptimizer (as the DPO benchmark's baselines):
    the weighted sum's gradient, stepped with momentum, so its state (the momentum buffers) matters."""

    def __init__(self, params, weights) -> None:
        super().__init__(params, lr=0.1, weights=weights, momentum=0.9)


class MomentumTrainer(HalvesTrainer):
    multi_objective_types = (ConflictAverseOptimizer, WeightedMomentumSGD)


def _momentum_run(tmp_path, out: str, resume: str | None = None) -> torch.nn.Module:
    model = tiny.no_dropout_gpt2(tiny.tokenizer())
    opt = WeightedMomentumSGD(model.parameters(), weights=[1.0, 3.0])
    trainer = MomentumTrainer(
        model=model,
        args=args(tmp_path / out, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=rows(4),
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
    )
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.optimizer is opt or trainer.conflict_averse_optimizer is opt
    return model


def test_resuming_with_a_custom_multi_objective_optimizer_restores_its_state(tmp_path):
    """Resumed after step 1 of 2, the run ends where the run without a break ends: the custom optimizer's
    momentum is the checkpoint's (the Trainer loads its state as for any optimizer)."""
    straight = _momentum_run(tmp_path, "a")
    resumed = _momentum_run(tmp_path, "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(straight.parameters(), tiny.no_dropout_gpt2(tiny.tokenizer()).parameters()))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A checkpoint after one step with the default settings (``c = 0.4``, ``nonfinite="skip"``)."""
    out = tmp_path_factory.mktemp("first")
    first = HalvesTrainer(
        model=tiny.no_dropout_gpt2(tiny.tokenizer()),
        args=args(out, max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=rows(4),
    )
    first.train()
    assert (first.conflict_averse_optimizer.nonfinite, first.conflict_averse_optimizer.c) == ("skip", 0.4)
    return str(out / "checkpoint-1")


def test_resuming_with_a_new_nonfinite_policy_applies_it_and_names_every_change_in_one_line(tmp_path, caplog, checkpoint):
    """A new phase from a checkpoint: ``nonfinite`` and ``c`` given to this run replace the checkpoint's,
    one log line names both (", "-separated), and the optimizer's own "replaced with the checkpoint's"
    warning, undone here, does not reach the user."""
    resumed = HalvesTrainer(
        model=tiny.no_dropout_gpt2(tiny.tokenizer()),
        args=args(tmp_path, max_steps=2),
        train_dataset=rows(4),
        c=0.1,
        nonfinite="raise",
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="cagrad_clip.integrations.hf"):
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=checkpoint)
    opt = resumed.conflict_averse_optimizer
    assert (opt.nonfinite, opt.c) == ("raise", 0.1)
    lines = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert lines == [
        f"resumed from {checkpoint}: this run's settings replace the checkpoint's (c: 0.4 -> 0.1, nonfinite: 'skip' -> 'raise')"
    ]
    assert not [w for w in caught if "load_state_dict replaced" in str(w.message)]


class Delegating:
    """A user's multi-objective wrapper around a ConflictAverseOptimizer (logging, say): it has the
    protocol's members through its ``.optimizer``, so it is the multi-objective optimizer the trainer finds."""

    def __init__(self, inner: ConflictAverseOptimizer) -> None:
        self.optimizer = inner

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


def _wrapped_run(out, c: float, max_steps: int, resume: str | None = None) -> ConflictAverseOptimizer:
    model = tiny.no_dropout_gpt2(tiny.tokenizer())
    inner = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), c=c)
    trainer = HalvesTrainer(
        model=model,
        args=args(out, max_steps=max_steps, save_strategy="steps", save_steps=1),
        train_dataset=rows(4),
        optimizers=(Delegating(inner), torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)),
    )
    trainer.train(resume_from_checkpoint=resume)
    return inner


def test_resuming_through_a_users_wrapper_still_applies_this_runs_settings(tmp_path, caplog):
    """The resume looks through a wrapper of the user's own to the ConflictAverseOptimizer inside: this
    run's ``c`` replaces the checkpoint's there too, and the one log line names it."""
    _wrapped_run(tmp_path / "a", c=0.4, max_steps=1)
    checkpoint = str(tmp_path / "a" / "checkpoint-1")
    with caplog.at_level(logging.WARNING, logger="cagrad_clip.integrations.hf"):
        inner = _wrapped_run(tmp_path / "b", c=0.1, max_steps=2, resume=checkpoint)
    assert inner.c == 0.1
    lines = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert lines == [f"resumed from {checkpoint}: this run's settings replace the checkpoint's (c: 0.4 -> 0.1)"]


class WarningSGD(torch.optim.SGD):
    """A base optimizer that warns when it loads a learning rate other than its own (as a user's may)."""

    def load_state_dict(self, state_dict) -> None:
        saved, own = state_dict["param_groups"][0]["lr"], self.param_groups[0]["lr"]
        if saved != own:
            warnings.warn(f"WarningSGD: the loaded learning rate {saved} replaces {own}", UserWarning, stacklevel=2)
        super().load_state_dict(state_dict)


def test_resuming_silences_only_the_settings_warning_not_the_base_optimizers_own(tmp_path, checkpoint):
    """Only the wrapper's "replaced this optimizer's settings" warning is held back on a resume: a warning
    the base optimizer raises while its state loads still reaches the user."""
    model = tiny.no_dropout_gpt2(tiny.tokenizer())
    built = HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(4)).create_optimizer()
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in built.param_groups]  # the checkpoint's groups
    own = ConflictAverseOptimizer(WarningSGD(groups, lr=0.25), c=0.1)  # the checkpoint has 0.5
    trainer = HalvesTrainer(
        model=model,
        args=args(tmp_path, max_steps=2),
        train_dataset=rows(4),
        optimizers=(own, torch.optim.lr_scheduler.LambdaLR(own, lambda s: 1.0)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=checkpoint)
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if m.startswith("WarningSGD:")] == ["WarningSGD: the loaded learning rate 0.5 replaces 0.25"]
    assert not [m for m in messages if "load_state_dict replaced" in m]
    assert own.c == 0.1  # this run's settings, not the checkpoint's
