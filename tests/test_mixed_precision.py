"""Mixed precision: autocast, bf16 parameters and GradScaler in both orders (unscale/clip before step or not)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer

WEIGHTS = [0.8, 0.2]


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    f32 = dict(dtype=torch.float32)
    model = nn.ModuleDict(
        dict(
            trunk=nn.Sequential(nn.Linear(6, 32, **f32), nn.GELU(), nn.LayerNorm(32, **f32), nn.Linear(32, 16, **f32), nn.GELU()),
            a=nn.Linear(16, 1, **f32),
            b=nn.Linear(16, 1, **f32),
        )
    )
    x = torch.randn(64, 6)
    ya, yb = x[:, :1] * 2, -x[:, :1] + x[:, 1:2] ** 2
    return model, x, ya, yb


def losses_of(model, x, ya, yb):
    h = model["trunk"](x)
    return [((model["a"](h).float() - ya) ** 2).mean(), ((model["b"](h).float() - yb) ** 2).mean()]


def train(model, x, ya, yb, steps=5, autocast=False):
    opt = ConflictAverseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), weights=WEIGHTS, c=0.4)
    dtype = next(model.parameters()).dtype
    coefs = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = losses_of(model, x.to(dtype), ya, yb)
        opt.backward(losses)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        coefs.append(opt.last.coefficients)
        assert opt.last.gram.dtype == torch.float32  # the Gram is never formed in bf16
    return torch.stack(coefs)


def max_param_diff(m1, m2) -> float:
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(m1.parameters(), m2.parameters()))


def test_autocast_bf16_tracks_fp32():
    model, x, ya, yb = model_and_data()
    twin = copy.deepcopy(model)
    c32 = train(model, x, ya, yb)
    c16 = train(twin, x, ya, yb, autocast=True)
    torch.testing.assert_close(c16, c32, rtol=0.05, atol=0.03)
    assert max_param_diff(model, twin) < 2e-2  # bf16 tolerance: 5 AdamW steps of lr 1e-2


def test_bf16_parameters_track_fp32():
    model, x, ya, yb = model_and_data()
    twin = copy.deepcopy(model).to(torch.bfloat16)
    c32 = train(model, x, ya, yb)
    c16 = train(twin, x, ya, yb)
    assert next(twin.parameters()).grad.dtype == torch.bfloat16
    torch.testing.assert_close(c16, c32, rtol=0.05, atol=0.03)
    assert max_param_diff(model, twin) < 3e-2


@pytest.mark.parametrize("order", ["unscale_and_clip_then_step", "step_directly", "combine_twice_then_step"])
def test_grad_scaler_orders_give_the_unscaled_update(order):
    model, x, ya, yb = model_and_data()
    twin = copy.deepcopy(model)
    plain = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=WEIGHTS)
    scaled = ConflictAverseOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), weights=WEIGHTS, nonfinite="ignore")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(2):
        plain.zero_grad()
        plain.backward(losses_of(model, x, ya, yb))
        if order == "unscale_and_clip_then_step":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        plain.step()

        scaled.zero_grad()
        scaled.backward([scaler.scale(loss) for loss in losses_of(twin, x, ya, yb)])
        if order == "unscale_and_clip_then_step":
            scaler.unscale_(scaled)  # .grad already holds the combined direction
            torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        elif order == "combine_twice_then_step":
            scaled.combine()
            scaled.combine()  # idempotent: the direction is written once
        scaler.step(scaled)  # step() does not combine again (it would double the direction)
        scaler.update()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_an_injected_overflow_and_lowers_the_scale():
    model, x, ya, yb = model_and_data()
    opt = ConflictAverseOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), weights=WEIGHTS, nonfinite="ignore")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = copy.deepcopy(model.state_dict())
    losses = losses_of(model, x, ya, yb)
    opt.zero_grad()
    opt.backward([scaler.scale(losses[0]), scaler.scale(losses[1]) * torch.tensor(float("inf"))])
    assert not torch.isfinite(model["trunk"][0].weight.grad).all()  # the overflow reaches .grad
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.optimizer.state == {} or all(not s for s in opt.optimizer.state.values())
