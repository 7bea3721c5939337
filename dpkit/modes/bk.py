"""Norm modes (``bk``, ``ghost``, ``auto``): clip from per-example norms without keeping per-example gradients.

Book-keeping (Bu et al. 2023): one backward pass records each layer's inputs and
output gradients; norm samplers give per-example norms (ghost norms for
sequences); then each layer's clipped sum Σ_i f_i g_i is one contraction of the
recorded tensors with output gradients reweighted by the clip factors. A grad
sampler computes that contraction when called with all rows as the K copies of
a single example, so no per-example gradient is formed.

Exactness cases: a parameter used by several calls (tied or shared weights) needs
the norm of the *sum* of its contributions, so its per-example gradients are
materialised; units without samplers (the torch.func fallback) are too.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dpkit.layers import upcast
from dpkit.modes._capture import Capture, Capturer


def record_norms(records: Sequence[Capture], params: Sequence[nn.Parameter], batch: int, K: int,
                 capturer: Capturer) -> tuple[Tensor, dict[nn.Parameter, Tensor]]:
    """``[P, B]`` per-parameter norms of per-example (K-averaged) gradients, and the materialised gradients."""
    uses = Counter(p for cap in records for p in set(cap.row.params.values()))
    squares: dict[nn.Parameter, Tensor] = {}
    materialised: dict[nn.Parameter, Tensor] = {}

    def keep(p: nn.Parameter, g: Tensor) -> None:
        materialised[p] = materialised[p] + g if p in materialised else g

    for cap in records:
        row = cap.row
        shared = any(uses[p] > 1 for p in row.params.values())
        if row.norm_sampler is not None and not shared:
            with capturer.quiet():
                got = row.call(row.norm_sampler, cap.args, cap.grads[0], K, cap.bdim == 0)
            for p, n in got.items():
                squares[p] = squares[p] + upcast(n).square() if p in squares else upcast(n).square()
            continue
        grads = capturer.compute(cap)
        for p, g in grads.items():
            if row.sampler is None or uses[p] > 1:
                keep(p, g)  # needed again for the clipped sum, or summed with another use first
            else:
                squares[p] = upcast(g.reshape(batch, -1 if batch else 0)).square().sum(1)
    for p, g in materialised.items():
        squares[p] = upcast(g.reshape(batch, -1 if batch else 0)).square().sum(1)
    first = next(iter(squares.values()), None)
    norms = torch.zeros(len(params), batch, device=first.device if first is not None else None,
                        dtype=first.dtype if first is not None else torch.float32)
    for i, p in enumerate(params):
        if p in squares:
            norms[i] = squares[p].to(norms.device)
    return norms.sqrt() / K, materialised


def record_sums(records: Sequence[Capture], params: Sequence[nn.Parameter], factors: Tensor, K: int,
                materialised: dict[nn.Parameter, Tensor], capturer: Capturer) -> dict[nn.Parameter, Tensor]:
    """Σ_i f_i g_i per parameter, from the records (and the materialised gradients)."""
    index = {p: i for i, p in enumerate(params)}

    def factor(p: nn.Parameter) -> Tensor:
        return factors[index[p]] if factors.dim() == 2 else factors

    sums: dict[nn.Parameter, Tensor] = {}

    def add(p: nn.Parameter, s: Tensor) -> None:
        sums[p] = sums[p] + s if p in sums else s

    for p, g in materialised.items():
        add(p, torch.tensordot(factor(p).to(g.dtype), g, dims=1) / K)
    for cap in records:
        if cap.rows == 0:
            continue
        todo = [p for p in cap.row.local_params.values() if p not in materialised]
        if not todo:
            continue
        # One call per distinct factor vector: flat clipping needs one, per-layer clipping one per parameter.
        groups = [todo] if factors.dim() == 1 else [[p] for p in todo]
        for group in groups:
            weights = (factor(group[0]) / K).repeat_interleave(K)
            wanted = set(group)
            for p, s in _weighted_sum(cap, weights, capturer).items():
                if p in wanted:
                    add(p, s)
    return sums


def _weighted_sum(cap: Capture, weights: Tensor, capturer: Capturer) -> dict[nn.Parameter, Tensor]:
    """Σ over rows of each row's gradient times its weight, for the layer of one record."""
    row, bdim = cap.row, cap.bdim
    g = cap.grads[0]
    shape = [1] * g.dim()
    shape[bdim] = -1
    g = g * weights.to(g.dtype).reshape(shape)
    with capturer.quiet():
        if row.sampler is not None:
            # All rows as the K copies of one example: the sampler returns their sum, shape [1, *p.shape].
            return {p: s[0] for p, s in row.call(row.sampler, cap.args, g, cap.rows, bdim == 0).items()}
        own = list(row.local_params.values())
        with torch.enable_grad():
            out = row.module(*cap.args)
            grads = torch.autograd.grad(out, own, g, allow_unused=True)
    return {p: s for p, s in zip(own, grads) if s is not None}
