"""nn.MultiheadAttention's linear parts: bk and auto take its gradients from its forward's own F.linear calls
(dpkit/modes/_parts.py) instead of recomputing the attention. Every mode's clipped, noise-free step against a loop
over examples; the recomputation never runs in bk/auto unless the calls cannot cover the layer (add_bias_kv);
attention dropout, whose draws the real backward carries, against a replay of the same draws."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError, UnsupportedLayerError
from dpkit.layers import attention
from dpkit.modes import _parts
from test_recurrent import plugins  # noqa: F401 (a fixture)

E, HEADS, L, S = 4, 2, 3, 5
MODES = ("hooks", "ghost", "bk", "auto", "functorch")


class Net(nn.Module):
    """Attention over ``x[:, :L]`` (the query), keys and values from it (``self``) or from projections of
    ``x[:, L:]`` (``kv-same``: key is value; ``kv-differ``: two tensors), mean-pooled into 3 logits.

    ``weights``: ``"used"`` (the attention weights enter the logits), ``"unused"`` (asked for, not read) or False.
    ``kpm``: a key padding mask from the batch itself; ``causal``: a causal mask with ``is_causal=True``."""

    def __init__(self, *, batch_first=True, kind="self", weights=False, kpm=False, causal=False, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kwargs)
        self.kin = nn.Linear(E, kwargs.get("kdim") or E)
        self.vin = nn.Linear(E, kwargs.get("vdim") or E)
        self.fc = nn.Linear(E, 3)
        self.batch_first, self.kind, self.weights, self.kpm, self.causal = batch_first, kind, weights, kpm, causal
        if kind != "kv-differ":
            self.vin = None
        if kind == "self":
            self.kin = None

    def forward(self, x):
        q, memory = x[:, :L], x[:, L:]
        layout = (lambda t: t) if self.batch_first else (lambda t: t.transpose(0, 1))
        query = layout(q)
        if self.kind == "self":
            key = value = query  # one tensor: the packed projection, one F.linear call
        else:
            key = layout(self.kin(memory))
            value = key if self.kind == "kv-same" else layout(self.vin(memory))
        kwargs = {}
        if self.kpm:
            source = q if self.kind == "self" else memory
            pad = source[..., 0] > 0.5
            pad[:, 0] = False  # no query attends to nothing
            kwargs["key_padding_mask"] = pad
        if self.causal:
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            kwargs["is_causal"] = True
        out, w = self.attn(query, key, value, need_weights=bool(self.weights), **kwargs)
        logits = self.fc(layout(out).mean(1))
        return logits + w.mean(1)[:, :3] * 3 if self.weights == "used" else logits


CASES = {
    "self": dict(),
    "self-seq-first-weights-used": dict(batch_first=False, weights="used"),
    "self-kpm-causal": dict(kpm=True, causal=True),
    "self-causal": dict(causal=True),
    "self-weights-unused": dict(weights="unused", kpm=True),
    "cross-key-is-value-seq-first": dict(kind="kv-same", batch_first=False, kpm=True),
    "cross-weights-used": dict(kind="kv-differ", weights="used"),
    "cross-kdim-vdim": dict(kind="kv-differ", batch_first=False, kdim=3, vdim=2, kpm=True),
    "no-bias": dict(kind="kv-same", bias=False),
    "bias-kv": dict(add_bias_kv=True, kpm=True),  # bias_k, bias_v read by torch.cat: the recomputation serves
}


def make(seed=0, **kwargs) -> Net:
    torch.manual_seed(seed)
    model = Net(**kwargs).double()
    with torch.no_grad():
        for p in model.attn.parameters():
            p.normal_(0, 0.5)  # zero biases would hide a missing bias term
    return model


def batch(rows: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(E, L + S, rows, dtype=torch.double, generator=gen).permute(2, 1, 0)  # non-contiguous
    return x, torch.randint(0, 3, (rows,), generator=gen)


def loop_grads(model, x, y, K):
    """Each example's gradient (the mean over its K rows), one micro-batch of K rows at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.autograd.grad(F.cross_entropy(model(x[b * K:(b + 1) * K]), y[b * K:(b + 1) * K]), params)
            for b in range(x.shape[0] // K)]


def clipped_sum(grads, C, clipping, reduction, count):
    """Σ_b f_b g_b (divided by B under "mean"), f from each example's whole norm or each parameter's."""
    total = [torch.zeros_like(t) for t in grads[0]] if grads else []
    for g in grads:
        if clipping == "flat":
            factors = [min(1.0, C / (torch.cat([t.flatten() for t in g]).norm().item() + 1e-6))] * len(g)
        else:
            bound = C / math.sqrt(len(g))
            factors = [min(1.0, bound / (t.norm().item() + 1e-6)) for t in g]
        total = [s + f * t for s, t, f in zip(total, g, factors)]
    return [t / count for t in total] if reduction == "mean" else total


def private_step(model, x, y, *, mode, K, C, reduction="sum", clipping="flat", seed=None):
    """The update of one dpkit step (SGD, lr=1, no noise); ``seed`` seeds the RNG right before the forward."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                     noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
                                     clipping=clipping, augmentation_multiplicity=K, loss_reduction=reduction,
                                     criterion=nn.CrossEntropyLoss(), expected_batch_size=max(y.shape[0] // K, 1))
    before = [p.detach().clone() for p in model.parameters()]
    if seed is not None:
        torch.manual_seed(seed)
    with private.micro_batches():
        private.criterion(model(x), y).backward()
    opt.step()
    private.detach()
    return [b - a.detach() for b, a in zip(before, model.parameters())]


def median_bound(grads):
    """A clipping bound that clips about half the examples."""
    norms = sorted(torch.cat([t.flatten() for t in g]).norm().item() for g in grads)
    return (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2


def assert_close(got, expected, model, label):
    for (name, _), g, e in zip(model.named_parameters(), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9, msg=lambda m: f"{label}, {name}: {m}")


@pytest.fixture
def recomputations(monkeypatch):
    """The calls of the attention sampler's recomputation, counted."""
    calls = []
    original = attention.recompute
    monkeypatch.setattr(attention, "recompute", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("K,reduction", [(1, "sum"), (3, "mean")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_modes_match_the_loop(plugins, recomputations, case, mode, K, reduction, clipping):  # noqa: F811
    if mode == "ghost" and clipping == "per_layer":
        pytest.skip("ghost refuses per-layer clipping")
    model = make(**CASES[case])
    x, y = batch(4 * K)
    grads = loop_grads(model, x, y, K)
    C = median_bound(grads)
    expected = clipped_sum(grads, C, clipping, reduction, len(grads))
    got = private_step(model, x, y, mode=mode, K=K, C=C, reduction=reduction, clipping=clipping)
    assert_close(got, expected, model, mode)
    if mode in ("bk", "auto"):  # the parts serve, unless bias_k and bias_v need the recomputation
        assert bool(recomputations) == (case == "bias-kv")


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(plugins, mode):  # noqa: F811
    x, y = batch(0)
    update = private_step(make(**CASES["cross-weights-used"]), x, y, mode=mode, K=1, C=1.0, reduction="mean")
    assert all(torch.count_nonzero(t) == 0 for t in update)


def replay_grads(model, x, y, K, seed):
    """Each example's gradient in the batched forward whose random draws ``seed`` fixes: what dropout gives it."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = F.cross_entropy(model(x), y, reduction="none")
    return [torch.autograd.grad(losses[b * K:(b + 1) * K].mean(), params, retain_graph=True)
            for b in range(x.shape[0] // K)]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", ["bk", "auto"])
@pytest.mark.parametrize("case", ["self", "self-seq-first-weights-used", "cross-kdim-vdim"])
def test_dropout_with_parts_matches_a_replay_of_its_draws(plugins, recomputations, case, mode, K):  # noqa: F811
    """The real backward carries the real dropout draws, so bk/auto allow attention dropout."""
    model = make(**CASES[case], dropout=0.4)
    x, y = batch(4 * K)
    grads = replay_grads(model, x, y, K, seed=7)
    C = median_bound(grads)
    expected = clipped_sum(grads, C, "flat", "sum", len(grads))
    got = private_step(model, x, y, mode=mode, K=K, C=C, seed=7)
    assert_close(got, expected, model, mode)
    assert not recomputations
    different = private_step(model, x, y, mode=mode, K=K, C=C, seed=8)
    assert any(not torch.allclose(a, b) for a, b in zip(different, expected))  # the draws matter here


@pytest.mark.parametrize("mode,case", [("hooks", "self"), ("ghost", "self"), ("bk", "bias-kv"), ("auto", "bias-kv")])
def test_dropout_is_refused_where_the_attention_is_recomputed(plugins, mode, case):  # noqa: F811
    model = make(**CASES[case], dropout=0.4)
    x, y = batch(4)
    with pytest.raises(UnsupportedLayerError, match="MultiheadAttention.*dropout"):
        private_step(model, x, y, mode=mode, K=1, C=1.0)


def test_functorch_refuses_dropout(plugins):  # noqa: F811
    x, y = batch(4)
    with pytest.raises(Exception, match="random|dropout"):
        private_step(make(dropout=0.4), x, y, mode="functorch", K=1, C=1.0)


# --- the checks would catch mis-stacked or mis-attributed blocks --------------------------------------------------

def _step_and_expected(case, mode="bk"):
    model = make(**CASES[case])
    x, y = batch(4)
    grads = loop_grads(model, x, y, 1)
    C = median_bound(grads)
    return model, (lambda: private_step(model, x, y, mode=mode, K=1, C=C)), clipped_sum(grads, C, "flat", "sum", 4)


def test_reversed_blocks_would_fail(plugins, monkeypatch):  # noqa: F811
    """Three in-projection blocks (query, key, value all different) stacked in the wrong order: caught."""
    model, step, expected = _step_and_expected("cross-weights-used")
    assert_close(step(), expected, model, "bk")
    original = _parts.blocks
    monkeypatch.setattr(_parts, "blocks", lambda *a: {p: b[::-1] for p, b in original(*a).items()})
    with pytest.raises(AssertionError):
        assert_close(step(), expected, model, "bk")


def test_examples_swapped_in_a_layout_would_fail(plugins, monkeypatch):  # noqa: F811
    """A layout that attributed the out-projection's rows to the wrong examples: caught."""
    model, step, expected = _step_and_expected("self")
    original = attention.grad_sampler.linear_calls

    def rolled(layer, activations, backprops, x, g):
        pair = original(layer, activations, backprops, x, g)
        return pair if x.dim() == 3 else (pair[0].roll(1, 0), pair[1])

    monkeypatch.setattr(attention.grad_sampler, "linear_calls", rolled)
    with pytest.raises(AssertionError):
        assert_close(step(), expected, model, "bk")


# --- a layer whose F.linear calls are row blocks, or not ---------------------------------------------------------

class Split(nn.Module):
    """``F.linear(x, W)`` computed as two calls: on row blocks of W (``rows``) or on column blocks (not rows)."""

    def __init__(self, split: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, dtype=torch.double))
        self.bias = nn.Parameter(torch.randn(6, dtype=torch.double))
        self.split = split

    def forward(self, x):
        W, b = self.weight, self.bias
        if self.split == "rows":
            return torch.cat([F.linear(x, W[:2], b[:2]), F.linear(x, W[2:], b[2:])], -1)
        return F.linear(x[..., :1], W[:, :1], b) + F.linear(x[..., 1:], W[:, 1:])


def split_sampler(layer, activations, backprops, K=1):
    """Per-example gradients of ``F.linear(x, W, b)``: what either split computes."""
    x, g = activations[0], backprops
    return {layer.weight: torch.einsum("bto,bti->boi", g, x).reshape(-1, K, 6, 4).sum(1),
            layer.bias: g.sum(1).reshape(-1, K, 6).sum(1)}


split_sampler.linear_calls = lambda layer, activations, backprops, x, g: (x, g)


class SplitNet(nn.Module):
    def __init__(self, split):
        super().__init__()
        self.inner = Split(split)
        self.fc = nn.Linear(6, 3).double()

    def forward(self, x):
        return self.fc(self.inner(x[:, :, :4]).mean(1))


@pytest.mark.parametrize("split,sampled", [("rows", False), ("columns", True)])
@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_only_whole_row_blocks_are_taken(fresh_registry, split, sampled, mode):
    """Row blocks are parts; a column block is no Linear block of the parameter: the sampler serves instead."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return split_sampler(*args, **kwargs)

    counted.linear_calls = split_sampler.linear_calls
    dpkit.register_grad_sampler(Split)(counted)
    torch.manual_seed(0)
    model = SplitNet(split)
    x, y = batch(4)
    grads = loop_grads(model, x, y, 1)
    C = median_bound(grads)
    got = private_step(model, x, y, mode=mode, K=1, C=C)
    assert_close(got, clipped_sum(grads, C, "flat", "sum", 4), model, mode)
    assert bool(calls) == sampled


def test_row_span():
    stand = torch.zeros(6, 4)
    assert _parts._row_span(stand, stand) == (0, 6)
    assert _parts._row_span(stand[2:5], stand) == (2, 5)
    assert _parts._row_span(stand.chunk(3)[2], stand) == (4, 6)
    assert _parts._row_span(stand[:, :2], stand) is None
    assert _parts._row_span(stand.t(), stand) is None
    assert _parts._row_span(stand[::2], stand) is None
    bias = torch.zeros(6)
    assert _parts._row_span(bias.split([2, 4])[1], bias) == (2, 6)


# --- misuse stays refused ------------------------------------------------------------------------------------------

def test_a_user_hook_that_changes_the_output_is_exact(plugins):  # noqa: F811
    """dpkit's forward hook runs first, so the output gradient it sees is the layer's own, parts included."""
    model = make()
    model.attn.register_forward_hook(lambda m, args, out: (out[0] * 3, out[1]))
    x, y = batch(4)
    grads = loop_grads(model, x, y, 1)
    C = median_bound(grads)
    for mode in ("bk", "auto"):
        assert_close(private_step(model, x, y, mode=mode, K=1, C=C), clipped_sum(grads, C, "flat", "sum", 4),
                     model, mode)


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_a_hook_prepended_after_make_private_is_refused(plugins, mode):  # noqa: F811
    model = make()
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 data_loader=None, sample_rate=0.5, noise_multiplier=0.0, max_grad_norm=1.0,
                                 grad_sample_mode=mode, expected_batch_size=4)
    model.attn.register_forward_hook(lambda m, args, out: (out[0] * 3, out[1]), prepend=True)
    with pytest.raises(PrivacyUsageError, match="'attn'.*prepend=True"):
        model(batch(4)[0])
    private.detach()


class Outside(Net):
    """Reads the attention's in-projection weight outside its forward too."""

    def forward(self, x):
        return super().forward(x) + F.linear(x[:, 0], self.attn.in_proj_weight)[:, :3]


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_a_linear_on_the_weight_outside_the_forward_is_refused(plugins, mode):  # noqa: F811
    torch.manual_seed(0)
    model = Outside().double()
    with pytest.raises(PrivacyUsageError, match="outside their module's forward"):
        private_step(model, *batch(4), mode=mode, K=1, C=1.0)


class Twice(Net):
    """One attention layer called on two halves of the batch's positions: its record is shared by two calls."""

    def forward(self, x):
        a, _ = self.attn(x[:, :L], x[:, :L], x[:, :L], need_weights=False)
        b, _ = self.attn(x[:, L:], x[:, L:], x[:, L:], need_weights=False)
        return self.fc(a.mean(1) + b.mean(1))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_a_layer_called_twice_sums_its_parts(plugins, recomputations, mode, clipping):  # noqa: F811
    torch.manual_seed(0)
    model = Twice().double()
    x, y = batch(4)
    grads = loop_grads(model, x, y, 1)
    C = median_bound(grads)
    got = private_step(model, x, y, mode=mode, K=1, C=C, clipping=clipping)
    assert_close(got, clipped_sum(grads, C, clipping, "sum", 4), model, mode)
    assert not recomputations
