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

Memory: the sums are handed out one layer at a time and each record is freed once
its sum is formed, so the records shrink while the accumulator fills. The
built-in Linear forms its sum directly (``linear.weighted_sum``), weighting the
narrower of input and gradient instead of copying the gradient.

Host cost: small records of same-shaped built-in Linear and LayerNorm calls (every
block of a transformer) are stacked, and so are small same-shaped per-example
gradients, so one set of torch calls serves the whole group (``_groups.py``).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from dpkit.layers import contract, fold, reused_grams, upcast, weight_sq_norms
from dpkit.modes import _groups
from dpkit.modes import functorch as fn_mode
from dpkit.modes._capture import Capture, Capturer


def record_norms(records: Sequence[Capture], params: Sequence[nn.Parameter], batch: int, K: int,
                 capturer: Capturer) -> tuple[Tensor, dict[nn.Parameter, Tensor]]:
    """``[P, B]`` per-parameter norms of per-example (K-averaged) gradients, and the materialised gradients.

    Records formed on arrival (``form_early``) bring their gradients, which serve the clipped sum
    too. Parameters are keyed by ``id`` on this path: hashing a tensor is a Python call.
    """
    users: dict[int, list[Capture]] = defaultdict(list)
    for cap in records:
        for p in _own(cap.row):
            users[id(p)].append(cap)
    # A weight shared by Linear/Embedding calls (an embedding tied to the LM head): each call's own norm
    # from its norm sampler, plus the cross terms between calls, computed from the records (ghost style).
    crossed = {i for i, caps in users.items() if len(caps) > 1
               and all(c.row.norm_sampler is not None and _factorable(c, i) for c in caps)}
    squares: dict[int, Tensor] = {}
    materialised: dict[int, tuple[nn.Parameter, Tensor]] = {}

    def add(store: dict, key: int, t: Tensor) -> None:
        store[key] = store[key] + t if key in store else t

    with reused_grams():  # q, k and v projections of one input share its Gram matrix
        single = lambda p: len(users[id(p)]) == 1  # noqa: E731
        for group in (*_groups.linear_groups(records, single), *_groups.norm_groups(records, single, K)):
            for p, sq in group.sq_norms(K):
                add(squares, id(p), sq)
        for cap in records:
            if cap.group is not None:  # stacked with same-shaped Linear records, its norms taken above
                continue
            if cap.squares is not None:  # taken when the gradient arrived (ghost)
                for p, sq in cap.squares.items():
                    add(squares, id(p), sq)
                continue
            if cap.formed is not None:  # formed when the gradient arrived (parameters not shared)
                for p, g in cap.formed.items():
                    materialised[id(p)] = (p, g)
                continue
            row = cap.row
            own = _own(row)
            by_norm = set() if row.norm_sampler is None else {
                id(p) for p in own if len(users[id(p)]) == 1 or id(p) in crossed}
            blocks_of = getattr(row.sampler, "blocks", None)
            if len(by_norm) == len(own) and (cap.blocks is not None or (blocks_of is not None and cap.rows)):
                # Linear blocks from the forward's own F.linear calls (cap.blocks), or from the sampler's recomputation
                # done once: they serve the norms and the clipped sum.
                blocks = cap.blocks
                if blocks is None:
                    with capturer.quiet():
                        blocks = row.call(_blocks_sampler(row.sampler), cap.args, cap.grads, K, cap.bdim == 0)
                cap.release()
                cap.blocks = blocks
                for p, parts in blocks.items():
                    add(squares, id(p), sum(_block_squares(a, g, K) for a, g in parts))
                continue
            if cap.blocks is not None:  # a parameter shared with another call: per-example gradients from the blocks
                for p, g in capturer.compute(cap).items():
                    key = id(p)
                    materialised[key] = (p, materialised[key][1] + g) if key in materialised else (p, g)
                cap.release()
                continue
            if by_norm:
                with capturer.quiet():
                    got = row.call(row.norm_sampler, cap.args, cap.grads, K, cap.bdim == 0)
                for p, n in got.items():
                    if id(p) in by_norm:
                        add(squares, id(p), upcast(n).square())
            if len(by_norm) < len(own):
                for p, g in capturer.compute(cap).items():
                    key = id(p)
                    if key in by_norm:
                        continue
                    if row.sampler is None or len(users[key]) > 1:
                        # needed again for the clipped sum, or summed with another use first
                        materialised[key] = (p, materialised[key][1] + g) if key in materialised else (p, g)
                    else:
                        squares[key] = _square_norms(g, batch)
    for key in crossed:
        caps = users[key]
        for i in range(len(caps)):
            for j in range(i + 1, len(caps)):
                add(squares, key, 2 * _inner(_factor(caps[i], K), _factor(caps[j], K)))
    squares.update(_groups.square_norms({key: g for key, (_, g) in materialised.items()}, batch))
    return _table(squares, params, batch) / K, {p: g for p, g in materialised.values()}


def _own(row) -> dict[nn.Parameter, None]:
    return dict.fromkeys(row.params.values())


