"""Per-example gradients and gradient norms for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``.

Every weight of a recurrent layer acts like a Linear applied at each time step: ``weight_ih`` to the step's input,
``weight_hh`` to the previous hidden state (``weight_hr`` to the LSTM's unprojected state), so an example's gradient
is ``Σ_t dz_t a_tᵀ`` with ``dz_t`` the gradient of the step's gate pre-activations. The layer's output gradient does
not give ``dz_t``: it takes back-propagation through time. The sampler replays the forward pass one level at a time,
keeping the gates it needs (the input's share of every gate is one matrix product over all steps, the hidden
state's one product per step), then runs the backward recursion by hand; both loops over time are vectorised over
the batch and over both directions. Replaying the gates costs one forward pass; replaying only the hidden states
with the fused kernel and forming the gates from them afterwards would cost two.

The weights then reuse the Linear formulas (ghost or instantiated norm, as ``weight_sq_norms`` picks). Parameters
whose gradients share ``dz`` (an LSTM's or Elman RNN's ``weight_ih`` and ``weight_hh``, and its two biases) share
its Gram matrix and its sum over time.

``activations`` are ``forward``'s ``(input, hx)``; ``input`` batch-first ``[N, T, in]``. ``hx`` is the layer's
``[L·D, N, H]`` (a tuple ``(h0, c0)`` for LSTM), except that a tensor ``hx`` of a sequence-first layer
(``batch_first=False``) arrives with its first two dimensions swapped, as dpkit's capture relays every tensor of a
sequence-first call. ``backprops`` is the output's gradient, or the gradients of every output tensor
``(output, h_n[, c_n])`` (``None`` where one got none; ``h_n`` and ``c_n`` as the layer returns them).

A ``PackedSequence`` input (rows: the steps of every example, ``batch_sizes`` per step) is unpacked to the padded
``[T, N, ·]`` of the caller's (unsorted) order, zeros past each example's length ``L_b``. The reverse direction's own
time is each example's reversal within its length (``L_b - 1 - t``), so in every direction an example's steps come
first and its padding after them: the replay runs on through the padding, which changes nothing before it, and
``h_n``/``c_n`` are the states after step ``L_b - 1``, where their gradients enter the backward recursion. A padded
step gets no output gradient and passes none back, so its ``dz`` is exactly zero and it adds nothing. The capture
hands such a call the gradients of the packed output's leaves ``(data, batch_sizes, [sorted_indices,
unsorted_indices,] h_n[, c_n])``; ``data``'s is ``[Σ L_b, D·H]`` (swapped, like every tensor, for a sequence-first
layer).

Refused, naming the layer: unbatched inputs, and dropout between layers in training mode (the recomputation cannot
replay its random draws).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from dpkit.errors import UnsupportedLayerError
from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import _gram, _recurrent_forms, fold, upcast, weight_sq_norms
from dpkit.layers._recurrence import Recurrent
from dpkit.layers import _recurrence as cell

# One group of parameters whose gradients share the same dz, time-major ``[T, N, ·]`` in a direction's own time:
# (dz, [(weight, its input)], [biases]).
Group = tuple[Tensor, list[tuple[nn.Parameter, Tensor]], list[nn.Parameter]]


def _refuse(layer: Recurrent, x: object) -> None:
    if not isinstance(x, Tensor | PackedSequence):
        raise UnsupportedLayerError(
            f"{layer!r} got a {type(x).__name__} input: its per-example gradients need an [N, T, in] tensor or a "
            "PackedSequence.")
    if isinstance(x, Tensor) and x.dim() != 3:
        raise UnsupportedLayerError(f"{layer!r} got an unbatched input of shape {tuple(x.shape)}; feed [N, T, in].")
    if layer.dropout and layer.training and layer.num_layers > 1:
        raise UnsupportedLayerError(
            f"{layer!r} applies dropout between its layers in training mode; recomputing it cannot replay the random "
            "draws, so per-example gradients would be wrong. Build it with dropout=0 (stack single-layer RNNs with "
            "nn.Dropout between them if you need it).")


def _initial_state(layer: Recurrent, hx: object, x: Tensor, dirs: int) -> tuple[Tensor, Tensor | None]:
    """``h0`` ``[L·D, N, Hout]`` (and the LSTM's ``c0`` ``[L·D, N, H]``), zeros where the call gave none; ``x``
    time-major."""
    rows, out = x.shape[1], getattr(layer, "proj_size", 0) or layer.hidden_size
    if hx is None:
        h0 = x.new_zeros(layer.num_layers * dirs, rows, out)
        return h0, (x.new_zeros(layer.num_layers * dirs, rows, layer.hidden_size) if layer.mode == "LSTM" else None)
    if isinstance(hx, Tensor):
        return (hx if layer.batch_first else hx.transpose(0, 1)), None
    return hx[0], hx[1]


def _output_grads(layer: Recurrent, backprops: Tensor | Sequence[Tensor | None], packed: bool
                  ) -> list[Tensor | None]:
    """``[output, h_n, c_n]`` gradients, ``None`` for those absent; a packed output's ``batch_sizes`` and indices,
    which take no gradient, left out."""
    grads = [backprops] if isinstance(backprops, Tensor) else list(backprops)
    if packed and len(grads) > 1:
        grads = [grads[0], *grads[-(2 if layer.mode == "LSTM" else 1):]]
    return (grads + [None, None])[:3]


class _Packed:
    """Where a ``PackedSequence``'s rows sit in the padded time-major ``[T, N, ·]`` of the unsorted batch, and
    each example's reversal within its length (the reverse direction's own time)."""

    def __init__(self, seq: PackedSequence):
        device, sizes = seq.data.device, seq.batch_sizes
        T, N = len(sizes), int(sizes[0])
        self.time = torch.repeat_interleave(torch.arange(T), sizes).to(device)
        starts = (sizes.cumsum(0) - sizes).to(device)
        rank = torch.arange(seq.data.shape[0], device=device) - starts[self.time]  # position in the sorted batch
        self.example = rank if seq.sorted_indices is None else seq.sorted_indices[rank]
        lengths = (sizes[None, :] > torch.arange(N)[:, None]).sum(1).to(device)  # in the sorted batch
        self.lengths = lengths if seq.unsorted_indices is None else lengths[seq.unsorted_indices]
        t = torch.arange(T, device=device)[:, None]
        self.reverse = torch.where(t < self.lengths, self.lengths - 1 - t, t)  # [T, N]; padding stays put
        self.columns = torch.arange(N, device=device)
        self.shape = (T, N)

    def pad(self, rows: Tensor) -> Tensor:
        """``[Σ L_b, k]`` packed rows → ``[T, N, k]``, zeros past each example's length."""
        out = rows.new_zeros(*self.shape, rows.shape[-1])
        out[self.time, self.example] = rows
        return out

    def flip(self, x: Tensor) -> Tensor:
        """``[T, N, ...]``: each example's steps reversed within its length, its padding left in place."""
        return x[self.reverse, self.columns]

    def at_ends(self, g: Tensor, grad: Tensor | None) -> Tensor:
        """``g`` ``[T, D, N, k]`` plus ``grad`` ``[D, N, k]`` at each example's last step: a final state's gradient
        enters where that example's recursion ends."""
        if grad is not None:
            D, N = grad.shape[:2]
            index = ((self.lengths - 1)[None], torch.arange(D, device=g.device)[:, None], self.columns[None])
            g = g.index_put(index, grad, accumulate=True)
        return g


