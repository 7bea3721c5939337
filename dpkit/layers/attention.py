"""Per-example gradients and gradient norms for ``nn.MultiheadAttention``.

Its weights are Linear maps: the in-projections (packed ``in_proj_weight``, or separate ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ) take the query, key and value, ``out_proj`` takes the heads' concatenated output. The
out-projection's gradient needs that output, the in-projections' the gradients of q, k and v, and neither is in the
captured record (the inputs and the output's gradient).

In ``bk`` and ``auto`` they come from the real forward and backward: ``F.multi_head_attention_forward`` applies
every weight through ``F.linear`` on (row blocks of) it, and the sampler says so with ``linear_calls``, which lays
each recorded call out batch-first (dpkit/modes/_parts.py). bk takes norms and clipped sums from those blocks with
no recomputation, and attention dropout is allowed there, since the real backward carries the real draws.
Elsewhere (``hooks``, ``ghost``), and in bk/auto when the calls cannot cover the layer (``add_bias_kv``: ``bias_k``
and ``bias_v`` are read by ``torch.cat``), the sampler recomputes the attention from the projected q, k and v and
differentiates it once over the whole batch, then applies the Linear formulas (``weight_sq_norms``: ghost or
instantiated norm). ``bias_k``/``bias_v`` get their gradient as the appended key and value.

``activations`` are ``forward``'s arguments ``(query, key, value, key_padding_mask, need_weights, attn_mask,
average_attn_weights, is_causal)``, query, key and value batch-first; the masks of a sequence-first layer
(``batch_first=False``) arrive with their first two dimensions swapped, as dpkit's capture relays every tensor of a
sequence-first call. ``backprops`` is the output's gradient, or ``(output, attention weights)`` gradients (``None``
where one got none). The out-projection's parameters are ``out_proj``'s, a child module the layer's ``forward``
reads without calling it. Refused by the recomputation, naming the layer: attention dropout in training mode (its
draws cannot be replayed) and unbatched inputs.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.errors import UnsupportedLayerError
from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import block_grads, fold, upcast, weight_sq_norms


def _name(layer: nn.MultiheadAttention) -> str:
    return f"MultiheadAttention(embed_dim={layer.embed_dim}, num_heads={layer.num_heads})"


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: masked) as the additive float mask PyTorch makes of it."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def _projections(layer: nn.MultiheadAttention) -> tuple[list[nn.Parameter | None], list[Tensor | None]]:
    """The q, k, v weights (rows of ``in_proj_weight`` or the separate ones) and biases, detached."""
    if layer.in_proj_weight is not None:
        weights = list(layer.in_proj_weight.detach().chunk(3))
    else:
        weights = [layer.q_proj_weight.detach(), layer.k_proj_weight.detach(), layer.v_proj_weight.detach()]
    biases = [None] * 3 if layer.in_proj_bias is None else list(layer.in_proj_bias.detach().chunk(3))
    return weights, biases


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def recompute(layer: nn.MultiheadAttention, activations: list, backprops: Tensor | Sequence[Tensor | None]
               ) -> tuple[list[Tensor], list[Tensor], Tensor, list[Tensor | None]]:
    """Inputs ``[x_q, x_k, x_v]``, their projections' gradients ``[dq, dk, dv]``, the heads' output (the input of
    ``out_proj``), and the gradients of the appended ``bias_k``, ``bias_v`` (``[N, 1, E]``, or ``None``).

    Self-attention through a packed weight (query, key and value one tensor) has one input and one gradient,
    ``[dq | dk | dv]`` ``[N, L, 3E]``: the packed weight's gradient is then one Linear's, and its ghost norm needs
    one Gram matrix of the input instead of three."""
    query, key, value, kpm, need_weights, attn_mask, average, is_causal = [*activations, *[None] * 8][:8]
    if query.dim() != 3:
        raise UnsupportedLayerError(f"{_name(layer)} got an unbatched query of shape {tuple(query.shape)}; feed [N, L, E].")
    if layer.dropout and layer.training:
        raise UnsupportedLayerError(
            f"{_name(layer)} applies dropout to its attention weights in training mode; recomputing it cannot replay the "
            "random draws, so per-example gradients would be wrong. Build it with dropout=0.0.")
    if not layer.batch_first:  # undo the capture's swap of a sequence-first call's dimensions 0 and 1
        kpm, attn_mask = (m.transpose(0, 1) if isinstance(m, Tensor) and m.dim() > 1 else m for m in (kpm, attn_mask))
    grads = [backprops] if isinstance(backprops, Tensor) else list(backprops)
    g_out, g_weights = (grads + [None])[:2]
    N, L, E = query.shape
    h = layer.num_heads
    weights, biases = _projections(layer)
    dtype = query.dtype
    if is_causal and kpm is None and not need_weights:  # PyTorch then ignores attn_mask for the causal hint
        attn_mask = torch.ones(L, key.shape[1], dtype=torch.bool, device=query.device).triu(1)
    attn_mask, kpm = _float_mask(attn_mask, dtype), _float_mask(kpm, dtype)
    with torch.enable_grad():
        if layer.in_proj_weight is not None and _same(query, key, value):  # self-attention: q, k, v as one product
            qkv = F.linear(query, layer.in_proj_weight.detach(), _detached(layer.in_proj_bias)).requires_grad_()
            inputs, leaves = [query], [qkv]
            q, k, v = qkv.chunk(3, -1)
        else:
            q, k, v = (F.linear(x, w, b).requires_grad_() for x, w, b in zip((query, key, value), weights, biases))
            inputs, leaves = [query, key, value], [q, k, v]
        kk, vv = k, v
        if layer.bias_k is not None:
            extra = [t.detach().expand(N, 1, E).clone().requires_grad_() for t in (layer.bias_k, layer.bias_v)]
            leaves += extra
            kk, vv = torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1)
        pad = (layer.bias_k is not None) + layer.add_zero_attn
        if layer.add_zero_attn:
            kk, vv = (F.pad(t, (0, 0, 0, 1)) for t in (kk, vv))
        S = kk.shape[1]
        mask = None
        if attn_mask is not None:
            mask = F.pad(attn_mask, (0, pad)).reshape(-1, h, L, S) if attn_mask.dim() == 3 else F.pad(attn_mask, (0, pad))
        if kpm is not None:
            kpm = F.pad(kpm, (0, pad)).reshape(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        heads = [t.unflatten(-1, (h, E // h)).transpose(1, 2) for t in (q, kk, vv)]
        scores = torch.matmul(heads[0] * (E // h) ** -0.5, heads[1].transpose(2, 3))
        scores = scores if mask is None else scores + mask  # no pass over the scores where nothing is masked
        attn = scores.softmax(-1)
        out = torch.matmul(attn, heads[2]).transpose(1, 2).reshape(N, L, E)
        outputs, wanted = [out], [g_out @ layer.out_proj.weight.detach() if g_out is not None else None]
        if g_weights is not None:
            outputs.append(attn.mean(1) if average else attn)
            wanted.append(g_weights)
        found = torch.autograd.grad([o for o, g in zip(outputs, wanted) if g is not None],
                                    leaves, [g for g in wanted if g is not None], allow_unused=True)
    found = [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, found)]
    n = len(inputs)
    return inputs, found[:n], out.detach(), (found[n:] or [None, None])


def _parts(layer: nn.MultiheadAttention, activations: list, backprops: Tensor | Sequence[Tensor | None]
           ) -> Iterator[tuple[nn.Parameter, list[tuple[Tensor | None, Tensor]]]]:
    """``(parameter, [(a, g), ...])``: its gradient is ``Σ_t g_t a_tᵀ`` (``Σ_t g_t`` where ``a`` is ``None``) over
    each pair, stacked along the parameter's first dimension (the q, k and v rows of a packed weight)."""
    inputs, dqkv, heads, extra = recompute(layer, activations, backprops)
    g_out = backprops if isinstance(backprops, Tensor) else backprops[0]
    g_out = torch.zeros_like(heads) if g_out is None else g_out
    pairs = list(zip(inputs, dqkv))
    if layer.in_proj_weight is not None:
        yield layer.in_proj_weight, pairs
    else:
        yield from ((w, [pair]) for w, pair in zip((layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight),
                                                    pairs))
    if layer.in_proj_bias is not None:
        yield layer.in_proj_bias, [(None, g) for g in dqkv]
    if layer.bias_k is not None:
        yield from ((p, [(None, g)]) for p, g in zip((layer.bias_k, layer.bias_v), extra))
    yield layer.out_proj.weight, [(heads, g_out)]
    if layer.out_proj.bias is not None:
        yield layer.out_proj.bias, [(None, g_out)]


