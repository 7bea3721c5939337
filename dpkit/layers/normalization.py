"""Per-example gradients and gradient norms for LayerNorm, GroupNorm, InstanceNorm1d/2d/3d and RMSNorm.

Each of these normalises within an example (unlike BatchNorm), then applies an elementwise affine map
``y = x̂ · weight + bias``. So an example's gradient is ``Σ x̂ · g`` for the weight and ``Σ g`` for the bias,
summed over its positions and K copies. ``x̂`` is recomputed from the input with the layer's own functional
form minus the affine part, which reproduces the forward's statistics (and eps) exactly. The parameters are
small, so the norm sampler instantiates the gradient (in float32) and takes its norm.

Reads ``activations[0]`` (the input) only. InstanceNorm needs batched input; in eval mode with
``track_running_stats`` it normalises with the running statistics, as the forward does.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import examples, sum_examples, upcast

_INSTANCE_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}
Norm = nn.LayerNorm | nn.GroupNorm | nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d | nn.RMSNorm


def _normalized(layer: Norm, x: Tensor) -> Tensor:
    """``x̂``: the input normalised as the layer's forward does it, before the affine map."""
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    if isinstance(layer, nn.RMSNorm):
        return F.rms_norm(x, layer.normalized_shape, eps=layer.eps)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, eps=layer.eps)
    if x.dim() != _INSTANCE_DIMS[type(layer)]:
        raise ValueError(
            f"{layer!r} got an unbatched input of shape {list(x.shape)}; per-example gradients need a batch dim"
        )
    use_input_stats = layer.training or not layer.track_running_stats
    stats = (None, None) if use_input_stats else (layer.running_mean, layer.running_var)
    return F.instance_norm(x, *stats, use_input_stats=use_input_stats, eps=layer.eps)


def _grads(layer: Norm, x: Tensor, g: Tensor, K: int, cast=lambda t: t) -> dict[nn.Parameter, Tensor]:
    x_hat, g = cast(_normalized(layer, x)), cast(g)  # x̂ in the forward's dtype: RMSNorm's default eps depends on it
    if isinstance(layer, (nn.LayerNorm, nn.RMSNorm)):
        keep = len(layer.normalized_shape)  # the parameters cover the trailing normalized_shape
        reduce = functools.partial(sum_examples, K=K, keep=keep)
    else:
        reduce = functools.partial(_sum_channels, K=K)  # one parameter per channel (dim 1)
    out = {}
    if layer.weight is not None and layer.weight.requires_grad:
        # x̂ is this function's own tensor: the product overwrites it rather than allocating another of its size
        in_place = x_hat.dtype == torch.promote_types(x_hat.dtype, g.dtype)
        out[layer.weight] = reduce(x_hat.mul_(g) if in_place else x_hat * g)
    bias = getattr(layer, "bias", None)  # RMSNorm has none; LayerNorm(bias=False) holds None
    if bias is not None and bias.requires_grad:
        out[bias] = reduce(g)
    return out


def _sum_channels(x: Tensor, K: int) -> Tensor:
    """``[B*K, C, *spatial]`` → ``[B, C]``: positions summed where they lie (no channels-last copy), then K copies."""
    x = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).sum(2)
    return examples(x, K).sum(1)


def grad_sampler(layer: Norm, activations: list[Tensor], backprops: Tensor, K: int = 1) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients, ``[B, *param.shape]`` for the weight and the bias."""
    return _grads(layer, activations[0], backprops, K)


def norm_sampler(layer: Norm, activations: list[Tensor], backprops: Tensor, K: int = 1) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]``, from the (small) gradients computed in float32."""
    grads = _grads(layer, activations[0], backprops, K, cast=upcast)
    return {p: grad.flatten(1).norm(dim=1) for p, grad in grads.items()}


_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm)


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return dict.fromkeys(_LAYERS, grad_sampler)


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return dict.fromkeys(_LAYERS, norm_sampler)
