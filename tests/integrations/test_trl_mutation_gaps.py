"""Behaviours of the TRL integration that surviving mutants showed no test pinned.

Each test checks a documented behaviour against a hand computation: the per-token averages and the
preferred-response NLL when a response is one token long (an empty response is its EOS alone), the
losses' dtype and device, ``objective_betas`` in float64, IPO's target, ``exo_pair``'s smoothing in
float64, ``sft`` listed first, a single decided pair under ``ties="drop"``; the argument checks and
tie handling of the dataset helpers, the errors of ``SignsCollator``, the rows ``signs_tensor``
accepts, ``check_dataset`` on streams and empty sets; and of ``MultiObjectiveDPOTrainer``: the
evaluation metrics' mode, accuracy at an exact tie, ``num_tokens``, the start time passed on to
``Trainer.log``, ``training_step`` called by keyword, a backbone with a fixed signature, and prompt
tuning's virtual tokens.
"""

from __future__ import annotations

import copy
import math
import time
import types

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cagrad_clip.integrations.trl import (  # noqa: E402
    MultiObjectiveDPOTrainer,  # noqa: E402
    SignsCollator,
    pair_from_preferred_ids,
    signs_from_ratings,
)
from cagrad_clip.integrations.trl.losses import PairScores, objective_dpo_losses  # noqa: E402
from cagrad_clip.integrations.trl.signs import check_dataset, signs_tensor  # noqa: E402

from . import tiny  # noqa: E402
from .test_trl import BETA, TOL, WEIGHTS, SequentialDPOTrainer, config, hand_loop, max_diff, run_trainer  # noqa: E402


# ------------------------------------------------------------------ per-token averages
def test_the_per_token_margin_divides_a_one_token_response_by_one():
    """``normalized_delta`` is the chosen log-ratio over its completion-token count minus the rejected
    one's: a response of one token (an empty response's EOS) is divided by 1, on either side."""
    pairs = PairScores(
        chosen_ratios=torch.tensor([2.0, 6.0], dtype=torch.float64),
        rejected_ratios=torch.tensor([3.0, 5.0], dtype=torch.float64),
        completion_mask=torch.tensor(
            [
                [0, 1, 0, 0],  # pair 0, chosen: 1 token
                [0, 1, 1, 0],  # pair 1, chosen: 2 tokens
                [0, 1, 1, 1],  # pair 0, rejected: 3 tokens
                [0, 0, 1, 0],  # pair 1, rejected: 1 token
            ]
        ),
        per_token_logps=torch.zeros(4, 3, dtype=torch.float64),
    )
    assert pairs.normalized_delta().tolist() == [2.0 / 1 - 3.0 / 3, 6.0 / 2 - 5.0 / 1]


def test_the_sft_term_of_a_one_token_preferred_response_is_its_tokens_nll():
    """RPO's NLL term (``"sft"``): objective ``i``'s mean NLL over the tokens of the responses it
    prefers. One pair whose chosen response is one token: the objective that prefers it gets that
    token's NLL; the one that prefers the (two-token) rejected response their mean; a tie gets 0."""
    logps = torch.tensor([[-9.0, -0.75, -9.0], [-9.0, -0.5, -1.5]], dtype=torch.float64)  # (2B, L-1), B = 1
    mask = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]])  # shifted: chosen token 1 only, rejected tokens 1 and 2
    pairs = PairScores(
        chosen_ratios=torch.tensor([0.3], dtype=torch.float64),
        rejected_ratios=torch.tensor([0.1], dtype=torch.float64),
        completion_mask=mask,
        per_token_logps=logps,
    )
    signs = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    args = types.SimpleNamespace(loss_type="sft", loss_weights=None, label_smoothing=0.0, beta=0.1)
    losses = objective_dpo_losses(pairs, signs, args)
    assert [loss.item() for loss in losses] == [0.75, (0.5 + 1.5) / 2, 0.0]


def _pairs(dtype=torch.float32, device="cpu"):
    """Two pairs with one-token responses; the chosen minus rejected log-ratio is 0.5 and -1.0."""
    kw = dict(dtype=dtype, device=device)
    return PairScores(
        chosen_ratios=torch.tensor([1.0, -0.5], **kw),
        rejected_ratios=torch.tensor([0.5, 0.5], **kw),
        completion_mask=torch.tensor([[0, 1]] * 4, device=device),
        per_token_logps=torch.tensor([[-1.0], [-2.0], [-3.0], [-4.0]], **kw),
    )


