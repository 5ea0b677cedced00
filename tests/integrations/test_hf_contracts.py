"""Contracts of the shared integration helpers and of ``MultiObjectiveTrainerMixin`` that the
end-to-end tests in ``test_hf.py`` leave open: weight checks, the walk to the multi-objective
optimizer, the accumulation share outside a prefetched window, DDP's ``no_sync``, evaluation
weights, the log's keys, a custom optimizer type. Each against a hand computation."""

from __future__ import annotations

import contextlib
import copy
import math
import time
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations import check_weights, find_conflict_averse, objective_names, require_conflict_averse  # noqa: E402

from . import tiny  # noqa: E402
from .test_hf import HalvesTrainer, args, halves, rows  # noqa: E402

WEIGHTS = [0.8, 0.2]


def sgd(model: torch.nn.Module, lr: float = 0.5) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr)


def weighted(losses, w) -> float:
    return sum(wi * float(li) for wi, li in zip(w, losses))


# ------------------------------------------------------------------ check_weights / objective_names
def test_check_weights_accepts_zero_and_unnormalised_weights_and_returns_lists():
    assert check_weights(None, None) == (None, None)
    assert check_weights((1, 0), ("a", "b")) == ([1.0, 0.0], ["a", "b"])  # a zero weight is allowed
    assert check_weights([0.5, 0.5], None) == ([0.5, 0.5], None)  # weights summing to 1
    assert check_weights([0.3], ["only"]) == ([0.3], ["only"])  # one objective, weight below 1
    assert check_weights(None, ["x", "y", "z"]) == (None, ["x", "y", "z"])  # names alone
    w, n = check_weights(torch.tensor([2, 6]), (0, 1))
    assert w == [2.0, 6.0] and all(type(x) is float for x in w) and n == ["0", "1"]


@pytest.mark.parametrize("weights", [[], [-1.0, 2.0], [math.inf, 1.0], [math.nan, 1.0], [0.0, 0.0], [0.0], [-0.5]], ids=repr)
def test_check_weights_refuses_weights_that_are_empty_negative_nonfinite_or_sum_to_zero(weights):
    with pytest.raises(ValueError):
        check_weights(weights, None)


def test_check_weights_refuses_repeated_names_and_a_name_count_other_than_the_weight_count():
    with pytest.raises(ValueError):
        check_weights(None, ["a", "a"])
    with pytest.raises(ValueError):
        check_weights([1.0, 1.0], ["a"])
    with pytest.raises(ValueError):
        check_weights([1.0], ["a", "b"])


def test_objective_names_default_to_numbered_names_and_must_match_the_count():
    assert objective_names(None, 3) == ["objective_0", "objective_1", "objective_2"]
    given = ("a", "b")
    names = objective_names(given, 2)
    assert names == ["a", "b"] and isinstance(names, list)
    with pytest.raises(ValueError):
        objective_names(["a"], 2)


# ------------------------------------------------------------------ find / require
class Wrapper:
    """An accelerate-like wrapper: the wrapped optimizer in ``.optimizer``."""

    def __init__(self, inner: object) -> None:
        self.optimizer = inner


class Looping:
    """Its ``.optimizer`` is itself: a walk must stop (reads past a few mean it went round again)."""

    def __init__(self) -> None:
        self.reads = 0

    @property
    def optimizer(self):
        self.reads += 1
        if self.reads > 3:
            raise RuntimeError("the walk went round the cycle again")
        return self


def test_find_conflict_averse_walks_wrappers_to_the_first_match_and_stops_on_cycles():
    model = torch.nn.Linear(2, 1)
    base = sgd(model)
    cao = ConflictAverseOptimizer(base, weights=WEIGHTS)
    assert find_conflict_averse(cao) is cao  # not its base optimizer (which is its .optimizer)
    assert find_conflict_averse(Wrapper(Wrapper(cao))) is cao
    assert find_conflict_averse(base) is None
    assert find_conflict_averse(Wrapper(base)) is None
    assert find_conflict_averse(None) is None
    assert find_conflict_averse(Wrapper(base), (torch.optim.SGD,)) is base  # the types asked for
    assert find_conflict_averse(Wrapper(cao), (torch.optim.SGD,)) is base
    loop = Looping()
    assert find_conflict_averse(loop) is None
    a, b = Wrapper(None), Wrapper(None)
    a.optimizer, b.optimizer = b, a
    assert find_conflict_averse(a) is None
    assert require_conflict_averse(Wrapper(cao), "Owner", "hint") is cao
    assert require_conflict_averse(Wrapper(base), "Owner", "hint", (torch.optim.SGD,)) is base
    with pytest.raises(TypeError):
        require_conflict_averse(Wrapper(base), "Owner", "hint")


