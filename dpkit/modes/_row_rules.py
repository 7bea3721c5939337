"""Row provenance rules (used by ``_rows.py``): which dimension of a tensor holds the batch's examples, or that
its rows mix examples.

DP-SGD bounds one example's influence by clipping its gradient, which is only that example's if loss row *i*
depends on example *i* alone (its K augmented copies included). The batch trace (``_trace.py``) gives every tensor
derived from the batch a state, computed here from the torch call that made it:

* ``(dim, group)``: dimension ``dim`` holds the examples, ``group`` consecutive entries each (``x.flatten(0, 1)`` of
  ``[B, T]`` gives ``(0, T)``; K augmented copies of an example are ``(0, K)``);
* ``Summed``: a sum (or a mean over a count fixed by shapes) over the rows: a loss, or a statistic of the batch;
* ``One``: one example's data alone (``x[i]``, a row of ``for row in x``): a per-example loop;
* ``Mixed``: rows that combine examples, with the operation that combined them.

The rules are keyed by op family, not by example: each reads the dims an op works along from its arguments and
says whether the batch dimension is among them. An op dpkit does not know keeps the batch dimension of its first
batched input when its output has as many entries there; otherwise it mixes, conservatively.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP = (os.path.dirname(os.path.abspath(torch.__file__)), _HERE, os.path.dirname(os.path.abspath(os.__file__)))


class Mixed:
    """Rows that combine examples; ``why`` names the operation that combined them and where."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


class Summed:
    """A sum over the batch's rows (a loss being formed); ``what`` names the reduction.

    ``weight`` is the factor each row's own loss gets, where known: 1 for a sum over the rows, ``1 / rows`` for
    their mean, times the numbers the loss was scaled by since; ``rows`` is how many rows it reduced. The loss's
    ``backward()`` compares them with ``make_private(loss_reduction=...)``: a sum where a mean is expected scales
    every per-example gradient by the batch size before clipping.
    """

    __slots__ = ("what", "weight", "rows")

    def __init__(self, what: str, weight: float | None = None, rows: int | None = None):
        self.what, self.weight, self.rows = what, weight, rows

    def scaled(self, by: float | None) -> Summed:
        return Summed(self.what, self.weight * by if by is not None and self.weight is not None else None, self.rows)


class One:
    """Example ``i``'s data alone (of ``n``), taken out of the batch: ``x[i]``, or a row of ``for row in x``."""

    __slots__ = ("i", "n")

    def __init__(self, i: int, n: int):
        self.i, self.n = i, n

    def __eq__(self, other: object) -> bool:
        return type(other) is One and (other.i, other.n) == (self.i, self.n)

    def __hash__(self) -> int:
        return hash((self.i, self.n))


TRUSTED = "trusted"  # computed inside a function declared row-wise (rowwise): not checked
FREE = "free"  # a trace that does not track rows (no batch dim given, or one example): only marked


def op_name(func: Callable) -> str:
    """``torch.Tensor.flip``, ``torch.nn.functional.batch_norm``, ``torch.matmul``: how the user wrote it."""
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", repr(func))
    if name == "__get__" and owner is not None:  # a property such as Tensor.T
        return f"torch.Tensor.{getattr(owner, '__name__', '?')}"
    qual = getattr(func, "__qualname__", "")
    if qual.startswith(("TensorBase.", "Tensor.")):
        return f"torch.Tensor.{name}"
    module = getattr(func, "__module__", None) or "torch"
    if module in ("torch._C._linalg", "torch._C._special"):
        return f"torch.{module[9:]}.{name.split('_', 1)[1]}"
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"torch.nn.functional.{name}"
    if not module.startswith("torch"):  # a user's function (rowwise)
        return f"{module}.{qual or name}"
    return f"{module if module.startswith('torch.') else 'torch'}.{name}"


def where() -> str:
    """The user's line that made the call: the first frame outside torch, dpkit and the standard library."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    return "" if frame is None else f" (at {frame.f_code.co_filename}:{frame.f_lineno})"


def mix(func: Callable, text: str) -> Mixed:
    return Mixed(f"{op_name(func)} {text}{where()}")


def _arg(args: tuple, kwargs: dict, pos: int | None, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[pos] if pos is not None and len(args) > pos else default


def _dims(value, ndim: int) -> set[int] | None:
    """A ``dim``/``dims`` argument as a set of non-negative dims; None for all of them."""
    if value is None:
        return None
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (list, tuple, torch.Size)) or not value or not all(isinstance(v, int) for v in value):
        return None  # names or empty: all dims, conservatively
    return {v % ndim if ndim else 0 for v in value}


def _first_out(out) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    for o in out if isinstance(out, (tuple, list)) else ():
        if isinstance(o, Tensor):
            return o
    return None


# -- families ----------------------------------------------------------------------------------------------------
def agree(func, found: list) -> object:
    """The batched inputs' common state: the same dim counted from the left or from the right, or Mixed."""
    t, (d, g) = found[0]
    for u, s in found[1:]:
        if s[1] != g or (s[0] != d and s[0] - u.dim() != d - t.dim()):
            return mix(func, f"combines the batch held along dim {d} of one input and dim {s[0]} of another")
    return (d, g)


