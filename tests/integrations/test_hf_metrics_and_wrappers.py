"""Behaviours of ``MultiObjectiveTrainerMixin`` that surviving mutants showed no test pinned: the refusal of
a trainer that reports DeepSpeed, the weights and diagnostics read through a user's wrapper when
``multi_objective_types`` is narrowed, the device of the window's item count, and the objective metrics
(counts of another dtype or given as numbers, zero and fractional counts, the cap without periodic logs,
and the sum over processes, simulated by ranks in threads around a fake all-reduce). Each against a hand
computation or a reference run of the library's optimizer."""

from __future__ import annotations

import copy
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations.hf import MultiObjectiveTrainerMixin  # noqa: E402

from . import tiny  # noqa: E402
from .test_hf import HalvesTrainer, args, halves, rows  # noqa: E402


def trainer_for(tmp_path: Path, **kw: Any) -> HalvesTrainer:
    """A tiny trainer in training mode, no optimizer built yet."""
    model = tiny.no_dropout_gpt2(tiny.tokenizer()).train()
    return HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), **kw)


def last_log(trainer: HalvesTrainer) -> dict[str, float]:
    """What one manual ``log`` call hands to the Trainer."""
    trainer.log({})
    return trainer.state.log_history[-1]


# ------------------------------------------------------------------ construction
class ReportsDeepSpeed(transformers.Trainer):
    """A Trainer whose set-up ends with DeepSpeed on (as accelerate's DeepSpeed plugin leaves it)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.is_deepspeed_enabled = True


class DeepSpeedHalvesTrainer(MultiObjectiveTrainerMixin, ReportsDeepSpeed):
    def objective_losses(self, model, inputs):
        return halves(model, inputs["input_ids"])


def test_a_trainer_that_reports_deepspeed_is_refused_at_construction(tmp_path: Path) -> None:
    """The constructor checks the trainer itself for DeepSpeed, once the Trainer's set-up has run."""
    model = tiny.no_dropout_gpt2(tiny.tokenizer())
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        DeepSpeedHalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2))


# ------------------------------------------------------------------ a user's wrapper, narrowed types
class ForwardingWrapper:
    """A user's multi-objective-shaped wrapper (``backward``, ``weights``, ``last``) around the optimizer,
    with no weights or diagnostics of its own."""

    weights = None
    last = None

    def __init__(self, optimizer: ConflictAverseOptimizer) -> None:
        self.optimizer = optimizer

    def backward(self, losses, combine: bool = True) -> None:
        self.optimizer.backward(losses, combine=combine)

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class OnlyConflictAverseTrainer(HalvesTrainer):
    multi_objective_types = (ConflictAverseOptimizer,)


def wrapped_trainer(tmp_path: Path) -> OnlyConflictAverseTrainer:
    """A trainer (no objective_weights of its own) whose optimizer is a wrapper around a
    ``ConflictAverseOptimizer`` with weights [1, 3]."""
    model = tiny.no_dropout_gpt2(tiny.tokenizer()).train()
    trainer = OnlyConflictAverseTrainer(model=model, args=args(tmp_path), train_dataset=rows(2))
    trainer.optimizer = ForwardingWrapper(ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), weights=[1.0, 3.0]))
    return trainer


def test_the_reported_loss_uses_the_weights_of_the_conflict_averse_optimizer_inside_a_users_wrapper(tmp_path: Path) -> None:
    """With ``multi_objective_types`` narrowed to ``ConflictAverseOptimizer``, the weighted loss reads the
    weights of the one inside the wrapper (0.25 head + 0.75 tail), not the wrapper's (none: uniform)."""
    trainer = wrapped_trainer(tmp_path)
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids})
        head, tail = halves(model, ids)
    assert loss.item() == pytest.approx(0.25 * head.item() + 0.75 * tail.item(), rel=1e-6)


