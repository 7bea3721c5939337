"""Per-example gradients and norms for ``transformers.pytorch_utils.Conv1D``, GPT-2's linear layer.

Despite its name ``Conv1D`` is a linear map with the weight stored transposed: ``y = x W + b`` with ``W`` of
shape ``[in, out]``. For one example with inputs ``a_t`` and output gradients ``g_t`` at positions t (its K
augmented copies folded in as positions), the weight gradient is ``Σ_t a_t g_tᵀ`` (``[in, out]``, the
transpose of ``nn.Linear``'s) and the bias gradient ``Σ_t g_t``. The norm of ``Σ_t a_t g_tᵀ`` equals that of
its transpose, so the Linear ghost-norm helper serves unchanged.
"""
from __future__ import annotations

from opt_einsum import contract
from torch import Tensor, nn

from dpkit.layers import fold, upcast, weight_sq_norms


def grad_sampler(layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients: weight ``[B, in, out]``, bias ``[B, out]``."""
    a, g = fold(activations[0], K), fold(backprops, K)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = contract("bti,bto->bio", a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1)
    return out


def norm_sampler(layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]``: ghost (two T×T Gram matrices) or instantiated, whichever is cheaper."""
    a, g = fold(activations[0], K), fold(backprops, K)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = weight_sq_norms(a, g).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = upcast(g).sum(1).norm(dim=1)
    return out