# ------------------------------------------------------------------ a custom multi-objective optimizer type
class WeightedSumSGD(torch.optim.SGD):
    """An optimizer-shaped baseline (as the DPO benchmark's): ``backward(losses, combine=)`` writes the
    gradient of the weighted sum, ``weights`` (normalised) and ``last`` like the wrapper's."""

    def __init__(self, params, lr: float, weights, momentum: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum)
        w = torch.tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.last = None

    def backward(self, losses, combine: bool = True) -> None:
        torch.stack(list(losses)).float().matmul(self.weights.float()).backward()
        m = len(self.weights)
        self.last = types.SimpleNamespace(coefficients=self.weights.clone(), cosines=torch.eye(m, dtype=torch.float64))


class WeightedSumTrainer(HalvesTrainer):
    multi_objective_types = (ConflictAverseOptimizer, WeightedSumSGD)


def test_a_custom_multi_objective_type_is_used_as_is_for_training_evaluation_and_logs(tmp_path):
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    opt = WeightedSumSGD(model.parameters(), lr=0.5, weights=[1.0, 3.0])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = WeightedSumTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), optimizers=(opt, sched))
    assert trainer.optimizer is opt  # not wrapped in a ConflictAverseOptimizer
    assert trainer.create_optimizer() is opt
    assert trainer.conflict_averse_optimizer is opt
    data = rows(4)
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        head, tail = halves(model.eval(), torch.stack([r["input_ids"] for r in data]))
    assert metrics["eval_loss"] == pytest.approx(0.25 * head.item() + 0.75 * tail.item(), rel=1e-5)  # its weights
    model.train()
    trainer.training_step(model, {"input_ids": torch.stack([r["input_ids"] for r in data])})
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["coef/objective_0"] == pytest.approx(0.25) and logged["coef/objective_1"] == pytest.approx(0.75)
    assert logged["cos/objective_0|objective_1"] == 0.0


# ------------------------------------------------------------------ construction and the optimizer it builds
def test_constructor_settings_reach_the_optimizer_built_for_the_model_asked(tmp_path):
    tok = tiny.tokenizer()
    model, other = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    trainer = HalvesTrainer(model, args(tmp_path), train_dataset=rows(2), objective_weights=[1, 3], c=0.2, clip=False, rescale="1+c")
    assert trainer.model is model and trainer.args.learning_rate == 0.5  # positional model and args reach the Trainer
    opt = trainer.create_optimizer()
    assert isinstance(opt, ConflictAverseOptimizer) and trainer.create_optimizer() is opt
    assert (opt.c, opt.clip, opt.rescale, opt.nonfinite) == (0.2, False, "1+c", "skip")
    assert opt.weights.tolist() == [0.25, 0.75]
    assert isinstance(opt.optimizer, torch.optim.SGD)
    for how in ("positional", "keyword"):  # Trainer.create_optimizer(model): the optimizer of that model
        fresh = HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2))
        built = fresh.create_optimizer(other) if how == "positional" else fresh.create_optimizer(model=other)
        assert isinstance(built, ConflictAverseOptimizer)
        mine = {id(p) for g in built.param_groups for p in g["params"]}
        assert mine == {id(p) for p in other.parameters()}, how


def test_fp16_defaults_to_ignore_unless_the_user_chose_a_policy(tmp_path):
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    trainer = HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2))
    assert trainer.wrap_optimizer(sgd(model)).nonfinite == "skip"
    trainer.args.fp16 = True  # the GradScaler checks for Inf/NaN itself
    assert trainer.wrap_optimizer(sgd(model)).nonfinite == "ignore"
    chosen = HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), nonfinite="raise")
    chosen.args.fp16 = True
    assert chosen.wrap_optimizer(sgd(model)).nonfinite == "raise"