def test_the_losses_keep_the_inputs_dtype():
    """``objective_dpo_losses`` computes in the dtype of its inputs: bfloat16 scores and signs give
    bfloat16 losses, each the bfloat16 ``-mean log sigmoid(s_i beta Delta)`` bit for bit."""
    signs = torch.tensor([[1.0, -1.0], [1.0, 0.0]], dtype=torch.bfloat16)
    args = types.SimpleNamespace(loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, beta=0.5)
    losses = objective_dpo_losses(_pairs(torch.bfloat16), signs, args)
    delta = torch.tensor([0.5, -1.0], dtype=torch.bfloat16)
    for i, loss in enumerate(losses):
        assert loss.dtype == torch.bfloat16
        assert loss.item() == (-torch.nn.functional.logsigmoid(signs[:, i] * 0.5 * delta)).mean().item()


def test_the_losses_are_made_on_the_inputs_device():
    """The per-objective totals and ``objective_betas`` are made on the scores' device, not the
    default one (on a GPU, CUDA inputs; a CPU-only run can check it with meta tensors, which do not
    mix with CPU ones)."""
    signs = torch.tensor([[1.0, -1.0], [1.0, 0.0]], device="meta")
    for loss_type, betas in (("sigmoid", None), ("sft", None), ("sigmoid", [0.5, 0.25])):
        args = types.SimpleNamespace(loss_type=[loss_type], loss_weights=None, label_smoothing=0.0, beta=0.5, objective_betas=betas)
        losses = objective_dpo_losses(_pairs(device="meta"), signs, args)
        assert [loss.device.type for loss in losses] == ["meta", "meta"]
        assert [loss.shape for loss in losses] == [torch.Size([])] * 2


def _args(**kw):
    base = dict(loss_type=["sigmoid"], loss_weights=None, label_smoothing=0.0, beta=0.5)
    return types.SimpleNamespace(**{**base, **kw})


SIGNS = torch.tensor([[1.0, -1.0], [1.0, 0.0]], dtype=torch.float64)  # objective 1 decides pair 0 only


def test_ipo_targets_a_margin_of_one_over_two_beta():
    """IPO's per-pair loss is ``(s_i * normalized Delta - 1 / (2 beta))**2``: at beta = 0.1 the target
    is 5. One-token responses: the normalized margins are 0.5 and -1.0 (a tie's is 0)."""
    losses = objective_dpo_losses(_pairs(torch.float64), SIGNS, _args(loss_type=["ipo"], beta=0.1))
    assert [loss.item() for loss in losses] == [((0.5 - 5) ** 2 + (-1.0 - 5) ** 2) / 2, ((-0.5 - 5) ** 2 + (0.0 - 5) ** 2) / 2]


def test_exo_pair_in_float64_uses_the_label_smoothing_in_float64():
    """``exo_pair`` is ``sigmoid(z) (log sigmoid(z) - log(1 - eps)) + sigmoid(-z) (log sigmoid(-z) - log eps)``:
    with float64 scores its ``eps`` (0.1, not a float32 number) is taken in float64 too."""
    eps = 0.1
    losses = objective_dpo_losses(_pairs(torch.float64), SIGNS, _args(loss_type=["exo_pair"], label_smoothing=eps))
    delta = [0.5, -1.0]

    def exo(z):
        sig = 1 / (1 + math.exp(-z))
        return sig * (math.log(sig) - math.log1p(-eps)) + (1 - sig) * (math.log(1 - sig) - math.log(eps))

    for i, loss in enumerate(losses):
        hand = sum(exo(SIGNS[p, i].item() * 0.5 * delta[p]) for p in range(2)) / 2
        assert loss.item() == pytest.approx(hand, rel=1e-13, abs=0)