def _groups(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None]) -> Iterator[Group]:
    """The layer's parameter groups, one level and direction at a time: each weight's gradient is ``Σ_t dz_t a_tᵀ``,
    each bias's ``Σ_t dz_t``, with ``dz`` and ``a`` ``[T, N, ·]`` in a direction's own time (the order of t does not
    matter to a sum). Frozen and absent parameters are left out."""
    x, hx = [*activations, None][:2]
    _refuse(layer, x)
    dirs = 2 if layer.bidirectional else 1
    packed = _Packed(x) if isinstance(x, PackedSequence) else None
    g_out, g_h, g_c = _output_grads(layer, backprops, packed is not None)
    if packed is None:
        flip, x = cell.flip, x.transpose(0, 1)
        g_out = g_out.transpose(0, 1) if g_out is not None else None
    else:  # the data's gradient arrives swapped under a sequence-first layer, as every tensor does
        # The capture widens a call's tensors to one dtype, not a PackedSequence's data (under autocast the layer's
        # output, so its gradients, can be narrower than its input): widen them here alike.
        wide = functools.reduce(torch.promote_types, [t.dtype for t in (x.data, g_out, g_h, g_c) if t is not None])
        g_out, g_h, g_c = (t.to(wide) if t is not None else None for t in (g_out, g_h, g_c))
        flip, x = packed.flip, packed.pad(x.data.to(wide))
        g_out = packed.pad(g_out if layer.batch_first else g_out.transpose(0, 1)) if g_out is not None else None
    h0, c0 = _initial_state(layer, hx, x, dirs)
    T, N = x.shape[:2]
    with torch.no_grad():
        states, a = [], cell.own_time(x, dirs, flip)
        for level in range(layer.num_layers):  # the forward pass, one level at a time
            hid = slice(level * dirs, (level + 1) * dirs)
            states.append(cell.Level(layer.mode, cell.weights(layer, level, dirs), a, h0[hid], c0[hid] if c0 is not None
                                 else None))
            if level + 1 < layer.num_layers:
                a = cell.own_time(cell.join_time(states[-1].h[1:], flip), dirs, flip)
        top = states[-1].h
        g = cell.split_time(g_out, dirs, flip) if g_out is not None else top.new_zeros(top[1:].shape)
        for level in reversed(range(layer.num_layers)):
            s, hid = states.pop(), slice(level * dirs, (level + 1) * dirs)
            gh, gc = (g_h[hid] if g_h is not None else None), (g_c[hid] if g_c is not None else None)
            if packed is not None:  # the final states' gradients enter at each example's own last step
                g, gh = packed.at_ends(g, gh), None
                gc = packed.at_ends(s.c[1:].new_zeros(s.c[1:].shape), gc) if gc is not None else None
            if layer.mode == "LSTM":
                dzih, groups = cell.lstm_backward(s, g, gh, gc)
            elif layer.mode == "GRU":
                dzih, groups = cell.gru_backward(s, g, gh)
            else:
                dzih, groups = cell.rnn_backward(s, g, gh)
            for dz, weights, biases in groups:
                for d in range(dirs):
                    suffix = f"_l{level}{'_reverse' if d else ''}"
                    own = [(p, acts[:, d]) for kind, acts in weights
                           if (p := getattr(layer, kind + suffix, None)) is not None and p.requires_grad]
                    bias = [p for kind in biases if (p := getattr(layer, kind + suffix, None)) is not None
                            and p.requires_grad]
                    if own or bias:
                        yield dz[:, d], own, bias
            if level:  # the gradient of the level below's output, from every direction's gates
                w_ih = s.w["weight_ih"]
                down = torch.bmm(dzih.transpose(0, 1).reshape(dirs, T * N, -1), w_ih).reshape(dirs, T, N, -1)
                down = down[0] if dirs == 1 else down[0] + flip(down[1])
                g = cell.split_time(down, dirs, flip)


