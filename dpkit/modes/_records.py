"""A unit call's record (:class:`Capture`), what the capture does when its gradients arrive (:class:`Arrival`),
and the small helpers the capture's hooks share.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import attrs
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

from dpkit.modes import _parts
from dpkit.plan import LayerPlan

_EAGER_REASON = ("dpkit's capture hooks keep Python records, swap parameters for stand-ins and register tensor "
                 "hooks, which a compiled graph must not bake in, so they run eagerly between compiled pieces: "
                 "under dpkit, compile without fullgraph=True (docs/compile.md)")


def eager(fn: Callable, reason: str = _EAGER_REASON) -> Callable:
    """A hook that Dynamo calls instead of tracing: traced, its side effects would be replayed or guarded away.

    A graph break, not a skipped hook: the hook still runs at every call, between the compiled pieces. Outside
    compilation the hook is called directly: ``torch.compiler.disable``'s frame switching costs about 15 µs a call.
    """
    disabled = None  # made on first use: torch.compiler.disable imports torch._dynamo (about a second)

    @functools.wraps(fn)
    def hook(*args, **kwargs):
        nonlocal disabled
        if torch.compiler.is_compiling():
            if disabled is None:
                disabled = torch.compiler.disable(fn, reason=reason)
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return hook


_ATOMS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _tensors(tree: object) -> list[Tensor]:
    """The tensors of a hook's arguments or a layer's output, in pytree's order. Plain tuples, lists and dicts and
    scalars are walked by hand (pytree costs about 20 µs a call, several calls a layer); anything else by pytree."""
    kind = type(tree)
    if isinstance(tree, Tensor):
        return [tree]
    if kind is tuple or kind is list:
        return [t for x in tree for t in _tensors(x)]
    if kind is dict:
        return [t for x in tree.values() for t in _tensors(x)]
    if kind in _ATOMS:
        return []
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


def _detach(x):
    return x.detach() if isinstance(x, Tensor) else x


@attrs.define(eq=False)
class Capture:
    """One call of one planned unit, from forward to the arrival of its output gradients."""

    row: LayerPlan
    args: list
    kwargs: dict
    rows: int
    bdim: int  # the batch dimension of this call's output (and of its inputs, for samplers)
    grads: list[Tensor | None]
    pending: set[int]
    outputs: list[Tensor] = attrs.field(factory=list)  # kept in ghost mode for the norm pass
    squares: dict[nn.Parameter, Tensor] | None = None  # ghost: norms taken on arrival, the record freed
    formed: dict[nn.Parameter, Tensor] | None = None  # bk, auto: small per-example gradients formed on arrival
    blocks: dict[nn.Parameter, list] | None = None  # bk: a sampler's Linear blocks, kept instead of the record
    parts: _parts.Parts | None = None  # bk: the F.linear calls of a parts unit's forward, until processed
    group: object = None  # bk: the stacked group of same-shaped Linear records this one joined (_groups.py)
    versions: list[int] = attrs.field(factory=list)
    input_versions: list[int | None] = attrs.field(factory=list)  # of ``args``, when the call read them
    unbatched: frozenset[int] = frozenset()  # ids of captured input tensors that do not derive from the batch
    batch: object = None  # which loader batch the forward pass read, where the loader can tell
    done: bool = False

    def release(self) -> None:
        """Drop the recorded tensors: what the record was kept for has been computed from them."""
        self.args, self.kwargs, self.grads, self.blocks = [], {}, [], None


@attrs.frozen
class Arrival:
    """What the capture does with a call's record once all its output gradients have arrived: one policy per mode.

    ``kind`` is ``"per_example"`` (hooks, functorch, ew: per-example gradients at once, the record freed),
    ``"records"`` (bk, auto: kept for the end of the pass, when every layer's norm is known) or ``"norms"``
    (ghost: norms at once, the record freed, the outputs kept for the reweighting pass, whose stand-ins require
    grad). ``form``: which records ``bk`` and ``auto`` turn into per-example gradients at once. ``stream``: the
    engine's streaming clipper, True when it clipped and summed the record (per-layer clipping).
    """

    kind: str
    form: Callable[[Capture], bool] | None = None
    stream: Callable[[Capture], bool] | None = None

    @property
    def keeps_records(self) -> bool:
        return self.kind != "per_example"

    @property
    def ghost(self) -> bool:
        return self.kind == "norms"


def forward_arguments(module: nn.Module) -> list[tuple[str, object]]:
    """``forward``'s parameters after ``self`` with their defaults, up to any ``*args``/``**kwargs``."""
    out = []
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            break
        out.append((param.name, None if param.default is param.empty else param.default))
    return out


def _rows_at(x: Tensor | None, dim: int) -> int:
    if x is None or x.dim() == 0:
        return 0
    return x.shape[dim] if x.dim() > dim else x.shape[0]


def _call_rows(output: object, first: Tensor | None, dim: int) -> int:
    """The rows of one unit call: its first output tensor's along ``dim``, except that an RNN fed a
    ``PackedSequence`` returns one whose ``data`` rows are the steps of every example: it holds ``batch_sizes[0]``."""
    head = output[0] if type(output) is tuple and output else output
    if isinstance(head, PackedSequence):
        return int(head.batch_sizes[0])  # torch packs no empty batch
    return _rows_at(first, dim)


def _dense(grad: Tensor) -> Tensor:
    """A gradient that arrived strided (an LM head's, from a loss on ``[B, V, T]``) made contiguous, once.

    Handed back to autograd too, so the layer's own backward and the samplers all read the one copy instead
    of each making its own. Gradients dense in a memory format (channels-last) are left as they are.
    """
    if grad.is_contiguous() or (grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last)) or (
            grad.dim() == 5 and grad.is_contiguous(memory_format=torch.channels_last_3d)):
        return grad
    return grad.contiguous()


def _slots(row: LayerPlan) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Where the unit's forward reads each planned parameter: (module, attribute, parameter), every tied slot."""
    if row.uses_activations or row.mode == "ew":
        return list(row.owners)
    planned = {id(p) for p in row.params.values()}
    return [(m, n, p) for m in row.module.modules() for n, p in m._parameters.items()
            if p is not None and id(p) in planned]


def _broadcast(x, dim: int, rows: int, add_dim: bool):
    """An unbatched tensor as the batch sees it: ``[T, d]`` (``add_dim``) or ``[1, T, d]`` → ``[rows, T, d]``."""
    if not isinstance(x, Tensor) or x.dim() < dim:
        return x
    if add_dim:
        x = x.unsqueeze(dim)
    elif x.dim() == dim or x.shape[dim] != 1:
        return x
    return x.expand(*x.shape[:dim], rows, *x.shape[dim + 1:])
