"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run as their ``F.linear`` calls, so that bk and auto keep the gates of the
real forward.

``torch.lstm``, ``torch.gru`` and ``torch.rnn_tanh``/``rnn_relu`` (what the layers' ``forward`` calls) hide their
gates, so the recurrent sampler replays the layer to find them. In bk and auto the capture instead runs these forms
in the real forward (``linear_forms``, ``dpkit/modes/_parts.py``), with every product by a weight an ``F.linear``
call whose output gradient the real backward hands over: that gradient is ``dz``, the gates' gradient, and the
weights' per-example gradients are ``Σ_t dz_t a_tᵀ`` over the calls (``linear_calls`` lays them out). No replay.

- GRU and Elman layers: ATen's cells written out, the input's share of the gates one call over all steps, the
  hidden state's one call per step; autograd differentiates them.
- LSTM: torch's CPU kernel (oneDNN) is fused, and the cell written out as separate autograd operations costs
  several times more than it. So each level runs as the sampler's own forward without autograd
  (``_recurrence.Level``, which keeps the gates), and one autograd node (:class:`_LSTMLevel`) over two calls per
  direction, the input's share and the hidden states' share (over all steps at once, the states read detached),
  whose backward is the sampler's back-propagation through time (``_recurrence.lstm_backward``).

Only the plain layouts take this path: a batched, non-empty tensor input, no projection (``proj_size``), no dropout
between levels in training, no autocast, and for the LSTM an initial state that needs no gradient. Any other call
runs torch's own function, and the sampler replays it (or refuses) as before. The forms equal torch's functions to
float rounding (``tests/layers/test_recurrent_forms.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from dpkit.layers import _recurrence

_VF = torch._C._VariableFunctions


def _plain(args: tuple, weights_per_cell: int) -> bool:
    """A padded call (``input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first``)
    on a batched, non-empty input whose parameters are each cell's weights and biases only, outside autocast
    (whose casts torch's kernel and these forms would place differently)."""
    if (len(args) != 9 or not isinstance(args[0], Tensor) or args[0].dim() != 3 or args[0].numel() == 0
            or torch.is_autocast_enabled(args[0].device.type)):
        return False
    params, has_biases, num_layers, dropout, train, bidirectional = args[2:8]
    cells = num_layers * (2 if bidirectional else 1)
    return len(params) == cells * (weights_per_cell if has_biases else 2) and not (dropout and train and num_layers > 1)


def _relaid(out: Tensor, batch_first: bool) -> Tensor:
    """The top level's batch-first output as the layer returns it: contiguous, sequence-first if asked."""
    return out if batch_first else out.transpose(0, 1).contiguous()


def _anchored(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor | None:
    """The bias of a call ``linear(x, w, b)``; where nothing the call reads needs a gradient (a hidden share reads
    the states detached; a first level may read the data), a view of it that does, a leaf of its own.

    The call's output must need a gradient for the backward to hand over its ``dz``; the capture would otherwise
    read the weight through such a leaf (``dpkit/modes/_parts.py``), and autograd would form that leaf's gradient,
    ``Σ dz aᵀ``, a product as large as the call's own. The bias's is a sum over the rows. The view reads the same
    parameter (the capture finds it through ``_base``), and its gradient, like the weight leaf's, is dropped."""
    if b is None or x.requires_grad or w.requires_grad or b.requires_grad:
        return b
    return b.view_as(b).requires_grad_()


def _levels(linear: Callable, x: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int,
            bidirectional: bool, states: list[tuple[Tensor, ...]], cell: Callable) -> tuple[Tensor, list]:
    """Run ``cell`` over every level and direction of batch-first ``x`` ``[N, T, in]``; ``states[j]`` is cell
    ``j``'s initial state. Returns the top level's output ``[N, T, D·H]`` and every cell's final state."""
    dirs, per = (2 if bidirectional else 1), (4 if has_biases else 2)
    finals = []
    for level in range(num_layers):
        outs = []
        for d in range(dirs):
            j = level * dirs + d
            w_ih, w_hh, *biases = params[j * per:(j + 1) * per]
            b_ih, b_hh = biases if biases else (None, None)
            ih = linear(x, w_ih, _anchored(x, w_ih, b_ih))  # the input's share of every step's gates, one call
            # One node hands out the steps (its backward stacks their gradients once); indexing each step made
            # its own backward node, which formed a zero [N, T, G] gradient per step and summed them.
            ih_t, state, steps = ih.unbind(1), states[j], [None] * x.shape[1]
            for t in (reversed(range(x.shape[1])) if d else range(x.shape[1])):
                state = cell(ih_t[t], linear(state[0], w_hh, _anchored(state[0], w_hh, b_hh)), state)
                steps[t] = state[0]
            outs.append(torch.stack(steps, 1))
            finals.append(state)
        x = outs[0] if dirs == 1 else torch.cat(outs, 2)
    return x, finals


def _gru_cell(ih: Tensor, hh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
    """ATen's GRUCell: ``r, z = σ(ih + hh)``, ``n = tanh(ih_n + r hh_n)``, ``h = (h - n) z + n``.

    Split, not sliced: a split's backward joins its parts' gradients in one pass, where each slice's formed a zero
    gradient of the whole and copied into it."""
    H = state[0].shape[-1]
    (ih_rz, ih_n), (hh_rz, hh_n) = ih.split([2 * H, H], 1), hh.split([2 * H, H], 1)
    r, z = (hh_rz + ih_rz).sigmoid().split(H, 1)
    n = torch.addcmul(ih_n, hh_n, r).tanh()
    return (torch.addcmul(n, state[0] - n, z),)


def _rnn_cell(relu: bool) -> Callable:
    """ATen's Elman cell: ``h = act(ih + hh)``."""
    def cell(ih: Tensor, hh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
        z = hh + ih
        return (z.relu() if relu else z.tanh(),)
    return cell


def _gates(ih: list[Tensor], bias_hh: Tensor | None) -> Tensor:
    """The gates' start: each direction's input share ``[N, T, 4H]`` in its own time, the hidden bias added, as
    ``[T, D, N, 4H]`` over batch-major memory ``[D, N, T, 4H]``.

    Batch-major because the backward's ``dz`` takes this layout (``lstm_backward`` forms it elementwise from the
    gates), and each direction's ``dz`` is then the calls' output gradient ``[N, T, 4H]`` as it is: no copy for
    the calls' blocks, where time-major ``dz`` cost two (one per call) of the step's largest tensors."""
    if len(ih) == 1:  # one pass, a fresh buffer: the level's forward activates the gates in place
        z = ih[0][None].clone() if bias_hh is None else torch.add(ih[0][None], bias_hh[:, None, None])
    else:
        z = torch.stack([ih[0], ih[1].flip(1)])
        z = z if bias_hh is None else z.add_(bias_hh[:, None, None])
    return z.permute(2, 0, 1, 3)


class _LSTMLevel(torch.autograd.Function):
    """One LSTM level (every direction) as one autograd node over its gates' two shares.

    The forward pass was run without autograd (``_recurrence.Level``, which keeps the gates, the cells and
    ``tanh(c)``); the node's inputs are the gates' input and hidden shares as ``F.linear`` calls made them, each
    ``[N, T, 4H]`` per direction in real time, and its backward is the recurrent sampler's back-propagation through
    time (``_recurrence.lstm_backward``), whose ``dz`` is the gradient of both shares. So the real backward hands
    the calls their ``dz``, and autograd takes the input's gradient (``dz W_ih``) and the weights' from them; no
    ATen kernel and no replay. The hidden share's call reads the states of the forward pass detached: its input
    gradient would be the recursion's, which the backward already carries."""

    @staticmethod
    def forward(ctx, level, flip, *shares):
        ctx.level, ctx.flip = level, flip
        h, c = level.h, level.c
        return _recurrence.join_time(h[1:], flip).clone(), h[-1].clone(), c[-1].clone()

    @staticmethod
    def backward(ctx, g_out, g_h, g_c):
        level, flip = ctx.level, ctx.flip
        dirs = level.h.shape[1]
        dz, _ = _recurrence.lstm_backward(level, _recurrence.split_time(g_out, dirs, flip), g_h, g_c)
        per_dir = [dz[:, d].transpose(0, 1) if d == 0 else dz[:, d].transpose(0, 1).flip(1) for d in range(dirs)]
        return (None, None, *(share for dz_d in per_dir for share in (dz_d, dz_d)))  # both shares' gradient is dz


def lstm(linear: Callable, func: Callable, *args):
    """``torch.lstm`` as :class:`_LSTMLevel` nodes over ``linear`` calls; ``func`` (torch's) for the layouts left to
    it, and where the initial state needs a gradient (the node passes none to it)."""
    if not _plain(args, 4) or any(t.requires_grad for t in args[1]):
        return func(*args)
    x, (h0, c0), params, has_biases, num_layers, _, _, bidirectional, batch_first = args
    dirs, per, flip = (2 if bidirectional else 1), (4 if has_biases else 2), _recurrence.flip
    a = x.transpose(0, 1) if batch_first else x  # time-major, real time
    finals = []
    for level in range(num_layers):
        cells = [params[j * per:(j + 1) * per] for j in range(level * dirs, (level + 1) * dirs)]
        names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"][:per]
        w = {n: torch.stack([cell[i].detach() for cell in cells]) for i, n in enumerate(names)}
        hid = slice(level * dirs, (level + 1) * dirs)
        x_bf = a.transpose(0, 1)
        ih = [linear(x_bf, cell[0], _anchored(x_bf, cell[0], cell[2] if has_biases else None))
              for cell in cells]  # [N, T, 4H]
        with torch.no_grad():
            s = _recurrence.Level("LSTM", w, _recurrence.own_time(a.detach(), dirs, flip), h0[hid], c0[hid],
                                  _gates(ih, w.get("bias_hh")))
        shares = []
        for d, cell in enumerate(cells):
            prev = s.h[:-1, d] if d == 0 else flip(s.h[:-1, d])  # [T, N, H] in real time
            prev = prev.transpose(0, 1).contiguous()  # one product, where a strided [N, T, H] made matmul batch it
            shares += [ih[d], linear(prev, cell[1], _anchored(prev, cell[1], cell[3] if has_biases else None))]
        out, h_n, c_n = _LSTMLevel.apply(s, flip, *shares)
        finals.append((h_n, c_n))
        a = out
    out = a.transpose(0, 1).contiguous() if batch_first else a
    return out, torch.cat([h for h, _ in finals]), torch.cat([c for _, c in finals])


def gru(linear: Callable, func: Callable, *args):
    """``torch.gru`` with its products through ``linear``; ``func`` (torch's) for the layouts left to it."""
    return _one_state(linear, func, args, _gru_cell)


def rnn(linear: Callable, func: Callable, *args):
    """``torch.rnn_tanh`` / ``torch.rnn_relu`` with its products through ``linear``."""
    return _one_state(linear, func, args, _rnn_cell(func is _VF.rnn_relu))


def _one_state(linear: Callable, func: Callable, args: tuple, cell: Callable):
    """A recurrence with one state per level (GRU, Elman RNN) run by ``cell``, level by level."""
    if not _plain(args, 4):
        return func(*args)
    x, h0, params, has_biases, num_layers, _, _, bidirectional, batch_first = args
    x = x if batch_first else x.transpose(0, 1)
    out, finals = _levels(linear, x, params, has_biases, num_layers, bidirectional,
                          [(h,) for h in h0.unbind(0)], cell)
    return _relaid(out, batch_first), torch.stack([h for h, in finals])


FORMS = {_VF.lstm: lstm, _VF.gru: gru, _VF.rnn_tanh: rnn, _VF.rnn_relu: rnn}


def linear_calls(layer: nn.Module, activations: list, backprops: Sequence[Tensor | None], x: Tensor, g: Tensor
                 ) -> tuple[Tensor, Tensor] | None:
    """One ``F.linear`` call of the forms batch-first, ``[N, positions, ·]``, or ``None`` (the record then falls
    back to the replay): a share over all steps ``[N, T, ·]`` (the input's; the LSTM's hidden states') as it is, a
    step's hidden state ``[N, H]`` as one position. Anything else (a packed or unbatched input, which the forms
    leave to torch) is ``None``."""
    x_in = activations[0]
    if isinstance(x_in, PackedSequence) or not isinstance(x_in, Tensor) or x_in.dim() != 3:
        return None
    N = x_in.shape[0]  # batch-first, as the sampler gets it
    if x.dim() == 3 and x.shape[0] == N and x.shape[1] == x_in.shape[1]:
        return x, g
    if x.dim() == 2 and x.shape[0] == N:
        return x[:, None], g[:, None]
    return None