def generic(tr, func, args, kwargs, out, found):
    """An op dpkit has no rule for: the output keeps the batch dim of the first batched input if it has as many
    entries there, and every batched input agrees on it (same dim from the left or the right)."""
    agreed = agree(func, found)
    if type(agreed) is Mixed:
        return agreed
    t, (d, g) = found[0]
    states = []
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if not isinstance(o, Tensor):
            states.append(None)
        elif o.dim() > d and o.shape[d] == t.shape[d]:
            states.append((d, g))
        else:
            states.append(mix(func, f"turns the batch's {t.shape[d]} rows along dim {d} into shape "
                                    f"{tuple(o.shape)}; dpkit cannot tell that it keeps examples apart"))
    return states[0] if isinstance(out, Tensor) else states


def pointwise(tr, func, args, kwargs, out, found):
    """Elementwise with broadcasting: batch dims align from the right, and all batched inputs must agree."""
    o = out if type(out) is Tensor else _first_out(out)
    nd = o.dim() if o is not None else found[0][0].dim()
    if len(found) == 1 and found[0][0].dim() == nd:  # the common case: one batched operand, same dims
        return found[0][1]
    if any(u.dim() > nd for u, _ in found):  # fewer dims out than in (torch.where(cond)): not elementwise
        return generic(tr, func, args, kwargs, out, found)
    state = None
    for u, (d, g) in found:
        cand = (d + nd - u.dim(), g)
        if state is None:
            state = cand
        elif cand != state:
            return mix(func, f"combines examples: the batch is along dim {state[0]} of one operand and dim "
                             f"{cand[0]} of another (after broadcasting), so each entry pairs two examples")
    return state


def reduction(pos: int | None, summed: bool = False, default=None):
    """sum, mean, max, std, norm...: over the batch dim a sum or mean is a ``Summed`` loss, anything else mixes."""
    def rule(tr, func, args, kwargs, out, found):
        x = args[0]
        other = _arg(args, kwargs, pos, "other") if pos == 1 else None
        if isinstance(other, Tensor) or tr.state(x) is None:  # torch.max(a, b): elementwise
            return pointwise(tr, func, args, kwargs, out, found)
        d, g = tr.state(x)
        dims = _dims(_arg(args, kwargs, pos, "dim", kwargs.get("axis", default)), x.dim())
        if dims is None or d in dims:
            if summed:
                rows = x.shape[d]
                return Summed(f"{op_name(func)}{where()}", 1 / rows if "mean" in func.__name__ else 1.0, rows)
            return mix(func, f"reduces over dim {d}, the batch dimension")
        o = _first_out(out)
        if o is not None and o.dim() == x.dim():  # keepdim
            return (d, g)
        return (d - sum(1 for k in dims if k < d), g)
    return rule


def along(pos: int | None, default=None, varargs: bool = False):
    """softmax, cumsum, sort, topk, flip, roll, normalize...: each output entry depends on the whole line along
    ``dim``, so that line must not be the batch dimension."""
    def rule(tr, func, args, kwargs, out, found):
        x = args[0]
        s = tr.state(x)
        if not isinstance(s, tuple):
            return generic(tr, func, args, kwargs, out, found)
        value = _arg(args, kwargs, pos, "dim", _arg(args, kwargs, None, "dims", default))
        if varargs and len(args) > 2:
            value = args[1:]
        if value is None and callable(default):  # softmax's implicit dim
            value = default(x)
        dims = _dims(value, x.dim())
        if dims is None or s[0] in dims:
            return mix(func, f"over dim {s[0] if dims else 'None (all dims)'}, the batch dimension")
        return s
    return rule


def _softmax_dim(x: Tensor) -> int:
    return 0 if x.dim() in (0, 1, 3) else 1  # torch's implicit dim for softmax without one