def test_a_users_wrapper_is_kept_and_its_weights_weight_the_reported_loss(tmp_path):
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    own = ConflictAverseOptimizer(sgd(model), weights=[1.0, 3.0])
    trainer = HalvesTrainer(
        model=model, args=args(tmp_path), train_dataset=rows(2), optimizers=(own, torch.optim.lr_scheduler.LambdaLR(own, lambda s: 1.0))
    )
    assert trainer.optimizer is own and trainer.create_optimizer() is own  # not wrapped a second time
    data = rows(4)
    ids = torch.stack([r["input_ids"] for r in data])
    model.train()
    trainer.training_step(model, {"input_ids": ids})  # one combination: own.last is set
    assert own.last is not None
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        head, tail = halves(model.eval(), ids)
    assert metrics["eval_loss"] == pytest.approx(0.25 * head.item() + 0.75 * tail.item(), rel=1e-5)
    assert not [k for k in metrics if "coef/" in k or "cos/" in k]  # the coefficients are training logs


# ------------------------------------------------------------------ evaluation and compute_loss
@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_evaluation_before_any_optimizer_weights_by_the_normalised_user_weights_or_uniformly(tmp_path, weights):
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    trainer = HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), objective_weights=weights)
    assert trainer.optimizer is None
    data = rows(4)
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        losses = halves(model.eval(), torch.stack([r["input_ids"] for r in data]))
    w = [0.5, 0.5] if weights is None else [0.25, 0.75]
    assert metrics["eval_loss"] == pytest.approx(weighted(losses, w), rel=1e-5)
    assert metrics["eval_loss/objective_0"] == pytest.approx(losses[0].item(), rel=1e-5)
    assert not [k for k in metrics if "coef/" in k]


def test_compute_loss_in_training_mode_feeds_the_training_logs_and_can_return_outputs(tmp_path):
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok).train()
    trainer = HalvesTrainer(
        model=model, args=args(tmp_path), train_dataset=rows(2), objective_weights=WEIGHTS, objective_names=["head", "tail"]
    )
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    loss, outputs = trainer.compute_loss(model, {"input_ids": ids}, return_outputs=True)
    assert outputs is None
    with torch.no_grad():
        head, tail = halves(model, ids)
    assert loss.dtype == head.dtype and loss.requires_grad
    assert loss.item() == pytest.approx(weighted((head, tail), WEIGHTS), rel=1e-6)
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["loss/head"] == pytest.approx(head.item(), rel=1e-6)
    assert logged["loss/tail"] == pytest.approx(tail.item(), rel=1e-6)
    assert not [k for k in logged if k.startswith("eval_")]


def test_one_objective_is_trained_and_evaluated(tmp_path):
    class Whole(HalvesTrainer):
        def objective_losses(self, model, inputs):
            return [sum(halves(model, inputs["input_ids"])) / 2]

    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    trainer = Whole(model=model, args=args(tmp_path), train_dataset=rows(2))
    data = rows(4)
    ids = torch.stack([r["input_ids"] for r in data])
    with torch.no_grad():
        expected = (sum(halves(model.eval(), ids)) / 2).item()
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(expected, rel=1e-5)
    trainer.create_optimizer()
    model.train()
    assert trainer.training_step(model, {"input_ids": ids}).item() == pytest.approx(expected, rel=1e-5)


def test_the_weights_live_on_the_losses_device_in_their_dtype(tmp_path):
    """``meta`` stands in for an accelerator: the weights follow the losses, not the default device."""
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    like = torch.empty((), dtype=torch.float64, device="meta")
    for weights in (None, [1.0, 3.0]):
        trainer = HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), objective_weights=weights)
        w = trainer._weights(2, like)
        assert (w.device.type, w.dtype, tuple(w.shape)) == ("meta", torch.float64, (2,)), weights
    trainer.create_optimizer()  # the optimizer's (float64) weights are also moved and cast
    assert trainer._weights(2, torch.empty((), device="meta")).dtype == torch.float32


