"""Same-shaped Linear and LayerNorm records, and same-shaped per-example gradients formed on arrival, stacked in bk
and auto (dpkit/modes/_groups.py): the step equals the loop over examples, and groups form where they may (small
records, built-in samplers, parameters used once) only."""
from __future__ import annotations

import warnings

import pytest
import torch
from _reference import dpkit_step
from test_equivalence import reference
from torch import nn

import dpkit
from dpkit.modes import _groups


class Tower(nn.Module):
    """Three same-shaped blocks (LayerNorm, Linear), two bias-free Linears, a Linear with a frozen weight."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.nobias = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(2))
        if tie:
            self.nobias[1].weight = self.nobias[0].weight
        self.frozen = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        for layer in self.frozen:
            layer.weight.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        for layer in (*self.nobias, *self.frozen):
            h = torch.tanh(layer(h))
        out = self.head(h)
        return out.mean(1) if out.dim() == 3 else out


@pytest.fixture
def groups(monkeypatch):
    """The sizes of the groups of each backward pass: Linear and LayerNorm records, per-example gradients."""
    seen: dict[str, list[int]] = {"linear": [], "norm": [], "formed": []}
    linear, norm, stackable = _groups.linear_groups, _groups.norm_groups, _groups._stackable

    def spy_linear(*args, **kwargs):
        out = linear(*args, **kwargs)
        seen["linear"] += sorted(len(g.caps) for g in out)
        return out

    def spy_norm(*args, **kwargs):
        out = norm(*args, **kwargs)
        seen["norm"] += sorted(len(g.caps) for g in out)
        return out

    def spy_stackable(items):
        out = stackable(items)
        seen["formed"] += sorted(len(g) for g in out if len(g) > 1)
        return out

    monkeypatch.setattr(_groups, "linear_groups", spy_linear)
    monkeypatch.setattr(_groups, "norm_groups", spy_norm)
    monkeypatch.setattr(_groups, "_stackable", spy_stackable)
    return seen


def _half_clipped(model, x, y, K):
    _, grads = reference(model, x, y, K, 1.0, "sum")
    norms = sorted(torch.sqrt(sum((t ** 2).sum() for t in g)).item() for g in grads)
    return (norms[1] + norms[2]) / 2


@pytest.mark.parametrize("positions", [True, False])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_grouped_step_matches_loop_reference(groups, mode, K, positions):
    torch.manual_seed(0)
    model = Tower()
    x = torch.randn(4 * K, 3, 5) if positions else torch.randn(4 * K, 5)
    y = torch.randint(0, 3, (4 * K,))
    C = _half_clipped(model, x, y, K)
    expected, _ = reference(model, x, y, K, C, "mean")
    got = dpkit_step(model, x, y, mode=mode, C=C, K=K, reduction="mean")
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9, msg=lambda m: f"parameter {i}: {m}")
    # Small LayerNorm records are kept for the end of the pass and stacked there (3). Per-example gradients are
    # formed on arrival where no bigger than the record, and stacked by shape: always the frozen-weight Linears'
    # biases ([B, 8]: 2, once for the norms and once for the sums); from K * positions >= 4 the 8 x 8 Linears'
    # too ([B, 8, 8]: 5) and their and the input layer's biases ([B, 8]: 6). The Linears not formed are stacked
    # as records (2 bias-free, 3 in the blocks).
    small = K * (3 if positions else 1) < 4
    assert groups["norm"] == [3]
    assert groups["linear"] == ([2, 3] if small else [])
    assert sorted(groups["formed"]) == ([2, 2] if small else [5, 5, 6, 6])


def test_tied_weights_and_large_records_are_not_stacked(groups, monkeypatch):
    """A weight used by two calls needs the norm of the sum of its uses: those records stay apart. Past
    MAX_ELEMENTS nothing is stacked; either way the step is the loop's."""
    torch.manual_seed(0)
    model = Tower(tie=True)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4,))
    C = _half_clipped(model, x, y, 1)
    expected, _ = reference(model, x, y, 1, C, "sum")
    for limit in (_groups.MAX_ELEMENTS, 0):
        monkeypatch.setattr(_groups, "MAX_ELEMENTS", limit)
        groups["linear"].clear()
        groups["norm"].clear()
        for g, e in zip(dpkit_step(model, x, y, mode="bk", C=C), expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)
        assert groups["linear"] == ([3] if limit else [])  # the tied pair is not among them
        assert groups["norm"] == ([3] if limit else [])  # past the limit, LayerNorms are formed on arrival


@pytest.mark.parametrize("K", [1, 2])
def test_per_layer_clipping_at_the_end_of_the_pass_matches_hooks(groups, fresh_registry, K):
    """Per-layer clipping normally streams each record alone; with an observer it clips at the end of the pass,
    from the groups, with one factor per parameter."""

    class Observer:
        @dpkit.hookimpl
        def dpkit_on_clip(self, event):
            pass

    fresh_registry.register_plugin(Observer(), name="observer")
    torch.manual_seed(0)
    model = Tower()
    x, y = torch.randn(3 * K, 3, 5), torch.randint(0, 3, (3 * K,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bk = dpkit_step(model, x, y, mode="bk", C=0.05, K=K, clipping="per_layer")
        hooks = dpkit_step(model, x, y, mode="hooks", C=0.05, K=K, clipping="per_layer")
    for g, h in zip(bk, hooks):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)
    # LayerNorms are formed on arrival, since per-layer clipping may stream (clip each record as it arrives),
    # which keeps no record for later. K = 1: the 8 x 8 Linears' records are stacked (2 and 3), the small
    # gradients by shape ([B, 8]: 8); K = 2: the Linears are formed too ([B, 8, 8]: 5, [B, 8]: 12).
    assert groups["norm"] == []
    assert groups["linear"] == ([2, 3] if K == 1 else [])
    assert sorted(groups["formed"]) == ([8, 8] if K == 1 else [5, 5, 12, 12])
