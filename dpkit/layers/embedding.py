"""Per-example gradients and gradient norms for ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag``.

A lookup's gradient sends each output gradient ``g_t`` to the row ``idx_t`` it read. Per example that is a
scatter-add into a dense ``[V, d]`` table (the grad sampler must return it). The norm never needs the table:
rows that appear several times in an example are consolidated by sorting the keys ``(example, row)``, and the
squared norm is the sum of the consolidated rows' squared norms, O(n·d + n log n) for n lookups.

Refused, with a message naming the layer: ``scale_grad_by_freq=True`` (it divides by counts taken over the
whole batch, so one example's gradient depends on the others and per-example clipping bounds nothing) and
``sparse=True`` (DP noise touches every row, so the private gradient is dense anyway).

Reads ``activations[0]`` (indices) for both layers, and ``activations[1:3]`` (offsets, per_sample_weights)
for EmbeddingBag.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpkit.errors import UnsupportedLayerError
from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import RowSum, upcast


def _refuse(layer: nn.Embedding | nn.EmbeddingBag) -> None:
    if layer.scale_grad_by_freq:
        raise UnsupportedLayerError(
            f"{layer!r}: scale_grad_by_freq=True scales by token counts over the whole batch, so an example's "
            "gradient depends on other examples and clipping cannot bound it; build it with scale_grad_by_freq=False"
        )
    if layer.sparse:
        raise UnsupportedLayerError(
            f"{layer!r}: sparse=True gradients are not supported, because DP noise is added to every row and makes "
            "the gradient dense; build it with sparse=False (and use a dense optimizer)"
        )


def _lookups(
    layer: nn.Embedding | nn.EmbeddingBag, activations: list[Tensor], backprops: Tensor, K: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Every lookup as (example, row, gradient ``[n, width]``).

    Padding lookups carry zero gradients rather than being dropped, so no shape depends on the data (no host
    sync on GPU).
    """
    _refuse(layer)
    if isinstance(layer, nn.EmbeddingBag):
        idx, offsets, weights = [*activations, None, None][:3]  # forward(input, offsets, per_sample_weights)
        return _bag_lookups(layer, idx, offsets, weights, backprops, K)
    N, T, d = activations[0].shape[0], activations[0][0].numel() if len(activations[0]) else 0, backprops.shape[-1]
    idx, g = activations[0].reshape(N * T).long(), backprops.reshape(N * T, d)
    example = (torch.arange(N, device=idx.device) // K).repeat_interleave(T)
    return example, idx, g * _valid(layer, idx)[:, None]


def _valid(layer: nn.Embedding | nn.EmbeddingBag, idx: Tensor) -> Tensor:
    return idx != (-1 if layer.padding_idx is None else layer.padding_idx)  # indices are never negative


def _bag_lookups(
    layer: nn.EmbeddingBag, idx: Tensor, offsets: Tensor | None, weights: Tensor | None, backprops: Tensor, K: int
) -> tuple[Tensor, Tensor, Tensor]:
    """EmbeddingBag: each lookup's share of its bag's output gradient (sum, mean or max mode)."""
    bags, d = backprops.shape
    if idx.dim() == 2:
        bag = torch.arange(bags, device=idx.device).repeat_interleave(idx.shape[1])
    else:
        starts = (offsets[:-1] if layer.include_last_offset else offsets).long().contiguous()
        bag = torch.searchsorted(starts, torch.arange(idx.numel(), device=idx.device), right=True) - 1
    idx = idx.reshape(-1).long()
    valid = _valid(layer, idx)  # padding lookups are left out of the bag's reduction
    if layer.mode == "max":
        return _max_lookups(layer, idx, bag, valid, backprops, K)
    g = backprops[bag] * valid[:, None]
    if layer.mode == "sum" and weights is not None:
        g = g * weights.reshape(-1, 1)
    elif layer.mode == "mean":
        size = backprops.new_zeros(bags).index_add_(0, bag, valid.to(backprops.dtype))
        g = g / size.clamp_min(1)[bag, None]
    return bag // K, idx, g


def _max_lookups(
    layer: nn.EmbeddingBag, idx: Tensor, bag: Tensor, valid: Tensor, backprops: Tensor, K: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Max mode: feature k of a bag's gradient goes to the first lookup holding the bag's maximum of feature k.

    The lookups become (row, feature) pairs, keyed ``row·d + k`` with gradients of width 1, one per bag and feature.
    """
    (bags, d), n = backprops.shape, idx.shape[0]
    values = layer.weight.detach()[idx].masked_fill(~valid[:, None], -torch.inf)
    where = bag[:, None].expand(n, d)
    top = values.new_full((bags, d), -torch.inf).scatter_reduce_(0, where, values, "amax")
    pos = torch.arange(n, device=idx.device)[:, None].expand(n, d)
    pos = torch.where((values == top[bag]) & valid[:, None], pos, n)
    first = pos.new_full((bags, d), n).scatter_reduce_(0, where, pos, "amin")  # n: an empty bag
    row = torch.cat([idx, idx.new_zeros(1)])[first]
    key = row * d + torch.arange(d, device=idx.device)
    example = (torch.arange(bags, device=idx.device) // K).repeat_interleave(d)
    return example, key.reshape(-1), (backprops * (first < n)).reshape(-1, 1)


def grad_sampler(
    layer: nn.Embedding | nn.EmbeddingBag, activations: list[Tensor], backprops: Tensor, K: int = 1
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients: weight ``[B, V, d]``, dense, zero outside the rows an example read."""
    if not layer.weight.requires_grad:
        return {}
    example, row, g = _lookups(layer, activations, backprops, K)
    B, (V, d) = backprops.shape[0] // K, layer.weight.shape
    width = g.shape[1]  # d, or 1 for max-mode bags whose rows are (row, feature) keys
    out = g.new_zeros(B * V * d // width, width).index_add_(0, example * (V * d // width) + row, g)
    return {layer.weight: out.reshape(B, V, d)}


def weighted_sum(
    layer: nn.Embedding | nn.EmbeddingBag, activations: list[Tensor], backprops: Tensor, weights: Tensor
) -> dict[nn.Parameter, RowSum]:
    """``Σ_r w_r ∇_r`` over rows r (bk's clipped sum) as the weighted rows each lookup adds to the table: the step's
    buffer takes them in place (``RowSum``), with no dense ``[V, d]`` sum to form and copy."""
    if not layer.weight.requires_grad:
        return {}
    rows = backprops.shape[0]
    g = backprops * weights.to(backprops.dtype).reshape(rows, *[1] * (backprops.dim() - 1))
    _, key, g = _lookups(layer, activations, g, max(rows, 1))  # all rows as one example's copies
    return {layer.weight: RowSum(tuple(layer.weight.shape), key, g)}


def norm_sampler(
    layer: nn.Embedding | nn.EmbeddingBag, activations: list[Tensor], backprops: Tensor, K: int = 1
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]`` without a ``[B, V, d]`` table: consolidate repeated rows, then sum squares.

    Sorting the keys ``example·V + row`` makes repeats adjacent; a running segment id then sums them, all with
    shapes known in advance (no host sync on GPU).
    """
    if not layer.weight.requires_grad:
        return {}
    example, row, g = _lookups(layer, activations, backprops, K)
    B, n = backprops.shape[0] // K, row.shape[0]
    key, order = (example * (layer.weight.numel() // g.shape[1]) + row).sort()
    segment = torch.cat([key.new_zeros(min(n, 1)), (key[1:] != key[:-1]).long()]).cumsum(0)
    sums = upcast(g).new_zeros(n, g.shape[1]).index_add_(0, segment, upcast(g)[order])
    owner = example.new_zeros(n).scatter_(0, segment, example[order])
    sq = upcast(g).new_zeros(B).index_add_(0, owner, sums.square().sum(1))
    return {layer.weight: sq.sqrt()}


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.Embedding: grad_sampler, nn.EmbeddingBag: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.Embedding: norm_sampler, nn.EmbeddingBag: norm_sampler}
