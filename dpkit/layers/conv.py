"""Per-example gradients and gradient norms for ``torch.nn.Conv1d``, ``Conv2d`` and ``Conv3d``.

A convolution is a Linear applied to every receptive field (patch) of its padded input, one Linear per group.
So the input is unfolded into patches ``[N, C·∏k, L]`` (L output positions) and the Linear math applies, with
an example's K copies and L positions folded into one axis. One unfold serves 1-, 2- and 3-d convolutions:
``Tensor.unfold`` once per spatial dimension, then a stride-``dilation`` slice of each window. Padding is done
here as the module does it (``F.pad`` with its ``padding_mode``; ``"same"`` puts the odd extra element on the
right), so the patches match the forward exactly for every mode, stride, dilation and group count.

Forming per-example weight gradients uses the convolution's own weight-gradient kernel instead: with the
examples as groups (``B·C`` input and ``B·O`` output channels, ``B·G`` groups) and an example's K copies as
the kernel's batch, one call returns every example's gradient, K-summed, without the ``∏k``-times larger
patches. Patches remain for ghost norms, chosen when the shapes make them cheaper.

The sampler reads ``activations[0]`` (the input, batched ``[N, C, *spatial]``) only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import examples, upcast, weight_sq_norms

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _pad(layer: Conv) -> list[int]:
    """The module's padding in ``F.pad`` order (last dimension first, left then right)."""
    if layer.padding == "valid":
        pairs = [(0, 0)] * len(layer.kernel_size)
    elif layer.padding == "same":
        totals = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
        pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in layer.padding]
    return [side for pair in reversed(pairs) for side in pair]


def patches(layer: Conv, x: Tensor) -> Tensor:
    """``[N, C, *spatial]`` → ``[N, C·∏k, L]``: each receptive field a column, in the weight's (c, k…) order."""
    nd = len(layer.kernel_size)
    if x.dim() != nd + 2:
        raise ValueError(
            f"{layer!r} got an input of shape {list(x.shape)}; per-example gradients need a batch dim"
        )
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, _pad(layer), mode=mode)
    for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # dim 2+i becomes the window count, the window goes last
    x = x[(..., *(slice(None, None, d) for d in layer.dilation))]  # [N, C, *L, *k]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))  # [N, C, *k, *L]
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 2 + nd]), math.prod(x.shape[2 + nd :]))


def _padded(layer: Conv, x: Tensor) -> Tensor:
    nd = len(layer.kernel_size)
    if x.dim() != nd + 2:
        raise ValueError(
            f"{layer!r} got an input of shape {list(x.shape)}; per-example gradients need a batch dim"
        )
    return F.pad(x, _pad(layer), mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)


def weight_grads(layer: Conv, x: Tensor, g: Tensor, K: int) -> Tensor:
    """Per-example weight gradients ``[B, *weight.shape]`` (K-summed) from the weight-gradient kernel."""
    x = _padded(layer, x)
    B = x.shape[0] // K
    if B == 0:
        return g.new_zeros((0, *layer.weight.shape))
    x = examples(x, K).transpose(0, 1).reshape(K, B * x.shape[1], *x.shape[2:])
    g = examples(g, K).transpose(0, 1).reshape(K, B * g.shape[1], *g.shape[2:])
    x, g = (x, g.to(x.dtype)) if x.dtype == torch.promote_types(x.dtype, g.dtype) else (x.to(g.dtype), g)
    # The kernel behind torch.nn.grad.conv*_weight. Its weight argument gives only the shape; on the CPU an
    # allocated (never written) one, rather than the expanded scalar those functions pass, takes oneDNN's
    # faster path (up to 2x for some shapes). Elsewhere the expanded one costs no memory.
    nd = len(layer.kernel_size)
    shape = (B * layer.out_channels, *layer.weight.shape[1:])
    stand_in = x.new_empty(shape) if x.device.type == "cpu" else x.new_empty(1).expand(shape)
    w = torch.ops.aten.convolution_backward(
        g, x, stand_in, None, list(layer.stride), [0] * nd, list(layer.dilation), False, [0] * nd,
        B * layer.groups, (False, True, False))[1]
    return w.reshape(B, *layer.weight.shape)


