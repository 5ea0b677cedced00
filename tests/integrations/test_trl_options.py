"""The optimizer's options, per-objective betas and tie handling in MultiObjectiveDPOConfig."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations.trl import MultiObjectiveDPOTrainer  # noqa: E402

from . import tiny  # noqa: E402
from .test_trl import BETA, LR, WEIGHTS, config, max_diff, run_trainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def test_the_optimizers_options_reach_it_from_the_config(tok, tmp_path):
    model, ref = tiny.no_dropout_gpt2(tok, n_layer=2), tiny.no_dropout_gpt2(tok, seed=1, n_layer=2)
    args = config(
        tmp_path,
        max_steps=1,
        solver="frank_wolfe",
        max_iter=7,
        accumulate_dtype="float64",
        nonfinite="raise",
        shared_modules=["transformer.h.*"],
    )
    trainer = run_trainer(tok, tiny.preference_rows(8, 2), args, model, ref, MultiObjectiveDPOTrainer)
    opt = trainer.conflict_averse_optimizer
    assert (opt.solver, opt.max_iter, opt.accumulate_dtype, opt.nonfinite) == ("frank_wolfe", 7, torch.float64, "raise")
    blocks = {id(p) for p in model.transformer.h.parameters()}
    store = opt._store
    assert {id(p) for p in store.params[: store.shared_count]} == blocks  # the Gram is measured on the blocks only
    assert len(store.params) > store.shared_count


def test_memory_low_from_the_config_trains_as_the_default_memory(tok, tmp_path):
    rows = tiny.preference_rows(8, 2, seed=2)
    low, default = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok)
    ref = tiny.no_dropout_gpt2(tok, seed=1)
    common = dict(max_steps=1, per_device_train_batch_size=8)
    trainer = run_trainer(tok, rows, config(tmp_path / "l", memory="low", **common), low, copy.deepcopy(ref))
    run_trainer(tok, rows, config(tmp_path / "d", **common), default, copy.deepcopy(ref))
    assert trainer.conflict_averse_optimizer.memory == "low"
    assert max_diff(low, default) < 1e-5


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"solver": "newton"}, "unknown solver='newton'"),
        ({"max_iter": -1}, "max_iter must be None or an int >= 0"),
        ({"memory": "lots"}, "unknown memory='lots'"),
        ({"accumulate_dtype": "float16"}, "accumulate_dtype must be None, 'float32' or 'float64'"),
        ({"memory": "low", "accumulate_dtype": "float32"}, "accumulate_dtype does not apply"),
        ({"nonfinite": "sometimes"}, "sometimes"),
        ({"shared_modules": "transformer.h"}, "shared_modules must be a list of module-name patterns"),
        ({"objective_betas": [0.1]}, "1 objective_betas but 2 objective_weights"),
        ({"objective_betas": [0.1, -1.0]}, "objective_betas must be finite numbers > 0"),
        ({"objective_betas": [0.1, float("nan")]}, "objective_betas must be finite numbers > 0"),
        ({"ties": "maybe"}, "ties must be 'keep' or 'drop'"),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_a_bad_option_is_refused_when_the_config_is_built(tmp_path, option, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config(tmp_path, **option)


def test_a_shared_pattern_that_matches_no_module_is_refused_when_the_trainer_is_built(tok, tmp_path):
    with pytest.raises(ValueError, match=r"shared_modules pattern 'decoder\.\*' matches no module.*transformer"):
        MultiObjectiveDPOTrainer(
            model=tiny.no_dropout_gpt2(tok),
            ref_model=tiny.no_dropout_gpt2(tok, seed=1),
            args=config(tmp_path, shared_modules=["decoder.*"]),
            train_dataset=datasets.Dataset.from_list(tiny.preference_rows(4, 2)),
            processing_class=tok,
        )


def _hand_step(model, ref, tok, rows, losses_fn):
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), weights=WEIGHTS[2], c=0.4)
    opt.zero_grad()
    opt.backward(losses_fn(model, ref, tok, rows))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return opt


def test_objective_betas_give_each_objective_its_own_margin(tok, tmp_path):
    rows = tiny.preference_rows(8, 2, seed=4)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    betas = [0.25, 2.0]

    def losses(policy, reference, tok_, rows_):
        return [tiny.hand_dpo_losses(policy, reference, tok_, rows_, beta)[i] for i, beta in enumerate(betas)]

    _hand_step(mine, ref, tok, rows, losses)
    args = config(tmp_path, per_device_train_batch_size=8, max_steps=1, objective_betas=betas)
    run_trainer(tok, rows, args, model, copy.deepcopy(ref))
    assert max_diff(model, mine) < 1e-5
    assert max_diff(model, tiny.no_dropout_gpt2(tok)) > 1e-2


def _drop_tie_losses(policy, reference, tok_, rows_):
    """Each objective's mean of -log sigmoid(s beta Delta) over its non-tied pairs, by hand."""
    out = []
    for i in range(2):
        kept = [r for r in rows_ if r["objective_signs"][i] != 0]
        relabelled = [{**r, "one": [r["objective_signs"][i]]} for r in kept]
        out.append(tiny.hand_dpo_losses(policy, reference, tok_, relabelled, BETA, signs_key="one")[0])
    return out


def test_ties_drop_averages_each_objective_over_its_non_tied_pairs(tok, tmp_path):
    rows = tiny.preference_rows(8, 2, seed=6)
    assert any(0 in r["objective_signs"] for r in rows)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    _hand_step(mine, ref, tok, rows, _drop_tie_losses)
    run_trainer(tok, rows, config(tmp_path, per_device_train_batch_size=8, max_steps=1, ties="drop"), model, copy.deepcopy(ref))
    assert max_diff(model, mine) < 1e-5
    kept = tiny.no_dropout_gpt2(tok)
    run_trainer(tok, rows, config(tmp_path / "k", per_device_train_batch_size=8, max_steps=1), kept, copy.deepcopy(ref))
    assert max_diff(model, kept) > 1e-4  # "keep" (TRL's mean over every pair) is another step


def test_an_objective_whose_batch_is_all_ties_gets_a_zero_gradient_under_ties_drop(tok, tmp_path):
    rows = tiny.preference_rows(8, 2, seed=7)
    for r in rows:
        r["objective_signs"][1] = 0
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    trainer = run_trainer(tok, rows, config(tmp_path, per_device_train_batch_size=8, max_steps=1, ties="drop"), model, ref)
    gram = trainer.conflict_averse_optimizer.last.gram
    assert gram[1, 1] == 0 and gram[0, 0] > 0
    assert trainer.state.global_step == 1
