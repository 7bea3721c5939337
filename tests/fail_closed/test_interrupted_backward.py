"""A backward pass that stops with an error half-way (the user's autograd Function, an interrupt) never reaches its
end, where dpkit clips it whole or refuses it, and per-layer streaming may have summed part of it already. The
step must be refused until ``zero_grad()``, which drops it; training then goes on exactly."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError


@dpkit.rowwise  # a custom Function must be declared row-wise (forward and backward) to train
class Fails(torch.autograd.Function):
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if Fails.armed:
            raise RuntimeError("the user's backward failed")
        return g


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # `out` gets its gradient (and is streamed) before the failure reaches `first`
        return self.out(Fails.apply(torch.tanh(self.first(x))))


def attach(mode: str, clipping: str) -> dpkit.PrivateTraining:
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        return dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                  noise_multiplier=0.0, max_grad_norm=0.1, grad_sample_mode=mode, clipping=clipping,
                                  sample_rate=0.5, expected_batch_size=4, criterion=nn.CrossEntropyLoss())


def backward(private, x, y, fail: bool = False) -> None:
    Fails.armed = fail
    try:
        private.criterion(private.module(x), y).backward()
    finally:
        Fails.armed = False


def update(private, x, y) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in private.module.parameters()]
    backward(private, x, y)
    private.optimizer.step()
    return [b - p.detach() for b, p in zip(before, private.module.parameters())]


BATCH = (torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1]))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_a_dead_pass_refuses_the_step_until_zero_grad(mode, clipping):
    expected = update(attach(mode, clipping), *BATCH)
    private = attach(mode, clipping)
    with pytest.raises(RuntimeError, match="the user's backward failed"):
        backward(private, *BATCH, fail=True)
    backward(private, *BATCH)  # a good pass after it, without zero_grad: still not releasable
    with pytest.raises(PrivacyUsageError, match="stopped with an error before its end.*zero_grad"):
        private.optimizer.step()
    private.optimizer.zero_grad()
    for got, want in zip(update(private, *BATCH), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_a_dead_micro_batch_drops_the_whole_step(mode):
    """The first micro-batch was summed; the second died after its last layer was streamed into the buffers.
    Stepping would release part of a pass that was never admitted: refused, and zero_grad drops both."""
    private = attach(mode, "per_layer")
    x, y = BATCH
    with private.micro_batches():
        backward(private, x[:2], y[:2])
        with pytest.raises(RuntimeError):
            backward(private, x[2:], y[2:], fail=True)
    with pytest.raises(PrivacyUsageError, match="stopped with an error"):
        private.optimizer.step()
    private.optimizer.zero_grad()
    assert not private.accumulator.current()
    expected = update(attach(mode, "per_layer"), x, y)
    for got, want in zip(update(private, x, y), expected, strict=True):
        torch.testing.assert_close(got, want)
