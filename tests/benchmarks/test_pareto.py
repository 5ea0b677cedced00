"""Facts about the synthetic Pareto benchmarks that hold by construction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

pytest.importorskip("tqdm", reason='needs the bench extra: pip install -e ".[bench]"')
pytest.importorskip("matplotlib", reason='needs the bench extra: pip install -e ".[bench]"')

from benchmarks.pareto import engine, preference, quadratic, toy, vlmop2
from benchmarks.pareto.__main__ import main
from benchmarks.pareto.hypervolume import hypervolume, hypervolume_2d, hypervolume_3d
from benchmarks.pareto.methods import DEFAULT_METHODS, get_methods, min_norm_coefficients, pcgrad_coefficients

torch.set_num_threads(1)
F64 = torch.float64


# ---------------------------------------------------------------- hypervolume
def _grid_hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Brute force on integer points: count unit cells dominated by some point."""
    axes = [np.arange(int(lo), int(r)) + 0.5 for lo, r in zip(points.min(0), ref)]
    cells = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(ref))
    dominated = (points[None, :, :] <= cells[:, None, :]).all(-1).any(-1)
    return float(dominated.sum())


@pytest.mark.parametrize("dim", [2, 3])
def test_hypervolume_matches_brute_force_grid(dim: int) -> None:
    rng = np.random.default_rng(dim)
    for _ in range(20):
        pts = rng.integers(0, 9, size=(rng.integers(1, 9), dim)).astype(float)
        ref = np.full(dim, 10.0)
        assert hypervolume(pts, ref) == pytest.approx(_grid_hv(pts, ref), abs=1e-9)


def test_hypervolume_edge_cases() -> None:
    assert hypervolume_2d(np.array([[2.0, 2.0]]), [1.0, 1.0]) == 0.0  # outside the reference box
    assert hypervolume_2d(np.array([[0.0, 0.0], [0.5, 0.5]]), [1.0, 1.0]) == pytest.approx(1.0)
    assert hypervolume_3d(np.array([[0.0, 0.0, 0.0]]), [1.0, 2.0, 3.0]) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        hypervolume(np.zeros((1, 4)), np.ones(4))


def test_hypervolume_against_pymoo_when_installed() -> None:
    pymoo_hv = pytest.importorskip("pymoo.indicators.hv")
    rng = np.random.default_rng(0)
    for dim in (2, 3):
        pts = rng.random((30, dim))
        ref = np.full(dim, 1.1)
        assert hypervolume(pts, ref) == pytest.approx(pymoo_hv.HV(ref_point=ref)(pts), rel=1e-9)


