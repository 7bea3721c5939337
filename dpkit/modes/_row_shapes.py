"""Row provenance rules for indexing and shapes (see ``_rows.py``): where the batch dimension goes when a tensor is
indexed, reshaped, transposed or stacked, and when that selects, reorders or interleaves examples instead."""
from __future__ import annotations

import torch
from torch import Tensor

from dpkit.modes._row_rules import Mixed, One, _arg, _dims, _first_out, generic, mix


# -- indexing ----------------------------------------------------------------------------------------------------
def _is_arange(t: Tensor, n: int) -> int | None:
    """The dim of ``t`` along which it is ``arange(n)`` (broadcastable: other dims 1), else None: the one
    tensor index on the batch dimension that keeps each example in its own row (``x[arange(B), y]``)."""
    if t.dtype in (torch.bool, torch.uint8) or t.numel() != n or n == 0:
        return None
    dims = [i for i, s in enumerate(t.shape) if s != 1] or [t.dim() - 1]
    if len(dims) != 1 or not torch.equal(t.reshape(-1), torch.arange(n, device=t.device, dtype=t.dtype)):
        return None
    return dims[0]


def _within_one(item, size: int, group: int) -> int | None:
    """The example that an int or a slice on the batch dim stays within, else None."""
    if isinstance(item, slice):
        start, stop, step = item.indices(size)
        last = start + (len(range(start, stop, step)) - 1) * step
        return start // group if stop > start and step > 0 and start // group == last // group else None
    if isinstance(item, bool) or not isinstance(item, (int, Tensor)):
        return None
    return int(item) % size // group


