"""A dpkit layer plugin: per-example gradients and gradient norms for :class:`ScaledLinear`.

``ScaledLinear`` computes ``y = s ⊙ (W x) + b``: a linear map whose outputs each get a learned gain ``s``
(as in weight-normalised or "LayerScale"-style layers). dpkit has no sampler for it, so without this plugin
it trains only in ``auto`` (a per-layer ``torch.func`` fallback) or ``functorch`` mode. With it, ``hooks``,
``ghost`` and ``bk`` work too, and faster.

The whole plugin is this module: the layer, two sampler functions, and two ``@dpkit.hookimpl`` tables. The
entry point in ``pyproject.toml`` (``[project.entry-points.dpkit] example_layer = "dpkit_example_layer"``)
is how dpkit finds it once the package is installed.
"""
from __future__ import annotations

import math

import torch
from opt_einsum import contract
from torch import Tensor, nn

import dpkit
from dpkit.layers import fold, upcast, weight_sq_norms

__all__ = ["ScaledLinear", "grad_sampler", "norm_sampler"]
__version__ = "0.1.0"


class ScaledLinear(nn.Module):
    """``y = s ⊙ (x Wᵀ) + b`` over the last dimension of ``x``; any leading dimensions (batch, positions)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale = nn.Parameter(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        y = (x @ self.weight.T) * self.scale
        return y if self.bias is None else y + self.bias


def grad_sampler(layer: ScaledLinear, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients: weight ``[B, out, in]``, scale and bias ``[B, out]``.

    With ``a_t`` the input and ``g_t`` the output gradient at position t of one example (its K augmented
    copies are positions too, which ``fold`` arranges):

    * ``∂/∂W = Σ_t (s ⊙ g_t) a_tᵀ``: the Linear formula with the gain folded into the output gradient;
    * ``∂/∂s = Σ_t g_t ⊙ (W a_t)``: needs the unscaled output, recomputed from the input;
    * ``∂/∂b = Σ_t g_t``.
    """
    a, g = fold(activations[0], K), fold(backprops, K)  # [B, K*T, in], [B, K*T, out]
    W, s = layer.weight.detach(), layer.scale.detach()  # samplers compute values; they build no graph
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = contract("bto,bti->boi", g * s, a)
    if layer.scale.requires_grad:
        out[layer.scale] = (g * (a @ W.T)).sum(1)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1)
    return out


def norm_sampler(layer: ScaledLinear, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]`` without the ``[B, out, in]`` weight gradient.

    ``‖Σ_t h_t a_tᵀ‖² = Σ_{t,u} (h_t·h_u)(a_t·a_u)`` with ``h = s ⊙ g`` (the ghost norm): two T×T Gram
    matrices instead of an out×in matrix per example. ``dpkit.layers.weight_sq_norms`` picks that or the
    instantiated gradient, whichever the shapes make cheaper, and accumulates in float32 at least.
    """
    a, g = fold(activations[0], K), fold(backprops, K)
    W, s = layer.weight.detach(), layer.scale.detach()
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = weight_sq_norms(a, g * s).sqrt()
    if layer.scale.requires_grad:
        out[layer.scale] = upcast(g * (a @ W.T)).sum(1).norm(dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = upcast(g).sum(1).norm(dim=1)
    return out


@dpkit.hookimpl
def dpkit_grad_samplers():
    return {ScaledLinear: grad_sampler}


@dpkit.hookimpl
def dpkit_norm_samplers():
    return {ScaledLinear: norm_sampler}