# ---------------------------------------------------------------- methods
@pytest.mark.parametrize("m", [2, 3, 5])
def test_min_norm_matches_scipy(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    G = torch.randn(20, m, 12, generator=g, dtype=F64)
    H = G @ G.mT
    p = min_norm_coefficients(H)
    assert torch.allclose(p.sum(-1), torch.ones(20, dtype=F64)) and bool((p >= 0).all())
    for r in range(20):
        h = H[r].numpy()
        ref = minimize(
            lambda x: x @ h @ x,
            np.ones(m) / m,
            jac=lambda x: 2 * h @ x,
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        assert float(p[r] @ H[r] @ p[r]) <= ref.fun + 1e-9 * (1 + abs(ref.fun))


def test_pcgrad_two_objectives_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    G = torch.randn(200, 2, 5, generator=g, dtype=F64)
    H = G @ G.mT
    W = torch.rand(200, 2, generator=g, dtype=F64) + 0.1
    a = pcgrad_coefficients(H, W, torch.Generator().manual_seed(1))
    d = torch.einsum("rm,rmd->rd", a, G)
    g1, g2 = G[:, 0], G[:, 1]
    dot = (g1 * g2).sum(-1, keepdim=True)
    conflict = dot < 0
    p1 = torch.where(conflict, g1 - dot / (g2 * g2).sum(-1, keepdim=True) * g2, g1)
    p2 = torch.where(conflict, g2 - dot / (g1 * g1).sum(-1, keepdim=True) * g1, g2)
    w = W / W.sum(-1, keepdim=True)
    assert torch.allclose(d, w[:, :1] * p1 + w[:, 1:] * p2, atol=1e-12)


def test_unknown_method_and_problem_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        get_methods(["weighted", "nope"])
    with pytest.raises(SystemExit):
        main(["--problems", "nope"])


# ---------------------------------------------------------------- engine
def _quad_setup(m: int, kappa: float, seeds: list[int]):
    W1 = quadratic.weight_set(m, quick=True)
    inst = [quadratic.make_instance(m, kappa, s) for s in seeds]
    runs = [(si, wi) for si in range(len(seeds)) for wi in range(len(W1))]
    A = torch.stack([inst[si][0] for si, _ in runs])
    u = torch.stack([inst[si][1] for si, _ in runs])
    x0 = torch.stack([inst[si][2] for si, _ in runs])
    W = torch.stack([W1[wi] for _, wi in runs])
    return A, u, x0, W


def test_c_zero_reproduces_weighted_sum_bit_for_bit() -> None:
    A, u, x0, W = _quad_setup(3, 10.0, [0, 1])
    meths = get_methods(["weighted"]) + get_methods(["cagrad", "raco"], c=0.0)
    res = engine.run(
        lambda z: quadratic.losses(A, u, z),
        x0,
        W,
        meths,
        60,
        optimizer="adam",
        lr=0.05,
        record_trajectory=True,
        log_points=60,
        progress=False,
    )
    assert res.trajectory is not None
    assert torch.equal(res.trajectory[:, 1], res.trajectory[:, 0])
    assert torch.equal(res.trajectory[:, 2], res.trajectory[:, 0])


def test_batched_runs_do_not_interact() -> None:
    A, u, x0, W = _quad_setup(2, 10.0, [0, 1])
    meths = get_methods(["pcgrad", "raco"])
    fn = lambda A_, u_: lambda z: quadratic.losses(A_, u_, z)  # noqa: E731
    full = engine.run(fn(A, u), x0, W, meths[1:], 40, optimizer="sgd", lr=0.2, progress=False)
    one = engine.run(fn(A[2:3], u[2:3]), x0[2:3], W[2:3], meths[1:], 40, optimizer="sgd", lr=0.2, progress=False)
    assert torch.allclose(full.final[:, 2], one.final[:, 0], atol=1e-12)


def test_quadratics_conflict_averse_methods_approach_pareto_set_and_respect_w() -> None:
    for m in (2, 3):
        A, u, x0, W = _quad_setup(m, 2.0, [0, 1])
        meths = get_methods(list(DEFAULT_METHODS))
        res = engine.run(lambda z: quadratic.losses(A, u, z), x0, W, meths, 150, optimizer="sgd", lr=quadratic.LR, progress=False)
        lam = torch.cat([quadratic.lambda_grid(m, 2000), W])
        front = torch.stack(
            [quadratic.weighted_optimum(A[r].expand(len(lam), *A[r].shape), u[r].expand(len(lam), *u[r].shape), lam) for r in range(len(W))]
        )
        d0 = torch.cdist(x0.unsqueeze(1), front).squeeze(1).amin(-1)
        xstar = quadratic.weighted_optimum(A, u, W)
        for k, meth in enumerate(meths):
            dT = torch.cdist(res.final[k].unsqueeze(1), front).squeeze(1).amin(-1)
            if meth.conflict_averse:
                assert bool((dT < d0).all()), meth.name
            if meth.respects_w:  # limit points are critical points of the strictly convex L_w
                assert float((res.final[k] - xstar).norm(dim=-1).max()) < 1e-6, meth.name


# ---------------------------------------------------------------- problems
@pytest.mark.parametrize("w1", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_toy_weighted_optimum_matches_analytic(w1: float) -> None:
    x = toy.weighted_optimum(w1)
    assert x[0] == pytest.approx(7 * (w1 - (1 - w1)), abs=1e-12)
    assert -8.45 < x[1] < -8.35  # the Pareto set's theta2 ~ -8.36
    xt = torch.tensor(x, dtype=F64, requires_grad=True)
    lw = (torch.tensor([w1, 1 - w1], dtype=F64) * toy.toy_losses(xt)).sum()
    (grad,) = torch.autograd.grad(lw, xt)
    assert float(grad.norm()) < 1e-5  # stationary point of L_w


def test_toy_pareto_set_spans_the_segment() -> None:
    ps = toy.pareto_set(101)
    assert ps[0, 0] == pytest.approx(-7) and ps[-1, 0] == pytest.approx(7)
    assert np.all(np.diff(ps[:, 0]) > 0)
    assert np.all(np.abs(ps[:, 1] + 8.39) < 0.06)
    assert ps[50, 1] == pytest.approx(-8.3552, abs=1e-3)


def test_vlmop2_front_and_set_distance() -> None:
    t = torch.linspace(-1, 1, 11, dtype=F64)
    x = t.unsqueeze(-1) / vlmop2.N**0.5 * torch.ones(vlmop2.N, dtype=F64)
    assert torch.allclose(vlmop2.vlmop2(x), vlmop2.front(t), atol=1e-14)
    assert float(vlmop2.dist_pareto_set(x).abs().max()) < 1e-12
    e = torch.zeros(vlmop2.N, dtype=F64)
    e[0], e[1] = 1.0, -1.0  # orthogonal to the segment's direction
    assert float(vlmop2.dist_pareto_set(x[5] + 0.3 * e)) == pytest.approx(0.3 * 2**0.5)


@pytest.mark.parametrize("m,rho", [(2, -0.9), (2, 0.5), (3, -0.45)])
def test_preference_rewards_have_exact_cosine_and_reference_is_neutral(m: int, rho: float) -> None:
    task = preference.make_task(m, rho, seed=0)
    r = task["r"].reshape(m, -1)
    cos = (r @ r.T) / (r.norm(dim=-1, keepdim=True) * r.norm(dim=-1))
    for i, j in itertools.combinations(range(m), 2):
        assert float(cos[i, j]) == pytest.approx(rho, abs=1e-10)
    one = {k: v.unsqueeze(0) for k, v in task.items()}
    J0 = preference.expected_reward(one, torch.zeros(1, preference.D, dtype=F64))
    assert float(J0.abs().max()) < 1e-12  # centred rewards: the uniform reference has J = 0
    W = torch.full((1, m), 1.0 / m, dtype=F64)
    th = preference.weighted_optimum(one, W).requires_grad_(True)
    (g,) = torch.autograd.grad((W * preference.dpo_losses(one, th)).sum(), th)
    assert float(g.norm()) < 1e-6  # theta*(w) is the minimiser of the convex L_w


def test_cli_quick_writes_report(tmp_path) -> None:
    sections = main(["--quick", "--no-progress", "--out", str(tmp_path), "--problems", "vlmop2", "--methods", "weighted", "mgda", "raco"])
    assert (tmp_path / "report.md").exists() and (tmp_path / "vlmop2_front.png").exists()
    text = (tmp_path / "report.md").read_text()
    assert "VLMOP2" in text and "hypervolume" in text and len(sections) == 1


def test_the_loop_reports_how_often_the_clip_acted_against_a_hand_written_loop():
    """RACO's clip activity per run: the fraction of steps with ``clip_active`` and the mean ``clip_change``,
    as a hand-written SGD loop over ``solve_cagrad`` counts them; NaN for a method outside the CAGrad family."""
    from cagrad_clip import solve_cagrad

    scale = torch.tensor([1.0, 9.0], dtype=torch.float64)

    def losses(x):  # conflicting quadratics, the second 9x steeper: the clip's band at w = (0.9, 0.1)
        return torch.stack([((x - 1.0) ** 2).sum(-1), scale[1] * ((x + 1.0) ** 2).sum(-1)], -1)

    x0 = torch.tensor([[0.3, -0.2], [0.9, 0.1]], dtype=torch.float64)
    W = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    methods = get_methods(["weighted", "raco"], c=0.9)
    res = engine.run(losses, x0, W, methods, 12, optimizer="sgd", lr=0.01, progress=False)
    x, active, change = x0.clone(), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for _ in range(12):
        _, G = engine.per_objective_grads(losses, x[None])
        G = G[0]
        sol = solve_cagrad(G @ G.mT, W, c=0.9)
        active += sol.clip_active.double()
        change += sol.clip_change
        x = x - 0.01 * torch.einsum("rm,rmd->rd", sol.coefficients, G)
    assert torch.isnan(res.clip_active[0]).all() and torch.isnan(res.clip_change[0]).all()
    torch.testing.assert_close(res.clip_active[1], active / 12, rtol=0, atol=0)
    torch.testing.assert_close(res.clip_change[1], change / 12, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res.final[1], x, rtol=1e-12, atol=1e-14)
    assert float(res.clip_active[1].max()) > 0  # the clip did act here


@pytest.mark.parametrize("m", [2, 3])
def test_the_clip_band_problems_weighted_optimum_is_exact(m):
    """x*(w) = sum_i w_i s_i u_i / sum_i w_i s_i: the gradient of L_w vanishes there, and L_w is larger nearby."""
    from benchmarks.pareto import clipband

    scales = torch.tensor([[1.0] + [9.0] * (m - 1), [1.0] + [3.0] * (m - 1)], dtype=torch.float64)
    W = torch.tensor([clipband.WEIGHTS[m]] * 2, dtype=torch.float64)
    xstar = clipband.weighted_optimum(scales, W, clipband.TARGETS[m]).requires_grad_(True)
    lw = (W * clipband.losses(xstar, scales, clipband.TARGETS[m])).sum()
    (grad,) = torch.autograd.grad(lw, xstar)
    assert grad.abs().max() < 1e-14
    shifted = (W * clipband.losses(xstar.detach() + 1e-3, scales, clipband.TARGETS[m])).sum()
    assert shifted > lw


def test_the_clip_band_runs_both_radii_and_reports_the_clip(tmp_path):
    (section,) = main(
        ["--quick", "--no-progress", "--out", str(tmp_path), "--problems", "clipband", "--methods", "weighted", "cagrad", "raco"]
    )
    assert "| 2 | 0.9 | 9 | RACO (c=0.9, clip) |" in section.markdown and "| 3 | 0.4 | 1 | CAGrad (c=0.4) |" in section.markdown
    assert "| steps to eps | 25-75 % | reached |" in section.markdown
    assert "clipband m=2 c=0.9" in section.markdown  # the clip activity table, one block per (m, c)
    assert (tmp_path / "clipband_steps.png").stat().st_size > 0
    assert section.summary.startswith("clipband — RACO reached eps of the weighted optimum sooner than CAGrad")
