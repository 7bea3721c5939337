"""Book-keeping details the equivalence tests do not see: layers reading one input share its Gram matrix."""
from __future__ import annotations

import pytest
import torch
from _reference import dpkit_step
from test_equivalence import reference
from torch import nn


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
