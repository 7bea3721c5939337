"""Per-example gradients and norms for timm's ``LayerScale`` (``y = x ⊙ γ``, channels last) and ``LayerScale2d``
(channels in dim 1, NCHW).

For one example the gradient of ``γ`` is ``Σ_t x_t ⊙ g_t`` over its positions (tokens or pixels) and K copies.
The input is read as the layer received it: an in-place ``LayerScale(inplace=True)`` overwrites it, which dpkit
refuses as an input modified after a layer read it.
"""
from __future__ import annotations

from torch import Tensor, nn

from dpkit.layers import sum_examples, upcast


def _grads(layer: nn.Module, x: Tensor, g: Tensor, K: int) -> Tensor:
    xg = x * g
    if type(layer).__name__ == "LayerScale2d":
        xg = xg.movedim(1, -1)  # NCHW: channels last, the pixels become positions
    return sum_examples(xg, K, keep=1)


def grad_sampler(layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, C]`` of ``γ``."""
    if not layer.gamma.requires_grad:
        return {}
    return {layer.gamma: _grads(layer, activations[0], backprops, K)}


def norm_sampler(layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]`` of ``γ`` (a ``[B, C]`` gradient, formed in float32)."""
    if not layer.gamma.requires_grad:
        return {}
    return {layer.gamma: _grads(layer, upcast(activations[0]), upcast(backprops), K).norm(dim=1)}
