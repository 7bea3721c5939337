"""One level of a recurrent layer, replayed with its gates kept, and its back-propagation through time by hand.

Shared by the recurrent sampler (``recurrent.py``), which replays a layer to find the gates its fused kernel hides,
and by the forms (``_recurrent_forms.py``), whose LSTM runs each level as this forward without autograd and takes
this backward as its autograd node's. Time helpers: in every direction an example's own time runs first
(``own_time``/``split_time``/``join_time`` turn the layer's layout into it and back).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Recurrent = nn.RNN | nn.GRU | nn.LSTM


def flip(x: Tensor) -> Tensor:
    return x.flip(0)


def own_time(x: Tensor, dirs: int, flip: Callable[[Tensor], Tensor]) -> Tensor:
    """``[T, N, k]`` in real time → ``[T, D, N, k]``, the same input in each direction's own time."""
    return x[:, None] if dirs == 1 else torch.stack([x, flip(x)], 1)


def split_time(x: Tensor, dirs: int, flip: Callable[[Tensor], Tensor]) -> Tensor:
    """``[T, N, D·H]`` in real time → ``[T, D, N, H]``, each direction's part in its own time."""
    T, N = x.shape[:2]
    x = x.reshape(T, N, dirs, x.shape[-1] // dirs).transpose(1, 2)
    return x if dirs == 1 else torch.stack([x[:, 0], flip(x[:, 1])], 1)


def join_time(x: Tensor, flip: Callable[[Tensor], Tensor]) -> Tensor:
    """``[T, D, N, H]`` in each direction's own time → ``[T, N, D·H]`` in real time (the layer's output)."""
    return x[:, 0] if x.shape[1] == 1 else torch.cat([x[:, 0], flip(x[:, 1])], -1)


def linear(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``a wᵀ + b`` per direction, as one product over all steps: ``[T, D, N, k]``, ``[D, G, k]``, ``[D, G]`` →
    ``[T, D, N, G]`` (a view of direction-major memory, which per-step slices read as well)."""
    T, D, N, k = a.shape
    flat = a.transpose(0, 1).reshape(D, T * N, k)
    out = torch.bmm(flat, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None], flat, w.transpose(1, 2))
    return out.reshape(D, T, N, -1).transpose(0, 1)


def weights(layer: Recurrent, level: int, dirs: int) -> dict[str, Tensor]:
    """The level's weights by kind (``weight_ih``, ``bias_hh``, ...), directions stacked, detached."""
    names = layer._all_weights[level * dirs:(level + 1) * dirs]
    return {n.split("_l")[0]: torch.stack([getattr(layer, group[i]).detach() for group in names])
            for i, n in enumerate(names[0])}


def input_bias(w: dict[str, Tensor]) -> Tensor | None:
    """The bias added to the input's share of the gates: both biases where they add (LSTM, Elman RNN)."""
    return None if "bias_ih" not in w else w["bias_ih"] + w["bias_hh"]


class Level:
    """One level's replayed forward pass (per cell: what its backward recursion reads), all ``[T, D, N, ·]`` in each
    direction's own time, and ``h`` ``[T + 1, D, N, Hout]`` with ``h[0]`` the initial state."""

    def __init__(self, mode: str, w: dict[str, Tensor], a: Tensor, h0: Tensor, c0: Tensor | None,
                 z: Tensor | None = None):
        self.a, self.w = a, w
        T = a.shape[0]
        self.h = a.new_empty(T + 1, *h0.shape)
        self.h[0] = h0
        if mode == "LSTM":
            self._lstm(w, a, c0, z)
        elif mode == "GRU":
            self._gru(w, a)
        else:
            self._rnn(w, a, relu=mode == "RNN_RELU")

    def _lstm(self, w: dict[str, Tensor], a: Tensor, c0: Tensor, z: Tensor | None) -> None:
        """Gates i, f, g, o (activated in place), ``c`` ``[T + 1, ...]`` and ``tanh(c)``; with a projection, the
        unprojected state ``m = o tanh(c)``. ``z``: the input's share of the gates with both biases, if known (a
        buffer this overwrites)."""
        T, H = a.shape[0], c0.shape[-1]
        z = linear(a, w["weight_ih"], input_bias(w)) if z is None else z
        h, whh, whr = self.h, w["weight_hh"].mT, w.get("weight_hr")
        c = a.new_empty(T + 1, *c0.shape)
        c[0] = c0
        tc = a.new_empty(T, *c0.shape)
        m = a.new_empty(T, *c0.shape) if whr is not None else h[1:]
        for t in range(T):
            zt = z[t].baddbmm_(h[t], whh)
            zt[..., :2 * H].sigmoid_()
            zt[..., 2 * H:3 * H].tanh_()
            zt[..., 3 * H:].sigmoid_()
            torch.mul(zt[..., H:2 * H], c[t], out=c[t + 1]).addcmul_(zt[..., :H], zt[..., 2 * H:3 * H])
            torch.mul(zt[..., 3 * H:], torch.tanh(c[t + 1], out=tc[t]), out=m[t])
            if whr is not None:
                torch.bmm(m[t], whr.mT, out=h[t + 1])
        self.gates, self.c, self.tc, self.m = z, c, tc, m

    def _gru(self, w: dict[str, Tensor], a: Tensor) -> None:
        """``r``, ``z`` (sigmoid), ``n`` (tanh) and the hidden state's share of the gates, ``hh``."""
        T, H = a.shape[0], self.h.shape[-1]
        zih, h, whh = linear(a, w["weight_ih"], w.get("bias_ih")), self.h, w["weight_hh"].mT
        hh = a.new_empty(T, *h.shape[1:-1], 3 * H)
        rz, n, diff = a.new_empty(T, *h.shape[1:-1], 2 * H), a.new_empty(T, *h.shape[1:]), torch.empty_like(h[0])
        for t in range(T):
            if "bias_hh" in w:
                torch.baddbmm(w["bias_hh"][:, None], h[t], whh, out=hh[t])
            else:
                torch.bmm(h[t], whh, out=hh[t])
            torch.add(zih[t, ..., :2 * H], hh[t, ..., :2 * H], out=rz[t]).sigmoid_()
            torch.addcmul(zih[t, ..., 2 * H:], rz[t, ..., :H], hh[t, ..., 2 * H:], out=n[t]).tanh_()
            torch.addcmul(n[t], rz[t, ..., H:], torch.sub(h[t], n[t], out=diff), out=h[t + 1])
        self.rz, self.n, self.hh = rz, n, hh

    def _rnn(self, w: dict[str, Tensor], a: Tensor, relu: bool) -> None:
        z, h, whh = linear(a, w["weight_ih"], input_bias(w)), self.h, w["weight_hh"].mT
        act = torch.Tensor.relu_ if relu else torch.Tensor.tanh_
        for t in range(a.shape[0]):
            act(torch.baddbmm(z[t], h[t], whh, out=h[t + 1]))
        self.relu = relu


def lstm_backward(s: Level, g: Tensor, gh: Tensor | None, gc: Tensor | None) -> tuple[Tensor, list]:
    """Back-propagation through time of one LSTM level: ``c_t = f c_{t-1} + i g``, ``m_t = o tanh(c_t)``.

    ``gc`` is ``c_n``'s gradient ``[D, N, H]``, or ``[T, D, N, H]`` by step (a packed call's, at each last step).

    Returns the gates' gradient (for the level below) and the level's groups ``(dz, [(kind, input)], [kinds])``.
    """
    T, D, N, H = s.tc.shape
    dz = torch.addcmul(s.gates, s.gates, s.gates, value=-1).unflatten(-1, (4, H))  # s(1 - s): sigmoids' slopes
    i, f, gg, o = s.gates.unflatten(-1, (4, H)).unbind(-2)
    torch.addcmul(torch.ones((), dtype=gg.dtype, device=gg.device), gg, gg, value=-1, out=dz[..., 2, :])
    for k, other in enumerate((gg, s.c[:-1], i, s.tc)):  # ∂z_k through the cell: times g, c_{t-1}, i, tanh(c)
        dz[..., k, :].mul_(other)
    to_c = torch.addcmul(o, o * s.tc, s.tc, value=-1)  # ∂c_t/∂m_t = o (1 - tanh²c), given m_t's gradient
    whh, whr = s.w["weight_hh"], s.w.get("weight_hr")
    dhs = torch.empty_like(g) if whr is not None else None
    carry = gh if gh is not None else torch.zeros_like(g[0])
    dc = gc if gc is not None and gc.dim() == 3 else torch.zeros_like(s.c[0])
    for t in reversed(range(T)):
        dh = g[t] + carry
        dm = dh
        if whr is not None:
            dhs[t] = dh
            dm = torch.bmm(dh, whr)
        dc = torch.addcmul(dm * to_c[t], dc, f[t + 1]) if t + 1 < T else dc + dm * to_c[t]
        if gc is not None and gc.dim() == 4:  # packed: c_n's gradient enters at each example's last step
            dc = dc + gc[t]
        dz[t, :, :, :3].mul_(dc[:, :, None])
        dz[t, :, :, 3].mul_(dm)
        carry = torch.bmm(dz[t].reshape(D, N, 4 * H), whh)
    dz = dz.reshape(T, D, N, 4 * H)
    groups = [(dz, [("weight_ih", s.a), ("weight_hh", s.h[:-1])], ["bias_ih", "bias_hh"])]
    if whr is not None:
        groups.append((dhs, [("weight_hr", s.m)], []))
    return dz, groups


def gru_backward(s: Level, g: Tensor, gh: Tensor | None) -> tuple[Tensor, list]:
    """Back-propagation through time of one GRU level: ``n = tanh(a_in + r ⊙ a_hn)``, ``h = (1-z) n + z h_prev``."""
    T, D, N, H = s.n.shape
    r, z = s.rz.unflatten(-1, (2, H)).unbind(-2)
    hn, n, hprev = s.hh[..., 2 * H:], s.n, s.h[:-1]
    to_n = (1 - z) * (1 - n * n)
    to_r, to_z = to_n * hn * r * (1 - r), (hprev - n) * z * (1 - z)
    coef_hh = torch.stack([to_r, to_z, to_n * r], 3)
    whh = s.w["weight_hh"]
    dh_all, dzhh = torch.empty_like(g), torch.empty_like(coef_hh)
    carry = gh if gh is not None else torch.zeros_like(g[0])
    for t in reversed(range(T)):
        dh = torch.add(g[t], carry, out=dh_all[t])
        torch.mul(coef_hh[t], dh[:, :, None], out=dzhh[t])
        carry = torch.baddbmm(dh * z[t], dzhh[t].reshape(D, N, 3 * H), whh)
    dzih = (torch.stack([to_r, to_z, to_n], 3) * dh_all[:, :, :, None]).reshape(T, D, N, 3 * H)
    dzhh = dzhh.reshape(T, D, N, 3 * H)
    return dzih, [(dzih, [("weight_ih", s.a)], ["bias_ih"]), (dzhh, [("weight_hh", hprev)], ["bias_hh"])]


def rnn_backward(s: Level, g: Tensor, gh: Tensor | None) -> tuple[Tensor, list]:
    """Back-propagation through time of one Elman level, ``h = act(a)``: ``act'`` read off ``h`` itself."""
    h = s.h[1:]
    slope = (h > 0).to(h.dtype) if s.relu else 1 - h * h
    whh, da = s.w["weight_hh"], torch.empty_like(g)
    carry = gh if gh is not None else torch.zeros_like(g[0])
    for t in reversed(range(h.shape[0])):
        torch.mul(g[t] + carry, slope[t], out=da[t])
        carry = torch.bmm(da[t], whh)
    return da, [(da, [("weight_ih", s.a), ("weight_hh", s.h[:-1])], ["bias_ih", "bias_hh"])]