def test_objective_betas_in_float64_are_taken_in_float64():
    """``objective_betas`` (0.1 and 0.3, not float32 numbers) scale each objective's margin in the
    signs' dtype: float64 scores give ``-mean log sigmoid(s_i beta_i Delta)`` to float64 precision."""
    losses = objective_dpo_losses(_pairs(torch.float64), SIGNS, _args(objective_betas=[0.1, 0.3]))
    delta = [0.5, -1.0]
    for i, beta in enumerate([0.1, 0.3]):
        hand = sum(math.log1p(math.exp(-SIGNS[p, i].item() * beta * delta[p])) for p in range(2)) / 2
        assert losses[i].item() == pytest.approx(hand, rel=1e-13, abs=0)


def test_an_sft_term_listed_first_is_followed_by_the_other_loss_types():
    """``loss_type=["sft", "sigmoid"]``: each objective's loss is the sum of both terms, whatever their
    order (the NLL of the preferred responses plus ``-mean log sigmoid(s_i beta Delta)``)."""
    first = objective_dpo_losses(_pairs(torch.float64), SIGNS, _args(loss_type=["sft", "sigmoid"]))
    nll = [(1.0 + 2.0) / 2, 3.0]  # objective 0 prefers both chosen (log-probs -1, -2); objective 1 pair 0's rejected (-3)
    delta = torch.tensor([0.5, -1.0], dtype=torch.float64)
    for i, loss in enumerate(first):
        sigmoid = -torch.nn.functional.logsigmoid(SIGNS[:, i] * 0.5 * delta).mean().item()
        assert loss.item() == pytest.approx(nll[i] + sigmoid, rel=1e-15)


def test_dropped_ties_average_an_objective_over_its_single_decided_pair():
    """``ties="drop"``: an objective that decides one pair of the batch gets that pair's loss (divided
    by 1, not by the batch size or any other floor)."""
    losses = objective_dpo_losses(_pairs(torch.float64), SIGNS, _args(ties="drop"))
    assert losses[1].item() == -torch.nn.functional.logsigmoid(torch.tensor(-1.0 * 0.5 * 0.5, dtype=torch.float64)).item()
    delta = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert losses[0].item() == pytest.approx(-torch.nn.functional.logsigmoid(0.5 * delta).mean().item(), rel=1e-15)


# ------------------------------------------------------------------ signs_from_ratings
def test_signs_from_ratings_refuses_a_single_column_name_on_either_side():
    """``chosen`` and ``rejected`` are lists of column names: one given as a plain string is refused
    even when the other is a list (a one-letter name would otherwise be read as a list of letters)."""
    ex = {"c": 4, "r": 2}
    with pytest.raises(TypeError, match="lists of column names"):
        signs_from_ratings(ex, "c", ["r"])
    with pytest.raises(TypeError, match="lists of column names"):
        signs_from_ratings(ex, ["c"], "r")


# ------------------------------------------------------------------ pair_from_preferred_ids
def test_pair_from_preferred_ids_refuses_a_single_column_name_or_none():
    ex = {"response_0": "a", "response_1": "b", "better_response_id": 0}
    with pytest.raises(TypeError, match="list of id columns"):
        pair_from_preferred_ids(ex, preferred="better_response_id")
    with pytest.raises(TypeError, match="list of id columns"):
        pair_from_preferred_ids(ex, preferred=[])


@pytest.mark.parametrize(
    ("better", "safer", "expected"),
    [
        (-1, 1, {"chosen": "r0", "rejected": "r1", "objective_signs": [0, -1]}),  # -1: no preference
        (None, 0, {"chosen": "r0", "rejected": "r1", "objective_signs": [0, 1]}),  # None: no preference
        (1, -1, {"chosen": "r1", "rejected": "r0", "objective_signs": [1, 0]}),
        (-1, None, {"chosen": "r0", "rejected": "r1", "objective_signs": [0, 0]}),
    ],
)
def test_a_tie_of_either_objective_gives_its_sign_0_and_a_first_objective_tie_keeps_response_0_as_chosen(better, safer, expected):
    """``None`` or ``-1``: no preference. ``chosen`` is the response the first objective prefers, or
    ``responses[0]`` when it has none; the other objective's sign is relative to that orientation."""
    ex = {"response_0": "r0", "response_1": "r1", "better_response_id": better, "safer_response_id": safer}
    assert pair_from_preferred_ids(ex) == expected


