"""The samplers against torch.func on the layers themselves: Conv1D, LlamaRMSNorm, T5LayerNorm."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D

from dpkit.testing import check_grad_sampler, check_norm_sampler
from dpkit_transformers import conv1d, rms_norm


def randomized(layer: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # ones and zeros (the inits) would hide a missing factor
    return layer


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("shape", [(5, 8), (5, 7, 8)], ids=["N", "NT"])
def test_conv1d(shape, K):
    layer = randomized(Conv1D(6, 8))  # nf=6 outputs, nx=8 inputs: weight [8, 6]
    # Conv1D.forward itself calls x.view(), so it cannot take the non-contiguous inputs the check would add.
    check_grad_sampler(layer, torch.randn(shape), K=K, sampler=conv1d.grad_sampler, non_contiguous=False)
    check_norm_sampler(layer, torch.randn(shape), K=K, sampler=conv1d.norm_sampler, non_contiguous=False)


def test_conv1d_frozen_bias_and_bf16_norms():
    layer = randomized(Conv1D(6, 8))
    layer.bias.requires_grad_(False)
    check_grad_sampler(layer, torch.randn(5, 7, 8), K=2, sampler=conv1d.grad_sampler, non_contiguous=False)
    check_norm_sampler(Conv1D(6, 8), torch.randn(4, 9, 8), K=2, sampler=conv1d.norm_sampler,
                       non_contiguous=False, dtype=torch.bfloat16)


@pytest.mark.parametrize("cls", [LlamaRMSNorm, T5LayerNorm])
@pytest.mark.parametrize("K", [1, 3])
def test_rms_norms(cls, K):
    layer = randomized(cls(8, eps=1e-5))
    check_grad_sampler(layer, torch.randn(4, 5, 8), K=K, sampler=rms_norm.grad_sampler)
    check_norm_sampler(layer, torch.randn(4, 5, 8), K=K, sampler=rms_norm.norm_sampler)
    check_norm_sampler(layer, torch.randn(4, 5, 8), K=K, sampler=rms_norm.norm_sampler, dtype=torch.bfloat16)


def test_conv1d_transposed_weight_is_caught():
    """The check is not vacuous: nn.Linear's formula gives the transpose of Conv1D's weight gradient."""
    from dpkit.layers import linear

    with pytest.raises(AssertionError, match="parameter 'weight'.*shape"):
        check_grad_sampler(Conv1D(6, 8), torch.randn(5, 8), sampler=linear.grad_sampler, non_contiguous=False)
