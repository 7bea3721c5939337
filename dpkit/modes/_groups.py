"""Same-shaped records and per-example gradients taken together: one stacked call for a group's norms, one for
its clipped sums.

At small shapes a Linear's norm and clipped sum cost about twenty torch calls of a few microseconds each, far
more than their arithmetic, and every block of a transformer has the same shapes. Stacking a group lets one set
of calls serve all of it. Stacking copies, so it is done only where the calls cost more than the copy (small
tensors). Records are stacked only for the built-in Linear samplers, whose formulas these are (a plugin that
replaces them is called as before); per-example gradients formed on arrival (LayerNorms, small layers) of any
layer.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import attrs
import torch
from torch import Tensor, nn

from dpkit.layers import upcast, weight_sq_norms
from dpkit.modes._records import Capture

# Elements of one record (input and output gradient) up to which stacking pays: past it, a Linear's own products
# take longer than the twenty calls around them, and the stacked copy adds to the end of the pass's peak.
MAX_ELEMENTS = 1 << 16


@attrs.define(eq=False)
class LinearGroup:
    """The records of same-shaped Linear calls, stacked: ``a`` ``[L, rows, *positions, in]``, ``g`` ``[L, rows,
    *positions, out]``; each layer's weight and bias (None where frozen or absent)."""

    caps: list[Capture]
    a: Tensor | None
    g: Tensor | None
    weights: list[nn.Parameter | None]
    biases: list[nn.Parameter | None]

    def sq_norms(self, K: int) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Each parameter's ``[B]`` squared per-example norms (K-summed gradients), in at least float32."""
        L, rows, d, p = self.a.shape[0], self.a.shape[1], self.a.shape[-1], self.g.shape[-1]
        B = rows // K
        a, g = self.a.reshape(L * B, -1, d), self.g.reshape(L * B, -1, p)
        if self.weights[0] is not None:
            yield from zip(self.weights, weight_sq_norms(a, g).reshape(L, B))
        if self.biases[0] is not None:
            yield from zip(self.biases, upcast(g).sum(1).square().sum(1).reshape(L, B))

    @property
    def done(self) -> bool:
        return self.a is None

    def sums(self, weights: Tensor, index: dict[int, int]) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Σ_r w_r ∇_r per parameter (``weights``: ``[rows]``, or ``[P, rows]`` by ``index``), then the stacks go."""
        a, g = self.a, self.g
        self.a = self.g = None
        L, rows = a.shape[0], a.shape[1]
        a, g = a.reshape(L, rows, -1, a.shape[-1]), g.reshape(L, rows, -1, g.shape[-1])

        def per_row(params: list[nn.Parameter]) -> Tensor:  # [1 or L, rows, 1, 1]
            return _per_layer(weights, params, index).to(g.dtype).reshape(-1, rows, 1, 1)

        if self.weights[0] is not None:
            w = per_row(self.weights)
            wa, wg = (a * w, g) if a.shape[-1] <= g.shape[-1] else (a, g * w)
            yield from zip(self.weights, torch.bmm(wg.flatten(1, 2).transpose(1, 2), wa.flatten(1, 2)))
        if self.biases[0] is not None:
            w = per_row(self.biases)
            yield from zip(self.biases, (g.sum(2) * w.reshape(-1, rows, 1)).sum(1))


def _per_layer(weights: Tensor, params: list[nn.Parameter], index: dict[int, int]) -> Tensor:
    """``[1, rows]`` for flat weights, ``[L, rows]`` (each parameter's row) for per-layer ones."""
    if weights.dim() == 1:
        return weights.reshape(1, -1)
    return weights.index_select(0, torch.tensor([index[id(q)] for q in params], device=weights.device))


def _own(cap: Capture, single_use: Callable[[nn.Parameter], bool]) -> tuple | None:
    """The call's weight and bias (None where frozen or absent), if each is held by its module and used by this
    call alone; else None."""
    held, local = cap.row.module._parameters, cap.row.local_params
    weight, bias = local.get("weight"), local.get("bias")
    for name, q in (("weight", weight), ("bias", bias)):
        if q is not None and (held.get(name) is not q or not single_use(q)):
            return None  # FSDP2's gathered parameter (the sampler maps it back), or a tied one
    return None if weight is None and bias is None else (weight, bias)


def _plain(cap: Capture) -> bool:
    """A record of one output gradient, batch first, nothing taken from it yet."""
    return (cap.squares is None and cap.formed is None and cap.blocks is None and cap.parts is None and cap.rows > 0
            and cap.bdim == 0 and len(cap.grads) == 1 and cap.grads[0] is not None and len(cap.args) >= 1
            and isinstance(cap.args[0], Tensor) and cap.args[0].dtype == cap.grads[0].dtype
            and cap.args[0].device == cap.grads[0].device and cap.args[0].numel() > 0
            and cap.args[0].numel() + cap.grads[0].numel() <= MAX_ELEMENTS)


def linear_groups(records: Sequence[Capture], single_use: Callable[[nn.Parameter], bool]
                  ) -> list[LinearGroup]:
    """Groups of two or more records that can be stacked: built-in Linear samplers, parameters used by this call
    alone (``single_use``), one output gradient, batch first, one dtype, small. Their records are released."""
    from dpkit.layers import linear  # a plugin module: loaded with the plugin manager, not when dpkit is imported

    by_key: dict[tuple, list[tuple[Capture, nn.Parameter | None, nn.Parameter | None]]] = defaultdict(list)
    for cap in records:
        row = cap.row
        if row.sampler is not linear.grad_sampler or row.norm_sampler is not linear.norm_sampler or not _plain(cap):
            continue
        a, g = cap.args[0], cap.grads[0]
        own = _own(cap, single_use)
        if own is None or a.shape[:-1] != g.shape[:-1]:
            continue
        weight, bias = own
        key = (tuple(a.shape), tuple(g.shape), a.dtype, a.device, weight is None, bias is None)
        by_key[key].append((cap, weight, bias))
    groups = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        caps = [c for c, _, _ in members]
        group = LinearGroup(caps, torch.stack([c.args[0] for c in caps]), torch.stack([c.grads[0] for c in caps]),
                            [w for _, w, _ in members], [b for _, _, b in members])
        for cap in caps:
            cap.release()
            cap.group = group
        groups.append(group)
    return groups


def _stackable(items: list[tuple[object, Tensor]]) -> list[list[tuple[object, Tensor]]]:
    """Per-example gradients by shape, dtype and device: small ones in groups, each large one alone."""
    by_key: dict[tuple, list] = defaultdict(list)
    alone = []
    for key, g in items:
        if g.numel() <= MAX_ELEMENTS and g.numel():
            by_key[(tuple(g.shape), g.dtype, g.device)].append((key, g))
        else:
            alone.append([(key, g)])
    return [*by_key.values(), *alone]


def square_norms(grads: dict[int, Tensor], batch: int) -> dict[int, Tensor]:
    """``[B]`` squared norms of each per-example gradient ``[B, ...]`` (keyed by parameter id), in at least float32;
    same-shaped small ones in one stacked call."""
    out = {}
    for group in _stackable(list(grads.items())):
        g = torch.stack([t for _, t in group]) if len(group) > 1 else group[0][1].unsqueeze(0)
        sq = upcast(g.reshape(len(group), batch, math.prod(g.shape[2:]))).square().sum(2)
        out.update(zip([k for k, _ in group], sq))
    return out


def weighted_sums(grads: dict[nn.Parameter, Tensor], factors: Tensor, index: dict[int, int], K: int
                  ) -> Iterator[tuple[nn.Parameter, Tensor]]:
    """Σ_b f_b g_b / K per parameter from its per-example gradients ``[B, ...]`` (``factors``: ``[B]``, or ``[P, B]``
    by ``index``); same-shaped small ones in one stacked product. Empties ``grads`` as it goes."""
    groups = _stackable(list(grads.items()))
    grads.clear()
    for group in groups:
        params = [p for p, _ in group]
        g = torch.stack([t for _, t in group]) if len(group) > 1 else group[0][1].unsqueeze(0)
        group.clear()
        f = _per_layer(factors, params, index).to(g.dtype).unsqueeze(1)  # [1 or L, 1, B]
        sums = torch.matmul(f, g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:]))) / K  # [L, 1, n]
        del g
        yield from ((p, s.reshape(p.shape)) for p, s in zip(params, sums))
