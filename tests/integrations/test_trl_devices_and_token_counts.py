"""Behaviours of the TRL integration off the one-CPU path (other dtypes, devices, process counts), checked on one CPU.

The signs are cast to the log-probs' dtype (a replaced collator's integer or float64 signs) and moved
to their device (a policy whose LM head returns log-probs elsewhere: here the meta device); ``exo_pair``
makes its label smoothing on the scores' device, not the default one; ``num_tokens`` is summed over
the processes and divided by the tensor-parallel size (a stand-in accelerator with 2 or 3 processes);
a row that claims to be an empty sequence but cannot be read is refused with ``signs_tensor``'s error.
"""

from __future__ import annotations

import inspect
import math
import types
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cagrad_clip.integrations.trl.losses import PairScores, objective_dpo_losses  # noqa: E402
from cagrad_clip.integrations.trl.signs import signs_tensor  # noqa: E402

from . import tiny  # noqa: E402
from .test_trl import SequentialDPOTrainer, config  # noqa: E402

BETAS = [0.25, 0.5]  # objective_betas: float numbers, so betas made in an integer dtype would be 0
SIGNS = [[1, -1], [-1, 0], [1, 1], [0, -1]]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def trainer(tok, tmp_path_factory):
    """A trainer on 4 pairs with ``objective_betas``; each test restores what it changes (monkeypatch)."""
    rows = tiny.preference_rows(4, 2, seed=50)
    for r, s in zip(rows, SIGNS):
        r["objective_signs"] = s
    args = config(tmp_path_factory.mktemp("trl_devices"), per_device_train_batch_size=4, objective_betas=BETAS)
    built = SequentialDPOTrainer(
        model=tiny.no_dropout_gpt2(tok),
        ref_model=tiny.no_dropout_gpt2(tok, seed=1),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    built.rows = rows
    return built


# ------------------------------------------------------------------ the signs follow the log-probs
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=["int64", "float64"])
def test_signs_of_another_dtype_are_cast_to_the_log_probs_dtype(trainer, tok, dtype):
    """A collator replaced after construction may give integer or float64 signs: they are cast to the
    log-probs' dtype (float32), so ``objective_betas`` stay 0.25 and 0.5 (not 0 in an integer dtype)
    and each loss is the float32 ``-mean log sigmoid(s_i beta_i Delta)`` of a plain forward."""
    batch = next(iter(trainer.get_train_dataloader()))
    batch["objective_signs"] = torch.tensor(SIGNS, dtype=dtype)
    ids, attn, comp = tiny.encode_pairs(tok, trainer.rows)
    assert torch.equal(ids, batch["input_ids"])  # the premise: the hand computation reads the same batch
    with torch.no_grad():
        ratio = tiny.sequence_logps(trainer.model, ids, attn, comp) - tiny.sequence_logps(trainer.ref_model, ids, attn, comp)
        losses = trainer.objective_losses(trainer.model, batch)
    delta = (ratio[:4] - ratio[4:]).double()
    signs = torch.tensor(SIGNS, dtype=torch.float64)
    hand = [(-torch.nn.functional.logsigmoid(signs[:, i] * BETAS[i] * delta)).mean().item() for i in range(2)]
    assert [loss.dtype for loss in losses] == [torch.float32, torch.float32]
    assert [loss.item() for loss in losses] == pytest.approx(hand, abs=1e-5)
    assert abs(hand[0] - math.log(2)) > 1e-3 and abs(hand[1] - math.log(2)) > 1e-3  # betas of 0 would give log 2


class _HeadElsewhere(torch.nn.Module):
    """A policy whose LM head returns its outputs on the meta device (another device than the batch's)."""

    def forward(self, input_ids: torch.Tensor, attention_mask=None, use_cache=None, labels=None, fused_lm_head=False) -> Any:
        meta = dict(device="meta")
        n, length = input_ids.shape
        return types.SimpleNamespace(
            log_probs=torch.zeros(n, length, **meta),
            entropy=torch.zeros(n, length, **meta),
            mean_logits=torch.zeros(n, length, **meta),
            is_top1=torch.zeros(n, length, dtype=torch.bool, **meta),
        )


def test_signs_are_moved_to_the_log_probs_device(trainer, monkeypatch):
    """The batch's signs (CPU) are moved to the device of the policy's log-probs (meta here, as a head
    on another accelerator would be): the per-objective losses are computed there, and the signs the
    metrics get are there too (the metrics are only captured: they also read the batch's CPU masks)."""
    n, length = 2, 5
    batch = {
        "input_ids": torch.ones(2 * n, length, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, length, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 0, 1, 1, 1]] * (2 * n)),
        "ref_chosen_logps": torch.zeros(n, device="meta"),
        "ref_rejected_logps": torch.zeros(n, device="meta"),
        "objective_signs": torch.tensor([[1.0, -1.0], [0.0, 1.0]]),
    }
    seen = []
    monkeypatch.setattr(trainer, "precompute_ref_logps", True)  # the reference log-probs come with the batch
    monkeypatch.setattr(trainer, "_record_dpo_metrics", lambda mode, outputs, inputs, pairs, signs, *a: seen.append(signs))
    losses = trainer.objective_losses(_HeadElsewhere().eval(), batch)
    assert [(loss.device.type, loss.shape) for loss in losses] == [("meta", torch.Size([]))] * 2
    assert [(s.device.type, s.dtype, s.shape) for s in seen] == [("meta", torch.float32, torch.Size([2, 2]))]