def test_the_logged_coefficients_are_those_of_the_conflict_averse_optimizer_inside_a_users_wrapper(tmp_path: Path) -> None:
    """With ``multi_objective_types`` narrowed, ``log`` reads ``coef/`` and ``cos/`` from the
    ``ConflictAverseOptimizer`` inside the wrapper (the wrapper has no ``last``): the same as a step of
    the optimizer alone on a copy of the model."""
    trainer = wrapped_trainer(tmp_path)
    model = trainer.model
    reference_model = copy.deepcopy(model)
    ids = torch.stack([r["input_ids"] for r in rows(4)])
    reference = ConflictAverseOptimizer(torch.optim.SGD(reference_model.parameters(), lr=0.5), weights=[1.0, 3.0])
    reference.backward(halves(reference_model, ids))
    trainer.training_step(model, {"input_ids": ids})
    logged = last_log(trainer)
    coefficients, cosines = reference.last.coefficients.tolist(), reference.last.cosines.tolist()
    assert logged["coef/objective_0"] == pytest.approx(coefficients[0], rel=1e-5)
    assert logged["coef/objective_1"] == pytest.approx(coefficients[1], rel=1e-5)
    assert logged["cos/objective_0|objective_1"] == pytest.approx(cosines[0][1], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ the prefetched window
def test_the_windows_item_count_is_put_on_the_device_asked_for(tmp_path: Path) -> None:
    """``get_batch_samples`` passes the Trainer's device on: the item count of batches with labels is on
    that device (meta here, not the host), and the window's micro-batch is returned as it came."""
    trainer = trainer_for(tmp_path)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "labels": torch.tensor([[3, 4, -100, 6]])}
    samples, num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("meta"))
    assert samples == [batch]
    assert isinstance(num_items, torch.Tensor) and num_items.device.type == "meta"


# ------------------------------------------------------------------ recorded metrics, one process
def test_a_float64_count_gives_the_float32_ratio(tmp_path: Path) -> None:
    """Counts are cast to the totals' float32: a float64 count of 3 over a total of 1 logs float32's 1/3."""
    trainer = trainer_for(tmp_path)
    trainer.record_objective_metric("train", "score", torch.tensor(1.0), torch.tensor(3.0, dtype=torch.float64))
    assert last_log(trainer)["score"] == float(np.float32(1.0) / np.float32(3.0))


def test_a_count_given_as_a_number_goes_to_the_totals_device(tmp_path: Path) -> None:
    """A count given as a Python number is put on the totals' device (meta here), so metrics recorded off
    the host reduce to a value on that device, one per objective."""
    trainer = trainer_for(tmp_path)
    trainer.record_objective_metric("train", "loss/{}", torch.ones(2, device="meta"), 4)
    trainer.record_objective_metric("train", "loss/{}", torch.ones(2, device="meta"), 2.0)
    out = trainer._reduced_objective_metrics("train")
    assert set(out) == {"loss/{}"}
    assert out["loss/{}"].device.type == "meta" and out["loss/{}"].shape == (2,)


def test_a_zero_count_logs_zero_and_a_fractional_count_divides(tmp_path: Path) -> None:
    """A step's value is 0 where its count is 0 (whatever its total) and ``total / count`` for a count
    between 0 and 1; the logged number is the mean over the steps."""
    trainer = trainer_for(tmp_path, objective_names=["a", "b"])
    trainer.record_objective_metric("train", "m/{}", torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.5]))
    trainer.record_objective_metric("train", "m/{}", torch.tensor([2.0, 1.0]), torch.tensor([4.0, 0.25]))
    trainer.record_objective_metric("train", "zero", torch.tensor(5.0), 0)
    logged = last_log(trainer)
    assert logged["m/a"] == pytest.approx((0.0 + 2.0 / 4.0) / 2)
    assert logged["m/b"] == pytest.approx((1.0 / 0.5 + 1.0 / 0.25) / 2)
    assert logged["zero"] == 0.0


@pytest.mark.parametrize("given", ["interval_strategy", "plain_string_later"])
def test_without_periodic_logs_only_the_last_steps_are_kept(tmp_path: Path, given: str) -> None:
    """With ``logging_strategy="no"`` (an ``IntervalStrategy`` or a plain string) only the last
    ``unlogged_metric_steps`` steps are kept: a manual log averages steps 3 and 4 of 4 (4 and 8: 6)."""
    model = tiny.no_dropout_gpt2(tiny.tokenizer()).train()
    strategy = "no" if given == "interval_strategy" else "steps"
    trainer = HalvesTrainer(model=model, args=args(tmp_path, logging_strategy=strategy), train_dataset=rows(2))
    if given != "interval_strategy":
        trainer.args.logging_strategy = "no"
    trainer.unlogged_metric_steps = 2
    for value in (1.0, 2.0, 4.0, 8.0):
        trainer.record_objective_metric("train", "score", torch.tensor(value), 1)
    assert last_log(trainer)["score"] == pytest.approx(6.0)


