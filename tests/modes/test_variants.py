"""Modes agree beyond the plain case: composed losses, per-layer clipping, seq-first batches, autocast."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _reference import dpkit_step
from test_equivalence import MODELS, TokenModel, data
from torch import nn

import dpkit

ALL = ("hooks", "functorch", "ew", "ghost", "bk", "auto")


def make(model, mode, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                  noise_multiplier=0.0, max_grad_norm=kw.pop("C", 0.05), grad_sample_mode=mode,
                                  criterion=nn.CrossEntropyLoss(), loss_reduction="sum", **kw)


def update(model, mode, run, **kw):
    model = copy.deepcopy(model)
    private = make(model, mode, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    run(private)
    private.optimizer.step()
    return [b - a.detach() for b, a in zip(before, model.parameters())]


@pytest.mark.parametrize("mode", ALL)
def test_composed_losses_match_hooks(mode):
    """0.5·L(x) − (−L₂(x)) / 4 + 3: two heads on one forward pass, combined as numbers and losses."""
    torch.manual_seed(0)
    model = TokenModel()
    x, y = data("tokens", 6)
    y2 = torch.randint(0, 4, y.shape)

    def run(p):
        out = p.module(x)
        loss = 0.5 * p.criterion(out, y) - (-p.criterion(out, y2)) / 4 + 3
        assert isinstance(loss.item(), float) and "DPLoss" in repr(loss)
        loss.backward()

    expected = update(model, "hooks", run)
    for a, b in zip(update(model, mode, run), expected):
        torch.testing.assert_close(a, b)


def test_a_tensor_penalty_is_refused():
    model = TokenModel()
    p = make(model, "hooks")
    x, y = data("tokens", 4)
    with pytest.raises(TypeError, match="weight penalty"):
        p.criterion(p.module(x), y) + model.fc.weight.square().sum()


@pytest.mark.parametrize("mode", ["functorch", "ew", "bk", "auto"])
def test_per_layer_clipping_matches_hooks(mode):
    torch.manual_seed(2)
    model = TokenModel()
    x, y = data("tokens", 6)
    expected = dpkit_step(model, x, y, mode="hooks", C=0.1, clipping="per_layer")
    for a, b in zip(dpkit_step(model, x, y, mode=mode, C=0.1, clipping="per_layer"), expected):
        torch.testing.assert_close(a, b)
    assert not all(torch.allclose(a, b) for a, b in zip(expected, dpkit_step(model, x, y, mode="hooks", C=0.1)))


def test_ghost_refuses_per_layer_clipping():
    with pytest.raises(ValueError, match="ghost"):
        make(TokenModel(), "ghost", clipping="per_layer")


class SeqFirst(nn.Module):
    """Sequence-first layout: [T, B, d] through Linear, LayerNorm and an LSTM(batch_first=False)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.rnn = nn.LSTM(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(self.norm(self.fc(x)))
        return self.head(out[-1])


@pytest.mark.parametrize("mode", ["functorch", "auto"])
def test_batch_first_false(mode):
    torch.manual_seed(3)
    model = SeqFirst()
    x, y = torch.randn(3, 6, 4), torch.randint(0, 3, (6,))
    grads = []
    for i in range(6):
        loss = nn.functional.cross_entropy(model(x[:, i:i + 1]), y[i:i + 1])
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    norms = [torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads]
    expected = [sum(gs[j] * min(1.0, 0.05 / (n.item() + 1e-6)) for gs, n in zip(grads, norms))
                for j in range(len(grads[0]))]

    def run(p):
        p.criterion.batch_first = True  # the logits are [B, classes]
        p.criterion(p.module(x), y).backward()

    got = update(model, mode, run, batch_first=False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["conv", "tied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_autocast_matches_fp32(mode, dtype, name):
    """Norms are computed in float32 under autocast, so the clipped step stays close to the fp32 one."""
    torch.manual_seed(4)
    make, kind, _ = MODELS[name]
    model = make().float()
    x, y = data(kind, 6)
    x = x.float() if x.is_floating_point() else x

    def run(p, autocast):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = p.module(x)
        p.criterion(out.float(), y).backward()

    ref = update(model, mode, lambda p: run(p, False), C=0.5)
    got = update(model, mode, lambda p: run(p, True), C=0.5)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02 * b.abs().max().item())


def test_lstm_in_float32_at_onednn_sizes():
    """Where CPU LSTMs run on oneDNN kernels (float32, larger sizes), auto's torch.func fallback still works."""
    from _reference import clipped_sum, per_example_grads, per_row_loss
    from test_equivalence import Recurrent

    torch.manual_seed(5)
    model = Recurrent(nn.LSTM)
    model.rnn = nn.LSTM(4, 64, batch_first=True)
    model.fc = nn.Linear(64, 3)
    model = model.float()
    x, y = torch.randn(16, 20, 4, dtype=torch.float32), torch.randint(0, 3, (16,))
    expected = clipped_sum(per_example_grads(model, per_row_loss(nn.CrossEntropyLoss()), x, y, 1), 0.05)
    got = dpkit_step(model, x, y, mode="auto", C=0.05)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-6)
