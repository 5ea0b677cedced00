"""Behaviours of the TRL integration's helpers that surviving mutants showed no test pinned.

Each test checks a documented behaviour against a hand computation: the per-token averages and the
preferred-response NLL when a response is one token long (an empty response is its EOS alone), and the
argument checks and tie handling of the dataset helpers.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("trl")

from cagrad_clip.integrations.trl import pair_from_preferred_ids, signs_from_ratings  # noqa: E402
from cagrad_clip.integrations.trl.losses import PairScores, objective_dpo_losses  # noqa: E402


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
