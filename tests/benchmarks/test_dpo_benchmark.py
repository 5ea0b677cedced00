"""The DPO benchmark's pieces: the judge, the MGDA/PCGrad optimizers, the metrics (the run itself is CI's --quick)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.dpo import report, task  # noqa: E402
from benchmarks.dpo.baselines import GramRuleOptimizer, mgda_rule, pcgrad_rule  # noqa: E402
from benchmarks.dpo.run import RunResult  # noqa: E402


def test_judge():
    k = ["alpha", "beta"]
    assert task.score(k, "alpha please is good", 3) == (0.5, -4.0, 1.0)
    assert task.signs(k, "alpha beta thanks", "the", 3) == [1, -1, 1]
    assert task.signs(k, "the", "a", 2) == [0, 0]
    assert task.win_rates(["alpha", "the"], ["the", "the"], [k, k], 2) == [0.75, 0.5]


def two_objective_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3)
    return model, lambda: [model(x).pow(2).mean(), (model(x) - 1).pow(2).mean()]


def test_mgda_optimizer_steps_along_the_min_norm_direction():
    model, losses = two_objective_model()
    params = list(model.parameters())
    g = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]) for loss in losses()]
    # closed form for two gradients: the point of the segment [g1, g2] closest to the origin
    t = ((g[1] - g[0]) @ g[1] / (g[1] - g[0]).pow(2).sum()).clamp(0, 1)
    expected = t * g[0] + (1 - t) * g[1]
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt = GramRuleOptimizer(torch.optim.SGD(params, lr=0.1), mgda_rule, [0.9, 0.1])
    opt.zero_grad()
    opt.backward(losses(), combine=False)
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after, before - 0.1 * expected, rtol=1e-5, atol=1e-6)
    assert opt.last.coefficients.sum().item() == pytest.approx(1.0)


def test_pcgrad_without_conflict_is_the_weighted_sum():
    gram = torch.tensor([[1.0, 0.2], [0.2, 2.0]], dtype=torch.float64)
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    torch.testing.assert_close(pcgrad_rule(0)(gram, w), w)
    conflict = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    a = pcgrad_rule(0)(conflict, w)  # g1 loses its g2 part and vice versa: a = w + w_other * 0.5
    torch.testing.assert_close(a, torch.tensor([0.7 + 0.3 * 0.5, 0.3 + 0.7 * 0.5], dtype=torch.float64))


def test_metrics_by_hand():
    runs = [
        RunResult(2, "a", (0.8, 0.2), 0, [0.9, 0.3], [0, 0], [0, 0], 0.0),
        RunResult(2, "a", (0.2, 0.8), 0, [0.4, 0.8], [0, 0], [0, 0], 0.0),
        RunResult(2, "b", (0.8, 0.2), 0, [0.6, 0.6], [0, 0], [0, 0], 0.0),
        RunResult(2, "b", (0.2, 0.8), 0, [0.6, 0.6], [0, 0], [0, 0], 0.0),
    ]
    met = report.metrics(runs)
    # a: union of [0,.9]x[0,.3] and [0,.4]x[0,.8] = .27 + .32 - .12
    assert met[(2, "a")]["hypervolume"] == [pytest.approx(0.47)]
    assert met[(2, "b")]["hypervolume"] == [pytest.approx(0.36)]
    # weighted: a (.78, .72) vs b (.6, .6): a is best at both weights
    assert met[(2, "a")]["regret"] == [pytest.approx(0.0)]
    assert met[(2, "b")]["regret"] == [pytest.approx((0.18 + 0.12) / 2)]
    assert met[(2, "a")]["steering"] == [pytest.approx(0.5)]  # (.9 - .4 + .8 - .3) / 2
    assert met[(2, "b")]["steering"] == [pytest.approx(0.0)]


def test_to_docs_copies_report_and_figures(tmp_path):
    from benchmarks.dpo import to_docs

    res = tmp_path / "res"
    res.mkdir()
    report = "# Multi-objective DPO benchmark\n\nCommand: x\n\n## Headline\n\n| a |\n\n## m = 2\n\n![f](dpo_m2.png)\n"
    (res / "report.md").write_text(report)
    (res / "dpo_m2.png").write_bytes(b"png")
    (tmp_path / "intro.md").write_text("# DPO\n\nintro\n")
    path = to_docs.main([str(tmp_path / "intro.md"), str(res)], docs=tmp_path / "docs")
    text = path.read_text()
    assert text.startswith("# DPO\n\nintro\n\n## Generated report\n") and "### Headline" in text and "### m = 2" in text
    assert "](figures/dpo_m2.png)" in text and (tmp_path / "docs" / "figures" / "dpo_m2.png").exists()


def test_the_detail_table_reports_the_clip_activity_of_the_cagrad_family_only():
    from benchmarks.dpo.report import detail

    runs = [
        RunResult(2, "raco", (0.8, 0.2), 0, [0.5, 0.5], [0, 0], [0, 0], 0.0, [], 0.25, 0.05),
        RunResult(2, "raco", (0.8, 0.2), 1, [0.5, 0.5], [0, 0], [0, 0], 0.0, [], 0.75, 0.15),
        RunResult(2, "weighted", (0.8, 0.2), 0, [0.5, 0.5], [0, 0], [0, 0], 0.0),
    ]
    rows = {line.split(" | ")[1]: line for line in detail(runs, ["raco", "weighted"], 2).splitlines()[2:]}
    assert rows["RACO (c=0.4, clip)"].endswith("| 50.0 ± 25.0 | 0.100 ± 0.050 |")
    assert rows["Weighted sum (c=0)"].endswith("| - | - |")  # a run without the clip fields (NaN)


def test_the_rare_signal_variant_keeps_one_objectives_sign_in_a_fraction_of_the_pairs():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "objective_signs": [1 if i % 2 else -1, 1 if i % 3 else 0]} for i in range(2000)
    ]
    thin = task.thin_signal(rows, 0, 0.1, seed=3)
    kept = sum(r["objective_signs"][0] != 0 for r in thin)
    assert 150 < kept < 250  # about 10 % of 2000
    assert all(any(r["objective_signs"]) for r in thin)  # pairs tied on every objective are dropped
    decided = sum(r["objective_signs"][1] != 0 for r in rows)
    assert sum(r["objective_signs"][1] != 0 for r in thin) == decided  # every pair objective 1 decides stays
    assert task.thin_signal(rows, 0, 1.0, seed=3) == [r for r in rows if any(r["objective_signs"])]
