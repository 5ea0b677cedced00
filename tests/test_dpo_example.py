"""A seconds-long run of examples/multi_objective_dpo.py (needs the ``examples`` extra: transformers)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "multi_objective_dpo.py"
TINY = ["--steps", "2", "--warmup-steps", "2", "--pairs", "32", "--batch", "4", "--eval-prompts", "8", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("multi_objective_dpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_judge_and_signs(example):
    assert example.score(["alpha", "beta"], "alpha is good") == (0.5, -3.0)
    # y1 covers more but is longer: the objectives disagree, which is the point of the example.
    assert example.preference_signs(["alpha", "beta"], "alpha and beta", "the") == [1.0, -1.0]
    assert example.preference_signs(["alpha", "beta"], "the", "a") == [0.0, 0.0]


def test_dpo_losses_differ_only_by_sign_and_ties_give_no_gradient(example):
    import torch

    tok = example.WordTokenizer()
    model = example.tiny_model(tok, 0)
    pair = example.Pair(["alpha", "beta"], "write about alpha beta :", "alpha and beta", "the", [1.0, -1.0])
    tie = example.Pair(["alpha", "beta"], "write about alpha beta :", "the", "a", [0.0, 0.0])
    ref = example.reference_logps_of(model, tok, [pair]) - 0.3  # a reference that differs from the policy
    cov, brev = example.dpo_losses(model, ref, tok, [pair], beta=0.2)
    delta = torch.logit(torch.exp(-cov))  # -log sigmoid(delta) = cov
    torch.testing.assert_close(brev, -torch.nn.functional.logsigmoid(-delta))
    ref_tie = example.reference_logps_of(model, tok, [tie])
    tie_losses = example.dpo_losses(model, ref_tie, tok, [tie], beta=0.2)
    grads = torch.autograd.grad(tie_losses[0], [p for p in model.parameters()], allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("method", ["raco"])
def test_example_runs_and_writes_the_table(example, tmp_path, method):
    out = tmp_path / "table.md"
    result = example.run(TINY + ["--method", method, "--out", str(out)])
    assert set(result["win_rates"]) == {"coverage", "brevity"}
    assert all(0.0 <= r <= 1.0 for r in result["win_rates"].values())
    assert result["c"] == (0.0 if method == "weighted" else 0.4)
    text = out.read_text()
    assert text.startswith("| method |") and f"| {method} |" in text


def test_lora_trains_adapters_only(example):
    pytest.importorskip("peft")
    result = example.run(TINY + ["--lora", "--steps", "1"])
    assert 0.0 <= result["win_rates"]["coverage"] <= 1.0
    assert 0 < result["trainable_params"] < result["total_params"] / 5  # the adapters are the shared parameters
