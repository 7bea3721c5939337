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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import examples, upcast

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
    """Per-row sums of ``x̂ · g`` and ``g``, a few rows at a time, then each example's K rows added.

    The passes over a chunk (normalise, multiply, sum) find it in cache: over the whole input, each would stream
    it through memory again. ``x̂`` is this function's own tensor, so the product overwrites it."""
    keep = len(layer.normalized_shape) if isinstance(layer, (nn.LayerNorm, nn.RMSNorm)) else 0
    weight, bias = layer.weight, getattr(layer, "bias", None)  # RMSNorm has no bias; LayerNorm(bias=False) None
    weight = weight if weight is not None and weight.requires_grad else None
    bias = bias if bias is not None and bias.requires_grad else None
    rows = x.shape[0]
    step = max(1, _CHUNK // max(1, math.prod(x.shape[1:])))
    parts: dict[nn.Parameter, list[Tensor]] = {p: [] for p in (weight, bias) if p is not None}
    for i in range(0, max(rows, 1), step):  # once for an empty batch
        g_i = cast(g[i:i + step])
        if weight is not None:
            x_hat = cast(_normalized(layer, x[i:i + step]))  # in the forward's dtype: RMSNorm's default eps needs it
            in_place = x_hat.dtype == torch.promote_types(x_hat.dtype, g_i.dtype)
            parts[weight].append(_row_sums(x_hat.mul_(g_i) if in_place else x_hat * g_i, keep))
        if bias is not None:
            parts[bias].append(_row_sums(g_i, keep))
    return {p: examples(torch.cat(sums), K).sum(1) for p, sums in parts.items()}


_CHUNK = 1 << 18  # entries of x̂ a chunk (1 MiB in float32): the fastest of 2^14..2^18 and whole at every
# GroupNorm shape of convnet-cpu and two LayerNorm shapes, 1 thread (2^17 within 10%)


def _row_sums(t: Tensor, keep: int) -> Tensor:
    """Each row's sum over positions: ``[N, C, *spatial]`` → ``[N, C]`` (one parameter per channel, summed where
    they lie, no channels-last copy), or ``[N, *positions, *kept]`` → ``[N, *kept]`` (the trailing ``keep`` dims)."""
    if not keep:
        return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).sum(2)
    kept = t.shape[t.dim() - keep:]
    return t.reshape(t.shape[0], math.prod(t.shape[1:t.dim() - keep]), math.prod(kept)).sum(1).reshape(-1, *kept)


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
