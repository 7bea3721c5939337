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
patches; except for few input channels, where that kernel idles and patches are faster. Norms take the cheapest
of three routes by their multiply-adds: the gradients, ghost norms over patches, or (stride 1) ghost norms from
Gram matrices of the padded input, which need no patches.

The sampler reads ``activations[0]`` (the input, batched ``[N, C, *spatial]``) only.
"""
from __future__ import annotations

import itertools
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
    """Per-example weight gradients ``[B, *weight.shape]`` (K-summed): on the CPU by patches and a batched matmul
    when the layer has few input channels per group, else by the weight-gradient kernel, one group per example.

    oneDNN's weight-gradient kernel vectorises over channels; with fewer than ``_FEW_CHANNELS`` input channels
    per group most of its lanes idle, and patches win: 0.3-0.8x of its time at every shape measured with 1 to 4
    channels (16 or 64 outputs, 8² to 32² positions, 1 thread), 0.7-1.3x at 8, 0.9-2.2x at 16, up to 5x at 32.
    With one example (the clipped sum, all rows as one example's copies) the kernel is the batched one autograd
    runs, which beats the patches at every width. Other devices keep the kernel: their rule is unmeasured.
    """
    x, g = _common_dtype(x, g)
    B = x.shape[0] // K
    if B == 0:
        return g.new_zeros((0, *layer.weight.shape))
    if B > 1 and x.device.type == "cpu" and layer.in_channels // layer.groups < _FEW_CHANNELS:
        return _patch_grads(layer, x, g, K)
    return _kernel_grads(layer, x, g, K)


_FEW_CHANNELS = 8


def _kernel_grads(layer: Conv, x: Tensor, g: Tensor, K: int) -> Tensor:
    """The weight-gradient kernel with the examples as groups (``B·C`` in, ``B·O`` out channels, ``B·G`` groups)
    and an example's K copies as its batch: every example's gradient, K-summed, in one call."""
    x = _padded(layer, x)
    B = x.shape[0] // K
    x = examples(x, K).transpose(0, 1).reshape(K, B * x.shape[1], *x.shape[2:])
    g = examples(g, K).transpose(0, 1).reshape(K, B * g.shape[1], *g.shape[2:])
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


def _patch_grads(layer: Conv, x: Tensor, g: Tensor, K: int) -> Tensor:
    """Per example and group, ``patches · gᵀ`` over its K·L positions, a few examples at a time: a chunk's patches
    (``∏k`` times its input) hold no more entries than the whole record (input and output gradient)."""
    B, per = x.shape[0] // K, K * layer.in_channels * math.prod(layer.kernel_size) * math.prod(g.shape[2:])
    chunk = max(1, (x.numel() + g.numel()) // per)
    return torch.cat([_chunk_patch_grads(layer, x[i * K:(i + chunk) * K], g[i * K:(i + chunk) * K], K)
                      for i in range(0, B, chunk)])


def _chunk_patch_grads(layer: Conv, x: Tensor, g: Tensor, K: int) -> Tensor:
    a, g = _grouped(layer, [x], g, K)  # [B, K, G, c·∏k, L], [B, K, G, o, L]
    B, _, G, d, L = a.shape
    a = a.permute(0, 2, 3, 1, 4).reshape(B * G, d, K * L)  # no copy for K = 1
    g = g.permute(0, 2, 3, 1, 4).reshape(B * G, g.shape[3], K * L)
    # [c·∏k, o] per (example, group): the measured faster orientation for these thin products
    return torch.bmm(a, g.transpose(1, 2)).transpose(1, 2).reshape(B, *layer.weight.shape)


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
    """Per-example gradient norms ``[B]``, in float32: per group, by whichever route ``_norm_route`` finds cheapest."""
    out = {}
    route = _norm_route(layer, activations[0], backprops, K) if layer.weight.requires_grad else None
    if route == "ghost":
        a, g = _grouped(layer, activations, backprops, K)
        B, K, G, _, L = g.shape
        # one Linear per (example, group) over the K·L positions; the squared norms add over groups
        a2 = a.permute(0, 2, 1, 4, 3).reshape(B * G, K * L, a.shape[3])
        g2 = g.permute(0, 2, 1, 4, 3).reshape(B * G, K * L, g.shape[3])
        out[layer.weight] = weight_sq_norms(a2, g2).reshape(B, G).sum(1).sqrt()
    elif route == "gram":
        out[layer.weight] = gram_norms(layer, upcast(activations[0]), upcast(backprops), K)
    elif route == "instantiated":
        out[layer.weight] = _instantiated_norms(layer, upcast(activations[0]), upcast(backprops), K)
    if layer.bias is not None and layer.bias.requires_grad:
        g = upcast(examples(backprops, K))
        out[layer.bias] = g.reshape(*g.shape[:3], math.prod(g.shape[3:])).sum((1, 3)).norm(dim=1)
    return out


def _norm_route(layer: Conv, x: Tensor, g: Tensor, K: int) -> str:
    """The cheapest way to a weight's per-example norms by multiply-adds per example and group, o = O/G outputs,
    c = C/G inputs, L positions: instantiating the gradient ~K·L·o·c·∏k; ghost norms over patches
    ~(K·L)²·(o + c·∏k); ghost norms over the padded input ``gram_norms`` ~M²·c + N²·(o + ∏k) (stride 1 only)."""
    L, o, c = math.prod(g.shape[2:]), layer.out_channels // layer.groups, layer.weight.shape[1]
    k = math.prod(layer.kernel_size)
    costs = {"instantiated": K * L * o * c * k, "ghost": (K * L) ** 2 * (o + c * k)}
    if all(s == 1 for s in layer.stride):
        N, M = _gram_sizes(layer, x, g, K)
        costs["gram"] = M * M * c + N * N * (o + k)
    return min(costs, key=costs.__getitem__)


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


def _gram_sizes(layer: Conv, x: Tensor, g: Tensor, K: int) -> tuple[int, int]:
    """``gram_norms``' grid: ``N`` output-gradient positions an example, ``M`` input positions an example."""
    P, pad = list(x.shape[2:]), _pad(layer)
    P = [p + pad[2 * (len(P) - 1 - i)] + pad[2 * (len(P) - 1 - i) + 1] for i, p in enumerate(P)]
    steps = [math.prod(P[i + 1:]) for i in range(len(P))]
    N = (K - 1) * math.prod(P) + g.shape[2] * steps[0]
    return N, N + sum(d * (k - 1) * s for k, d, s in zip(layer.kernel_size, layer.dilation, steps))


def gram_norms(layer: Conv, x: Tensor, g: Tensor, K: int) -> Tensor:
    """Per-example weight-gradient norms ``[B]`` of a stride-1 convolution from Gram matrices of its padded input:
    ghost norms without patches, a few examples at a time.

    Flatten the padded input's positions (``Lx`` an example) and put the output gradient on the same grid, each
    output position where its receptive field starts (zeros in the padding columns), an example's K copies
    ``Lx`` apart. Kernel tap t then reads the input at a fixed offset ``s_t`` from every output position, so the
    patches' Gram matrix ``Σ_t ⟨x_{i+s_t}, x_{j+s_t}⟩`` is a sum of ``∏k`` shifted blocks of the input's Gram
    matrix, and the squared norm is ``Σ_ij ⟨g_i, g_j⟩ · Σ_t ⟨x_{i+s_t}, x_{j+s_t}⟩`` (a Linear's ghost norm).
    A chunk's Gram matrices hold no more entries than the whole record (input and output gradient).
    """
    x, g = _common_dtype(x, g)
    B = x.shape[0] // K
    if B == 0:
        return g.new_zeros(0)
    N, M = _gram_sizes(layer, x, g, K)
    per = layer.groups * (M * M + 2 * N * N)
    chunk = max(1, (x.numel() + g.numel()) // per)
    return torch.cat([_chunk_gram_sq_norms(layer, x[i * K:(i + chunk) * K], g[i * K:(i + chunk) * K], K, N, M)
                      for i in range(0, B, chunk)]).clamp_min(0).sqrt()


def _chunk_gram_sq_norms(layer: Conv, x: Tensor, g: Tensor, K: int, N: int, M: int) -> Tensor:
    x = _padded(layer, x)
    P, G, nd = x.shape[2:], layer.groups, len(layer.kernel_size)
    B, Lx, L0 = x.shape[0] // K, math.prod(P), g.shape[2] * math.prod(P[1:])
    steps = [math.prod(P[i + 1:]) for i in range(nd)]
    # the output gradient on the input's grid: padding columns of zeros in every dimension but the first
    g = F.pad(g, [side for i in reversed(range(1, nd)) for side in (0, P[i] - g.shape[2 + i])])
    g = F.pad(g.reshape(B, K, G, g.shape[1] // G, L0), (0, Lx - L0))
    g = g.permute(0, 2, 3, 1, 4).reshape(B * G, g.shape[3], K * Lx)[:, :, :N]
    x = x.reshape(B, K, G, x.shape[1] // G, Lx).permute(0, 2, 3, 1, 4).reshape(B * G, x.shape[1] // G, K * Lx)
    x = F.pad(x, (0, M - K * Lx))
    gram_x = torch.bmm(x.transpose(1, 2), x)  # [B·G, M, M]
    shifts = [sum(t * d * s for t, d, s in zip(tap, layer.dilation, steps))
              for tap in itertools.product(*(range(k) for k in layer.kernel_size))]
    gram_a = gram_x[:, :N, :N].clone()  # summed block by block: a strided view of all the blocks sums 4x slower
    for s in shifts[1:]:
        gram_a += gram_x[:, s:s + N, s:s + N]
    sq = (torch.bmm(g.transpose(1, 2), g) * gram_a).sum((1, 2))
    return sq.reshape(B, G).sum(1)


def _common_dtype(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return (x, g.to(x.dtype)) if x.dtype == torch.promote_types(x.dtype, g.dtype) else (x.to(g.dtype), g)


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.Conv1d: grad_sampler, nn.Conv2d: grad_sampler, nn.Conv3d: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.Conv1d: norm_sampler, nn.Conv2d: norm_sampler, nn.Conv3d: norm_sampler}