def test_objective_batch_size_is_the_first_batched_tensors_length(tmp_path):
    tok = tiny.tokenizer()
    trainer = HalvesTrainer(model=tiny.no_dropout_gpt2(tok), args=args(tmp_path), train_dataset=rows(2))
    assert trainer.objective_batch_size({"text": ["a", "b"], "scale": torch.tensor(2.0), "ids": torch.zeros(3, 5)}) == 3
    assert trainer.objective_batch_size({"labels": torch.zeros(4)}) == 4
    with pytest.raises(ValueError):
        trainer.objective_batch_size({"text": ["a"], "scale": torch.tensor(1.0)})


# ------------------------------------------------------------------ the accumulation share
def reference_grads(model, ids, weights, share):
    mine = copy.deepcopy(model)
    opt = ConflictAverseOptimizer(sgd(mine), weights=weights)
    opt.zero_grad()
    opt.backward([loss * share for loss in halves(mine, ids)])
    return [p.grad.clone() for p in mine.parameters()]


def test_a_training_step_outside_a_prefetched_window_takes_the_trainers_accumulation_count(tmp_path):
    """Called directly (no ``get_batch_samples``): the share is ``1 / gradient_accumulation_steps``, or
    ``1 / current_gradient_accumulation_steps`` once the Trainer set it, and the direction is combined."""
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok).train()
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    trainer = HalvesTrainer(
        model=model, args=args(tmp_path, gradient_accumulation_steps=4), train_dataset=rows(2), objective_weights=WEIGHTS
    )
    trainer.create_optimizer()
    with torch.no_grad():
        losses = halves(model, ids)
    for share, current in ((0.25, None), (0.5, 2)):
        if current is not None:
            trainer.current_gradient_accumulation_steps = current
        trainer.optimizer.zero_grad()
        returned = trainer.training_step(model, {"input_ids": ids})
        assert returned.item() == pytest.approx(share * weighted(losses, WEIGHTS), rel=1e-6), share
        expected = reference_grads(model, ids, WEIGHTS, share)
        for p, g in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    unset = HalvesTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=0), train_dataset=rows(2), objective_weights=WEIGHTS)
    unset.create_optimizer()  # a count of 0 (accepted by TrainingArguments) means no accumulation: share 1
    assert unset.training_step(model, {"input_ids": ids}).item() == pytest.approx(weighted(losses, WEIGHTS), rel=1e-6)


def test_windows_of_three_micro_batches_and_a_short_last_one_equal_steps_on_all_their_examples(tmp_path):
    """7 examples, micro-batches of 2, accumulation 3: windows (2+2+2) and (1), no clipping. The first
    log holds exactly one coefficient per objective and one cosine per pair; the run's summary none.
    A later direct call falls back to the last window's length (1 micro-batch: share 1)."""
    tok = tiny.tokenizer()
    data = rows(7)
    model = tiny.no_dropout_gpt2(tok)
    mine = copy.deepcopy(model)
    opt = ConflictAverseOptimizer(sgd(mine), weights=WEIGHTS)
    hand = []
    for window in (data[:6], data[6:]):
        opt.zero_grad()
        opt.step(halves(mine, torch.stack([r["input_ids"] for r in window])))
        hand.append(opt.last)
    trainer = HalvesTrainer(
        model=model,
        args=args(
            tmp_path, gradient_accumulation_steps=3, num_train_epochs=1, max_grad_norm=0.0, logging_strategy="steps", logging_steps=1
        ),
        train_dataset=data,
        objective_weights=WEIGHTS,
        objective_names=["head", "tail"],
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), mine.parameters())) < 1e-5
    first, summary = trainer.state.log_history[0], trainer.state.log_history[-1]
    assert {k for k in first if k.startswith(("coef/", "cos/"))} == {"coef/head", "coef/tail", "cos/head|tail"}
    assert first["coef/head"] == pytest.approx(hand[0].coefficients[0].item(), rel=1e-4)
    assert first["coef/tail"] == pytest.approx(hand[0].coefficients[1].item(), rel=1e-4)
    assert first["cos/head|tail"] == pytest.approx(hand[0].cosines[0, 1].item(), rel=1e-4)
    assert "train_runtime" in summary and not [k for k in summary if k.startswith(("coef/", "cos/"))]
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    with torch.no_grad():
        losses = halves(model, ids)
    model.train()
    assert trainer.training_step(model, {"input_ids": ids}).item() == pytest.approx(weighted(losses, WEIGHTS), rel=1e-6)


