"""Per-example gradients and gradient norms for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``.

Every weight of a recurrent layer acts like a Linear applied at each time step: ``weight_ih`` to the step's input,
``weight_hh`` to the previous hidden state (``weight_hr`` to the LSTM's unprojected state), so an example's gradient
is ``Σ_t dz_t a_tᵀ`` with ``dz_t`` the gradient of the step's gate pre-activations. The layer's output gradient does
not give ``dz_t``: it takes back-propagation through time. The sampler recomputes the forward pass one layer at a
time with the layer's own fused kernel (the hidden states, so that every gate is one batched matrix product over all
steps), then runs the backward recursion by hand, vectorised over the batch and over both directions, in one loop
over time per layer. The weights then reuse the Linear formulas (``weight_sq_norms``: ghost or instantiated norm).

``activations`` are ``forward``'s ``(input, hx)``; ``input`` batch-first ``[N, T, in]``. ``hx`` is the layer's
``[L·D, N, H]`` (a tuple ``(h0, c0)`` for LSTM), except that a tensor ``hx`` of a sequence-first layer
(``batch_first=False``) arrives with its first two dimensions swapped, as dpkit's capture relays every tensor of a
sequence-first call. ``backprops`` is the output's gradient, or the gradients of every output tensor
``(output, h_n[, c_n])`` (``None`` where one got none; ``h_n`` and ``c_n`` as the layer returns them).

Refused, naming the layer: ``PackedSequence`` inputs (their rows are time steps, not examples), unbatched inputs,
and dropout between layers in training mode (the recomputation cannot replay its random draws).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, _VF, nn

from dpkit.errors import UnsupportedLayerError
from dpkit.hookspecs import GradSampler, NormSampler, hookimpl
from dpkit.layers import fold, upcast, weight_sq_norms

Recurrent = nn.RNN | nn.GRU | nn.LSTM
_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


def _refuse(layer: Recurrent, x: object) -> None:
    if not isinstance(x, Tensor):
        raise UnsupportedLayerError(
            f"{layer!r} got a {type(x).__name__} input: its per-example gradients need [N, T, in] tensors whose "
            "rows are the examples (a PackedSequence's rows are time steps). Pad the sequences instead "
            "(nn.utils.rnn.pad_packed_sequence), or leave this layer to grad_sample_mode='auto' without this sampler.")
    if x.dim() != 3:
        raise UnsupportedLayerError(f"{layer!r} got an unbatched input of shape {tuple(x.shape)}; feed [N, T, in].")
    if layer.dropout and layer.training and layer.num_layers > 1:
        raise UnsupportedLayerError(
            f"{layer!r} applies dropout between its layers in training mode; recomputing it cannot replay the random "
            "draws, so per-example gradients would be wrong. Build it with dropout=0 (stack single-layer RNNs with "
            "nn.Dropout between them if you need it).")


def _initial_state(layer: Recurrent, hx: object, x: Tensor, dirs: int) -> tuple[Tensor, Tensor | None]:
    """``h0`` ``[L·D, N, Hout]`` (and the LSTM's ``c0`` ``[L·D, N, H]``), zeros where the call gave none."""
    rows, out = x.shape[0], getattr(layer, "proj_size", 0) or layer.hidden_size
    if hx is None:
        h0 = x.new_zeros(layer.num_layers * dirs, rows, out)
        return h0, (x.new_zeros(layer.num_layers * dirs, rows, layer.hidden_size) if layer.mode == "LSTM" else None)
    if isinstance(hx, Tensor):
        return (hx if layer.batch_first else hx.transpose(0, 1)), None
    return hx[0], hx[1]


def _output_grads(layer: Recurrent, backprops: Tensor | Sequence[Tensor | None]) -> list[Tensor | None]:
    """``[output, h_n, c_n]`` gradients, ``None`` for those absent."""
    grads = [backprops] if isinstance(backprops, Tensor) else list(backprops)
    return (grads + [None, None])[:3]


def _time_major(x: Tensor, dirs: int) -> Tensor:
    """``[N, T, D·H]`` → ``[T, D, N, H]`` in each direction's own time: the reverse direction's steps reversed."""
    N, T = x.shape[:2]
    x = x.reshape(N, T, dirs, x.shape[-1] // dirs).permute(1, 2, 0, 3)
    return x if dirs == 1 else torch.stack([x[:, 0], x[:, 1].flip(0)], 1)


def _linear(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``a wᵀ + b`` per direction: ``[T, D, N, k]``, ``[D, G, k]``, ``[D, G]`` → ``[T, D, N, G]``."""
    T, D, N, k = a.shape
    flat = a.transpose(0, 1).reshape(D, T * N, k)
    out = torch.bmm(flat, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None], flat, w.transpose(1, 2))
    return out.reshape(D, T, N, -1).transpose(0, 1)


def _weights(layer: Recurrent, level: int, dirs: int) -> dict[str, Tensor]:
    """The level's weights by kind (``weight_ih``, ``bias_hh``, ...), directions stacked, detached."""
    names = layer._all_weights[level * dirs:(level + 1) * dirs]
    return {n.split("_l")[0]: torch.stack([getattr(layer, group[i]).detach() for group in names])
            for i, n in enumerate(names[0])}


def _flat_weights(layer: Recurrent, level: int, dirs: int) -> list[Tensor]:
    return [getattr(layer, n).detach() for group in layer._all_weights[level * dirs:(level + 1) * dirs] for n in group]


def _lstm(w: dict[str, Tensor], zih: Tensor, hprev: Tensor, c0: Tensor, g: Tensor, gh: Tensor | None,
          gc: Tensor | None) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
    """Back-propagation through time of one LSTM level (gates i, f, g, o).

    Returns the gate gradients (for ``weight_ih``, and for the level below), and the Linear-like parts.
    """
    T, D, N, _ = hprev.shape
    H = c0.shape[-1]
    z = (zih + _linear(hprev, w["weight_hh"], w.get("bias_hh"))).reshape(T, D, N, 4, H)
    i, f, o = z[:, :, :, (0, 1, 3)].sigmoid().unbind(3)
    gg = z[:, :, :, 2].tanh()
    c, ig = torch.empty_like(gg), i * gg
    prev = c0
    for t in range(T):  # c_t = f_t c_{t-1} + i_t g_t
        prev = torch.addcmul(ig[t], f[t], prev, out=c[t])
    tc = c.tanh()
    cprev = torch.cat([c0[None], c[:-1]])
    to_c = o * (1 - tc * tc)  # ∂c_t/∂m_t through h_t = o_t tanh(c_t), given the state's gradient
    coef = torch.stack([gg * i * (1 - i), cprev * f * (1 - f), i * (1 - gg * gg), tc * o * (1 - o)], 3)
    whh, whr = w["weight_hh"], w.get("weight_hr")
    dz = torch.empty_like(coef)
    dhs = torch.empty_like(g) if whr is not None else None
    carry = gh if gh is not None else torch.zeros_like(g[0])
    dc = gc if gc is not None else torch.zeros_like(c0)
    for t in reversed(range(T)):
        dh = g[t] + carry
        dm = dh
        if whr is not None:
            dhs[t] = dh
            dm = torch.bmm(dh, whr)
        dc = torch.addcmul(dm * to_c[t], dc, f[t + 1]) if t + 1 < T else dc + dm * to_c[t]
        torch.mul(coef[t, :, :, :3], dc[:, :, None], out=dz[t, :, :, :3])
        torch.mul(coef[t, :, :, 3], dm, out=dz[t, :, :, 3])
        carry = torch.bmm(dz[t].reshape(D, N, 4 * H), whh)
    dz = dz.reshape(T, D, N, 4 * H)
    parts = {"weight_hh": (hprev, dz), "bias_ih": (None, dz), "bias_hh": (None, dz)}
    if whr is not None:
        parts["weight_hr"] = (o * tc, dhs)
    return dz, dz, parts


def _gru(w: dict[str, Tensor], zih: Tensor, hprev: Tensor, g: Tensor, gh: Tensor | None
         ) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
    """Back-propagation through time of one GRU level: ``n = tanh(a_in + r ⊙ a_hn)``, ``h = (1-z) n + z h_prev``."""
    T, D, N, H = hprev.shape
    zhh = _linear(hprev, w["weight_hh"], w.get("bias_hh")).reshape(T, D, N, 3, H)
    zih = zih.reshape(T, D, N, 3, H)
    r, z = (zih[:, :, :, :2] + zhh[:, :, :, :2]).sigmoid().unbind(3)
    hn = zhh[:, :, :, 2]
    n = (zih[:, :, :, 2] + r * hn).tanh()
    to_n = (1 - z) * (1 - n * n)
    to_r, to_z = to_n * hn * r * (1 - r), (hprev - n) * z * (1 - z)
    coef_hh = torch.stack([to_r, to_z, to_n * r], 3)
    whh = w["weight_hh"]
    dh_all, dzhh = torch.empty_like(g), torch.empty_like(coef_hh)
    carry = gh if gh is not None else torch.zeros_like(g[0])
    for t in reversed(range(T)):
        dh = torch.add(g[t], carry, out=dh_all[t])
        torch.mul(coef_hh[t], dh[:, :, None], out=dzhh[t])
        carry = torch.baddbmm(dh * z[t], dzhh[t].reshape(D, N, 3 * H), whh)
    dzih = (torch.stack([to_r, to_z, to_n], 3) * dh_all[:, :, :, None]).reshape(T, D, N, 3 * H)
    dzhh = dzhh.reshape(T, D, N, 3 * H)
    return dzih, dzhh, {"weight_hh": (hprev, dzhh), "bias_ih": (None, dzih), "bias_hh": (None, dzhh)}


def _rnn(w: dict[str, Tensor], h: Tensor, hprev: Tensor, g: Tensor, gh: Tensor | None, relu: bool
         ) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
    """Back-propagation through time of one Elman level, ``h = act(a)``: ``act'`` read off ``h`` itself."""
    slope = (h > 0).to(h.dtype) if relu else 1 - h * h
    whh, da = w["weight_hh"], torch.empty_like(g)
    carry = gh if gh is not None else torch.zeros_like(g[0])
    for t in reversed(range(h.shape[0])):
        torch.mul(g[t] + carry, slope[t], out=da[t])
        carry = torch.bmm(da[t], whh)
    return da, da, {"weight_hh": (hprev, da), "bias_ih": (None, da), "bias_hh": (None, da)}


def _parts(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None]
           ) -> Iterator[tuple[nn.Parameter, Tensor | None, Tensor]]:
    """``(parameter, a, dz)`` per weight and bias: its gradient is ``Σ_t dz_t a_tᵀ`` (``Σ_t dz_t`` for a bias),
    with ``a`` and ``dz`` ``[N, T, ·]`` in a direction's own time (the order of t does not matter to a sum)."""
    x, hx = [*activations, None][:2]
    _refuse(layer, x)
    dirs = 2 if layer.bidirectional else 1
    h0, c0 = _initial_state(layer, hx, x, dirs)
    g_out, g_h, g_c = _output_grads(layer, backprops)
    levels, inputs, outputs = layer.num_layers, [], []
    with torch.no_grad():
        for level in range(levels):  # the forward pass, one level at a time: each level's input and hidden states
            state = h0[level * dirs:(level + 1) * dirs].contiguous()
            if c0 is not None:
                state = (state, c0[level * dirs:(level + 1) * dirs].contiguous())
            inputs.append(x)
            x = _KERNELS[layer.mode](x, state, _flat_weights(layer, level, dirs), layer.bias, 1, 0.0, False,
                                     layer.bidirectional, True)[0]
            outputs.append(x)
        N, T = x.shape[:2]
        g = _time_major(g_out, dirs) if g_out is not None else x.new_zeros(T, dirs, N, x.shape[-1] // dirs)
        for level in reversed(range(levels)):
            w = _weights(layer, level, dirs)
            hid = slice(level * dirs, (level + 1) * dirs)
            a = inputs[level].transpose(0, 1)
            a = a[:, None] if dirs == 1 else torch.stack([a, a.flip(0)], 1)
            h = _time_major(outputs[level], dirs)
            hprev = torch.cat([h0[hid][None], h[:-1]])
            zih = _linear(a, w["weight_ih"], w.get("bias_ih"))
            gh, gc = (g_h[hid] if g_h is not None else None), (g_c[hid] if g_c is not None else None)
            if layer.mode == "LSTM":
                dzih, dzhh, parts = _lstm(w, zih, hprev, c0[hid], g, gh, gc)
            elif layer.mode == "GRU":
                dzih, dzhh, parts = _gru(w, zih, hprev, g, gh)
            else:
                dzih, dzhh, parts = _rnn(w, h, hprev, g, gh, layer.mode == "RNN_RELU")
            parts["weight_ih"] = (a, dzih)
            for kind, (acts, grad) in parts.items():
                for d in range(dirs):
                    name = f"{kind}_l{level}{'_reverse' if d else ''}"
                    p = getattr(layer, name, None)
                    if p is not None and p.requires_grad:
                        yield p, None if acts is None else acts[:, d].transpose(0, 1), grad[:, d].transpose(0, 1)
            if level:  # the gradient of the level below's output: Σ_d dz_d W_ih,d in each direction's time
                down = torch.bmm(dzih.transpose(0, 1).reshape(dirs, T * N, -1), w["weight_ih"]).reshape(dirs, T, N, -1)
                down = down[0] if dirs == 1 else down[0] + down[1].flip(0)
                g = _time_major(down.transpose(0, 1), dirs)


def _empty(layer: Recurrent, activations: list) -> bool:
    """An empty batch (B = 0): nothing to recompute, and the fused kernels refuse it."""
    _refuse(layer, activations[0])
    return activations[0].shape[0] == 0


def grad_sampler(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None], K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, *p.shape]`` of every trainable weight and bias."""
    if _empty(layer, activations):
        return {p: p.new_zeros(0, *p.shape) for p in layer.parameters() if p.requires_grad}
    out = {}
    for p, a, dz in _parts(layer, activations, backprops):
        dz = fold(dz, K)
        out[p] = dz.sum(1) if a is None else torch.bmm(dz.transpose(1, 2), fold(a, K))
    return out


def norm_sampler(layer: Recurrent, activations: list, backprops: Tensor | Sequence[Tensor | None], K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example gradient norms ``[B]``, in at least float32, each weight's by the cheaper of ghost and instantiated."""
    if _empty(layer, activations):
        return {p: upcast(p.new_zeros(0)) for p in layer.parameters() if p.requires_grad}
    out = {}
    for p, a, dz in _parts(layer, activations, backprops):
        dz = fold(dz, K)
        out[p] = upcast(dz).sum(1).norm(dim=1) if a is None else weight_sq_norms(fold(a, K), dz).sqrt()
    return out


# Both read (output, h_n[, c_n]) gradients: a model that reads h_n has it in the example's gradient.
grad_sampler.all_outputs = norm_sampler.all_outputs = True


@hookimpl
def dpkit_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    return {nn.RNN: grad_sampler, nn.GRU: grad_sampler, nn.LSTM: grad_sampler}


@hookimpl
def dpkit_norm_samplers() -> dict[type[nn.Module], NormSampler]:
    return {nn.RNN: norm_sampler, nn.GRU: norm_sampler, nn.LSTM: norm_sampler}