def _table(squares: dict[int, Tensor], params: Sequence[nn.Parameter], batch: int) -> Tensor:
    """The ``[P, B]`` norm table from squared norms keyed by parameter id, in one stack (zeros where missing)."""
    if not squares:
        return torch.zeros(len(params), batch)
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in squares.values()})
    device = next(iter(squares.values())).device
    zero = torch.zeros(batch, dtype=dtype, device=device)
    rows = [squares[id(p)].to(device, dtype) if id(p) in squares else zero for p in params]
    return torch.stack(rows).clamp_min_(0).sqrt_()


def arrival_form(plan: Sequence, K: int, streams: bool) -> Callable[[Capture], bool]:
    """The capture's ``form`` policy for bk and auto: ``form_early``, keeping small LayerNorm records that have
    peers to be stacked with, unless each record is clipped as it arrives (streaming)."""
    return functools.partial(form_early, K=K, stacked=frozenset() if streams else _groups.peers(plan))


def form_early(cap: Capture, K: int, stacked: frozenset[int] = frozenset()) -> bool:
    """Whether ``bk`` and ``auto`` form a call's per-example gradients as soon as its output gradients arrive.

    True for torch.func units (their gradients are formed anyway) and for calls whose per-example gradients
    have no more entries than their record (a LayerNorm, a convolution, a short sequence): the record is
    freed at once and the gradients serve the norms and the clipped sum. A small record of a row in ``stacked``
    (a LayerNorm with same-shaped peers) is kept instead, to be stacked with theirs: it costs less memory than
    time.
    """
    if cap.row.sampler is None:
        return True
    if id(cap.row) in stacked and _groups.kept_for_group(cap):  # small: stacked with its peers at the pass's end
        return False
    record = sum(a.numel() for a in cap.args if isinstance(a, Tensor) and a.is_floating_point())
    record += sum(g.numel() for g in cap.grads if g is not None)
    return sum(p.numel() for p in cap.row.local_params.values()) * max(cap.rows // K, 1) <= record


def _square_norms(g: Tensor, batch: int) -> Tensor:
    return upcast(g.reshape(batch, -1 if batch else 0)).square().sum(1)


def _factorable(cap: Capture, key: int) -> bool:
    module = cap.row.module
    return type(module) in (nn.Linear, nn.Embedding) and key == id(module.weight) and cap.row.uses_activations


def _factor(cap: Capture, K: int) -> tuple[str, Tensor, Tensor]:
    """The call's weight gradient as Σ_t left_t ⊗ right_t per example: Linear g_t ⊗ a_t, Embedding e_idx ⊗ g_t."""
    x, g = cap.args[0], cap.grads[0]
    if cap.bdim != 0:
        x, g = x.movedim(1, 0), g.movedim(1, 0)
    g = fold(g, K)
    if isinstance(cap.row.module, nn.Embedding):
        idx = x.reshape(g.shape[0], g.shape[1])
        pad = cap.row.module.padding_idx
        if pad is not None:
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        return "index", idx, g
    return "dense", g, fold(x, K)


def _inner(f1: tuple[str, Tensor, Tensor], f2: tuple[str, Tensor, Tensor]) -> Tensor:
    """Per-example ⟨G₁, G₂⟩ = Σ_{t,s} ⟨left_t, left'_s⟩⟨right_t, right'_s⟩, without forming G (cost B·T·S·d)."""
    (k1, l1, r1), (k2, l2, r2) = f1, f2
    right = contract("btd,bsd->bts", upcast(r1), upcast(r2))
    if k1 == k2 == "dense":
        left = contract("bto,bso->bts", upcast(l1), upcast(l2))
    elif k1 == k2 == "index":
        left = (l1.unsqueeze(2) == l2.unsqueeze(1)).to(right.dtype)
    elif k1 == "index":  # row idx_t of the dense factor: l2[b, s, idx_t]
        left = upcast(l2).gather(2, l1.unsqueeze(1).expand(-1, l2.shape[1], -1)).transpose(1, 2)
    else:
        left = upcast(l1).gather(2, l2.unsqueeze(1).expand(-1, l1.shape[1], -1))
    return (left * right).sum((1, 2))


def record_sums(records: Sequence[Capture], params: Sequence[nn.Parameter], factors: Tensor, K: int,
                materialised: dict[nn.Parameter, Tensor], capturer: Capturer) -> Iterator[tuple[nn.Parameter, Tensor]]:
    """Σ_i f_i g_i per parameter and record, from the records and the materialised gradients.

    ``factors`` is ``[B]`` or ``[P, B]``. Yields one layer's sums at a time, so that the caller can add each
    into its accumulator and drop it before the next is formed; a tied weight's uses come separately. Empties
    ``materialised`` and frees each record as it goes.
    """
    index = {id(p): i for i, p in enumerate(params)}
    per_layer = factors.dim() == 2
    weights = (factors / K).repeat_interleave(K, dim=-1)  # per row: an example's K copies share its factor
    formed = {id(p) for p in materialised}
    yield from _groups.weighted_sums(materialised, factors, index, K)  # each group freed once used
    for cap in records:
        if cap.rows == 0:
            continue
        if cap.group is not None:  # the group's sums come at its first record, in one stacked product
            if not cap.group.done:
                yield from cap.group.sums(weights, index)
            continue
        if cap.blocks is not None:
            for p, parts in cap.blocks.items():
                yield p, _blocks_sum(parts, weights[index[id(p)]] if per_layer else weights).reshape(p.shape)
            cap.release()
            continue
        todo = [p for p in cap.row.local_params.values() if id(p) not in formed]
        # One call per distinct factor vector: flat clipping needs one, per-layer clipping one per parameter.
        groups = [[p] for p in todo] if per_layer else [todo] if todo else []
        for group in groups:
            wanted = {id(p) for p in group}
            w = weights[index[id(group[0])]] if per_layer else weights
            for p, s in _weighted_sum(cap, w, capturer).items():
                if id(p) in wanted:
                    yield p, s
        cap.release()  # the record's last use: free it before the next sum


def _blocks_sampler(sampler):
    """``sampler.blocks`` in the shape ``LayerPlan.call`` calls samplers with (it reads the same outputs)."""
    def blocks(layer: nn.Module, activations: list, backprops, K: int) -> dict[nn.Parameter, list]:
        return dict(sampler.blocks(layer, activations, backprops))

    blocks.all_outputs = getattr(sampler, "all_outputs", False)
    return blocks


def _block_squares(a: Tensor | None, g: Tensor, K: int) -> Tensor:
    """``[B]`` squared norms of one block of the K-summed gradient: ``Σ_t g_t a_tᵀ``, or ``Σ_t g_t`` without ``a``."""
    if a is None:
        return upcast(fold(g, K)).sum(1).square().sum(1)
    return weight_sq_norms(fold(a, K), fold(g, K))


def _blocks_sum(parts: list, weights: Tensor) -> Tensor:
    """Σ over rows of each row's weight times its gradient, block by block, stacked along the first dimension.

    The weights go on the narrower of a block's input and output gradient (an LSTM's gates are 4× its input),
    and a bias block takes them in a product, so that no weighted copy of the wide side is made."""
    sums = []
    for a, g in parts:
        w = weights.to(g.dtype)
        if a is None:
            sums.append(w @ g.reshape(g.shape[0], -1, g.shape[-1]).sum(1))
            continue
        a = a.to(g.dtype)
        if a.shape[-1] < g.shape[-1]:
            a = a * w.reshape(-1, *[1] * (a.dim() - 1))
        else:
            g = g * w.reshape(-1, *[1] * (g.dim() - 1))
        sums.append(g.flatten(0, -2).T @ a.flatten(0, -2))
    return sums[0] if len(sums) == 1 else torch.cat(sums, 0)


def _weighted_sum(cap: Capture, weights: Tensor, capturer: Capturer) -> dict[nn.Parameter, Tensor]:
    """Σ over rows of each row's gradient times its weight, for the layer of one record."""
    row, bdim = cap.row, cap.bdim
    direct = _direct_sum(row.sampler)
    if direct is not None:
        with capturer.quiet():
            return row.call(functools.partial(_without_k, direct, weights=weights), cap.args, cap.grads, 1, bdim == 0)
    dims = fn_mode.output_batch_dims(row.module, capturer.batch_first, cap.grads)
    dims[0] = bdim
    grads = [None if g is None else _weighted(g, weights, d) for g, d in zip(cap.grads, dims)]
    g = grads[0]
    with capturer.quiet():
        if row.sampler is not None:
            # All rows as the K copies of one example: the sampler returns their sum, shape [1, *p.shape].
            return {p: s[0] for p, s in row.call(row.sampler, cap.args, grads, cap.rows, bdim == 0).items()}
        own = list(row.local_params.values())
        with torch.enable_grad():
            out = row.module(*cap.args)
            grads = torch.autograd.grad(out, own, g, allow_unused=True)
    return {p: s for p, s in zip(own, grads) if s is not None}


def _weighted(g: Tensor, weights: Tensor, dim: int) -> Tensor:
    """Each row of ``g`` (along ``dim``) times its weight, into a fresh contiguous tensor in one pass, so that the
    sampler's reshapes are views."""
    shape = [1] * g.dim()
    shape[dim] = -1
    return torch.mul(g, weights.to(g.dtype).reshape(shape), out=torch.empty(g.shape, dtype=g.dtype, device=g.device))


def _without_k(direct, layer: nn.Module, activations: list, backprops: Tensor, K: int, *, weights: Tensor):
    return direct(layer, activations, backprops, weights)


def _direct_sum(sampler):
    """A built-in grad sampler's direct weighted sum (used only while that sampler is the one registered)."""
    from dpkit.layers import embedding, linear  # plugin modules: loaded with the plugin manager, not with dpkit

    return {linear.grad_sampler: linear.weighted_sum, embedding.grad_sampler: embedding.weighted_sum}.get(sampler)