# ------------------------------------------------------------------ SignsCollator
def test_the_collator_names_the_examples_without_signs():
    """A batch with examples that lack the signs column fails with a KeyError naming those examples
    (not a bare KeyError of the column name from the first one it reads)."""
    collate = SignsCollator(lambda examples: {"n": len(examples)}, "objective_signs", 2)
    examples = [{"objective_signs": [1, -1]}, {"prompt": "p"}, {"prompt": "q"}]
    with pytest.raises(KeyError, match=r"examples \[1, 2\] have no 'objective_signs'"):
        collate(examples)


def test_the_collator_names_the_setting_that_fixed_the_number_of_objectives():
    """A batch with the wrong number of signs (a streamed dataset is checked batch by batch) fails
    naming the config field that fixed the count: with ``objective_names`` the fix is one name per
    objective, not one weight."""
    collate = SignsCollator(lambda examples: {"n": len(examples)}, "objective_signs", 2, "objective_names")
    with pytest.raises(ValueError, match="there are 2 objective_names; give one name per objective"):
        collate([{"objective_signs": [1, -1, 0]}])
    assert collate([{"objective_signs": [1, 0]}])["objective_signs"].tolist() == [[1.0, 0.0]]
    by_default = SignsCollator(lambda examples: {"n": len(examples)}, "objective_signs", 2)  # the weights fix m
    with pytest.raises(ValueError, match="there are 2 objective_weights; give one weight per objective"):
        by_default([{"objective_signs": [1, -1, 0]}])


# ------------------------------------------------------------------ signs_tensor and check_dataset
@pytest.mark.parametrize("row", ["1", "10", b"\x01\x00"], ids=["str_1", "str_10", "bytes"])
def test_a_string_row_is_not_a_list_of_signs(row):
    """A row given as a string or bytes is refused, even one that could be read character by character
    as signs (``"1"``, ``"10"``)."""
    with pytest.raises(ValueError, match="is not a list of signs"):
        signs_tensor([row], "s", None)


def test_signs_tensor_messages_without_a_source_or_prefix_name_the_weights():
    """Called without ``source`` and ``where``, a count mismatch names ``objective_weights`` and the
    message starts with the column."""
    with pytest.raises(ValueError, match=r"^column 's' has 3 signs per example but there are 2 objective_weights; give one weight"):
        signs_tensor([[1, 0, -1]], "s", 2)


