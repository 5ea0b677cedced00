"""Signs from real data shapes: per-attribute ratings (HelpSteer2 / UltraFeedback) and per-objective
preferred-response ids (PKU-SafeRLHF), on small datasets of those shapes built in code."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cagrad_clip.integrations.trl import pair_from_preferred_ids, signs_from_ratings  # noqa: E402

from . import tiny  # noqa: E402
from .test_trl import config, run_trainer  # noqa: E402

ATTRIBUTES = ("helpfulness", "correctness", "verbosity")


def ratings_dataset():
    """UltraFeedback-style: each pair carries both responses' ratings per attribute."""
    rows = [
        {"prompt": "write about alpha : ", "chosen": "alpha is good", "rejected": "the", "ratings": ((4, 2), (3, 3), (1, 4))},
        {"prompt": "write about beta : ", "chosen": "beta", "rejected": "a good beta", "ratings": ((2, 3), (4, 3.5), (2, 2))},
        {"prompt": "write about alpha : ", "chosen": "a", "rejected": "alpha", "ratings": ((3, 3), (None, 2), (0, 1))},
    ]
    flat = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "ratings"}
        for name, (c, rj) in zip(ATTRIBUTES, r["ratings"]):
            row[f"chosen_{name}"], row[f"rejected_{name}"] = c, rj
        flat.append(row)
    return datasets.Dataset.from_list(flat)


def test_signs_from_ratings_are_the_signs_of_the_rating_differences_with_ties_within_tolerance():
    ds = ratings_dataset()
    chosen, rejected = [f"chosen_{a}" for a in ATTRIBUTES], [f"rejected_{a}" for a in ATTRIBUTES]
    strict = ds.map(lambda ex: {"objective_signs": signs_from_ratings(ex, chosen, rejected)})
    assert strict["objective_signs"] == [[1, 0, -1], [-1, 1, 0], [0, 0, -1]]  # None: unknown, a tie
    loose = ds.map(lambda ex: {"objective_signs": signs_from_ratings(ex, chosen, rejected, tolerance=0.5)})
    assert loose["objective_signs"] == [[1, 0, -1], [-1, 0, 0], [0, 0, -1]]  # 4 vs 3.5 is within 0.5


def test_bad_rating_columns_are_refused_naming_them():
    ex = {"c": 1, "r": "high", "t": True}
    with pytest.raises(KeyError, match="no 'missing' column"):
        signs_from_ratings(ex, ["c"], ["missing"])
    with pytest.raises(TypeError, match="column 'r' holds 'high'; a rating must be a number"):
        signs_from_ratings(ex, ["c"], ["r"])
    with pytest.raises(TypeError, match="column 't' holds True"):
        signs_from_ratings(ex, ["c"], ["t"])
    with pytest.raises(ValueError, match="same number"):
        signs_from_ratings(ex, ["c", "c"], ["c"])
    with pytest.raises(TypeError, match="lists of column names"):
        signs_from_ratings(ex, "c", "c")
    with pytest.raises(ValueError, match="tolerance"):
        signs_from_ratings(ex, ["c"], ["c"], tolerance=-1)


def safe_rlhf_dataset():
    """PKU-SafeRLHF-style: two responses and the id of the more helpful and of the safer one."""
    return datasets.Dataset.from_list(
        [
            {"prompt": "write about alpha : ", "response_0": "alpha", "response_1": "the", "better_response_id": 0, "safer_response_id": 0},
            {
                "prompt": "write about beta : ",
                "response_0": "a",
                "response_1": "beta good",
                "better_response_id": 1,
                "safer_response_id": 0,
            },
            {"prompt": "write about beta : ", "response_0": "is", "response_1": "beta", "better_response_id": 1, "safer_response_id": 1},
            {
                "prompt": "write about alpha : ",
                "response_0": "a",
                "response_1": "alpha",
                "better_response_id": 0,
                "safer_response_id": None,
            },
        ]
    )


def test_pairs_from_preferred_ids_orient_chosen_to_the_first_objective():
    pairs = safe_rlhf_dataset().map(pair_from_preferred_ids, remove_columns=["response_0", "response_1"])
    assert pairs["chosen"] == ["alpha", "beta good", "beta", "a"]
    assert pairs["rejected"] == ["the", "a", "is", "alpha"]
    assert pairs["objective_signs"] == [[1, 1], [1, -1], [1, 1], [1, 0]]  # helpful, harmless


def test_bad_preferred_ids_are_refused():
    ex = {"response_0": "a", "response_1": "b", "better_response_id": 2, "safer_response_id": 0}
    with pytest.raises(ValueError, match="column 'better_response_id' holds 2"):
        pair_from_preferred_ids(ex)
    with pytest.raises(KeyError, match="no 'safer'"):
        pair_from_preferred_ids(ex, preferred=["safer"])
    with pytest.raises(ValueError, match="two response columns"):
        pair_from_preferred_ids(ex, responses=["response_0"])


def test_the_mapped_datasets_train(tmp_path):
    tok = tiny.tokenizer()
    pairs = safe_rlhf_dataset().map(pair_from_preferred_ids, remove_columns=["response_0", "response_1"])
    trainer = run_trainer(
        tok,
        pairs.to_list(),
        config(tmp_path, per_device_train_batch_size=4, max_steps=1, objective_names=["helpful", "harmless"]),
        tiny.no_dropout_gpt2(tok),
        tiny.no_dropout_gpt2(tok, seed=1),
    )
    assert trainer.state.global_step == 1
