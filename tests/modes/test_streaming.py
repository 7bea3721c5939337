"""Streaming per-layer clipping in bk and auto: each layer clipped and summed as its output gradient arrives.

The step must equal the end-of-pass path's (hooks, itself checked against the loop reference in
tests/clipping/test_per_layer.py), and no record may outlive its layer's backward pass.
"""
from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError
from dpkit.optimizer import NonFiniteGradientError

STREAMING = ["bk", "auto"]


class TiedLM(nn.Module):
    """Embedding tied to the head (a parameter with two calls, so its records wait for the pass's end), a
    LayerNorm (auto forms its per-example gradients on arrival) and Linears over a sequence."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.emb, self.mix, self.norm = nn.Embedding(11, 6), nn.Linear(6, 6), nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.mix(self.emb(x)))))


def batch(examples: int, K: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (examples * K, 5), generator=gen)
    return x, torch.randint(0, 11, (examples * K, 5), generator=gen)


def attach(mode: str, *, tied: bool = True, K: int = 1, clipping: str = "per_layer", **kwargs):
    torch.manual_seed(0)
    model = TiedLM(tied)
    kwargs.setdefault("loss_reduction", "mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        return dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                  noise_multiplier=0.0, max_grad_norm=0.05, grad_sample_mode=mode,
                                  clipping=clipping, augmentation_multiplicity=K, sample_rate=0.5,
                                  expected_batch_size=4, criterion=nn.CrossEntropyLoss(), **kwargs)


def loss(private, x, y):
    return private.criterion(private.module(x).transpose(1, 2), y)


def update(private, *batches) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in private.module.parameters()]
    private.optimizer.zero_grad()
    with private.micro_batches():
        for x, y in batches:
            loss(private, x, y).backward()
    private.optimizer.step()
    return [b - p.detach() for b, p in zip(before, private.module.parameters())]


def assert_same(got, expected):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode", STREAMING)
def test_streamed_step_equals_the_hooks_step(mode, tied, K):
    x, y = batch(4, K)
    assert_same(update(attach(mode, tied=tied, K=K), (x, y)), update(attach("hooks", tied=tied, K=K), (x, y)))


@pytest.mark.parametrize("mode", STREAMING)
def test_micro_batches_stream_into_one_step(mode):
    x, y = batch(6)
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]
    assert_same(update(attach(mode), *halves), update(attach("hooks"), (x, y)))


@pytest.mark.parametrize("mode", STREAMING)
def test_non_contiguous_and_empty_batches(mode):
    x, y = batch(4)
    xt, yt = x.t().contiguous().t(), y.t().contiguous().t()  # same values, transposed strides
    assert not xt.is_contiguous()
    assert_same(update(attach(mode), (xt, yt)), update(attach("hooks"), (x, y)))
    empty = update(attach(mode), (x[:0], y[:0]))
    assert all(float(u.abs().max()) == 0 for u in empty)  # no examples: the sum is zero (and noise is 0 here)


@pytest.mark.parametrize("mode", STREAMING)
def test_no_record_outlives_its_layer(mode):
    """When a layer's gradient arrives, every record before it has been freed; only the tied weight's two
    calls wait for the end of the pass."""
    private = attach(mode)
    capturer, streamed = private.capturer, private.capturer.arrival.stream
    assert streamed is not None
    held, at_end = [], []

    def spy(cap):
        held.append(sum(1 for c in capturer.captures if c.done and c.args and c is not cap
                        and c.row.name not in ("emb", "head")))
        return streamed(cap)

    capturer.arrival = attrs.evolve(capturer.arrival, stream=spy)
    clip = private.passes.clip_records
    private.passes.clip_records = lambda records, rows: (at_end.append(sorted(c.row.name for c in records)),
                                                   clip(records, rows))
    update(private, batch(4))
    assert len(held) == 2 and max(held) == 0  # mix and norm, each freed on arrival
    assert at_end == [["emb", "head"]]


def test_flat_clipping_and_a_scaler_do_not_stream():
    assert attach("bk", clipping="flat").capturer.arrival.stream is None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert attach("auto", grad_scaler=scaler).capturer.arrival.stream is None
    assert attach("bk").capturer.arrival.stream is not None


@pytest.mark.parametrize("mode", STREAMING)
def test_a_non_finite_gradient_is_refused_after_layers_were_summed(mode):
    """The NaN shows in the first layer to arrive (the head) or later; the layers summed before it are dropped
    with the pass, and the next batch steps as if the refused one never happened."""
    private = attach(mode, tied=False)
    x, y = batch(4)
    with torch.no_grad():
        private.module.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        loss(private, x, y).backward()
    with pytest.raises(PrivacyUsageError):
        private.optimizer.step()
    with torch.no_grad():
        private.module.norm.weight[0] = 1.0
    reference = attach("hooks", tied=False)
    assert_same(update(private, (x, y)), update(reference, (x, y)))


@pytest.mark.parametrize("mode", STREAMING)
def test_a_refusal_mid_pass_drops_what_was_streamed(mode):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.block, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            x = torch.tanh(self.first(x))
            x += self.block(x)  # changes the block's input after it read it: refused when its gradient arrives
            return self.out(x)

    torch.manual_seed(0)
    model = InPlace()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                     noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                     clipping="per_layer", sample_rate=0.5, expected_batch_size=4,
                                     criterion=nn.CrossEntropyLoss())
    with pytest.raises(PrivacyUsageError, match="modified in place"):
        private.criterion(model(torch.randn(4, 4)), torch.randint(0, 3, (4,))).backward()
    assert not private.accumulator.current()  # `out` was summed on arrival, then dropped with the pass
    with pytest.raises(PrivacyUsageError):
        private.optimizer.step()


def test_observers_see_the_same_step_unstreamed(fresh_registry):
    seen = []

    class Observer:
        @dpkit.hookimpl
        def dpkit_on_clip(self, event):
            seen.append(event)

    fresh_registry.register_plugin(Observer(), name="observer")
    x, y = batch(4)
    private = attach("bk")
    got = update(private, (x, y))
    assert_same(got, update(attach("hooks"), (x, y)))
    bk_event = seen[0]
    assert bk_event.factors.shape == (5, 4)
    # What the observer is shown as the pass's sum is the whole of it (a streamed pass would hide the layers
    # summed before the snapshot): the update is that sum over the expected batch size, 4.
    names = [n for n, _ in private.module.named_parameters()]
    torch.testing.assert_close(bk_event.clipped_sum["mix.weight"], 4 * got[names.index("mix.weight")])


def test_auto_streams_only_what_it_formed_on_arrival():
    """A Linear over a short sequence with wide weights has per-example gradients larger than its record: auto
    keeps that record for the end of the pass (its norm then costs memory after the activations are freed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.LayerNorm(64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                     noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="auto",
                                     clipping="per_layer", sample_rate=0.5, expected_batch_size=4)
    at_end = []
    clip = private.passes.clip_records
    private.passes.clip_records = lambda records, rows: (at_end.append([c.row.name for c in records]), clip(records, rows))
    model(torch.randn(4, 2, 64)).square().sum(dim=(1, 2)).mean().backward()
    assert at_end == [["0"]]  # the LayerNorm ("2") was formed, streamed and freed; the Linear waited


def test_a_flat_clipper_with_layer_factors_does_not_stream(fresh_registry):
    """``layer_factors`` means per-row factors of the per-parameter table; a flat clipper's factors depend on the
    whole model's norm, so one that defines it anyway must still wait for the end of the pass."""
    from dpkit.clipping.flat import FlatClipper

    class Confused(FlatClipper):
        def layer_factors(self, norms, total):
            return torch.ones_like(norms)

    class Plugin:
        @dpkit.hookimpl
        def dpkit_clippers(self):
            return {"confused": Confused}

    fresh_registry.register_plugin(Plugin(), name="confused")
    x, y = batch(4)
    private = attach("bk", clipping="confused")
    assert private.capturer.arrival.stream is None
    assert_same(update(private, (x, y)), update(attach("hooks", clipping="flat"), (x, y)))
