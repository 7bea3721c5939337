"""nn.MultiheadAttention samplers against a loop over examples."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _samples import assert_samples

from dpkit.errors import UnsupportedLayerError
from dpkit.layers import attention
from test_recurrent import assert_step_matches_loop, plugins  # noqa: F401 (a fixture)

E, HEADS, L, S = 4, 2, 3, 5


def make(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(E, HEADS, **kwargs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # zero biases would hide a missing bias term
    return layer


def draw(layer, rows, *, self_attention=False, kpm=False, mask=None, strided=False):
    """Inputs in the layer's own layout, and its keyword arguments."""
    kdim, vdim = layer.kdim, layer.vdim
    shape = (lambda n, t, d: (n, t, d)) if layer.batch_first else (lambda n, t, d: (t, n, d))
    q = torch.randn(*shape(rows, L, E), dtype=torch.double)
    k, v = torch.randn(*shape(rows, S, kdim), dtype=torch.double), torch.randn(*shape(rows, S, vdim), dtype=torch.double)
    if strided:
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    if self_attention:
        k = v = q
    src = L if self_attention else S
    kwargs = {}
    if kpm:
        kwargs["key_padding_mask"] = torch.arange(src).expand(rows, src) >= torch.randint(1, src + 1, (rows, 1))
    if mask == "2d-float":
        kwargs["attn_mask"] = torch.randn(L, src, dtype=torch.double)
    elif mask == "3d-bool":
        kwargs["attn_mask"] = torch.rand(rows * HEADS, L, src) < 0.3
        kwargs["attn_mask"][..., 0] = False  # no row fully masked
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.double)
        kwargs["is_causal"] = True
    return (q, k, v), kwargs


def call_args(layer, qkv, kwargs, need_weights, average=True):
    return [*qkv, kwargs.get("key_padding_mask"), need_weights, kwargs.get("attn_mask"), average,
            kwargs.get("is_causal", False)]


def loop_reference(layer, qkv, kwargs, need_weights, average, grads, K):
    bdim = 0 if layer.batch_first else 1
    params = [p for p in layer.parameters() if p.requires_grad]
    rows = qkv[0].shape[bdim]
    out = []
    for b in range(rows // K):
        pick = slice(b * K, (b + 1) * K)
        sel = [t[pick] if bdim == 0 else t[:, pick] for t in qkv]
        kw = dict(kwargs)
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][pick]
        if kw.get("attn_mask") is not None and kw["attn_mask"].dim() == 3:
            kw["attn_mask"] = kw["attn_mask"][b * K * HEADS:(b + 1) * K * HEADS]
        o, w = layer(*sel, need_weights=need_weights, average_attn_weights=average, **kw)
        g_o = grads[0][pick] if bdim == 0 else grads[0][:, pick]
        loss = (o * g_o).sum() + (0 if grads[1] is None else (w * grads[1][pick]).sum())
        out.append(torch.autograd.grad(loss, params, allow_unused=True))
    return {p: torch.stack([g[i] for g in out]) if out else p.new_zeros(0, *p.shape) for i, p in enumerate(params)}


def as_captured(layer, args, grads):
    """What dpkit's capture hands the sampler: every >1-D tensor of a sequence-first call with dims 0, 1 swapped."""
    if layer.batch_first:
        return args, grads
    swap = lambda t: t.transpose(0, 1) if isinstance(t, torch.Tensor) and t.dim() > 1 else t  # noqa: E731
    return [swap(a) for a in args], [swap(grads[0]), grads[1]]


def check(layer, rows, K, *, need_weights=False, weights_grad=False, average=True, **draw_kwargs):
    torch.manual_seed(1)
    qkv, kwargs = draw(layer, rows, **draw_kwargs)
    with torch.no_grad():
        o, w = layer(*qkv, need_weights=need_weights, average_attn_weights=average, **kwargs)
    grads = [torch.randn_like(o), torch.randn_like(w) if weights_grad else None]
    expected = loop_reference(layer, qkv, kwargs, need_weights, average, grads, K)
    acts, bps = as_captured(layer, call_args(layer, qkv, kwargs, need_weights, average), grads)
    bps = bps if weights_grad else bps[0]
    got, norms = attention.grad_sampler(layer, acts, bps, K=K), attention.norm_sampler(layer, acts, bps, K=K)
    assert_samples(layer, got, norms, expected)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_layouts(batch_first, self_attention, K):
    check(make(batch_first=batch_first), 2 * K, K, self_attention=self_attention)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "2d-float", "3d-bool", "causal"])
def test_masks(batch_first, mask):
    check(make(batch_first=batch_first), 3, 1, self_attention=True, kpm=mask != "causal", mask=mask)


@pytest.mark.parametrize("need_weights,weights_grad,average", [(True, False, True), (True, True, True),
                                                                (True, True, False)],
                         ids=["weights-unused", "averaged-weights-used", "per-head-weights-used"])
