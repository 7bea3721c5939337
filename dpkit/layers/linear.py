"""Per-example gradients and gradient norms for ``torch.nn.Linear``.

For one example with inputs ``a_t`` and output gradients ``g_t`` at positions t (tokens, pixels, and its K
augmented copies, all folded into one axis), the weight gradient is ``Σ_t g_t a_tᵀ`` and the bias gradient
``Σ_t g_t``. Any number of leading dimensions (``[N, in]``, ``[N, T, in]``, ``[N, A, B, in]``) folds the same way.

The sampler reads ``activations[0]`` (the input) only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import fold, upcast, weight_sq_norms


def grad_sampler(
    layer: nn.Linear, activations: list[Tensor], backprops: Tensor, K: int = 1
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients: weight ``[B, out, in]``, bias ``[B, out]``."""
    a, g = fold(activations[0], K), fold(backprops, K)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.bmm(g.transpose(1, 2), a)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1)
    return out


def norm_sampler(
    layer: nn.Linear, activations: list[Tensor], backprops: Tensor, K: int = 1
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]``, ghost or instantiated (whichever the shapes make cheaper), in float32.

    The bias norm is ``‖Σ_t g_t‖``: summing first keeps it exact and O(T·out).
    """
    g = fold(backprops, K)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = weight_sq_norms(fold(activations[0], K), g, shared_input=True).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = upcast(g).sum(1).norm(dim=1)
    return out


def weighted_sum(layer: nn.Linear, activations: list[Tensor], backprops: Tensor, weights: Tensor
                 ) -> dict[nn.Parameter, Tensor]:
    """``Σ_r w_r ∇_r`` over rows r (bk's clipped sum), without a per-example gradient or a weighted gradient copy.

    The weight's sum is ``gᵀ·diag(w)·a`` over all rows and positions: one matrix product, with the weights on
    whichever of ``a`` and ``g`` is narrower (an LM head's ``g`` is vocabulary-wide).
    """
    a, g = fold(activations[0], 1), fold(backprops, 1)  # [rows, positions, in], [rows, positions, out]
    rows = g.shape[0]
    w = weights.to(g.dtype).reshape(rows, 1, 1)
    out = {}
    if layer.weight.requires_grad:
        wa, wg = (a * w, g) if a.shape[-1] <= g.shape[-1] else (a, g * w)
        out[layer.weight] = wg.reshape(-1, g.shape[-1]).T @ wa.reshape(-1, a.shape[-1])
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = w.reshape(rows) @ g.sum(1)
    return out


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.Linear: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.Linear: norm_sampler}
