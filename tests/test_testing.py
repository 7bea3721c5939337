"""dpkit.testing must catch wrong samplers, with messages that say what is wrong; and pass right ones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkit
from dpkit.errors import UnsupportedLayerError
from dpkit.layers import fold, linear
from dpkit.testing import check_grad_sampler, check_norm_sampler, forward_activations


class Scale(nn.Module):
    """A plugin author's layer: y = x * weight (elementwise over the last dim)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def scale_grad(layer, activations, backprops, K=1):
    return {layer.weight: (fold(activations[0], K) * fold(backprops, K)).sum(1)}


def scale_norm(layer, activations, backprops, K=1):
    return {p: g.norm(dim=1) for p, g in scale_grad(layer, activations, backprops, K).items()}


# --- wrong samplers, each with the defect it carries -------------------------------------------------------------


def times_two(layer, activations, backprops, K=1):
    return {p: 2 * g for p, g in linear.grad_sampler(layer, activations, backprops, K).items()}


def no_k_sum(layer, activations, backprops, K=1):
    """Treats every row as an example: shapes [B*K, ...]."""
    return linear.grad_sampler(layer, activations, backprops, K=1)


def first_copy_only(layer, activations, backprops, K=1):
    """Right shapes, but drops copies 2..K of each example."""
    rows = slice(None, None, K)
    return linear.grad_sampler(layer, [activations[0][rows]], backprops[rows], K=1)


def transposed(layer, activations, backprops, K=1):
    out = linear.grad_sampler(layer, activations, backprops, K)
    out[layer.weight] = out[layer.weight].transpose(1, 2).reshape(out[layer.weight].shape)
    return out


def without_bias(layer, activations, backprops, K=1):
    out = linear.grad_sampler(layer, activations, backprops, K)
    del out[layer.bias]
    return out


def ignores_requires_grad(layer, activations, backprops, K=1):
    a, g = fold(activations[0], K), fold(backprops, K)
    return {layer.weight: torch.einsum("bto,bti->boi", g, a), layer.bias: g.sum(1)}


def uses_view(layer, activations, backprops, K=1):
    a, g = activations[0], backprops
    a, g = (x.view(x.shape[0] // K, K * x.shape[1], x.shape[2]) for x in (a, g))  # [N, T, d] only
    return {layer.weight: torch.einsum("bto,bti->boi", g, a), layer.bias: g.sum(1)}


def breaks_on_empty_batch(layer, activations, backprops, K=1):
    a, g = activations[0], backprops
    B = a.shape[0] // K
    a, g = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])  # -1 is ambiguous when B = 0
    return {layer.weight: torch.einsum("bto,bti->boi", g, a), layer.bias: g.sum(1)}


def in_place(layer, activations, backprops, K=1):
    activations[0].mul_(1.0 + 1e-3)
    return linear.grad_sampler(layer, activations, backprops, K)


def nan_bias(layer, activations, backprops, K=1):
    out = linear.grad_sampler(layer, activations, backprops, K)
    out[layer.bias] = out[layer.bias].clone()
    if len(out[layer.bias]):
        out[layer.bias][-1, 0] = float("nan")
    return out


WRONG_GRADS = {  # sampler: the words the failure must contain
    times_two: ["parameter 'weight'", "example", "max abs diff"],
    no_k_sum: ["parameter 'weight'", "shape [3, 6, 5], expected [1, 6, 5]"],
    first_copy_only: ["parameter 'weight'", "K=3", "max abs diff"],
    transposed: ["parameter 'weight'", "max abs diff"],
    without_bias: ["missing ['bias']"],
    uses_view: ["non-contiguous", "view"],
    breaks_on_empty_batch: ["B=0"],
    in_place: ["modified activations[0] in place"],
    nan_bias: ["parameter 'bias'", "example 0", "nan"],
}


@pytest.mark.parametrize("sampler", WRONG_GRADS, ids=lambda f: f.__name__)
def test_check_grad_sampler_catches(sampler):
    with pytest.raises(AssertionError) as info:
        check_grad_sampler(nn.Linear(5, 6), torch.randn(4, 2, 5), K=3, sampler=sampler)
    for words in WRONG_GRADS[sampler]:
        assert words in str(info.value)


