"""Book-keeping details the equivalence tests do not see: layers reading one input share its Gram matrix."""
from __future__ import annotations

import warnings

import pytest
import torch
from _reference import dpkit_step
from test_equivalence import reference
from torch import nn

import dpkit


class SeparateQKV(nn.Module):
    """Three projections of one hidden state, as BERT and Llama have them (d=8 → 6: ghost norms at T=3)."""

    def __init__(self, d=8, p=6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, p), nn.Linear(d, p), nn.Linear(d, p)
        self.head = nn.Linear(3 * p, 3)

    def forward(self, x):
        return self.head(torch.cat([self.q(x), self.k(x), self.v(x)], -1)).mean(1)


@pytest.mark.parametrize("mode", ["bk", "auto", "ghost"])
def test_separate_projections_of_one_input_match_the_reference(mode):
    torch.manual_seed(0)
    model = SeparateQKV()
    x, y = torch.randn(5, 3, 8), torch.randint(0, 3, (5,))
    expected, _ = reference(model, x, y, 1, 0.1, "sum")
    for got, want in zip(dpkit_step(model, x, y, mode=mode, C=0.1), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_input_gram_is_formed_once_for_its_three_projections(monkeypatch):
    torch.manual_seed(0)
    grams = []
    bmm = torch.bmm

    def counting(a, b, *args, **kw):
        if a.shape[-1] == 8 and b.shape[-2] == 8:  # a·aᵀ over the 8-wide input, not the 6-wide gradients
            grams.append(a.shape)
        return bmm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "bmm", counting)
    dpkit_step(SeparateQKV(), torch.randn(5, 3, 8), torch.randint(0, 3, (5,)), mode="bk", C=0.1)
    assert len(grams) == 1


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("K", [1, 3])
def test_samplers_with_blocks_are_recomputed_once_and_exact(clipping, K, monkeypatch):
    """A grad sampler's ``blocks`` (an LSTM with a projection, which runs as torch's kernel) gives bk the norms and
    the clipped sum from one recomputation: one call per layer and step, and the step of hooks (itself checked
    against the loop). MultiheadAttention's blocks come from its forward's own F.linear calls (``linear_calls``): no
    call at all, as a plain LSTM's (tests/layers/test_recurrent_forms.py)."""
    from dpkit.layers import attention, recurrent

    calls = []
    for family in (recurrent, attention):
        original = family.grad_sampler.blocks
        monkeypatch.setattr(family.grad_sampler, "blocks",
                            lambda *a, _original=original, **k: (calls.append(1), _original(*a, **k))[1])

    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(5, 9, num_layers=2, bidirectional=True, batch_first=True, proj_size=7)
            self.att = nn.MultiheadAttention(14, 2, batch_first=True)
            self.out = nn.Linear(14, 3)

        def forward(self, x):
            h, _ = self.rnn(x)
            a, _ = self.att(h, h, h)
            return self.out(a.mean(1))

    def update(mode):
        torch.manual_seed(0)
        model = Sequence()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = dpkit.make_private(module=model, optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=0.3,
                                         grad_sample_mode=mode, clipping=clipping, augmentation_multiplicity=K,
                                         sample_rate=0.5, expected_batch_size=4, criterion=nn.CrossEntropyLoss())
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4 * K, 6, 5, generator=gen)
        y = torch.randint(0, 3, (4,), generator=gen).repeat_interleave(K)
        before = [p.detach().clone() for p in model.parameters()]
        private.criterion(model(x), y).backward()
        optimizer.step()
        return [b - p.detach() for b, p in zip(before, model.parameters())]

    expected = update("hooks")
    calls.clear()
    got = update("bk")
    assert len(calls) == 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