def _ghost_cheaper(layer: Conv, backprops: Tensor, K: int) -> bool:
    """Ghost norms cost ~(K·L)²·(p+d) per example and group, forming the gradient ~K·L·p·d (L positions)."""
    L = K * math.prod(backprops.shape[2:])
    p, d = layer.out_channels // layer.groups, layer.weight[0].numel()
    return L * (p + d) < p * d


def _grouped(layer: Conv, activations: list[Tensor], backprops: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Patches ``[B, K, G, C/G·∏k, L]`` and output gradients ``[B, K, G, O/G, L]``."""
    G = layer.groups
    a = examples(patches(layer, activations[0]), K)
    B, _, CK, L = a.shape
    g = backprops.reshape(B, K, G, layer.out_channels // G, L)
    return a.reshape(B, K, G, CK // G, L), g


def grad_sampler(layer: Conv, activations: list[Tensor], backprops: Tensor, K: int = 1) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients: weight ``[B, O, C/G, *k]``, bias ``[B, O]``."""
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = weight_grads(layer, activations[0], backprops, K)
    if layer.bias is not None and layer.bias.requires_grad:
        g = examples(backprops, K)
        out[layer.bias] = g.reshape(*g.shape[:3], math.prod(g.shape[3:])).sum((1, 3))
    return out


def norm_sampler(layer: Conv, activations: list[Tensor], backprops: Tensor, K: int = 1) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]``: per group, ghost or instantiated (whichever is cheaper), in float32."""
    out = {}
    if layer.weight.requires_grad and _ghost_cheaper(layer, backprops, K):
        a, g = _grouped(layer, activations, backprops, K)
        B, K, G, _, L = g.shape
        # one Linear per (example, group) over the K·L positions; the squared norms add over groups
        a2 = a.permute(0, 2, 1, 4, 3).reshape(B * G, K * L, a.shape[3])
        g2 = g.permute(0, 2, 1, 4, 3).reshape(B * G, K * L, g.shape[3])
        out[layer.weight] = weight_sq_norms(a2, g2).reshape(B, G).sum(1).sqrt()
    elif layer.weight.requires_grad:
        out[layer.weight] = _instantiated_norms(layer, upcast(activations[0]), upcast(backprops), K)
    if layer.bias is not None and layer.bias.requires_grad:
        g = upcast(examples(backprops, K))
        out[layer.bias] = g.reshape(*g.shape[:3], math.prod(g.shape[3:])).sum((1, 3)).norm(dim=1)
    return out


def _instantiated_norms(layer: Conv, x: Tensor, g: Tensor, K: int) -> Tensor:
    """Per-example weight-gradient norms ``[B]`` from the gradients themselves, formed a few examples at a time.

    All at once, a wide layer's gradients (``B·O·C·∏k`` entries) outgrow the record they come from (its input and
    output gradient) several times over, at the backward pass's peak: in chunks whose gradients hold no more
    entries than the record, the peak hardly moves. On the CPU the chunks are also faster: oneDNN's kernel with
    one group per example slows down as the groups multiply (``contrib/benchmarks/RESULTS.md``)."""
    B, numel = x.shape[0] // K, layer.weight.numel()
    chunk = max(1, (x.numel() + g.numel()) // numel)
    if B <= chunk:
        return weight_grads(layer, x, g, K).reshape(B, numel).norm(dim=1)
    return torch.cat([weight_grads(layer, x[i * K:(i + chunk) * K], g[i * K:(i + chunk) * K], K)
                      .reshape(-1, numel).norm(dim=1) for i in range(0, B, chunk)])


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.Conv1d: grad_sampler, nn.Conv2d: grad_sampler, nn.Conv3d: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.Conv1d: norm_sampler, nn.Conv2d: norm_sampler, nn.Conv3d: norm_sampler}