def test_check_grad_sampler_catches_a_frozen_parameter_returned():
    layer = nn.Linear(5, 6)
    layer.bias.requires_grad_(False)
    check_grad_sampler(layer, torch.randn(4, 5), sampler=linear.grad_sampler)
    with pytest.raises(AssertionError, match=r"unexpected \['bias'\]"):
        check_grad_sampler(layer, torch.randn(4, 5), sampler=ignores_requires_grad)


def squared(layer, activations, backprops, K=1):
    return {p: n.square() for p, n in linear.norm_sampler(layer, activations, backprops, K).items()}


def norm_no_k_sum(layer, activations, backprops, K=1):
    """Sums the K copies' norms instead of taking the norm of their summed gradient."""
    norms = linear.norm_sampler(layer, activations, backprops, K=1)
    return {p: n.reshape(-1, K).sum(1) for p, n in norms.items()}


def grads_not_norms(layer, activations, backprops, K=1):
    return linear.grad_sampler(layer, activations, backprops, K)


WRONG_NORMS = {
    squared: ["parameter 'weight'", "max abs diff"],
    norm_no_k_sum: ["parameter 'weight'", "max abs diff"],
    grads_not_norms: ["parameter 'weight'", "shape [0, 6, 5], expected [0]"],
}


@pytest.mark.parametrize("sampler", WRONG_NORMS, ids=lambda f: f.__name__)
def test_check_norm_sampler_catches(sampler):
    with pytest.raises(AssertionError) as info:
        check_norm_sampler(nn.Linear(5, 6), torch.randn(4, 2, 5), K=3, sampler=sampler)
    for words in WRONG_NORMS[sampler]:
        assert words in str(info.value)


def test_bf16_tolerance_still_catches_a_small_error():
    def off_by_ten_percent(layer, activations, backprops, K=1):
        return {p: 1.1 * n for p, n in linear.norm_sampler(layer, activations, backprops, K).items()}

    layer = nn.Linear(16, 8)
    check_norm_sampler(layer, torch.randn(4, 3, 16), K=2, sampler=linear.norm_sampler, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="parameter 'weight'"):
        check_norm_sampler(layer, torch.randn(4, 3, 16), K=2, sampler=off_by_ten_percent, dtype=torch.bfloat16)


# --- right samplers, and how a plugin author uses the kit ---------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3])
def test_plugin_author_layer_passes(K):
    check_grad_sampler(Scale(4), torch.randn(2, 3, 4), K=K, sampler=scale_grad)
    check_norm_sampler(Scale(4), torch.randn(2, 3, 4), K=K, sampler=scale_norm)


def test_registered_sampler_is_found(fresh_registry):
    with pytest.raises(UnsupportedLayerError, match="Scale"):
        check_grad_sampler(Scale(4), torch.randn(2, 4))
    dpkit.register_grad_sampler(Scale)(scale_grad)
    dpkit.register_norm_sampler(Scale)(scale_norm)
    check_grad_sampler(Scale(4), torch.randn(2, 4), K=2)
    check_norm_sampler(Scale(4), torch.randn(2, 4), K=2)


def test_builtin_sampler_is_found(fresh_registry):
    check_grad_sampler(nn.Linear(3, 2), torch.randn(2, 3), K=2)
    check_norm_sampler(nn.Linear(3, 2), torch.randn(2, 3), K=2)


def test_leaves_layer_and_rng_alone():
    layer = nn.Linear(5, 6)
    before = {n: p.clone() for n, p in layer.state_dict().items()}
    x = torch.randn(4, 5)
    rng = torch.get_rng_state()
    check_grad_sampler(layer, x, K=2, sampler=linear.grad_sampler, dtype=torch.float32)
    assert torch.equal(rng, torch.get_rng_state())
    for name, value in layer.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[name])


def test_forward_activations_fill_defaults_in_signature_order():
    bag = nn.EmbeddingBag(5, 3)
    idx = torch.tensor([[1, 2]])
    weights = torch.ones(1, 2)
    got = forward_activations(bag, (idx,))
    assert len(got) == 3 and torch.equal(got[0], idx) and got[1:] == [None, None]
    got = forward_activations(bag, (idx,), {"per_sample_weights": weights})
    assert got[0] is not idx and torch.equal(got[0], idx) and got[1] is None and torch.equal(got[2], weights)


def test_layer_forward_failure_is_reported_with_context():
    with pytest.raises(RuntimeError, match="B=0.*forward failed.*batch_sizes"):
        check_grad_sampler(nn.InstanceNorm1d(3, affine=True), torch.randn(2, 3, 4))