# ------------------------------------------------------------------ recorded metrics, several processes
class FakeRanks:
    """``n`` ranks run in threads; ``reduce`` is an all-reduce over them, with ``Accelerator.reduce``'s
    signature and meaning (sum; "mean" divides by ``n``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=20)
        self.slots: list[Any] = [None] * n

    def accelerator(self, rank: int, real: Any) -> Any:
        ranks = self

        class Accelerator:
            num_processes = ranks.n

            def reduce(self, tensor, reduction="sum", scale=1.0):
                assert isinstance(tensor, torch.Tensor), f"reduce got {type(tensor).__name__}, not a tensor"
                ranks.slots[rank] = tensor.clone()
                ranks.barrier.wait()
                out = torch.stack(ranks.slots).sum(0)
                ranks.barrier.wait()  # every rank has read the slots
                return out / ranks.n if reduction == "mean" else out

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        return Accelerator()

    def run(self, work: Any) -> None:
        """``work(rank)`` on every rank at once; re-raises the first failure."""
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                work(rank)
            except BaseException as error:  # noqa: BLE001 (reported below)
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def rank_values(rank: int, step: int) -> dict[str, tuple[list[float], list[float]]]:
    """Each rank's (total, count) per key and step: different items on every rank, a zero count on rank 0's
    second step."""
    return {
        "loss/{}": ([1.0 + 3 * rank + step, 2.0 * (rank + 1) - step], [1.0 + rank + step, 2.0 + rank]),
        "rewards/margins": ([0.5 * (rank + 1) + step], [0.0 if rank == 0 and step == 1 else 2.0 + rank]),
    }


@pytest.mark.parametrize("n", [2, 3])
def test_every_rank_logs_the_metrics_over_all_ranks_items(tmp_path: Path, n: int) -> None:
    """With several processes each step's value is (sum over ranks of totals) / (sum of counts), and every
    rank logs the mean of those over its steps: the same numbers on every rank."""
    ranks = FakeRanks(n)
    model = tiny.no_dropout_gpt2(tiny.tokenizer()).train()
    trainers = []
    for rank in range(n):
        trainer = HalvesTrainer(model=model, args=args(tmp_path / str(rank)), train_dataset=rows(2), objective_names=["head", "tail"])
        trainer.accelerator = ranks.accelerator(rank, trainer.accelerator)
        for step in range(2):
            for key, (total, count) in rank_values(rank, step).items():
                scalar = key == "rewards/margins"
                trainer.record_objective_metric(
                    "train", key, torch.tensor(total[0] if scalar else total), torch.tensor(count[0] if scalar else count)
                )
        trainers.append(trainer)
    ranks.run(lambda rank: trainers[rank].log({}))

    def expected(key: str, i: int) -> float:
        per_step = []
        for step in range(2):
            total = sum(rank_values(r, step)[key][0][i] for r in range(n))
            count = sum(rank_values(r, step)[key][1][i] for r in range(n))
            per_step.append(total / count)
        return sum(per_step) / 2

    for trainer in trainers:
        logged = trainer.state.log_history[-1]
        assert logged["loss/head"] == pytest.approx(expected("loss/{}", 0), rel=1e-6)
        assert logged["loss/tail"] == pytest.approx(expected("loss/{}", 1), rel=1e-6)
        assert logged["rewards/margins"] == pytest.approx(expected("rewards/margins", 0), rel=1e-6)


def test_the_fake_ranks_reduce_as_accelerate_does() -> None:
    """The simulation's all-reduce sums over the ranks by default, as ``Accelerator.reduce`` does."""
    import inspect

    from accelerate import Accelerator

    assert inspect.signature(Accelerator.reduce).parameters["reduction"].default == "sum"
    ranks = FakeRanks(2)
    out: list[Any] = [None, None]
    accelerators = [ranks.accelerator(r, types.SimpleNamespace()) for r in range(2)]
    ranks.run(lambda r: out.__setitem__(r, accelerators[r].reduce(torch.tensor([1.0 + r, 10.0]))))
    assert out[0].tolist() == out[1].tolist() == [3.0, 20.0]