def test_attention_weights(need_weights, weights_grad, average):
    check(make(batch_first=True), 3, 1, need_weights=need_weights, weights_grad=weights_grad, average=average)


@pytest.mark.parametrize("kwargs", [dict(kdim=3, vdim=2), dict(add_bias_kv=True), dict(add_zero_attn=True),
                                    dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True, kdim=3)],
                         ids=["separate-qkv", "bias-kv", "zero-attn", "no-bias", "all"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_variants(kwargs, batch_first):
    check(make(batch_first=batch_first, **kwargs), 6, 3, kpm=True, mask="2d-float", strided=True)


@pytest.mark.parametrize("kwargs", [dict(add_bias_kv=True, add_zero_attn=True), dict(bias=False)],
                         ids=["bias-kv-zero-attn", "no-bias"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_variants(kwargs, batch_first):
    """The packed path (query, key and value one tensor: one projection, one [N, L, 3E] gradient) with the extras."""
    check(make(batch_first=batch_first, **kwargs), 6, 3, self_attention=True, kpm=True, mask="2d-float",
          strided=True, need_weights=True, weights_grad=True, average=False)


def test_key_is_query_but_value_differs():
    """Two of three inputs the same tensor: not self-attention, so each of q, k, v has its own input."""
    layer = make(batch_first=True)
    qkv, _ = draw(layer, 4, self_attention=True)
    q, v = qkv[0], torch.randn_like(qkv[0])
    g = torch.randn(4, L, E, dtype=torch.double)
    expected = loop_reference(layer, (q, q, v), {}, False, True, [g, None], 2)
    args = call_args(layer, (q, q, v), {}, False)
    got, norms = attention.grad_sampler(layer, args, g, K=2), attention.norm_sampler(layer, args, g, K=2)
    assert_samples(layer, got, norms, expected)


def test_frozen_parameters_are_left_out():
    layer = make(batch_first=True)
    layer.in_proj_bias.requires_grad_(False)
    layer.out_proj.weight.requires_grad_(False)
    check(layer, 3, 1)
    check(layer, 3, 1, self_attention=True)


def test_float32_norms_within_1e_5():
    layer = make(batch_first=True)
    qkv, _ = draw(layer, 4, self_attention=True)
    g = torch.randn(4, L, E, dtype=torch.double)
    expected = loop_reference(layer, qkv, {}, False, True, [g, None], 2)
    layer.float()
    got = attention.norm_sampler(layer, call_args(layer, [t.float() for t in qkv], {}, False), g.float(), K=2)
    for p, want in expected.items():
        assert got[p].dtype == torch.float32
        torch.testing.assert_close(got[p].double(), want.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)


def test_empty_batch():
    layer = make(batch_first=True)
    qkv, _ = draw(layer, 0)
    for sampler in (attention.grad_sampler, attention.norm_sampler):
        out = sampler(layer, call_args(layer, qkv, {}, False), torch.zeros(0, L, E, dtype=torch.double), K=3)
        assert out.keys() == set(layer.parameters()) and all(t.shape[0] == 0 for t in out.values())


def test_dropout_is_refused_in_training():
    layer = make(batch_first=True, dropout=0.1)
    qkv, _ = draw(layer, 2)
    args, g = call_args(layer, qkv, {}, False), torch.randn(2, L, E, dtype=torch.double)
    with pytest.raises(UnsupportedLayerError, match="MultiheadAttention.*dropout"):
        attention.grad_sampler(layer, args, g)
    layer.eval()
    assert attention.grad_sampler(layer, args, g).keys() == set(layer.parameters())


# --- through the engine: one clipped step without noise equals a loop over examples -----------------------------

class Classifier(nn.Module):
    """Self-attention over a sequence, mean-pooled; ``weights``: the attention weights enter the logits too."""

    def __init__(self, batch_first=True, weights=False, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kwargs)
        self.fc = nn.Linear(E, 3)
        self.batch_first, self.weights = batch_first, weights

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        pad = x[:, :, 0] > 1.0  # a key padding mask from the batch itself
        out, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=self.weights)
        out = out if self.batch_first else out.transpose(0, 1)
        logits = self.fc(out.mean(1))
        return logits if w is None else logits + w.mean(1)[:, :3] * 3


@pytest.mark.parametrize("K,reduction", [(1, "sum"), (3, "mean")])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
@pytest.mark.parametrize("kwargs", [dict(), dict(batch_first=False, add_bias_kv=True), dict(weights=True)],
                         ids=["batch-first", "sequence-first", "weights-used"])
def test_modes_match_the_loop(plugins, kwargs, mode, K, reduction):  # noqa: F811 (the fixture)
    torch.manual_seed(0)
    model = Classifier(**kwargs).double()
    x = torch.randn(E, L, 4 * K, dtype=torch.double).permute(2, 1, 0)  # non-contiguous
    assert_step_matches_loop(model, x, torch.randint(0, 3, (4 * K,)), mode=mode, K=K, reduction=reduction)
