"""Numerics: non-finite examples, extreme bounds and inputs, low and high precision, autocast."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError
from dpkit.testing import check_sensitivity

from ._setup import (
    MODES, Frozen, assert_counted, assert_noise_everywhere, assert_sensitivity, batch, loss_backward, make, net,
    noise_difference, sensitivity, train_step,
)


# -- 9. NaN and Inf -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_input_of_one_example_is_refused_and_zero_grad_recovers(mode, bad):
    p = make(mode=mode)
    x, y = batch()
    x[3, 1] = bad
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"example\(s\) \[3\] .*non-finite gradient"):
        loss_backward(p, x, y)
    frozen.check()
    with pytest.raises(PrivacyUsageError, match="was refused"):
        p.optimizer.step()
    frozen.check()
    p.optimizer.zero_grad()
    x[3, 1] = 0.0
    loss_backward(p, x, y)
    p.optimizer.step()
    assert_counted(p, 1)
    assert all(bool(torch.isfinite(q).all()) for q in p.module.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_loss_of_one_example_is_refused(mode):
    """The inputs are finite; one example's target is NaN, so its loss (and only its) is NaN."""
    p = make(mode=mode, criterion=nn.MSELoss())
    x, _ = batch()
    target = torch.zeros(8, 3)
    target[5, 0] = float("nan")
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"example\(s\) \[5\] .*non-finite gradient"):
        p.criterion(p.module(x), target).backward()
    with pytest.raises(PrivacyUsageError):
        p.optimizer.step()
    frozen.check()


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_huge_finite_input_is_clipped_or_refused(mode):
    x, y = batch()
    x[2] = 1e19  # per-example gradient norms overflow float32 when squared
    build = lambda: make(mode=mode, noise_multiplier=0.0)  # noqa: E731
    try:
        s = sensitivity(build, x, y, examples=[2, 4])
    except PrivacyUsageError as err:
        assert "non-finite" in str(err)
        return
    assert s <= 1.0 + 1e-5


@pytest.mark.parametrize("C", [1e-8, 1e6])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch", "auto"])
def test_extreme_clipping_bounds_hold(mode, C):
    x, y = batch()
    if C > 1:
        x = x * 1e6  # gradients far above 1e6, so the clipping is active
    assert_sensitivity(lambda: make(mode=mode, noise_multiplier=0.0, max_grad_norm=C), x, y, bound=C,
                       examples=[0, 5])


# -- 5. precision ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_parameters_get_gradients_in_their_dtype(mode, dtype):
    model = net().to(dtype)
    p = make(model, mode)
    x, y = batch()
    train_step(p, x.to(dtype), y)
    assert all(q.grad.dtype == dtype for q in model.parameters())
    assert all(bool(torch.isfinite(q).all()) for q in model.parameters())
    assert_counted(p, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["hooks", "bk", "functorch", "ew", "auto"])
def test_low_precision_sums_accumulate_in_float32(mode, dtype):
    """1000 examples give 250 per coordinate, then 24 single examples 0.25 each: 256 in float32. A sum kept in
    bf16 stays at 250 (its spacing there is 2), one in fp16 rounds several of the additions away."""
    model = nn.Linear(16, 1, bias=False).to(dtype)
    nn.init.zeros_(model.weight)
    p = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=None,
                           sample_rate=0.5, noise_multiplier=0.0 + 1e-30, max_grad_norm=1.0, loss_reduction="sum",
                           grad_sample_mode=mode, noise_seed=0)
    p.noise_multiplier = 0.0  # no noise, without the warning
    x = torch.ones(1024, 16, dtype=dtype)  # each example's gradient is x: norm 4, clipped to 0.25 per coordinate
    with p.micro_batches():
        model(x[:1000]).sum().backward()
        for i in range(1000, 1024):
            model(x[i:i + 1]).sum().backward()
    p.optimizer.step()
    assert model.weight.grad.dtype == dtype
    assert model.weight.grad.float().unique().tolist() == [256.0]


def test_float64_parameters_get_float64_noise():
    model = nn.Linear(300, 20, bias=False).double()
    nn.init.zeros_(model.weight)
    p = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=None,
                           sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="sum", noise_seed=0)
    model(torch.zeros(4, 300, dtype=torch.float64)).sum().backward()  # zero gradients: the update is the noise
    p.optimizer.step()
    noise = model.weight.grad
    assert noise.dtype == torch.float64
    coarse = noise.to(torch.float32).to(torch.float64) != noise
    assert coarse.float().mean().item() > 0.99, "the noise of a float64 model sits on float32's lattice"
    assert noise.std().item() == pytest.approx(1.0, rel=0.05)


def test_noise_beyond_the_range_of_fp16_parameters_fails_closed():
    model = net().half()
    try:
        p = make(model, noise_multiplier=1e6)  # std/E = 1.25e5 > 65504, the largest fp16
    except ValueError as err:
        assert "float16" in str(err)
        return
    x, y = batch()
    try:
        train_step(p, x.half(), y)
    except (ValueError, PrivacyUsageError):
        return
    assert all(bool(torch.isfinite(q).all()) for q in model.parameters()), "a non-finite step was released"


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch", "auto"])
def test_autocast_forward_stays_within_the_bound(mode):
    """Under bf16 autocast the other examples' gradients are rounded differently when the batch changes; the bound
    holds up to bf16 rounding (2**-8 relative)."""
    def autocast_step(p, x, y):
        p.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = p.module(x)
        p.criterion(out.float(), y).backward()
        p.optimizer.step()

    x, y = batch()
    s = sensitivity(lambda: make(mode=mode, noise_multiplier=0.0), x, y, autocast_step, examples=[0, 3, 6])
    assert 0.5 < s <= 1.0 + 2 ** -8


def test_autocast_in_ew_mode_is_refused():
    p = make(mode="ew")
    x, y = batch()
    with pytest.raises(PrivacyUsageError, match="does not support autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = p.module(x)
        p.criterion(out.float(), y).backward()
    assert p.steps == 0


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_noise_is_on_every_coordinate_of_a_mixed_precision_model(mode):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 6).double(), nn.Linear(6, 3)

        def forward(self, x):
            return self.second(torch.relu(self.first(x.double())).float())

    def build(seed):
        torch.manual_seed(0)
        return make(Mixed(), mode, noise_seed=seed)

    diff = noise_difference(build, *batch())
    assert_noise_everywhere(diff, ["first.weight", "first.bias", "second.weight", "second.bias"])


def test_check_sensitivity_of_a_plain_float64_step():
    """dpkit.testing's own measurement agrees on a float64 model (every mode shares this path)."""
    def setup():
        return make(net().double(), noise_multiplier=0.0)

    x, y = batch()
    report = check_sensitivity(setup, lambda p, b: train_step(p, *b), (x.double(), y))
    assert report.ok and report.sensitivity > 0.5