def _empty(layer: nn.MultiheadAttention, activations: list) -> bool:
    return activations[0].shape[0] == 0


def grad_sampler(layer: nn.MultiheadAttention, activations: list, backprops: Tensor | Sequence[Tensor | None],
                 K: int = 1) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, *p.shape]`` of the in- and out-projections (and ``bias_k``, ``bias_v``)."""
    if _empty(layer, activations):
        return {p: p.new_zeros(0, *p.shape) for p in layer.parameters() if p.requires_grad}
    out = {}
    for p, pairs in _parts(layer, activations, backprops):
        if p.requires_grad:
            out[p] = block_grads(pairs, K).reshape(-1, *p.shape)
    return out


def norm_sampler(layer: nn.MultiheadAttention, activations: list, backprops: Tensor | Sequence[Tensor | None],
                 K: int = 1) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]`` in at least float32; the q, k and v blocks of a packed weight are disjoint,
    so its squared norm is theirs summed (one block when query, key and value are one tensor)."""
    if _empty(layer, activations):
        return {p: upcast(p.new_zeros(0)) for p in layer.parameters() if p.requires_grad}
    out = {}
    for p, pairs in _parts(layer, activations, backprops):
        if not p.requires_grad:
            continue
        if pairs[0][0] is None:
            out[p] = torch.cat([upcast(fold(g, K)).sum(1) for _, g in pairs], 1).norm(dim=1)
        else:
            out[p] = sum(weight_sq_norms(fold(a, K), fold(g, K), shared_input=True) for a, g in pairs).sqrt()
    return out