def test_tensor_rows_are_read_and_boolean_tensor_rows_refused():
    """A row given as a float tensor is read as its signs; a boolean tensor row is refused (False is
    not a tie)."""
    assert signs_tensor([torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])], "s", 2).tolist() == [[1.0, -1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="holds booleans"):
        signs_tensor([torch.tensor([True, False])], "s", 2)


def test_signs_are_float32_on_the_cpu_whatever_torchs_defaults():
    """The signs are a float32 CPU tensor even under another default dtype or device (the collator
    runs in the data loader; the Trainer moves the batch)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            signs = signs_tensor([[1, -1], [0, 1]], "s", 2)
    finally:
        torch.set_default_dtype(previous)
    assert (signs.dtype, signs.device.type) == (torch.float32, "cpu")
    assert signs.tolist() == [[1.0, -1.0], [0.0, 1.0]]


class _Stream(torch.utils.data.IterableDataset):
    """A streamed dataset with no ``column_names`` and no ``__len__``."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_a_stream_without_column_names_has_its_first_example_checked_and_may_be_empty():
    """``check_dataset`` on a stream that has no ``column_names``: its first example is checked (a
    missing column or a wrong count is refused), an empty stream passes."""
    check_dataset(_Stream([{"s": [1, -1]}, {"s": "unchecked"}]), "s", 2, "train_dataset", "objective_weights")
    with pytest.raises(ValueError, match="train_dataset has no 's' column"):
        check_dataset(_Stream([{"x": 1}]), "s", 2, "train_dataset", "objective_weights")
    with pytest.raises(ValueError, match="train_dataset: column 's' has 3 signs"):
        check_dataset(_Stream([{"s": [1, 0, -1]}]), "s", 2, "train_dataset", "objective_weights")
    check_dataset(_Stream([]), "s", 2, "train_dataset", "objective_weights")


def test_an_empty_dataset_with_the_signs_column_passes_the_check():
    """A map-style dataset with the column and no rows has nothing to refuse."""
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": [], "s": []})
    check_dataset(empty, "s", 2, "eval_dataset", "objective_weights")


# ------------------------------------------------------------------ MultiObjectiveDPOTrainer
# (these train or evaluate a tiny GPT-2 on CPU)
@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def test_evaluation_rewards_are_logged_under_eval_and_stay_out_of_the_training_log(tok, tmp_path):
    """``evaluate()`` logs the DPO rewards as ``eval_rewards/...`` (over the evaluation pairs) and no
    ``num_tokens``; neither they nor the evaluation tokens reach the next training log:
    ``rewards/margins`` there is the training batch's and ``num_tokens`` counts the training batch's
    tokens only. The run's summary (``train_runtime``) carries no ``num_tokens``, as in TRL."""
    train_rows, eval_rows = tiny.preference_rows(4, 2, seed=32), tiny.preference_rows(4, 2, seed=33)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)

    def margins(rows):
        ids, attn, comp = tiny.encode_pairs(tok, rows)
        with torch.no_grad():
            ratio = tiny.sequence_logps(model, ids, attn, comp) - tiny.sequence_logps(ref, ids, attn, comp)
        return BETA * (ratio[:4] - ratio[4:]), int(attn.sum())

    eval_delta, _ = margins(eval_rows)
    train_delta, train_tokens = margins(train_rows)
    args = config(
        tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=1, logging_strategy="steps", logging_steps=1
    )
    trainer = SequentialDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows),
        processing_class=tok,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/margins"] == pytest.approx(eval_delta.mean().item(), abs=1e-5)
    assert "rewards/margins" not in metrics and "num_tokens" not in metrics  # TRL counts training tokens only
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["rewards/margins"] == pytest.approx(train_delta.mean().item(), abs=1e-5)
    assert logged["num_tokens"] == train_tokens
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and "num_tokens" not in summary  # as TRL: not on the run's summary


def test_a_pair_the_policy_does_not_separate_is_not_counted_accurate(tok, tmp_path):
    """At the first step with the reference a copy of the policy every margin is exactly 0: as in TRL,
    a pair counts as accurate only when its reward margin is > 0, so ``rewards/accuracies`` and every
    objective's ``rewards/<objective>/accuracies`` are 0 (not 1)."""
    rows = tiny.preference_rows(4, 2, seed=34)
    for r, s in zip(rows, ([1, -1], [-1, 1], [1, 1], [-1, -1])):
        r["objective_signs"] = s
    model = tiny.no_dropout_gpt2(tok)
    args = config(
        tmp_path, per_device_train_batch_size=4, max_steps=1, logging_strategy="steps", logging_steps=1, objective_names=["a", "b"]
    )
    logged = run_trainer(tok, rows, args, model, copy.deepcopy(model)).state.log_history[0]
    assert logged["rewards/margins"] == 0.0 and logged["rewards/a/margins"] == 0.0  # the premise: exact ties
    assert logged["rewards/accuracies"] == 0.0
    assert logged["rewards/a/accuracies"] == 0.0 and logged["rewards/b/accuracies"] == 0.0


def test_a_subclass_may_call_training_step_with_keyword_arguments(tok, tmp_path):
    """``training_step(model=..., inputs=..., num_items_in_batch=...)`` (a subclass calling ``super()``
    by keyword) takes the step: the returned loss is the ``w``-weighted sum of the hand DPO losses."""
    returned = []

    class ByKeyword(SequentialDPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model=model, inputs=inputs, num_items_in_batch=num_items_in_batch)
            returned.append(loss.item())
            return loss

    rows = tiny.preference_rows(4, 2, seed=35)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    with torch.no_grad():
        hand = tiny.hand_dpo_losses(model, ref, tok, rows, BETA)
    expected = sum(w * h.item() for w, h in zip(WEIGHTS[2], hand))
    run_trainer(tok, rows, config(tmp_path, per_device_train_batch_size=4, max_steps=1), model, copy.deepcopy(ref), trainer_cls=ByKeyword)
    assert returned == [pytest.approx(expected, abs=1e-5)]