# ------------------------------------------------------------------ exo_pair's label smoothing
def test_exo_pair_makes_its_label_smoothing_on_the_scores_device_not_the_default_one():
    """``exo_pair``'s ``eps`` becomes a tensor on the scores' device: under another default device
    (meta) CPU scores still give the CPU loss ``sigmoid(z) (log sigmoid(z) - log(1 - eps)) +
    sigmoid(-z) (log sigmoid(-z) - log eps)``, averaged over the pairs."""
    kw = dict(dtype=torch.float64, device="cpu")
    pairs = PairScores(
        chosen_ratios=torch.tensor([1.0, -0.5], **kw),
        rejected_ratios=torch.tensor([0.5, 0.5], **kw),
        completion_mask=torch.tensor([[0, 1]] * 4, device="cpu"),
        per_token_logps=torch.tensor([[-1.0], [-2.0], [-3.0], [-4.0]], **kw),
    )
    signs = torch.tensor([[1.0, -1.0], [1.0, 0.0]], **kw)
    eps, beta, delta = 0.1, 0.5, [0.5, -1.0]
    args = types.SimpleNamespace(loss_type=["exo_pair"], loss_weights=None, label_smoothing=eps, beta=beta)
    with torch.device("meta"):
        losses = objective_dpo_losses(pairs, signs, args)

    def exo(z: float) -> float:
        sig = 1 / (1 + math.exp(-z))
        return sig * (math.log(sig) - math.log1p(-eps)) + (1 - sig) * (math.log(1 - sig) - math.log(eps))

    assert [loss.device.type for loss in losses] == ["cpu", "cpu"]
    for i, loss in enumerate(losses):
        hand = sum(exo(signs[p, i].item() * beta * delta[p]) for p in range(2)) / 2
        assert loss.item() == pytest.approx(hand, rel=1e-13, abs=0)


# ------------------------------------------------------------------ num_tokens over the processes
class _Accelerator:
    """A stand-in for ``accelerate.Accelerator`` on ``num_processes`` ranks that each counted the same
    tokens: ``reduce`` follows ``Accelerator.reduce`` (a tensor only; ``"sum"``, the method's default,
    sums; ``"mean"`` divides the sum by the number of processes). The default is checked against
    accelerate's own signature below, so the stand-in cannot drift from it."""

    def __init__(self, num_processes: int) -> None:
        self.num_processes, self.calls = num_processes, []

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"reduce needs a tensor, got {type(tensor).__name__}")
        self.calls.append(reduction)
        summed = tensor * self.num_processes
        return summed // self.num_processes if reduction == "mean" else summed


def test_the_stand_in_reduce_has_accelerates_default() -> None:
    """``Accelerator.reduce``'s default reduction is ``"sum"`` (``accelerate.utils.reduce``'s is ``"mean"``):
    the stand-in above must default the same way, or the test below would pin a call's spelling."""
    from accelerate import Accelerator

    theirs = inspect.signature(Accelerator.reduce).parameters["reduction"].default
    assert inspect.signature(_Accelerator.reduce).parameters["reduction"].default == theirs == "sum"


@pytest.mark.parametrize(("processes", "tp_size"), [(2, 1), (3, 1), (3, 2)])
def test_num_tokens_sums_the_pending_tokens_over_the_processes_and_divides_by_the_tp_size(trainer, monkeypatch, processes, tp_size):
    """At a training log, the tokens counted since the last log (37 on each rank) are summed over the
    processes (one ``reduce(..., reduction="sum")``) and divided by the tensor-parallel size (the ranks
    of a TP group count the same batch): ``num_tokens`` is the 100 before plus ``37 * processes // tp_size``."""
    accelerator = _Accelerator(processes)
    monkeypatch.setattr(trainer, "accelerator", accelerator)
    monkeypatch.setattr(trainer, "_tp_size", tp_size)
    monkeypatch.setattr(trainer, "_total_train_tokens", 100)
    monkeypatch.setattr(trainer, "_pending_tokens", torch.tensor(37))
    monkeypatch.setattr(trainer, "_objective_store", {"train": defaultdict(list), "eval": defaultdict(list)})  # no other metric
    trainer.model.train()
    logs = {"loss": 0.5}
    trainer.log(logs)
    expected = {(2, 1): 174, (3, 1): 211, (3, 2): 155}[(processes, tp_size)]  # 100 + 74, 100 + 111, 100 + 111 // 2
    assert logs["num_tokens"] == expected and trainer.state.log_history[-1]["num_tokens"] == expected
    assert trainer._total_train_tokens == expected and trainer._pending_tokens == 0
    assert accelerator.calls == ["sum"]


# ------------------------------------------------------------------ signs_tensor
class _Unreadable(Sequence):
    """Registered as a sequence, of length 0, but iterating it fails (e.g. a broken lazy view)."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> float:
        raise TypeError("unreadable")

    def __iter__(self) -> Iterator[float]:
        raise TypeError("unreadable")


def test_an_empty_sequence_that_cannot_be_iterated_is_refused_with_a_value_error():
    """A row that is an empty ``Sequence`` but cannot be read gets ``signs_tensor``'s ValueError (one
    list of numbers per example), not a TypeError from inside the checks."""
    with pytest.raises(ValueError, match="must hold one list of numbers per example"):
        signs_tensor([_Unreadable()], "s", None)