def getitem(tr, func, args, kwargs, out, found):
    """``x[idx]``: full slices keep the batch dim; a partial slice, an int or a tensor index on it selects or
    permutes examples. Tensor indices elsewhere move their dims into one block (numpy's rules)."""
    x, idx = args[0], args[1]
    sx = tr.state(x)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    used = sum(t.dim() if isinstance(t, Tensor) and t.dtype == torch.bool else
               0 if t is None or t is Ellipsis or isinstance(t, bool) else 1 for t in items)
    if Ellipsis in [i for i in items if not isinstance(i, Tensor)]:
        k = next(j for j, i in enumerate(items) if i is Ellipsis)
        items[k:k + 1] = [slice(None)] * (x.dim() - used)
    basic_before, block_at, advanced, p, batch_out = 0, None, [], 0, None
    kinds = []
    for item in items:
        if item is None or isinstance(item, bool):
            basic_before += 1
            kinds.append("basic")
            continue
        if isinstance(item, (Tensor, list)) and not (isinstance(item, Tensor) and item.dim() == 0
                                                      and item.dtype != torch.bool):
            t = item if isinstance(item, Tensor) else torch.as_tensor(item)
            span = t.dim() if t.dtype == torch.bool else 1
            if sx is not None and p <= sx[0] < p + span:
                at = _is_arange(t, x.shape[sx[0]]) if span == 1 else None
                if at is None:
                    return mix(func, f"indexes dim {sx[0]}, the batch dimension, with a tensor (x[perm], x[mask]): "
                                     "it selects or reorders examples")
                advanced.append((t, (at, sx[1])))
            else:
                advanced.append((t, tr.state(item) if isinstance(item, Tensor) else None))
            if block_at is None:
                block_at = basic_before
            kinds.append("adv")
            p += span
            continue
        if sx is not None and p == sx[0]:
            if isinstance(item, slice) and item.indices(x.shape[p]) == (0, x.shape[p], 1):
                batch_out = basic_before
            elif _within_one(item, x.shape[p], sx[1]) is not None:  # x[i], x[i:i+1]: example i alone
                if any(tr.state(t) is not None for t in items if isinstance(t, Tensor) and t is not item):
                    return mix(func, "indexes one example with indices taken from other examples")
                return One(_within_one(item, x.shape[p], sx[1]), x.shape[p] // sx[1])
            else:
                return mix(func, f"takes part of dim {p}, the batch dimension ({item!r}): it selects examples")
        if isinstance(item, slice):
            basic_before += 1
        kinds.append("basic")
        p += 1
    if sx is not None and batch_out is None and p <= sx[0]:
        batch_out = basic_before + sx[0] - p  # after the last index: dims kept in order
    adv_dims = [k for k, kind in enumerate(kinds) if kind == "adv"]
    together = not adv_dims or adv_dims[-1] - adv_dims[0] == len(adv_dims) - 1
    start = block_at if together else 0
    nb = max((t.dim() for t, _ in advanced), default=0)
    in_block = {(s[0] + nb - t.dim(), s[1]) for t, s in advanced if isinstance(s, tuple)}
    if any(isinstance(s, Mixed) for _, s in advanced):
        return next(s for _, s in advanced if isinstance(s, Mixed))
    if sx is not None and batch_out is not None:
        if in_block:
            return mix(func, "indexes each example's rows with indices taken from other examples")
        return (batch_out + (nb if advanced and start <= batch_out else 0), sx[1])
    if len(in_block) > 1:
        return mix(func, "indexes with tensors whose batch dimensions do not line up")
    if in_block:
        d, g = in_block.pop()
        return (start + d, g)
    return generic(tr, func, args, kwargs, out, found)


def setitem(tr, func, args, kwargs, out, found):
    """``x[idx] = v``: writing a constant moves no example's data (``labels[labels == pad] = -100``), unless the
    positions come from other examples; a batched value must land in the rows of its own examples."""
    x, idx, value = args[0], args[1], args[2]
    sx, sv = tr.state(x), tr.state(value) if isinstance(value, Tensor) else None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    p = 0
    for item in items:
        s = tr.state(item) if isinstance(item, Tensor) else None
        if s is not None and not (item.dtype == torch.bool and isinstance(sx, tuple) and p <= sx[0] < p + item.dim()
                                  and s == (sx[0] - p, sx[1])):
            return mix(func, "writes at positions chosen by the batch's data, not aligned with the rows written")
        p += item.dim() if isinstance(item, Tensor) and item.dtype == torch.bool else \
            0 if item is None or isinstance(item, bool) else 1
    if sv is None:
        return sx if isinstance(sx, tuple) else None
    sel = getitem(tr, func, (x, idx), {}, x[idx], [f for f in found if f[0] is not value]) if sx is not None \
        else _written(x, items, sv, value, func)
    if not isinstance(sel, tuple):
        return sel
    if sx is None:
        return sel
    if (sv[0] + x[idx].dim() - value.dim(), sv[1]) != sel:
        return mix(func, "writes rows of the batch into other examples' rows")
    return sx


def _written(x: Tensor, items: list, sv: tuple, value: Tensor, func) -> object:
    """The state of a tensor not from the batch once a batched value is written into it with basic indexing
    (``out = x.new_zeros(...); out[:, 0] = h``): the dim of ``out`` that the value's batch dim lands on."""
    if any(isinstance(i, (Tensor, list)) for i in items):
        return mix(func, "writes the batch through a tensor index")
    n_used = sum(0 if i is None or i is Ellipsis or isinstance(i, bool) else 1 for i in items)
    dims, p = [], 0  # the dim of x behind each dim of the selection (None: a new one)
    for item in items:
        if item is Ellipsis:
            dims += list(range(p, p + x.dim() - n_used))
            p += x.dim() - n_used
        elif item is None or isinstance(item, bool):
            dims.append(None)
        else:
            if isinstance(item, slice):
                dims.append(p)
            p += 1
    dims += list(range(p, x.dim()))
    j = sv[0] + len(dims) - value.dim()
    at = dims[j] if 0 <= j < len(dims) else None
    if at is None or x.shape[at] != value.shape[sv[0]]:
        return mix(func, "writes the batch into part of a dimension")
    return (at, sv[1])


def dim_op(pos: int, keeps: bool, default: int | None = 0):
    """index_select, narrow, select, split, chunk, unbind, gather, scatter, index_add...: an op along ``dim``;
    along the batch dim it selects or moves examples (``keeps``: a full narrow/split is still the batch)."""
    def rule(tr, func, args, kwargs, out, found):
        x, s = args[0], tr.state(args[0])
        dim = _arg(args, kwargs, pos, "dim", default)
        if not isinstance(s, tuple):
            return generic(tr, func, args, kwargs, out, found)
        if dim is None:  # take_along_dim without dim: flattened
            return mix(func, "flattens the batch with the other dims")
        if isinstance(dim, int) and dim % x.dim() == s[0]:
            n = x.shape[s[0]]
            if func.__name__ == "unbind":  # for row in x: each row is one example's
                return [One(r // s[1], n // s[1]) for r in range(n)]
            if func.__name__ == "select":
                return One(_arg(args, kwargs, 2, "index") % n // s[1], n // s[1])
            o = _first_out(out)
            if not (keeps and o is not None and o.shape[s[0]] == x.shape[s[0]] and not isinstance(out, tuple)):
                return mix(func, f"works along dim {s[0]}, the batch dimension: it selects, gathers or scatters "
                                 "examples")
        o = _first_out(out)
        if o is not None and o.dim() < x.dim() and isinstance(dim, int) and dim % x.dim() < s[0]:
            return (s[0] - 1, s[1])  # select / unbind dropped a dim before the batch's
        return generic(tr, func, args, kwargs, out, found)
    return rule


# -- shapes ------------------------------------------------------------------------------------------------------
def reshape(tr, func, args, kwargs, out, found):
    """view/reshape/flatten/unflatten: element e of example k sits at flat positions whose index along the batch
    dim is in ``[k*g, (k+1)*g)``. The output keeps examples apart iff some dim there has ``B*g'`` entries with
    exactly ``g'*inner`` elements per step of it for the input's ``g*inner``."""
    x, s = args[0], tr.state(args[0])
    o = _first_out(out)
    if not isinstance(s, tuple) or o is None:
        return generic(tr, func, args, kwargs, out, found)
    d, g = s
    inner = 1
    for n in x.shape[d + 1:]:
        inner *= n
    examples, stride = x.shape[d] // g, g * inner
    acc = 1
    for k in range(o.dim() - 1, -1, -1):
        if stride % acc == 0 and o.shape[k] == examples * (stride // acc) and (examples != 1 or o.shape[k] != 1):
            return (k, stride // acc)
        acc *= o.shape[k]
    return mix(func, f"reshapes {tuple(x.shape)} (batch along dim {d}) to {tuple(o.shape)}, which interleaves "
                     "examples; merge the batch dim only with the dims after it")


def diagonal(tr, func, args, kwargs, out, found):
    """diagonal(offset, dim1, dim2): entries [i, i] of two dims, moved to the end."""
    x, (d, g) = args[0], tr.state(args[0])
    pair = {_arg(args, kwargs, 2, "dim1", 0) % x.dim(), _arg(args, kwargs, 3, "dim2", 1) % x.dim()}
    if d in pair:
        return mix(func, f"takes a diagonal along dim {d}, the batch dimension")
    return (d - sum(1 for k in pair if k < d), g)


def transpose(tr, func, args, kwargs, out, found):
    x, (d, g) = args[0], tr.state(args[0])
    n = x.dim()
    a, b = (_arg(args, kwargs, 1, "dim0", 0), _arg(args, kwargs, 2, "dim1", 1)) if n else (0, 0)
    if func.__name__ == "t":
        a, b = 0, n - 1 if n > 1 else 0
    a, b = a % max(n, 1), b % max(n, 1)
    return (b if d == a else a if d == b else d, g)


def reverse_dims(tr, func, args, kwargs, out, found):
    """Tensor.T (all dims reversed) and mT / mH (the last two)."""
    x, (d, g) = args[0], tr.state(args[0])
    n = x.dim()
    if getattr(func.__self__, "__name__", "") in ("T", "H"):
        return (n - 1 - d, g)
    return (n - 1 if d == n - 2 else n - 2 if d == n - 1 else d, g)


def permute(tr, func, args, kwargs, out, found):
    x, (d, g) = args[0], tr.state(args[0])
    order = _arg(args, kwargs, 1, "dims")
    order = list(args[1:]) if len(args) > 2 or isinstance(order, int) else list(order)
    return ([o % x.dim() for o in order].index(d), g)


def movedim(tr, func, args, kwargs, out, found):
    x, (d, g) = args[0], tr.state(args[0])
    src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = x.dim()
    src, dst = [v % n for v in src], [v % n for v in dst]
    rest = [k for k in range(n) if k not in src]
    order = [None] * n
    for a, b in zip(src, dst):
        order[b] = a
    it = iter(rest)
    order = [v if v is not None else next(it) for v in order]
    return (order.index(d), g)


def unsqueeze(tr, func, args, kwargs, out, found):
    x, (d, g) = args[0], tr.state(args[0])
    k = _arg(args, kwargs, 1, "dim") % (x.dim() + 1)
    return (d + 1 if k <= d else d, g)


def squeeze(tr, func, args, kwargs, out, found):
    x, (d, g) = args[0], tr.state(args[0])
    dims = _dims(_arg(args, kwargs, 1, "dim"), x.dim())
    gone = [k for k in range(x.dim()) if x.shape[k] == 1 and (dims is None or k in dims) and k != d]
    return (d - sum(1 for k in gone if k < d), g)


def stack(tr, func, args, kwargs, out, found):
    tensors = args[0]
    states = {tr.state(t) for t in tensors if isinstance(t, Tensor) and tr.state(t) is not None}
    if len(states) != 1:
        return mix(func, "stacks tensors whose batch dimensions do not line up")
    d, g = states.pop()
    k = _arg(args, kwargs, 1, "dim", 0) % (tensors[0].dim() + 1)
    return (d + 1 if k <= d else d, g)


def repeat(tr, func, args, kwargs, out, found):
    """repeat/tile copy the whole tensor: along the batch dim that puts every example's copies apart."""
    x, (d, g) = args[0], tr.state(args[0])
    o = _first_out(out)
    shift = o.dim() - x.dim()
    if o.shape[d + shift] != x.shape[d]:
        return mix(func, f"tiles dim {d}, the batch dimension, so copies of an example are not adjacent; use "
                         "repeat_interleave for K copies")
    return (d + shift, g)


def repeat_interleave(tr, func, args, kwargs, out, found):
    x, s = args[0], tr.state(args[0])
    reps, dim = _arg(args, kwargs, 1, "repeats"), _arg(args, kwargs, 2, "dim")
    if not isinstance(s, tuple) or (dim is None and x.dim() > 1) or (isinstance(reps, Tensor) and reps.numel() > 1
                                                                    and (dim is None or dim % x.dim() == s[0])):
        return generic(tr, func, args, kwargs, out, found) if not isinstance(s, tuple) else \
            mix(func, "repeats the batch's entries unevenly or flattened")
    if dim is None or dim % x.dim() == s[0]:
        return (s[0], s[1] * int(reps))
    return s
