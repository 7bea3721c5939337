"""The samplers against torch.func on the layer itself: input ranks, K, bias, frozen parameters, bf16 norms."""
from __future__ import annotations

import pytest
import torch

from dpkit.testing import check_grad_sampler, check_norm_sampler
from dpkit_example_layer import ScaledLinear, grad_sampler, norm_sampler


def layer(bias: bool = True) -> ScaledLinear:
    torch.manual_seed(0)
    made = ScaledLinear(5, 3, bias=bias)
    with torch.no_grad():
        made.scale.normal_()  # a gain of ones would hide a missing factor
        if bias:
            made.bias.normal_()
    return made


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5), (4, 2, 3, 5)], ids=["N", "NT", "NAB"])
@pytest.mark.parametrize("bias", [True, False])
def test_samplers_agree_with_torch_func(shape, bias, K):
    check_grad_sampler(layer(bias), torch.randn(shape), K=K, sampler=grad_sampler)
    check_norm_sampler(layer(bias), torch.randn(shape), K=K, sampler=norm_sampler)


@pytest.mark.parametrize("frozen", ["weight", "scale", "bias"])
def test_frozen_parameter_is_left_out(frozen):
    made = layer()
    getattr(made, frozen).requires_grad_(False)
    check_grad_sampler(made, torch.randn(4, 3, 5), K=2, sampler=grad_sampler)
    check_norm_sampler(made, torch.randn(4, 3, 5), K=2, sampler=norm_sampler)


def test_norms_survive_bfloat16():
    check_norm_sampler(layer(), torch.randn(4, 6, 5), K=2, sampler=norm_sampler, dtype=torch.bfloat16)


def test_a_wrong_sampler_is_caught():
    """The check is not vacuous: forgetting the gain in the weight gradient fails it."""
    def no_gain(layer, activations, backprops, K=1):
        out = grad_sampler(layer, activations, backprops, K)
        out[layer.weight] = out[layer.weight] / layer.scale.detach()[:, None]
        return out

    with pytest.raises(AssertionError, match="parameter 'weight'"):
        check_grad_sampler(layer(), torch.randn(4, 3, 5), sampler=no_gain)