def _same(*tensors: Tensor) -> bool:
    """Whether the tensors are views of the same values (self-attention's query, key and value)."""
    first = tensors[0]
    return all(t.data_ptr() == first.data_ptr() and t.shape == first.shape and t.stride() == first.stride()
               for t in tensors[1:])


def blocks(layer: nn.MultiheadAttention, activations: list, backprops: Tensor | Sequence[Tensor | None]
           ) -> Iterator[tuple[nn.Parameter, list[tuple[Tensor | None, Tensor]]]]:
    """Each trainable parameter's gradient as Linear blocks (see :func:`_parts`): bk takes both the norms and the
    clipped sum from them, so the attention is recomputed once a step."""
    return ((p, pairs) for p, pairs in _parts(layer, activations, backprops) if p.requires_grad)


def linear_calls(layer: nn.MultiheadAttention, activations: list, backprops: Sequence[Tensor | None], x: Tensor,
                 g: Tensor) -> tuple[Tensor, Tensor] | None:
    """One ``F.linear`` call of ``F.multi_head_attention_forward`` batch-first, ``[N, positions, ·]``, or ``None``.

    It projects sequence-first: the in-projections read the query, key or value themselves (``[L, N, ·]``, the same
    views), the out-projection the heads' output ``[L*N, E]``, whose output gradient is the layer output's. Any
    other call, or one these checks do not confirm, is ``None``: the record then falls back to the recomputation."""
    query = activations[0]
    if query.dim() != 3:
        return None
    N, L = query.shape[:2]
    if x.dim() == 3 and x.shape[1] == N:
        a = x.movedim(1, 0)
        return (a, g.movedim(1, 0)) if any(_same(a, t) for t in activations[:3]) else None
    if x.dim() == 2 and x.shape[0] == L * N:
        a, g = (t.unflatten(0, (L, N)).movedim(1, 0) for t in (x, g))
        g_out = backprops[0]
        if g_out is None and not g.any():
            return a, g
        if g_out is not None and torch.equal(g, g_out):
            return a, g_out  # the same values, batch-first in memory as the capture relays them: no copy to lay out
    return None


# Both read the attention weights' gradient too, and compute out_proj's parameters (a child forward never calls).
grad_sampler.all_outputs = norm_sampler.all_outputs = True
grad_sampler.blocks = blocks
grad_sampler.linear_calls = linear_calls
grad_sampler.covers_children = norm_sampler.covers_children = True


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.MultiheadAttention: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.MultiheadAttention: norm_sampler}