def _fold(x: Tensor, K: int) -> Tensor:
    """Time-major ``[T, B*K, d]`` → ``[B, K*T, d]``. All rows one example (bk's clipped sum) keeps the memory's order,
    a view where ``fold`` would copy; any order serves, as long as ``dz`` and ``a`` are folded alike."""
    if K == x.shape[1]:
        return x.reshape(1, -1, x.shape[-1])
    return fold(x.transpose(0, 1), K)


def _empty(layer: Recurrent, activations: list) -> bool:
    """An empty batch (B = 0): nothing to recompute. (torch cannot pack one: a PackedSequence holds an example.)"""
    x = activations[0]
    _refuse(layer, x)
    return not isinstance(x, PackedSequence) and x.shape[0] == 0


def grad_sampler(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None], K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, *p.shape]`` of every trainable weight and bias."""
    if _empty(layer, activations):
        return {p: p.new_zeros(0, *p.shape) for p in layer.parameters() if p.requires_grad}
    out = {}
    for dz, weights, biases in _groups(layer, activations, backprops):
        g = _fold(dz, K)
        for p, a in weights:
            out[p] = torch.bmm(g.transpose(1, 2), _fold(a, K))
        if biases:
            total = g.sum(1)
            out.update((p, total if j == 0 else total.clone()) for j, p in enumerate(biases))
    return out


def norm_sampler(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None], K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]``, in at least float32, each weight's by the cheaper of ghost and instantiated;
    weights of one ``dz`` share its Gram matrix, biases of one ``dz`` their norm."""
    if _empty(layer, activations):
        return {p: upcast(p.new_zeros(0)) for p in layer.parameters() if p.requires_grad}
    out = {}
    for dz, weights, biases in _groups(layer, activations, backprops):
        g = _fold(dz, K)
        gram = None
        for p, a in weights:
            a = _fold(a, K)
            T, d, q = a.shape[1], a.shape[2], g.shape[2]
            if T * (q + d) < q * d:  # weight_sq_norms's rule; the Gram matrix of g formed once for the group
                gram = _gram(g, False) if gram is None else gram
                out[p] = (_gram(a, False) * gram).sum((1, 2)).clamp_min(0).sqrt()
            else:
                out[p] = weight_sq_norms(a, g).sqrt()
        if biases:
            norm = upcast(g).sum(1).norm(dim=1)
            out.update((p, norm) for p in biases)
    return out


def blocks(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None]
           ) -> Iterator[tuple[nn.Parameter, list[tuple[Tensor | None, Tensor]]]]:
    """Each trainable parameter's gradient as Linear blocks ``[(a, dz)]`` (``[(None, dz)]`` for a bias), batch
    first: bk takes both the norms and the clipped sum from them, so the recurrence is replayed once a step."""
    for dz, weights, biases in _groups(layer, activations, backprops):
        g = dz.transpose(0, 1)
        for p, a in weights:
            yield p, [(a.transpose(0, 1), g)]
        for p in biases:
            yield p, [(None, g)]


# Both read (output, h_n[, c_n]) gradients: a model that reads h_n has it in the example's gradient.
grad_sampler.all_outputs = norm_sampler.all_outputs = True
grad_sampler.blocks = blocks
# bk and auto run LSTM, GRU and Elman layers as F.linear calls and take the gates' gradients from the real backward
# (_recurrent_forms.py); the replay above serves the other modes and the layouts the forms leave to torch.
grad_sampler.linear_calls = _recurrent_forms.linear_calls
grad_sampler.linear_forms = _recurrent_forms.FORMS


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.RNN: grad_sampler, nn.GRU: grad_sampler, nn.LSTM: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.RNN: norm_sampler, nn.GRU: norm_sampler, nn.LSTM: norm_sampler}
