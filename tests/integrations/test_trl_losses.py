"""Every supported DPO loss against TRL's own ``DPOTrainer``, and the per-objective forms of the signs.

At one objective, every sign +1 and c = 0 the multi-objective trainer must take TRL's steps and log
TRL's metrics; with several objectives, a sign of -1 must be the pair with chosen and rejected
swapped, and a tie must carry no gradient (checked on the loss functions directly).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from cagrad_clip.integrations.trl.losses import MARGIN_LOSSES, PairScores, objective_dpo_losses  # noqa: E402

from . import tiny  # noqa: E402
from .test_trl import BETA, LR, SequentialDPOTrainer, config, max_diff  # noqa: E402

LOSSES = {
    "sigmoid": {"loss_type": ["sigmoid"]},
    "hinge": {"loss_type": ["hinge"]},
    "ipo": {"loss_type": ["ipo"]},
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.2},
    "exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 0.1},
    "discopop": {"loss_type": ["discopop"], "discopop_tau": 0.5},
    "sigmoid_norm": {"loss_type": ["sigmoid_norm"]},
    "rpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
}
TRL_METRICS = tiny.TRL_METRICS


class SequentialTRLTrainer(tiny.InOrder, DPOTrainer):
    pass


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def test_every_per_objective_form_is_tested_here():
    assert {t for options in LOSSES.values() for t in options["loss_type"]} == set(MARGIN_LOSSES)


def _common(out, options) -> dict:
    return dict(
        output_dir=str(out),
        beta=BETA,
        learning_rate=LR,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        max_steps=2,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim="sgd",
        bf16=False,
        **options,
    )


@pytest.mark.parametrize("name", list(LOSSES))
def test_one_objective_with_positive_signs_takes_trls_steps_and_logs_trls_metrics(tok, tmp_path, name):
    rows = tiny.preference_rows(8, 1, seed=11)
    for row in rows:
        row["objective_signs"] = [1]
    plain = [{k: v for k, v in row.items() if k != "objective_signs"} for row in rows]
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    theirs = copy.deepcopy(model)
    trl = SequentialTRLTrainer(
        model=theirs,
        ref_model=copy.deepcopy(ref),
        args=DPOConfig(**_common(tmp_path / "trl", LOSSES[name])),
        train_dataset=datasets.Dataset.from_list(plain),
        processing_class=tok,
    )
    trl.train()
    ours = SequentialDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(ref),
        args=config(tmp_path / "ours", 2, **{**_common(tmp_path / "ours", LOSSES[name]), "objective_weights": [1.0], "c": 0.0}),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    ours.train()
    diff = max_diff(model, theirs)
    print(f"{name}: max parameter difference to TRL's DPOTrainer after 2 steps {diff:.1e}")
    assert diff < 1e-6
    assert max_diff(model, tiny.no_dropout_gpt2(tok)) > 1e-3  # it trained
    logged = [entry for entry in ours.state.log_history if "loss" in entry]
    expected = [entry for entry in trl.state.log_history if "loss" in entry]
    assert len(logged) == len(expected) == 2
    for got, want in zip(logged, expected):
        for key in (*TRL_METRICS, "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert got["loss/objective_0"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)


def _random_pairs(seed: int, b: int = 6, length: int = 7) -> PairScores:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2 * b, length, generator=g) < 0.7).long()
    mask[:, 1] = 1  # every completion has a token
    return PairScores(
        chosen_ratios=torch.randn(b, generator=g, dtype=torch.float64, requires_grad=True),
        rejected_ratios=torch.randn(b, generator=g, dtype=torch.float64, requires_grad=True),
        completion_mask=mask,
        per_token_logps=-torch.rand(2 * b, length - 1, generator=g, dtype=torch.float64).requires_grad_(True),
    )


def _swapped(pairs: PairScores) -> PairScores:
    """The same pairs with chosen and rejected exchanged."""
    b = pairs.chosen_ratios.shape[0]
    order = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return PairScores(pairs.rejected_ratios, pairs.chosen_ratios, pairs.completion_mask[order], pairs.per_token_logps[order])


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_negative_sign_is_the_swapped_pair_and_a_tie_carries_no_gradient(name):
    args = SimpleNamespace(**{"beta": BETA, "loss_weights": None, "label_smoothing": 0.0, "discopop_tau": 0.05, **LOSSES[name]})
    pairs = _random_pairs(3)
    b = pairs.chosen_ratios.shape[0]
    signs = torch.tensor([[1.0, -1.0, 0.0]] * b, dtype=torch.float64)
    plus, minus, tie = objective_dpo_losses(pairs, signs, args)
    (swapped,) = objective_dpo_losses(_swapped(pairs), torch.ones(b, 1, dtype=torch.float64), args)
    torch.testing.assert_close(minus, swapped, rtol=1e-12, atol=1e-14)
    inputs = (pairs.chosen_ratios, pairs.rejected_ratios, pairs.per_token_logps)
    for grad in torch.autograd.grad(tie, inputs, allow_unused=True, retain_graph=True):
        assert grad is None or torch.count_nonzero(grad) == 0
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in torch.autograd.grad(plus, inputs, allow_unused=True))
