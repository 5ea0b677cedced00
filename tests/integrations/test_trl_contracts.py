"""Contracts of ``MultiObjectiveDPOConfig``, ``SignsCollator`` and ``MultiObjectiveDPOTrainer`` that the
end-to-end tests in ``test_trl.py`` leave open: every unsupported DPO option is refused, the signs'
validation, the pair count of a batch, named evaluation sets, and the logged rewards when an objective
is all ties or decides a single pair. Each against a hand computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cagrad_clip.integrations.trl import MultiObjectiveDPOTrainer, SignsCollator  # noqa: E402
from cagrad_clip.integrations.trl.signs import signs_tensor  # noqa: E402

from . import tiny  # noqa: E402
from .test_trl import BETA, config, run_trainer  # noqa: E402


# ------------------------------------------------------------------ the config
@pytest.mark.parametrize(
    "option",
    [
        {"loss_type": ["nca_pair"]},
        {"loss_type": ["sigmoid", "bco_pair"]},
        {"loss_type": ["sppo_hard"]},
        {"loss_type": ["apo_zero"]},
        {"loss_type": ["apo_down"]},
        {"loss_type": ["aot"]},
        {"loss_type": ["aot_unpaired"]},
        {"loss_type": ["no_such_loss"]},
        {"ld_alpha": 0.5},
        {"f_divergence_type": "js_divergence"},
        {"use_weighting": True},
        {"padding_free": True},
        {"router_aux_loss_coef": 0.1},
        {"c": -0.1},
        {"c": float("inf")},
        {"rescale": "2c"},
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_every_option_without_a_per_objective_form_is_refused_with_its_reason(tmp_path, option):
    key, value = next(iter(option.items()))
    reasons = {
        "nca_pair": "treats the chosen and rejected log-ratios separately",
        "bco_pair": "treats the chosen and rejected log-ratios separately",
        "aot": "sorts the margins across the batch",
        "aot_unpaired": "sorts the margins across the batch",
        "no_such_loss": "unknown; the per-objective forms are",
    }
    with pytest.raises(ValueError) as info:
        config(tmp_path, **option)
    if key == "loss_type" and value[-1] in reasons:
        assert reasons[value[-1]] in str(info.value)


@pytest.mark.parametrize(
    "option",
    [
        {"loss_type": "sigmoid"},
        {"loss_type": ["sigmoid"]},
        {"loss_weights": [1.0]},
        {"loss_type": ["hinge"]},
        {"loss_type": ["ipo"]},
        {"loss_type": ["robust"], "label_smoothing": 0.1},
        {"loss_type": ["exo_pair"], "label_smoothing": 0.1},
        {"loss_type": ["discopop"]},
        {"loss_type": ["sigmoid_norm"]},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"c": 0.0},
        {"c": 2.5},
        {"rescale": "1+c"},
        {"rescale": "1+c^2"},
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_the_supported_settings_are_accepted(tmp_path, option):
    args = config(tmp_path, **option)
    key, value = next(iter(option.items()))
    if key in ("c", "rescale"):
        assert getattr(args, key) == value
    assert args.objective_weights == [0.7, 0.3]


def test_gradient_checkpointing_options_given_as_a_json_string_are_parsed_and_non_reentrant_by_default(tmp_path):
    """A string the Trainer's own parser leaves alone (it starts with a space, as from a YAML block)."""
    args = config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=' {"use_reentrant": true}')
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    args = config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=' {"preserve_rng_state": false}')
    assert args.gradient_checkpointing_kwargs == {"preserve_rng_state": False, "use_reentrant": False}


# ------------------------------------------------------------------ the collator
def inner_collator(seen):
    def collate(examples):
        seen.append([sorted(ex) for ex in examples])
        return {"n": len(examples)}

    return collate


def test_signs_collator_hands_the_rest_to_the_inner_collator_and_adds_float_signs():
    seen: list = []
    collator = SignsCollator(inner_collator(seen), "s", 3)
    batch = collator([{"x": 1, "s": [1, 0, -1]}, {"x": 2, "s": [-1, -1, 1]}])
    assert seen == [[["x"], ["x"]]]
    assert batch["n"] == 2
    assert batch["s"].dtype == torch.float32 and batch["s"].tolist() == [[1.0, 0.0, -1.0], [-1.0, -1.0, 1.0]]
    free = SignsCollator(inner_collator([]), "s", None)  # no count fixed: any one count per batch
    assert free([{"s": [1]}, {"s": [-1]}])["s"].tolist() == [[1.0], [-1.0]]
    assert free([{"s": [0, 0, 1, -1]}])["s"].shape == (1, 4)


@pytest.mark.parametrize(
    "rows",
    [
        [[1, 0], [1, 2]],  # a value other than +1, 0, -1
        [[0.5, 1]],
        [[-2, 1]],
        [[1, 0], [1]],  # ragged
        [[]],  # no signs
        [[1, 0, -1]],  # 3 signs, 2 objectives
        [[1]],
    ],
    ids=repr,
)
def test_signs_collator_refuses_bad_signs(rows):
    collator = SignsCollator(inner_collator([]), "s", 2 if rows != [[]] else None)
    with pytest.raises(ValueError):
        collator([{"s": r} for r in rows])


