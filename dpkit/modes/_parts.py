"""Linear parts: a unit's parameter gradients taken from the ``F.linear`` calls of its real forward and backward.

A layer whose forward applies its parameters only through ``F.linear`` on (row blocks of) them, such as
``nn.MultiheadAttention``'s in- and out-projections, has per-example gradients ``Σ_t g_t x_tᵀ`` over those calls,
given each call's input ``x`` and output gradient ``g``. Its grad sampler declares this by carrying
``linear_calls`` (see ``GradSampler``). In ``bk`` and ``auto`` the capture then records, while the unit's forward
runs on its stand-ins, every ``F.linear`` call that reads a stand-in or a block of its whole rows: the input, which
parameter rows, and (from the forward hook on) a tensor hook for the output's gradient. When every output gradient
has arrived the calls become the record's Linear blocks (``Capture.blocks``), from which bk takes norms and clipped
sums without recomputing the layer.

Fail closed: a stand-in read other than as whole rows, a call ``linear_calls`` does not recognise, an output that
needs no gradient, or a trainable parameter whose rows the calls do not tile exactly (``bias_k``, read by
``torch.cat``) leaves the record to the grad sampler, as if no call had been recorded.

A sampler may also carry ``linear_forms``, ``{torch function: form}``: while its unit is in flight a call of that
function runs ``form(linear, function, *args)`` instead, its own arithmetic with every product by a parameter an
``F.linear`` call (``torch.lstm`` and ``torch.gru``, whose gates torch's kernels hide: ``dpkit/layers/
_recurrent_forms.py``). A parameter read whole by several calls (a recurrent weight, once per step) gets the calls'
blocks joined along their positions: its gradient is the sum over the calls.

Functions of ``torch.nn.functional`` written in Python (``multi_head_attention_forward``) run their body with the
torch-function modes popped, so the batch trace sees them as one call and not the ``F.linear`` calls inside. While a
parts unit is in flight the trace hands every call to ``LinearSpy``, which runs those functions as copies whose
global ``linear`` is the spy's: torch's own code, with the calls visible, and no global state changed.
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.errors import PrivacyUsageError
from dpkit.layers import block_grads

_LINEAR = F.linear


@attrs.define(eq=False)
class LinearCall:
    """One ``F.linear`` call on a unit's stand-ins: its input, the parameter rows it read, its output's gradient."""

    x: Tensor
    version: int  # of ``x`` when read: an in-place change before the backward makes the blocks wrong
    out: Tensor | None  # until the forward hook registers its gradient hook
    shape: torch.Size
    dtype: torch.dtype
    weight: tuple[nn.Parameter, int, int] | None  # (parameter, first row, end row)
    bias: tuple[nn.Parameter, int, int] | None
    grad: Tensor | None = None


@attrs.define(eq=False)
class Parts:
    """The calls of one forward of a parts unit; ``broken`` says why they cannot serve, if they cannot."""

    calls: list[LinearCall] = attrs.field(factory=list)
    broken: str | None = None


def _row_span(view: Tensor, stand: Tensor) -> tuple[int, int] | None:
    """``(first, end)`` if ``view`` is rows ``first:end`` of ``stand`` (all columns, same strides), else ``None``."""
    if view is stand:
        return 0, stand.shape[0]
    if (view.dim() != stand.dim() or view.dim() == 0 or view.shape[1:] != stand.shape[1:]
            or view.stride() != stand.stride() or not stand.is_contiguous()):
        return None
    row = stand.stride(0)
    offset = view.storage_offset() - stand.storage_offset()
    if row <= 0 or offset % row:
        return None
    first = offset // row
    end = first + view.shape[0]
    return (first, end) if 0 <= first and end <= stand.shape[0] else None


@functools.cache
def _linear_callers() -> dict[Callable, str]:
    """The Python functions of ``torch.nn.functional`` that call ``linear``, directly or through one another."""
    funcs = {n: f for n, f in vars(F).items() if isinstance(f, types.FunctionType) and f.__module__ == F.__name__}
    found = {"linear"}
    while True:
        more = {n for n, f in funcs.items() if n not in found and found & set(f.__code__.co_names)}
        if not more:
            break
        found |= more
    return {funcs[n]: n for n in found - {"linear"}}


def _rebound(name: str, linear: Callable) -> Callable:
    """``torch.nn.functional.<name>`` as a copy whose (and whose helpers') global ``linear`` is ``linear``.

    Built per call from the module's current namespace, so a later change to ``torch.nn.functional`` is seen."""
    space = dict(vars(F))
    space["linear"] = linear
    for f, n in _linear_callers().items():
        copy = types.FunctionType(f.__code__, space, f.__name__, f.__defaults__, f.__closure__)
        copy.__kwdefaults__ = f.__kwdefaults__
        space[n] = copy
    return space[name]


class LinearSpy:
    """Records the ``F.linear`` calls on the stand-ins of the parts units in flight.

    The batch trace calls it with every torch call while one is in flight (``BatchTrace.spy``)."""

    def __init__(self) -> None:
        self._stands: dict[int, tuple[Tensor, nn.Parameter, Parts]] = {}  # by id of the stand-in
        self._open: dict[int, tuple[Parts, list[int]]] = {}  # by id of the unit's plan row
        self._forms: dict[int, dict[Callable, Callable]] = {}  # the open units' linear_forms, by id of the row

    @property
    def active(self) -> bool:
        return bool(self._open)

    def open(self, key: int, stands: list[tuple[Tensor, nn.Parameter]], forms: dict | None = None) -> None:
        """Start recording the calls on ``stands`` (each stand-in with its trainable parameter); ``forms``: the
        sampler's ``linear_forms``."""
        if forms:
            self._forms[key] = forms
        parts = Parts()
        for stand, p in stands:
            self._stands[id(stand)] = (stand, p, parts)
        self._open[key] = (parts, [id(s) for s, _ in stands])

    def close(self, key: int) -> Parts | None:
        """Stop recording a unit's calls (its forward ended) and hand them over."""
        parts, ids = self._open.pop(key, (None, ()))
        self._forms.pop(key, None)
        for i in ids:
            self._stands.pop(i, None)
        return parts

    def __call__(self, func: Callable, args: tuple, kwargs: dict):
        if func is _LINEAR:
            return self.linear(*args, **kwargs)
        for forms in self._forms.values():
            if func in forms:
                return forms[func](self.linear, func, *args, **kwargs)
        name = _linear_callers().get(func)
        if name is not None:
            return _rebound(name, self.linear)(*args, **kwargs)
        return func(*args, **kwargs)

    def linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.linear``, recording the call if it reads a stand-in.

        A recorded call whose output would need no gradient (its input, a query straight from the data, needs none,
        nor do the stand-ins) reads its weight through a leaf alias that requires grad, so that the backward hands
        over its output gradient; autograd then also forms that alias's (unused) gradient, this call's only."""
        w, b = self._find(weight), self._find(bias)
        if w is None and b is None:
            return _LINEAR(input, weight, bias)
        if not (input.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad):
            weight = weight.detach().requires_grad_()
        out = _LINEAR(input, weight, bias)
        parts = (w or b)[0]
        if w is not None and b is not None and w[0] is not b[0]:
            w[0].broken = b[0].broken = "one F.linear call read the parameters of two units"
        parts.calls.append(LinearCall(input.detach(), input._version, out, out.shape, out.dtype,
                                      w and w[1:], b and b[1:]))
        return out

    def _find(self, t: Tensor | None) -> tuple[Parts, nn.Parameter, int, int] | None:
        if t is None:
            return None
        entry = self._stands.get(id(t))
        if entry is None and t._base is not None:
            entry = self._stands.get(id(t._base))
        if entry is None or (entry[0] is not t and entry[0] is not t._base):
            return None
        stand, p, parts = entry
        span = _row_span(t, stand)
        if span is None:
            parts.broken = f"F.linear read a parameter of shape {tuple(p.shape)} other than as a block of whole rows"
            return None
        return parts, p, *span


def blocks(parts: Parts, layout: Callable, own: list[nn.Parameter], layer: nn.Module, activations: list,
           backprops: list) -> dict[nn.Parameter, list[tuple[Tensor | None, Tensor]]]:
    """Each trainable parameter's gradient as Linear blocks ``[(a, g), ...]`` in row order, from the recorded calls;
    empty if the calls do not give every parameter of ``own`` exactly (its rows tiled by the calls' row blocks, each
    block read whole by one call or more).

    ``layout`` is the sampler's ``linear_calls``; ``activations`` and ``backprops`` come batch-first, as a sampler
    gets them (this is called through ``LayerPlan.call``)."""
    if parts.broken is not None:
        return {}
    spans: dict[int, list[tuple[int, int, Tensor | None, Tensor]]] = {}
    for call in parts.calls:
        if call.x._version != call.version:
            raise PrivacyUsageError(
                f"a tensor that {type(layer).__name__} read through F.linear was modified in place after its "
                "forward, so its per-example gradients would be computed from the changed values. Use an "
                "out-of-place operation there.")
        g = call.grad if call.grad is not None else torch.zeros(call.shape, dtype=call.dtype, device=call.x.device)
        pair = layout(layer, activations, backprops, call.x, g)
        if pair is None:
            return {}
        # Laid out batch-first in memory once: the norms and the clipped sum reshape them several times, and a
        # strided gradient (MultiheadAttention's are sequence-first) made each reshape a copy, its sums slow.
        wide = torch.promote_types(pair[0].dtype, pair[1].dtype)
        a, g = (t.to(wide).contiguous() for t in pair)
        for ref, x in ((call.weight, a), (call.bias, None)):
            if ref is not None:
                spans.setdefault(id(ref[0]), []).append((ref[1], ref[2], x, g))
    out = {}
    for p in own:
        reads: dict[tuple[int, int], list[tuple[Tensor | None, Tensor]]] = {}
        for first, end, a, g in spans.get(id(p), ()):
            reads.setdefault((first, end), []).append((a, g))
        edge = 0
        for first, end in sorted(reads):
            if first != edge:
                return {}
            edge = end
        if not reads or edge != p.shape[0]:
            return {}
        out[p] = [_joined(reads[span]) for span in sorted(reads)]
    return out


def _joined(pairs: list[tuple[Tensor | None, Tensor]]) -> tuple[Tensor | None, Tensor]:
    """Blocks of the same rows of a parameter, one ``(a, g)`` with their positions side by side."""
    if len(pairs) == 1:
        return pairs[0]
    a = None if pairs[0][0] is None else torch.cat([a for a, _ in pairs], 1)
    return a, torch.cat([g for _, g in pairs], 1)


def per_example(blocks: dict[nn.Parameter, list[tuple[Tensor | None, Tensor]]], K: int) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, *p.shape]`` (summed over the K copies) from Linear blocks."""
    return {p: block_grads(pairs, K).reshape(-1, *p.shape) for p, pairs in blocks.items()}