# ------------------------------------------------------------------ DDP and logging plumbing
def test_under_ddp_the_backward_passes_run_inside_no_sync(tmp_path, monkeypatch):
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok).train()
    entered = []

    class Recording(HalvesTrainer):
        def objective_losses(self, model, inputs):
            entered.append(("losses", list(active)))
            return super().objective_losses(model, inputs)

    trainer = Recording(model=model, args=args(tmp_path), train_dataset=rows(2), objective_weights=WEIGHTS)
    trainer.create_optimizer()
    active: list = []

    @contextlib.contextmanager
    def no_sync(module):
        active.append(module)
        try:
            yield
        finally:
            active.remove(module)
        entered.append(("left", module))

    trainer.accelerator.no_sync = no_sync
    ids = torch.stack([r["input_ids"] for r in rows(2)])
    trainer.training_step(model, {"input_ids": ids})
    assert entered == [("losses", [])]  # one process: no no_sync
    entered.clear()
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    trainer.optimizer.zero_grad()
    trainer.training_step(model, {"input_ids": ids})
    assert entered == [("losses", [model]), ("left", model)]
    assert all(p.grad is not None for p in model.parameters())


def test_log_passes_the_start_time_on_to_the_trainer(tmp_path):
    """``Trainer.log(logs, start_time)`` adds speed metrics when it counts tokens: the Trainer passes the
    start time positionally, a user's callback may pass it by keyword; the coefficients are logged too."""
    tok = tiny.tokenizer()
    model = tiny.no_dropout_gpt2(tok)
    started = time.time() - 5.0

    class LogsMidRun(transformers.TrainerCallback):
        def on_step_end(self, train_args, state, control, **kw):
            if state.global_step == 1:
                trainer.log({"custom": 1.0}, start_time=started)

    trainer = HalvesTrainer(
        model=model,
        args=args(tmp_path, include_num_input_tokens_seen="all", max_steps=2, logging_strategy="steps", logging_steps=1),
        train_dataset=rows(4),
        callbacks=[LogsMidRun()],
    )
    trainer.train()
    (custom,) = [e for e in trainer.state.log_history if "custom" in e]
    assert custom["train_runtime"] >= 5.0
    assert "coef/objective_0" in custom  # not the run's summary: a training log
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert steps and all("train_tokens_per_second" in e and "coef/objective_0" in e for e in steps)


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ([0.5, -1.0], ValueError, "objective_weights: weights must be >= 0"),
        ([], ValueError, "objective_weights: .*m >= 1"),
        ([float("nan"), 1.0], ValueError, "objective_weights: weights must be finite"),
        ([[1.0, 2.0]], ValueError, "one number per objective"),
        ("ab", TypeError, "objective_weights: .*string"),
        (torch.tensor([1 + 1j, 2]), TypeError, "objective_weights: weights must be real"),
    ],
)
def test_the_integrations_check_objective_weights_by_the_librarys_own_rule(weights, error, message) -> None:
    """One rule for weights everywhere: what ``CAGradSettings`` refuses, the integrations refuse, naming the argument."""
    with pytest.raises(error, match=message):
        check_weights(weights, None)
    assert check_weights([1, 3], ["a", "b"]) == ([1.0, 3.0], ["a", "b"])


def test_any_optimizer_with_the_multi_objective_members_is_found_through_wrappers() -> None:
    """The integrations drive a :class:`MultiObjectiveOptimizer` (``backward(losses, combine=)``, ``last``,
    ``weights``), not only ``ConflictAverseOptimizer``: another rule with those members is found through
    wrappers; a torch optimizer (no ``backward``) is not."""
    from cagrad_clip.integrations import MultiObjectiveOptimizer

    class OtherRule(torch.optim.SGD):
        last = None
        weights = None

        def backward(self, losses, combine=True):
            torch.stack(list(losses)).sum().backward()

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    rule = OtherRule([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    assert isinstance(rule, MultiObjectiveOptimizer) and find_conflict_averse(Wrapper(rule)) is rule
    plain = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    assert not isinstance(plain, MultiObjectiveOptimizer) and find_conflict_averse(Wrapper(plain)) is None