@pytest.mark.parametrize("rows", [[[1, -1], [True, False]], [[1, 1], [1, 0], [False, False]]], ids=["bool_row_1", "bool_row_2"])
def test_boolean_signs_are_refused_naming_the_row_because_false_would_read_as_a_tie(rows):
    collator = SignsCollator(inner_collator([]), "s", 2)
    row = next(i for i, r in enumerate(rows) if isinstance(r[0], bool))
    with pytest.raises(ValueError, match=rf"column 's', row {row}: \[.*\] holds booleans;.*False is not a tie"):
        collator([{"s": r} for r in rows])
    with pytest.raises(ValueError, match="holds booleans"):  # numpy's booleans (a datasets numpy format) too
        signs_tensor([np.array(r) for r in rows], "s", 2)


def test_a_sign_outside_plus_minus_one_and_zero_names_its_row_and_values():
    with pytest.raises(ValueError, match=r"column 's', row 2: \[1.0, 0.5\] holds \[0.5\]; signs must be \+1 \(chosen better\)"):
        signs_tensor([[1, 0], [0, -1], [1, 0.5], [2, 2]], "s", 2)
    assert signs_tensor([[1, 0], [0, -1]], "s", 2).tolist() == [[1.0, 0.0], [0.0, -1.0]]


def test_signs_collator_refuses_examples_without_signs():
    with pytest.raises(KeyError):
        SignsCollator(inner_collator([]), "s", 2)([{"s": [1, 0]}, {"x": 1}])


# ------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def test_a_batch_of_n_pairs_counts_n_examples_and_named_eval_sets_are_each_checked(tok, tmp_path):
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    good = datasets.Dataset.from_list(tiny.preference_rows(4, 2))
    trainer = MultiObjectiveDPOTrainer(
        model=model, ref_model=ref, args=config(tmp_path), train_dataset=good, eval_dataset={"a": good, "b": good}, processing_class=tok
    )
    assert trainer.objective_batch_size({"input_ids": torch.zeros(6, 5, dtype=torch.long)}) == 3  # [chosen; rejected]
    assert trainer.objective_batch_size({"input_ids": torch.zeros(2, 9, dtype=torch.long)}) == 1
    bad = datasets.Dataset.from_list(tiny.preference_rows(4, 3))
    with pytest.raises(ValueError):
        MultiObjectiveDPOTrainer(
            model=model, ref_model=ref, args=config(tmp_path), train_dataset=good, eval_dataset={"a": good, "b": bad}, processing_class=tok
        )


def test_rewards_of_an_all_tie_objective_and_of_a_one_pair_objective(tok, tmp_path):
    """Objective 0 ties on every pair (margin and accuracy 0, not NaN), objective 1 decides one pair,
    objective 2 all; ``rewards/chosen`` and ``rewards/rejected`` are the mean implicit rewards."""
    rows = tiny.preference_rows(4, 3, seed=21)
    for r, s in zip(rows, ([0, 1, 1], [0, 0, -1], [0, 0, 1], [0, 0, -1])):
        r["objective_signs"] = s
    signs = torch.tensor([r["objective_signs"] for r in rows], dtype=torch.float32)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    ids, attn, comp = tiny.encode_pairs(tok, rows)
    with torch.no_grad():
        ratio = tiny.sequence_logps(model, ids, attn, comp) - tiny.sequence_logps(ref, ids, attn, comp)
    chosen, rejected = BETA * ratio[:4], BETA * ratio[4:]
    delta = chosen - rejected
    names = ["tie", "one", "all"]
    args = config(tmp_path, 3, per_device_train_batch_size=4, max_steps=1, logging_strategy="steps", logging_steps=1, objective_names=names)
    logged = run_trainer(tok, rows, args, model, copy.deepcopy(ref)).state.log_history[0]
    assert logged["rewards/tie/margins"] == 0.0 and logged["rewards/tie/accuracies"] == 0.0
    assert logged["loss/tie"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    one = (signs[0, 1] * delta[0]).item()
    assert logged["rewards/one/margins"] == pytest.approx(one, abs=1e-5)
    assert logged["rewards/one/accuracies"] == float(one > 0)
    margins = signs[:, 2] * delta
    assert logged["rewards/all/margins"] == pytest.approx(margins.mean().item(), abs=1e-5)
    assert logged["rewards/all/accuracies"] == pytest.approx((margins > 0).float().mean().item())
    assert logged["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert logged["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)


def test_with_training_logs_off_only_the_last_steps_metrics_are_kept(tok, tmp_path):
    """logging_strategy="no": no periodic log reads the training metrics, so at most
    ``unlogged_metric_steps`` steps of them are kept (a long run would pile them up otherwise)."""
    import transformers

    seen = []

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(max((len(v) for v in trainer._objective_store["train"].values()), default=0))

    trainer = MultiObjectiveDPOTrainer(
        model=tiny.no_dropout_gpt2(tok),
        ref_model=tiny.no_dropout_gpt2(tok, seed=1),
        args=config(tmp_path, per_device_train_batch_size=2, max_steps=4),  # config() turns logging off
        train_dataset=datasets.Dataset.from_list(tiny.preference_rows(8, 2)),
        processing_class=tok,
        callbacks=[Watch()],
    )
    trainer.unlogged_metric_steps = 2
    trainer.train()
    assert trainer.args.logging_strategy == "no" and seen == [1, 2, 2, 2]
