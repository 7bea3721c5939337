"""Same-shaped records and per-example gradients taken together: one stacked call for a group's norms, one for
its clipped sums.

At small shapes a Linear's norm and clipped sum cost about twenty torch calls of a few microseconds each, far
more than their arithmetic, and every block of a transformer has the same shapes. Stacking a group lets one set
of calls serve all of it. Stacking copies, so it is done only where the calls cost more than the copy (small
tensors). Records are stacked only for the built-in Linear and LayerNorm samplers, whose formulas these are (a
plugin that replaces them is called as before); per-example gradients formed on arrival, of any layer.
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


@attrs.define(eq=False)
class NormGroup:
    """Same-shaped LayerNorm calls: their per-example gradients (small: one vector per example and parameter) formed
    in one pass over the stacked inputs, ``[L, B, *normalized_shape]`` each, K-summed, in at least float32."""

    caps: list[Capture]
    weights: list[nn.Parameter | None]
    biases: list[nn.Parameter | None]
    grads: dict[str, Tensor]  # "weight", "bias" -> [L, B, *shape]
    done: bool = False

    def sq_norms(self, K: int) -> Iterator[tuple[nn.Parameter, Tensor]]:
        for key, params in (("weight", self.weights), ("bias", self.biases)):
            if key in self.grads:
                yield from zip(params, self.grads[key].flatten(2).square().sum(2))

    def sums(self, weights: Tensor, index: dict[int, int]) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Σ_b f_b g_b per parameter from the per-row ``weights`` (an example's K rows share its factor / K)."""
        grads, self.grads, self.done = self.grads, {}, True
        for key, params in (("weight", self.weights), ("bias", self.biases)):
            if key in grads:
                g = grads[key]
                B = g.shape[1]
                w = _per_layer(weights, params, index).reshape(-1, B, weights.shape[-1] // B)[:, :, 0]
                w = w.to(g.dtype).reshape(-1, B, *[1] * (g.dim() - 2))
                yield from zip(params, (g * w).sum(1))


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


def peers(plan: Sequence) -> frozenset[int]:
    """Ids of the plan's rows whose small records are kept for stacking (``kept_for_group``): LayerNorms of the
    built-in samplers that have a peer of the same shape and eps. A LayerNorm without one is formed on arrival."""
    from dpkit.layers import normalization

    by_key: dict[tuple, list[int]] = defaultdict(list)
    for row in plan:
        m = row.module
        if (type(m) is nn.LayerNorm and row.sampler is normalization.grad_sampler
                and row.norm_sampler is normalization.norm_sampler):
            by_key[(tuple(m.normalized_shape), m.eps)].append(id(row))
    return frozenset(i for ids in by_key.values() if len(ids) > 1 for i in ids)


def kept_for_group(cap: Capture) -> bool:
    """Whether a record whose per-example gradients are small is better kept to the end of the pass, to be stacked
    with its peers there (a LayerNorm of the built-in samplers, and small: it costs less memory than its calls
    cost time), than formed on arrival, one layer at a time."""
    from dpkit.layers import normalization

    row = cap.row
    return (type(row.module) is nn.LayerNorm and row.sampler is normalization.grad_sampler
            and row.norm_sampler is normalization.norm_sampler and _plain(cap))


def norm_groups(records: Sequence[Capture], single_use: Callable[[nn.Parameter], bool], K: int) -> list[NormGroup]:
    """Groups of two or more LayerNorm records of one shape, eps and dtype (built-in samplers); records released."""
    by_key: dict[tuple, list[tuple[Capture, list]]] = defaultdict(list)
    for cap in records:
        row = cap.row
        if not kept_for_group(cap):
            continue
        own = _own(cap, single_use)
        x = cap.args[0]
        if own is None or x.shape != cap.grads[0].shape:
            continue
        shape = tuple(row.module.normalized_shape)
        by_key[(tuple(x.shape), x.dtype, x.device, shape, row.module.eps, own[0] is None, own[1] is None)].append(
            (cap, own))
    groups = []
    for (_, _, _, shape, eps, _, _), members in by_key.items():
        if len(members) < 2:
            continue
        caps = [c for c, _ in members]
        x = torch.stack([c.args[0] for c in caps])
        g = upcast(torch.stack([c.grads[0] for c in caps]))
        x_hat = upcast(torch.nn.functional.layer_norm(x, shape, eps=eps))
        L, rows = x.shape[0], x.shape[1]
        fold = (L, rows // K, -1, *shape)  # [L, B, K*positions, *shape]
        grads = {}
        if members[0][1][0] is not None:
            grads["weight"] = (x_hat * g).reshape(fold).sum(2)
        if members[0][1][1] is not None:
            grads["bias"] = g.reshape(fold).sum(2)
        group = NormGroup(caps, [o[0] for _, o in members], [o[1] for _, o in members], grads)
        for cap in caps:
            cap.release()
            cap.group = group
        groups.append(group)
    return groups


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
