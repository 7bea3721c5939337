"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run as their ``F.linear`` calls, so that bk and auto keep the gates of the
real forward.

``torch.lstm``, ``torch.gru`` and ``torch.rnn_tanh``/``rnn_relu`` (what the layers' ``forward`` calls) hide their gates, so the recurrent sampler
replays the layer to find them. In bk and auto the capture instead runs these forms in the real forward
(``linear_forms``, ``dpkit/modes/_parts.py``): the same arithmetic as ATen's cells, with every product by a weight
an ``F.linear`` call, the input's share of the gates one call over all steps and the hidden state's one call per
step. The real backward then hands over each call's output gradient, which is ``dz``, the gates' gradient, and
the weights' per-example gradients are ``Σ_t dz_t a_tᵀ`` over the calls (``linear_calls`` lays them out): no
replay and no hand-written back-propagation through time.

Only the plain layouts take this path: a batched tensor input, no projection (``proj_size``), no dropout between
levels in training, no autocast. Any other call runs torch's own function, and the sampler replays it (or refuses) as before.
The forms equal torch's functions to float rounding (``tests/layers/test_recurrent_forms.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

_VF = torch._C._VariableFunctions


def _plain(args: tuple, weights_per_cell: int) -> bool:
    """A padded call (``input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first``)
    on a batched input whose parameters are each cell's weights and biases only, outside autocast (whose casts
    torch's kernel and these forms would place differently)."""
    if (len(args) != 9 or not isinstance(args[0], Tensor) or args[0].dim() != 3
            or torch.is_autocast_enabled(args[0].device.type)):
        return False
    params, has_biases, num_layers, dropout, train, bidirectional = args[2:8]
    cells = num_layers * (2 if bidirectional else 1)
    return len(params) == cells * (weights_per_cell if has_biases else 2) and not (dropout and train and num_layers > 1)


def _relaid(out: Tensor, batch_first: bool) -> Tensor:
    """The top level's batch-first output as the layer returns it: contiguous, sequence-first if asked."""
    return out if batch_first else out.transpose(0, 1).contiguous()


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
            ih = linear(x, w_ih, b_ih)  # the input's share of every step's gates, one call
            state, steps = states[j], [None] * x.shape[1]
            for t in (reversed(range(x.shape[1])) if d else range(x.shape[1])):
                state = cell(ih[:, t], linear(state[0], w_hh, b_hh), state)
                steps[t] = state[0]
            outs.append(torch.stack(steps, 1))
            finals.append(state)
        x = outs[0] if dirs == 1 else torch.cat(outs, 2)
    return x, finals


def _lstm_cell(ih: Tensor, hh: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """ATen's LSTMCell: gates i, f, g, o; ``c = f c + i g``, ``h = o tanh(c)``."""
    H = state[1].shape[-1]
    gates = hh + ih
    s, g = gates.sigmoid(), gates[:, 2 * H:3 * H].tanh()
    c = torch.addcmul(s[:, H:2 * H] * state[1], s[:, :H], g)
    return s[:, 3 * H:] * c.tanh(), c


def _gru_cell(ih: Tensor, hh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
    """ATen's GRUCell: ``r, z = σ(ih + hh)``, ``n = tanh(ih_n + r hh_n)``, ``h = (h - n) z + n``."""
    H = state[0].shape[-1]
    rz = (hh[:, :2 * H] + ih[:, :2 * H]).sigmoid()
    n = torch.addcmul(ih[:, 2 * H:], hh[:, 2 * H:], rz[:, :H]).tanh()
    return (torch.addcmul(n, state[0] - n, rz[:, H:]),)


def _rnn_cell(relu: bool) -> Callable:
    """ATen's Elman cell: ``h = act(ih + hh)``."""
    def cell(ih: Tensor, hh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
        z = hh + ih
        return (z.relu() if relu else z.tanh(),)
    return cell


def lstm(linear: Callable, func: Callable, *args):
    """``torch.lstm`` with its products through ``linear``; ``func`` (torch's) for the layouts left to it."""
    if not _plain(args, 4):
        return func(*args)
    x, (h0, c0), params, has_biases, num_layers, _, _, bidirectional, batch_first = args
    x = x if batch_first else x.transpose(0, 1)
    out, finals = _levels(linear, x, params, has_biases, num_layers, bidirectional,
                          list(zip(h0.unbind(0), c0.unbind(0))), _lstm_cell)
    return (_relaid(out, batch_first), torch.stack([h for h, _ in finals]),
            torch.stack([c for _, c in finals]))


def gru(linear: Callable, func: Callable, *args):
    """``torch.gru`` with its products through ``linear``; ``func`` (torch's) for the layouts left to it."""
    if not _plain(args, 4):
        return func(*args)
    x, h0, params, has_biases, num_layers, _, _, bidirectional, batch_first = args
    x = x if batch_first else x.transpose(0, 1)
    out, finals = _levels(linear, x, params, has_biases, num_layers, bidirectional,
                          [(h,) for h in h0.unbind(0)], _gru_cell)
    return _relaid(out, batch_first), torch.stack([h for h, in finals])


def rnn(linear: Callable, func: Callable, *args):
    """``torch.rnn_tanh`` / ``torch.rnn_relu`` with its products through ``linear``."""
    if not _plain(args, 4):
        return func(*args)
    x, h0, params, has_biases, num_layers, _, _, bidirectional, batch_first = args
    x = x if batch_first else x.transpose(0, 1)
    out, finals = _levels(linear, x, params, has_biases, num_layers, bidirectional,
                          [(h,) for h in h0.unbind(0)], _rnn_cell(func is _VF.rnn_relu))
    return _relaid(out, batch_first), torch.stack([h for h, in finals])


FORMS = {_VF.lstm: lstm, _VF.gru: gru, _VF.rnn_tanh: rnn, _VF.rnn_relu: rnn}


def linear_calls(layer: nn.Module, activations: list, backprops: Sequence[Tensor | None], x: Tensor, g: Tensor
                 ) -> tuple[Tensor, Tensor] | None:
    """One ``F.linear`` call of the forms batch-first, ``[N, positions, ·]``, or ``None`` (the record then falls
    back to the replay): the input's share ``[N, T, in]`` as it is, a step's hidden state ``[N, H]`` as one
    position. Anything else (a packed or unbatched input, which the forms leave to torch) is ``None``."""
    x_in = activations[0]
    if isinstance(x_in, PackedSequence) or not isinstance(x_in, Tensor) or x_in.dim() != 3:
        return None
    N = x_in.shape[0]  # batch-first, as the sampler gets it
    if x.dim() == 3 and x.shape[0] == N and x.shape[1] == x_in.shape[1]:
        return x, g
    if x.dim() == 2 and x.shape[0] == N:
        return x[:, None], g[:, None]
    return None