def test_a_model_whose_backbone_takes_only_named_arguments_trains(tok, tmp_path):
    """The policy forward passes the backbone only the batch's model inputs and ``use_cache``: a
    backbone whose ``forward`` has a fixed signature (no ``**kwargs``, as in many remote-code models)
    trains, and its step's loss is the weighted hand DPO loss."""
    rows = tiny.preference_rows(4, 2, seed=36)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    with torch.no_grad():
        hand = tiny.hand_dpo_losses(model, ref, tok, rows, BETA)
    backbone_forward = model.transformer.forward

    def strict_forward(input_ids=None, attention_mask=None, use_cache=None):
        return backbone_forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    model.transformer.forward = strict_forward
    args = config(tmp_path, per_device_train_batch_size=4, max_steps=1, logging_strategy="steps", logging_steps=1)
    logged = run_trainer(tok, rows, args, model, copy.deepcopy(ref)).state.log_history[0]
    assert logged["loss"] == pytest.approx(sum(w * h.item() for w, h in zip(WEIGHTS[2], hand)), abs=1e-5)


def test_prompt_tuning_sft_term_is_the_nll_of_the_real_tokens(tok, tmp_path):
    """Prompt-learning PEFT prepends virtual tokens to the model's outputs: the per-token log-probs
    are the last ``L - 1`` positions (the real tokens'), so RPO's NLL term (``"sft"``) is each
    objective's mean NLL over the tokens of the responses it prefers, by a plain forward's
    ``log_softmax`` past the virtual tokens."""
    peft = pytest.importorskip("peft")
    rows = tiny.preference_rows(4, 2, seed=37)
    for r, s in zip(rows, ([1, -1], [-1, 0], [1, 1], [0, -1])):
        r["objective_signs"] = s
    virtual = 2
    args = config(tmp_path, per_device_train_batch_size=4, loss_type=["sft"])
    trainer = SequentialDPOTrainer(
        model=tiny.no_dropout_gpt2(tok),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    ids, comp = batch["input_ids"], batch["completion_mask"][:, 1:].double()
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, virtual:-1]
        nll = -torch.gather(torch.log_softmax(logits.double(), -1), 2, ids[:, 1:, None]).squeeze(-1)
        losses = trainer.objective_losses(trainer.model, batch)
    hand = []
    for i in range(2):
        signs = torch.tensor([r["objective_signs"][i] for r in rows])
        rows_preferred = torch.cat([(signs > 0).nonzero().flatten(), 4 + (signs < 0).nonzero().flatten()])
        hand.append(((nll * comp)[rows_preferred].sum() / comp[rows_preferred].sum()).item())
    assert [loss.item() for loss in losses] == pytest.approx(hand, abs=1e-5)


def test_log_passes_the_start_time_on_to_the_trainer_positionally_or_by_keyword(tok, tmp_path):
    """``Trainer.log(logs, start_time)`` adds the speed metrics when it counts tokens: the Trainer passes
    the start time positionally (every training log has ``train_tokens_per_second``), a user's
    callback may pass it by keyword (its log gets ``train_runtime``)."""
    import transformers

    class LogsMidRun(transformers.TrainerCallback):
        def on_step_end(self, train_args, state, control, **kw):
            if state.global_step == 1:
                trainer.log({"custom": 1.0}, start_time=time.time())

    rows = tiny.preference_rows(4, 2, seed=38)
    logs = dict(logging_strategy="steps", logging_steps=1, include_num_input_tokens_seen="all")
    trainer = SequentialDPOTrainer(
        model=tiny.no_dropout_gpt2(tok),
        ref_model=tiny.no_dropout_gpt2(tok, seed=1),
        args=config(tmp_path, per_device_train_batch_size=2, max_steps=2, **logs),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[LogsMidRun()],
    )
    trainer.train()
    (custom,) = [e for e in trainer.state.log_history if "custom" in e]
    assert "train_runtime" in custom and "num_tokens" in custom  # a training log, with the start time
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert steps and all("train_tokens_per_second" in e for e in steps)


