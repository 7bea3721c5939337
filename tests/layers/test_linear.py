"""nn.Linear samplers against torch.func, through the plugin authors' checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpkit.layers import linear
from dpkit.testing import check_grad_sampler, check_norm_sampler

SHAPES = [(4, 5), (4, 3, 5), (4, 2, 3, 5)]  # [N, in], [N, T, in], [N, A, B, in]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
def test_grad_and_norm(K, shape, bias):
    layer = nn.Linear(5, 6, bias=bias)
    check_grad_sampler(layer, torch.randn(shape), K=K, sampler=linear.grad_sampler)
    check_norm_sampler(layer, torch.randn(shape), K=K, sampler=linear.norm_sampler)


@pytest.mark.parametrize(
    ("d", "p", "T"),
    [(64, 48, 3), (2, 3, 40)],
    ids=["ghost", "instantiated"],  # T·(p+d) < p·d picks the ghost norm
)
def test_norm_both_paths(d, p, T):
    assert (T * (p + d) < p * d) == (d == 64)
    check_norm_sampler(nn.Linear(d, p), torch.randn(3, T, d), K=2, sampler=linear.norm_sampler)


def test_frozen_bias_is_left_out():
    layer = nn.Linear(5, 6)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 3, 5)
    check_grad_sampler(layer, x, K=3, sampler=linear.grad_sampler)
    check_norm_sampler(layer, x, K=3, sampler=linear.norm_sampler)
    assert linear.grad_sampler(layer, [x], torch.randn(4, 3, 6)).keys() == {layer.weight}


@pytest.mark.parametrize("shape", [(4, 64), (4, 3, 64), (4, 50, 8)], ids=["2d", "ghost", "instantiated"])
def test_norm_bf16(shape):
    layer = nn.Linear(shape[-1], 64)
    check_norm_sampler(layer, torch.randn(shape), K=2, sampler=linear.norm_sampler, dtype=torch.bfloat16)
    a, g = torch.randn(2, *shape[1:]).bfloat16(), torch.randn(2, *shape[1:-1], 64).bfloat16()
    assert linear.norm_sampler(layer.bfloat16(), [a], g)[layer.weight].dtype == torch.float32


def test_registered(builtin_table):
    for hook, fn in [("dpkit_grad_samplers", linear.grad_sampler), ("dpkit_norm_samplers", linear.norm_sampler)]:
        entry = builtin_table(hook)[nn.Linear]
        assert (entry.value, entry.provider) == (fn, "dpkit.layers.linear")


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
@pytest.mark.parametrize(("d", "p"), [(5, 9), (9, 5)], ids=["weights-on-input", "weights-on-gradient"])
@pytest.mark.parametrize("bias", [True, False])
def test_weighted_sum_is_the_weighted_sum_of_per_row_gradients(shape, d, p, bias):
    torch.manual_seed(0)
    layer = nn.Linear(d, p, bias=bias).double()
    x, g = torch.randn(*shape[:-1], d).double(), torch.randn(*shape[:-1], p).double()
    w = torch.rand(shape[0]).double()
    per_row = linear.grad_sampler(layer, [x], g)
    got = linear.weighted_sum(layer, [x], g.transpose(0, -1).contiguous().transpose(0, -1), w)  # strided too
    assert got.keys() == per_row.keys()
    for param, grads in per_row.items():
        torch.testing.assert_close(got[param], torch.tensordot(w, grads, dims=1))
