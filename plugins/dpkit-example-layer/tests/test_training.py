"""End to end: one clipped step (no noise) of every mode equals a loop over examples; a noisy run trains."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dpkit
from dpkit_example_layer import ScaledLinear

C = 0.5  # small enough that every example is clipped


class Tagger(nn.Module):
    """Per-token classes from ScaledLinear layers around a built-in LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = ScaledLinear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.out = ScaledLinear(8, 3, bias=False)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.inp(x)))).transpose(1, 2)  # [N, classes, T]


def data(n: int = 5, T: int = 4):
    torch.manual_seed(1)
    return torch.randn(n, T, 6, dtype=torch.float64), torch.randint(0, 3, (n, T))


def model() -> Tagger:
    torch.manual_seed(0)
    made = Tagger().double()
    with torch.no_grad():
        for layer in (made.inp, made.out):
            layer.scale.uniform_(0.5, 2.0)
    return made


def loop_reference(net: nn.Module, x, y) -> list[torch.Tensor]:
    """Σ_i clip(∇ loss_i): each example's gradient from its own backward pass, no dpkit involved."""
    params = list(net.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1])  # mean over the example's tokens
        grads = torch.autograd.grad(loss, params)
        factor = min(1.0, C / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads)]
    return total


def private_step(mode: str, x, y) -> list[torch.Tensor]:
    """The gradient dpkit hands the optimizer for one batch (noise 0, sum reduction, lr 0)."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns that this is not private
        private = dpkit.make_private(module=net, optimizer=opt, sample_rate=0.5, noise_multiplier=0.0,
                                     max_grad_norm=C, grad_sample_mode=mode, loss_reduction="sum",
                                     criterion=nn.CrossEntropyLoss())
    if mode in ("hooks", "ghost", "bk"):
        assert {row.provider for row in private.plan if row.name in ("inp", "out")} == {"example_layer"}
    private.criterion(net(x), y).backward()
    opt.step()
    grads = [p.grad.detach().clone() for p in net.parameters()]
    private.detach()
    return grads


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto", "functorch"])
def test_one_clipped_step_matches_the_loop(mode):
    x, y = data()
    expected = loop_reference(model(), x, y)
    for got, want, (name, _) in zip(private_step(mode, x, y), expected, model().named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{mode}, {name}: {m}")


def test_hooks_equals_functorch():
    x, y = data(7)
    for a, b in zip(private_step("hooks", x, y), private_step("functorch", x, y)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_noisy_training_runs_and_counts_privacy():
    x, y = data(32)
    net = model()
    before = copy.deepcopy(net.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    private = dpkit.make_private(module=net, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                 max_grad_norm=1.0, grad_sample_mode="hooks", criterion=nn.CrossEntropyLoss(),
                                 noise_seed=0)
    net, opt, loader, criterion = private
    for xb, yb in loader:
        opt.zero_grad()
        criterion(net(xb), yb).backward()
        opt.step()
    assert private.steps == len(loader)
    assert all(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert 0 < private.epsilon(delta=1e-5) < float("inf")