# ------------------------------------------------------------------ MultiObjectiveDPOConfig and the trainer's construction
def test_objective_betas_must_be_positive(tmp_path):
    """A beta of 0 (or below) would switch an objective's DPO term off silently: refused."""
    with pytest.raises(ValueError, match="objective_betas must be finite numbers > 0"):
        config(tmp_path, objective_betas=[0.1, 0.0])


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ({"use_weighting": True}, r"use_weighting=True \(WPO's weights are not implemented here\)"),
        ({"padding_free": True}, "padding_free=True"),
    ],
)
def test_an_unsupported_option_is_named_as_the_user_set_it(tmp_path, option, reason):
    with pytest.raises(ValueError, match=f"does not support {reason}"):
        config(tmp_path, **option)


def test_the_trainer_hands_its_settings_collator_and_signs_count_on(tok, tmp_path):
    """The config's ``rescale`` reaches the optimizer, a user's ``data_collator`` is the one wrapped, the
    signs column is exposed as ``signs_column``, every batch's signs are counted against the setting
    that fixed ``m`` (here ``objective_names``) before the inner collator, and a batch of ``n`` pairs
    (``2n`` rows) counts ``n`` examples (an ``int``)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    calls = []

    class Recording(DataCollatorForPreference):
        def __call__(self, examples):
            calls.append(len(examples))
            return super().__call__(examples)

    rows = tiny.preference_rows(4, 2, seed=39)
    args = config(tmp_path, objective_weights=None, objective_names=["a", "b"], rescale="1+c", per_device_train_batch_size=4)
    trainer = MultiObjectiveDPOTrainer(
        model=tiny.no_dropout_gpt2(tok),
        ref_model=tiny.no_dropout_gpt2(tok, seed=1),
        args=args,
        data_collator=Recording(pad_token_id=tok.pad_token_id),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.create_optimizer()
    assert trainer.conflict_averse_optimizer.rescale == "1+c"
    assert trainer.signs_column == "objective_signs"
    batch = next(iter(trainer.get_train_dataloader()))
    assert calls == [4]
    n = trainer.objective_batch_size(batch)
    assert n == 4 and isinstance(n, int)
    with pytest.raises(ValueError, match="there are 2 objective_names; give one name per objective"):
        trainer.data_collator([{"objective_signs": [1, 0, -1]}])
    assert calls == [4]  # refused before the inner collator


def test_the_number_of_objective_betas_fixes_the_number_of_signs(tok, tmp_path):
    """Without weights or names, ``objective_betas`` fixes ``m``: a dataset with another number of
    signs is refused naming ``objective_betas``; with none of the three, the data sets ``m``."""
    rows = tiny.preference_rows(4, 3, seed=40)

    def make(**kw):
        args = config(tmp_path, objective_weights=None, **kw)
        return MultiObjectiveDPOTrainer(
            model=tiny.no_dropout_gpt2(tok),
            ref_model=tiny.no_dropout_gpt2(tok, seed=1),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )

    with pytest.raises(
        ValueError,
        match="^train_dataset: column 'objective_signs' has 3 signs per example but there are 2 objective_betas; give one beta per",
    ):
        make(objective_betas=[0.1, 0.2])
    free = make()
    assert free.data_collator.num_objectives is None


def test_a_single_eval_dataset_is_named_eval_dataset_in_its_errors(tok, tmp_path):
    bad = datasets.Dataset.from_list(tiny.preference_rows(4, 3, seed=41))
    with pytest.raises(ValueError, match="^eval_dataset: column 'objective_signs' has 3 signs"):
        MultiObjectiveDPOTrainer(
            model=tiny.no_dropout_gpt2(tok),
            args=config(tmp_path),
            train_dataset=datasets.Dataset.from_list(tiny.preference_rows(4, 2)),
            eval_dataset=bad,
            processing_class=tok,
        )


def test_an_accumulation_window_of_three_micro_batches_equals_one_batch(tok, tmp_path):
    """``gradient_accumulation_steps=3``: each micro-batch's share is its size over the window's, and the
    direction is combined after the third: the step equals the hand loop's on the 12 pairs at once."""
    rows = tiny.preference_rows(12, 2, seed=42)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    hand_loop(mine, ref, tok, [rows], 2)
    args = config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=1)
    run_trainer(tok, rows, args, model, copy.deepcopy(ref))
    assert max_diff(model, mine) < TOL
