"""Per-example gradients and norms for timm's ``LayerNorm``, ``GroupNorm``, ``GroupNorm1`` and ``LayerNorm2d``.

The first three subclass ``nn.LayerNorm``/``nn.GroupNorm`` and compute the same function (timm's optional "fast
norm" path differs only in how it casts under autocast), so dpkit's built-in samplers serve them. Resolution is by
exact type, which is why they are registered here by name. ``LayerNorm2d`` normalises the channels of an NCHW
input: ``y = LayerNorm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``; its sampler moves the channels of the input
and of the output gradient last and applies the LayerNorm formula, with the spatial positions as positions.
"""
from __future__ import annotations

from torch import Tensor, nn

from dpkit.layers import normalization

grad_sampler = normalization.grad_sampler
norm_sampler = normalization.norm_sampler


def _channels_last(activations: list[Tensor], backprops: Tensor) -> tuple[list[Tensor], Tensor]:
    return [activations[0].permute(0, 2, 3, 1)], backprops.permute(0, 2, 3, 1)


def grad_sampler_2d(layer: nn.LayerNorm, activations: list[Tensor], backprops: Tensor, K: int = 1
                    ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, C]`` of ``LayerNorm2d``'s weight and bias."""
    return normalization.grad_sampler(layer, *_channels_last(activations, backprops), K)


def norm_sampler_2d(layer: nn.LayerNorm, activations: list[Tensor], backprops: Tensor, K: int = 1
                    ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]`` of ``LayerNorm2d``'s weight and bias."""
    return normalization.norm_sampler(layer, *_channels_last(activations, backprops), K)