def across(pos: int, default: int):
    """renorm: each slice along ``dim`` is renormalised on its own, so only the batch dim is row-wise."""
    def rule(tr, func, args, kwargs, out, found):
        s = tr.state(args[0])
        dim = _arg(args, kwargs, pos, "dim", default)
        if s is None or not isinstance(dim, int) or dim % args[0].dim() != s[0]:
            return mix(func, "treats the batch dimension as one vector (dim is not the batch dimension)")
        return s
    return rule


def last_dims(tr, func, args, kwargs, out, found):
    """layer_norm / rms_norm: statistics over the trailing ``normalized_shape`` dims."""
    x, s = args[0], tr.state(args[0])
    shape = _arg(args, kwargs, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    if s is None or len(found) > 1:
        return mix(func, "has batched weights or bias") if s is not None else generic(tr, func, args, kwargs,
                                                                                     out, found)
    if s[0] >= x.dim() - k:
        return mix(func, f"normalises over dim {s[0]}, the batch dimension")
    return s


def leading(spatial: int | None):
    """conv, group_norm, instance_norm: per-sample only over dim 0 of a batched input (``N, C, ...``)."""
    def rule(tr, func, args, kwargs, out, found):
        x, s = args[0], tr.state(args[0])
        if s is None or len(found) > 1:
            return mix(func, "has a batched weight: it combines examples")
        if s[0] != 0 or (spatial is not None and x.dim() != spatial + 2):
            return mix(func, f"works across dim {s[0]} of a {x.dim()}-d input, which holds the batch; its "
                             "examples must be dim 0")
        return s
    return rule


def batch_norm(tr, func, args, kwargs, out, found):
    s = tr.state(args[0])
    if _arg(args, kwargs, 5, "training", False) and (s is None or s[0] != 1 or len(found) > 1):
        return mix(func, "with training=True normalises with the mean and variance of the whole batch; use "
                         "GroupNorm/LayerNorm, or training=False with fixed statistics")
    return pointwise(tr, func, args, kwargs, out, found)


def local_response_norm(tr, func, args, kwargs, out, found):
    s = tr.state(args[0])
    if s is None or s[0] == 1:
        return mix(func, "normalises across dim 1, which holds the batch")
    return s


def paired(dim_pos: int | None, default: int):
    """cosine_similarity / pairwise_distance: broadcast the two inputs, then reduce along ``dim``."""
    def rule(tr, func, args, kwargs, out, found):
        nd = max(args[0].dim(), args[1].dim())
        state = pointwise(tr, func, args, kwargs, torch.empty((0,) * nd), found)
        if not isinstance(state, tuple):
            return state
        dim = _arg(args, kwargs, dim_pos, "dim", default) if dim_pos is not None else default
        dim %= nd
        if dim == state[0]:
            return mix(func, f"reduces over dim {dim}, the batch dimension")
        o = _first_out(out)
        keep = o is not None and o.dim() == nd
        return (state[0] - (0 if keep or dim > state[0] else 1), state[1])
    return rule


# -- contractions: every product is an einsum; the batch's letter must survive, and be one letter ----------------
_LEAD = "ABCDEFGHIJKLMNOP"  # broadcast dims, right-aligned


def contract(func, specs: list[str], out_spec: str, operands: list, tr) -> object:
    letter, group = None, None
    for spec, t in zip(specs, operands):
        s = tr.state(t) if isinstance(t, Tensor) else None
        if s is None:
            continue
        if letter is None:
            letter, group = spec[s[0]], s[1]
        elif spec[s[0]] != letter or s[1] != group:
            return mix(func, "pairs rows of the batch with other rows of it (as z @ z.T does): each output entry "
                             "combines two examples")
    if letter not in out_spec:
        return mix(func, "sums over the batch dimension (a contracted dimension of the product)")
    return (out_spec.index(letter), group)


def _mm(na: int, nb: int) -> tuple[str, str, str]:
    if na == 1 and nb == 1:
        return "k", "k", ""
    lead = _LEAD[:max(na, nb) - 2]
    a = "k" if na == 1 else lead[len(lead) - (na - 2):] + "ik"
    b = "k" if nb == 1 else lead[len(lead) - (nb - 2):] + "km"
    return a, b, lead + ("i" if na > 1 else "") + ("m" if nb > 1 else "")


def _nd(t: Tensor) -> int:
    """``t.dim()``, also for a weight that is a tensor subclass answering few calls (ExpandedWeight)."""
    if type(t) is Tensor or type(t) is torch.nn.Parameter:
        return t.dim()
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.dim(t)


def _right(spec: str, t) -> str:
    return spec[len(spec) - _nd(t):] if isinstance(t, Tensor) else spec


def matmul(tr, func, args, kwargs, out, found):
    a, b = (args[1], args[0]) if func.__name__ == "__rmatmul__" else (args[0], args[1])
    sa, sb, so = _mm(_nd(a), _nd(b))
    return contract(func, [sa, sb], so, [a, b], tr)


def addmm_like(lhs: str, rhs: str, res: str):
    """addmm, baddbmm, addbmm, addmv, addr: ``input`` broadcast onto the product's result."""
    def rule(tr, func, args, kwargs, out, found):
        inp, m1, m2 = args[0], args[1], args[2]
        return contract(func, [_right(res, inp), lhs, rhs], res, [inp, m1, m2], tr)
    return rule


def fixed(*specs: str):
    """mm, bmm, mv, dot, outer...: fixed operand and output letters."""
    def rule(tr, func, args, kwargs, out, found):
        return contract(func, list(specs[:-1]), specs[-1], list(args[:len(specs) - 1]), tr)
    return rule


def linear(tr, func, args, kwargs, out, found):
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if len(found) == 1 and found[0][0] is x:  # the common case: a batched input, the layer's own weights
        s = found[0][1]
        return s if s[0] != x.dim() - 1 else mix(func, "sums over the batch dimension (the input's last dim)")
    lead = _LEAD[:_nd(x) - 1]
    return contract(func, [lead + "k", "ok"[2 - _nd(w):], "o"], lead + ("o" if _nd(w) == 2 else ""), [x, w, b], tr)


def bilinear(tr, func, args, kwargs, out, found):
    lead = _LEAD[:_nd(args[0]) - 1]
    return contract(func, [lead + "i", lead + "j", "oij", "o"], lead + "o", list(args[:4]), tr)


def cdist(tr, func, args, kwargs, out, found):
    lead = _LEAD[:max(_nd(args[0]), _nd(args[1])) - 2]
    return contract(func, [_right(lead + "pm", args[0]), _right(lead + "rm", args[1])], lead + "pr",
                    list(args[:2]), tr)


def attention(tr, func, args, kwargs, out, found):
    """scaled_dot_product_attention: softmax(q k^T) v per leading (batch, head) index."""
    q = args[0]
    lead = _LEAD[:_nd(q) - 2]
    mask = _arg(args, kwargs, 3, "attn_mask")
    specs = [lead + "le", _right(lead + "se", args[1]), _right(lead + "sf", args[2]), _right(lead + "ls", mask)]
    return contract(func, specs, lead + "lf", [q, args[1], args[2], mask], tr)


def inner(tr, func, args, kwargs, out, found):
    a, b = args[0], args[1]
    sa, sb = _LEAD[:_nd(a) - 1] + "k", "0123456789"[:_nd(b) - 1] + "k"
    return contract(func, [sa, sb], sa[:-1] + sb[:-1], [a, b], tr)


def tensordot(tr, func, args, kwargs, out, found):
    a, b = args[0], args[1]
    dims = _arg(args, kwargs, 2, "dims", 2)
    sa, sb = list("abcdefghijklmnop"[:_nd(a)]), list("0123456789qrstuvw"[:_nd(b)])
    if isinstance(dims, int):
        pairs = [(_nd(a) - dims + i, i) for i in range(dims)]
    elif isinstance(dims, (list, tuple)) and len(dims) == 2:
        da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
        pairs = list(zip(da, db))
    else:
        return generic(tr, func, args, kwargs, out, found)
    for i, j in pairs:
        sb[j] = sa[i]
    shared = {sa[i] for i, _ in pairs}
    so = "".join(c for c in sa if c not in shared) + "".join(c for c in sb if c not in shared)
    return contract(func, ["".join(sa), "".join(sb)], so, [a, b], tr)


def einsum(tr, func, args, kwargs, out, found):
    eq = args[0].replace(" ", "")
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops) or not all(isinstance(t, Tensor) for t in ops):
        return generic(tr, func, args, kwargs, out, found)
    ell = max((_nd(t) - len(s) + 3 for s, t in zip(terms, ops) if "..." in s), default=0)
    pool = "0123456789"[:ell]
    specs = [s.replace("...", pool[ell - (_nd(t) - len(s) + 3):]) for s, t in zip(terms, ops)]
    if "->" not in eq:
        letters = "".join(terms).replace("...", "")
        rhs = "..." + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return contract(func, specs, rhs.replace("...", pool), ops, tr)
