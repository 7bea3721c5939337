"""Capture each planned unit's inputs and output gradients on the real forward and backward.

A forward hook records a unit call's inputs and registers a tensor hook on each
output that requires grad. Tensor hooks (not module backward hooks) survive
in-place ops after the layer, such as ``ReLU(inplace=True)``, and give one record
per call, so a module called twice (shared weights) yields two records. In
``hooks``/``functorch`` a call's per-example gradients are computed as soon as
its output gradients arrive and its tensors are freed; in the norm modes
(``ghost``, ``bk``, ``auto``) the records are kept until the end of the backward
pass, when the engine needs every layer's norms before any clipping. The end of
a backward pass is an autograd callback.

Every unit runs on detached stand-ins of its parameters, so autograd forms no
(unclipped) parameter gradient through it, and a planned parameter that still
receives a gradient was used outside its unit: that backward pass is refused.

A trace of the forward (``_trace.py``) tells which inputs derive from the batch.
A layer that does not see the batch (a position embedding looked up as
``arange(T)`` or ``[1, T]`` and broadcast) has its output expanded to the batch,
so that each example's share of the gradient stays apart, and inputs shared by
every example (an attention mask) are not split into examples.

Under ``torch.compile`` every hook here runs eagerly (``eager``): Dynamo graph-breaks at each one instead of
tracing it, so the records, the stand-in swap and the tensor hooks are those of an uncompiled run, and the
layers' own code between them is compiled. The batch trace does the same for each torch call it sees. See
docs/compile.md.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from functools import partial

import attrs
import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

from dpkit.errors import PrivacyUsageError
from dpkit.modes import _parts
from dpkit.modes import functorch as fn_mode
from dpkit.modes._trace import BatchTrace
from dpkit.plan import LayerPlan


_EAGER_REASON = ("dpkit's capture hooks keep Python records, swap parameters for stand-ins and register tensor "
                 "hooks, which a compiled graph must not bake in, so they run eagerly between compiled pieces: "
                 "under dpkit, compile without fullgraph=True (docs/compile.md)")


def eager(fn: Callable, reason: str = _EAGER_REASON) -> Callable:
    """A hook that Dynamo calls instead of tracing: traced, its side effects would be replayed or guarded away.

    A graph break, not a skipped hook: the hook still runs at every call, between the compiled pieces. Outside
    compilation the hook is called directly: ``torch.compiler.disable``'s frame switching costs about 15 µs a call.
    """
    disabled = torch.compiler.disable(fn, reason=reason)

    @functools.wraps(fn)
    def hook(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return hook


def _untraced(fn: Callable) -> Callable:
    """A forward-time hook of the Capturer, run outside the batch trace: its own torch calls need no marks, and
    under a torch-function mode every tensor method written in Python (``register_hook``, ``__hash__``) takes
    torch's slow dispatch path, which cost the hooks about 0.2 ms per layer."""

    @functools.wraps(fn)
    def hook(self: Capturer, *args, **kwargs):
        trace = self._trace
        if trace is None or not trace.suspend():
            return fn(self, *args, **kwargs)
        try:
            return fn(self, *args, **kwargs)
        finally:
            trace.resume()

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
    formed: dict[nn.Parameter, Tensor] | None = None  # auto: small per-example gradients formed on arrival
    blocks: dict[nn.Parameter, list] | None = None  # bk: a sampler's Linear blocks, kept instead of the record
    parts: _parts.Parts | None = None  # bk: the F.linear calls of a parts unit's forward, until processed
    versions: list[int] = attrs.field(factory=list)
    input_versions: list[int | None] = attrs.field(factory=list)  # of ``args``, when the call read them
    unbatched: frozenset[int] = frozenset()  # ids of captured input tensors that do not derive from the batch
    batch: object = None  # which loader batch the forward pass read, where the loader can tell
    done: bool = False

    def release(self) -> None:
        """Drop the recorded tensors: what the record was kept for has been computed from them."""
        self.args, self.kwargs, self.grads, self.blocks = [], {}, [], None


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


class Capturer:
    """Owns the hooks of one attached model and the records of the backward pass in flight."""

    def __init__(self, model: nn.Module, rows: list[LayerPlan], *, K: int, batch_first: bool, rescale: bool,
                 keep_records: bool, keep_outputs: bool, grad_stand_ins: bool,
                 on_backward_end: Callable[..., None], form_on_arrival: Callable[[Capture], bool] | None = None,
                 on_arrival: Callable[[Capture], bool] | None = None):
        self.model = model
        self.plan = rows
        self.K = K
        self.batch_first = batch_first
        self.bdim = 0 if batch_first else 1
        self.rescale = rescale  # loss_reduction="mean": output grads are 1/rows of the sum's; scale them back
        self.keep_records = keep_records
        self.keep_outputs = keep_outputs
        self.form_on_arrival = form_on_arrival  # which records to turn into per-example gradients at once
        self.on_arrival = on_arrival  # the engine's streaming clipper: True when it consumed the record
        self.on_backward_end = on_backward_end
        self.enabled = True
        self.computing = False  # recomputation (torch.func units) must not be captured again
        self.captures: list[Capture] = []
        self.completed: list[Capture] = []
        self.grad_samples: dict[nn.Parameter, Tensor] = {}
        self.batch_rows: int | None = None
        self.batch_hint: int | None = None
        self.used_params: set[nn.Parameter] = set()
        self._queued = False
        self._handles: list = []
        self._signatures = {id(r): forward_arguments(r.module) for r in rows if r.uses_activations}
        # Every unit runs on stand-ins of its parameters (``_stand_in``), so that a planned parameter itself
        # receives a gradient only from a use outside its unit (``x @ layer.weight``): its hook then refuses.
        self._slots = {id(r): _slots(r) for r in rows}
        self.grad_stand_ins = grad_stand_ins  # ghost: the reweighted pass differentiates to the stand-ins
        self.stand_ins: list[tuple[nn.Parameter, Tensor]] = []  # the stand-ins that require grad, in ghost
        self._replaced: dict[int, list[tuple[nn.Module, str, Tensor]]] = {}  # per unit in flight: what it held
        self._watched: set[int] = set()  # ids of FSDP2's unsharded parameters with an outside-use hook
        self.on_refusal: Callable[[BaseException], None] = lambda err: None
        self._trace: BatchTrace | None = None  # which tensors of the forward in flight derive from the batch
        self._input_dims = 0  # of the model's first tensor input, in the forward in flight
        self._hook_ids: dict[int, int] = {}  # each unit's forward hook, which must stay the first one
        self.batch_of: Callable[[list[Tensor]], object] | None = None  # the loader's, set by the engine
        self._forward_batch: object = None
        self._pass_batches: set = set()
        self.last_pass_batches: set = set()  # the loader batches the last backward pass's forwards read
        self._attached = False
        owners = collections.Counter(id(p) for r in rows for p in dict.fromkeys(r.params.values()))
        self._tied_rows = {id(r) for r in rows if any(owners[id(p)] > 1 for p in r.params.values())}
        self._calls: collections.Counter | None = None  # calls per unit in the backward pass in flight
        self._spy = _parts.LinearSpy()  # the F.linear calls of parts units (_parts.py)

    # -- attach / detach -------------------------------------------------------------
    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self.start_forward, with_kwargs=True))
        for row in self.plan:
            if row.module is self.model:
                pass  # its pre-forward work is start_forward's, so that a replan can run it for the call in flight
            elif row.mode == "ew":
                self._handles.append(row.module.register_forward_pre_hook(partial(self._expand, row),
                                                                          with_kwargs=True))
            else:
                self._handles.append(row.module.register_forward_pre_hook(partial(self._stand_in, row)))
                if self._takes_parts(row):
                    self._handles.append(row.module.register_forward_pre_hook(partial(self._open_parts, row)))
            # First among the layer's forward hooks: a user hook that returns a changed output (o * 10) runs after
            # it, on the output the layer computed, so the gradient reaching that output is the layer's own.
            handle = row.module.register_forward_hook(partial(self._on_forward, row), with_kwargs=True,
                                                      always_call=True, prepend=True)
            self._handles.append(handle)
            self._hook_ids[id(row)] = handle.id
        # Last, so that a unit that is the model itself still sees the trace.
        self._handles.append(self.model.register_forward_hook(self._end_forward, always_call=True))
        self._attached = True
        for p in {p for row in self.plan for p in row.params.values()}:
            self._handles.append(p.register_hook(partial(self._on_param_grad, p)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watched.clear()
        self._attached = False
        self._end_forward()
        self.reset()

    @property
    def pass_died(self) -> bool:
        """Whether a backward pass stopped with an error before its end: its end-of-pass callback never ran, so
        it was neither clipped whole nor refused, and what it streamed may sit in the step's buffers."""
        return self._queued and torch._C._current_graph_task_id() == -1

    def drop_dead_pass(self) -> None:
        """Forget a backward pass that stopped with an error; forward passes not yet back-propagated stay."""
        self._queued = False
        self.completed.clear()
        self.grad_samples.clear()
        self.used_params.clear()
        self._pass_batches.clear()
        self.batch_rows, self._calls = None, None
        self.captures = [c for c in self.captures if not c.done]

    def reset(self) -> None:
        """Forget records of forward passes that no backward pass used (called after each step)."""
        self.captures.clear()
        self.completed.clear()
        self.grad_samples.clear()
        self.used_params.clear()
        self._pass_batches.clear()
        self.stand_ins.clear()
        self.batch_rows, self._calls = None, None

    # -- forward ---------------------------------------------------------------------
    def _active(self) -> bool:
        return self._attached and self.enabled and not self.computing and torch.is_grad_enabled()

    @eager
    def start_forward(self, model: nn.Module, args, kwargs=None) -> None:
        """The model's forward pre-hook: the batch size hint, the batch trace, and the stand-ins of a unit that
        is the model. The model's tensor inputs with the batch's rows are the batch."""
        if not self._active() or self._trace is not None:
            return
        inputs = _tensors((args, kwargs))
        self.batch_hint = _rows_at(inputs[0], self.bdim) if inputs else None
        self._input_dims = inputs[0].dim() if inputs else 0
        self._forward_batch = self.batch_of(inputs) if self.batch_of is not None else None
        self._trace = BatchTrace([t for t in inputs if _rows_at(t, self.bdim) == self.batch_hint])
        self._trace.__enter__()
        for row in self.plan:
            if row.module is model:
                if row.mode == "ew":
                    self._expand(row, model, args, kwargs)
                else:
                    self._stand_in(row, model, args)

    def _from_batch(self, t: Tensor, ndim: bool = True) -> bool:
        """Whether ``t`` is the batch's: derived from the model's batched inputs (the trace says), or built for
        the batch from its size rather than its values: ``buffer.expand(B, T)`` (stride 0, BERT's token types)
        and, with ``ndim``, ``arange(T).repeat(B, 1)`` or ``zeros(B, T)``, which have the batch's rows and as
        many dimensions as the model's input (``arange(T)`` with ``T == B`` has fewer, and is broadcast)."""
        if self._trace is None or self._trace.batched(t):
            return True
        hint, dim = self.batch_hint, self.bdim
        if hint is None or t.dim() <= dim or t.shape[dim] != hint:
            return False
        return (hint > 1 and t.stride(dim) == 0) or (ndim and t.dim() >= self._input_dims)

    @eager
    def _end_forward(self, *_) -> None:
        if self._trace is not None:
            trace, self._trace = self._trace, None
            trace.__exit__(None, None, None)

    @eager
    @_untraced
    def _expand(self, row: LayerPlan, module: nn.Module, args, kwargs) -> None:  # restored in _on_forward
        if not self._active():
            return
        from torch.nn.utils._expanded_weights import ExpandedWeight

        device = next((p.device.type for p in row.local_params.values()), "cpu")
        if torch.is_autocast_enabled(device):
            raise PrivacyUsageError(
                f"grad_sample_mode='ew' (ExpandedWeights) does not support autocast ({row.name!r} runs under "
                f"{torch.get_autocast_dtype(device)}); use grad_sample_mode='auto', 'bk' or 'hooks'.")
        first = next(iter(_tensors((args, kwargs))), None)
        if first is not None and not self._from_batch(first):
            raise PrivacyUsageError(
                f"{row.name!r} ({row.type_name}) reads an input that does not come from the batch (e.g. "
                "wpe(torch.arange(T))), which ExpandedWeights cannot differentiate per example. Use "
                "grad_sample_mode='auto' or 'hooks'.")
        rows = _rows_at(first, self.bdim)
        if first is not None and first.dim() < 2 and rows:
            raise PrivacyUsageError(
                f"{row.name!r} ({row.type_name}) got a 1-D input of shape {tuple(first.shape)}; ExpandedWeights "
                "needs a batch dimension and at least one more. Use grad_sample_mode='auto' or 'hooks', or "
                "feed [B, 1] indices.")
        if rows == 0:  # ExpandedWeights refuses an empty batch; it contributes nothing anyway
            self._stand_in(row, module, args)
            return
        self._replaced[id(row)] = [(module, name, p) for name, p in row.local_params.items()]
        for name, p in row.local_params.items():
            if hasattr(p, "grad_sample"):  # the last backward's, shown to the user; ExpandedWeights would add to it
                del p.grad_sample
            module._parameters[name] = ExpandedWeight(p, rows, "sum")

    @eager
    @_untraced
    def _stand_in(self, row: LayerPlan, module: nn.Module, args) -> None:
        """Run the unit on detached stand-ins of its parameters (restored by ``_on_forward``).

        A stand-in requires grad only where something must: the reweighted pass of ghost, and a first unit,
        whose output would otherwise need no gradient at all. Elsewhere autograd then skips the (unclipped,
        unused) parameter gradients.
        """
        if not self._active():
            return
        grad = self.grad_stand_ins or not any(
            t.requires_grad for t in _tensors(args))
        made: dict[int, Tensor] = {}
        replaced = []
        for owner, name, p in self._slots[id(row)]:
            # The slot holds ``p``, or under FSDP2 the unsharded parameter gathered for this forward.
            current = owner._parameters[name]
            if id(p) not in made:
                made[id(p)] = current.detach().requires_grad_(grad) if p.requires_grad else current
                if grad and self.grad_stand_ins and p.requires_grad:
                    self.stand_ins.append((p, made[id(p)]))
                if current is not p and id(current) not in self._watched:
                    self._watch(current, p)
            replaced.append((owner, name, current))
            owner._parameters[name] = made[id(p)]
        self._replaced[id(row)] = replaced

    def _watch(self, gathered: Tensor, p: nn.Parameter) -> None:
        """FSDP2 gathers ``p`` into one persistent unsharded parameter: a gradient reaching it is an outside use."""
        self._watched.add(id(gathered))
        self._handles.append(gathered.register_hook(partial(self._on_param_grad, p)))

    def _restore(self, row: LayerPlan) -> None:
        for owner, name, current in self._replaced.pop(id(row), ()):
            owner._parameters[name] = current

    @eager
    @_untraced
    def _on_forward(self, row: LayerPlan, module: nn.Module, args, kwargs, output):
        self._restore(row)
        parts = self._close_parts(row)
        if not self._active():
            return None
        if next(iter(module._forward_hooks)) != self._hook_ids[id(row)]:
            raise PrivacyUsageError(
                f"a forward hook registered with prepend=True on {row.name!r} ({row.type_name}) runs before "
                "dpkit's, so a change it makes to the layer's output would escape per-example clipping. Register "
                "it without prepend=True.")
        if isinstance(output, Tensor):  # the common case, without pytree's walk
            leaves = [output]
            wanted = {0} if output.requires_grad else set()
        else:
            leaves = _tensors(output)
            wanted = {i for i, t in enumerate(leaves) if t.requires_grad}
        if not wanted:
            return None
        trace, hint = self._trace, self.batch_hint
        inputs = _tensors((args, kwargs))
        # A unit recomputed per example (torch.func) shares an input unless it derives from the batch: an
        # attention mask is [T, T] also when T == B. A sampler layer's call is broadcast unless some input
        # derives from the batch or was built in its shape.
        batched = [self._from_batch(t, ndim=False) for t in inputs]
        call_batched = any(b or self._from_batch(t) for t, b in zip(inputs, batched))
        args = [a.detach() if isinstance(a, Tensor) else a if type(a) in _ATOMS else pytree.tree_map(_detach, a)
                for a in args]
        kwargs = {k: v.detach() if isinstance(v, Tensor) else v if type(v) in _ATOMS else pytree.tree_map(_detach, v)
                  for k, v in kwargs.items()}
        detached = _tensors((args, kwargs))
        unbatched = frozenset(id(t) for t, b in zip(detached, batched) if not b)
        if row.uses_activations:
            args = args + [kwargs.get(n, d) for n, d in self._signatures[id(row)][len(args):]]
            kwargs = {}
        out_dim = fn_mode.output_batch_dims(module, self.batch_first, leaves)[0]
        rows = _call_rows(output, leaves[0], out_dim)
        expanded = False
        if (trace is not None and not call_batched and isinstance(output, Tensor) and hint is not None
                and row.mode != "ew"):
            # A lookup that does not see the batch (wpe(arange(T)), broadcast over it): give every example its
            # own copy of the output, so that its share of the gradient stays its own.
            add_dim = output.dim() <= out_dim or output.shape[out_dim] != 1
            output = leaves[0] = _broadcast(output, out_dim, hint, add_dim)
            args = [_broadcast(a, out_dim, hint, add_dim) for a in args]
            rows, expanded, unbatched = hint, True, frozenset()
        cap = Capture(row, args, kwargs, rows, out_dim, [None] * len(leaves), wanted, unbatched=unbatched,
                      batch=self._forward_batch)
        cap.input_versions = [a._version if isinstance(a, Tensor) else None for a in args]
        if self.keep_outputs:
            cap.outputs = [leaves[i] for i in sorted(wanted)]
            cap.versions = [t._version for t in cap.outputs]
        self.captures.append(cap)
        for i in wanted:
            leaves[i].register_hook(partial(self._on_output_grad, cap, i))
        if parts is not None and not expanded:
            self._attach_parts(cap, parts)
        return output if expanded else None

    # -- linear parts (_parts.py) ----------------------------------------------------
    def _takes_parts(self, row: LayerPlan) -> bool:
        """Whether bk/auto take this unit's gradients from its forward's F.linear calls (its sampler declares them).

        Not for ghost (its second backward pass reweights the output gradients) nor a unit that is the model."""
        return row.mode == "bk" and row.module is not self.model and hasattr(row.sampler, "linear_calls")

    @eager
    @_untraced
    def _open_parts(self, row: LayerPlan, module: nn.Module, args) -> None:
        """After ``_stand_in``: record the F.linear calls on the unit's trainable stand-ins until its forward ends."""
        if not self._active() or self._trace is None or id(row) not in self._replaced:
            return
        stands = {id(p): (owner._parameters[name], p) for owner, name, p in self._slots[id(row)] if p.requires_grad}
        self._spy.open(id(row), list(stands.values()))
        self._trace.spy = self._spy

    def _close_parts(self, row: LayerPlan) -> _parts.Parts | None:
        parts = self._spy.close(id(row))
        if not self._spy.active and self._trace is not None:
            self._trace.spy = None
        return parts

    def _attach_parts(self, cap: Capture, parts: _parts.Parts) -> None:
        """Make the record wait for the output gradient of each recorded call too (they arrive after its own)."""
        cap.parts = parts
        for i, call in enumerate(parts.calls):
            out, call.out = call.out, None
            if not out.requires_grad:  # its parameter rows would get no gradient here: leave it to the sampler
                parts.broken = "an F.linear output needs no gradient"
                continue
            cap.pending.add(-1 - i)  # negative: the i-th call's output, beside the unit's own outputs
            out.register_hook(partial(self._on_output_grad, cap, -1 - i))

    def _take_parts(self, cap: Capture) -> None:
        """The recorded calls as the record's Linear blocks, or nothing: then the sampler computes the record."""
        parts, cap.parts = cap.parts, None
        if parts is None or not cap.rows:
            return
        row = cap.row
        own = [p for p in dict.fromkeys(row.params.values()) if p.requires_grad]

        def assemble(layer: nn.Module, activations: list, backprops: list, K: int) -> dict:
            return _parts.blocks(parts, row.sampler.linear_calls, own, layer, activations, backprops)

        assemble.all_outputs = True
        with self.quiet():
            cap.blocks = row.call(assemble, cap.args, cap.grads, self.K, cap.bdim == 0) or None

    def live_outputs(self) -> list[Tensor] | None:
        """Outputs of the calls whose gradients have not arrived yet (ghost's norm pass differentiates to them).

        ``None`` if one was modified in place after the layer (``ReLU(inplace=True)``): differentiating to
        it would stop at the in-place op, above the layer, so the norm pass must go down to the parameters.
        """
        live = [cap for cap in self.captures if not cap.done]
        if any(t._version != v for cap in live for t, v in zip(cap.outputs, cap.versions)):
            return None
        return [t for cap in live for t in cap.outputs]

    # -- backward --------------------------------------------------------------------
    @eager
    def _on_param_grad(self, p: nn.Parameter, grad: Tensor) -> None:
        if self.enabled and not self.computing:
            self.used_params.add(p)
            self._queue_end()

    def _refuse(self, err: BaseException) -> None:
        """A backward pass was refused: forget it whole, and let the engine refuse the step until it is discarded."""
        self.reset()
        self._queued = False
        self.on_refusal(err)

    @eager
    def _on_output_grad(self, cap: Capture, index: int, grad: Tensor) -> Tensor | None:
        if not self.enabled or self.computing:
            return None
        try:
            return self._take_output_grad(cap, index, grad)
        except Exception as err:
            self._refuse(err)
            raise

    def _take_output_grad(self, cap: Capture, index: int, grad: Tensor) -> Tensor | None:
        if cap.done:
            raise PrivacyUsageError(
                f"backward() ran a second time through one forward pass of {cap.row.name!r} "
                f"({cap.row.type_name}). Each backward() must follow its own forward pass: run the "
                "forward again, or sum the losses and call backward() once."
            )
        if index < 0:  # an F.linear call inside a parts unit (``_attach_parts``): kept as autograd gave it
            cap.parts.calls[-1 - index].grad = relaid = grad
        else:
            relaid = _dense(grad)
            cap.grads[index] = relaid
        cap.pending.discard(index)
        self._queue_end()
        if not cap.pending:
            self._process(cap)
        return relaid if relaid is not grad else None

    def _queue_end(self) -> None:
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._backward_end)

    def _process(self, cap: Capture) -> None:
        cap.done = True
        self._pass_batches.add(cap.batch)
        cap.outputs, cap.versions = [], []
        if any(v is not None and a._version != v for a, v in zip(cap.args, cap.input_versions)):
            # Autograd would catch this only if it had saved the input, and with detached parameters it has not.
            raise PrivacyUsageError(
                f"an input of {cap.row.name!r} ({cap.row.type_name}) was modified in place after the layer read "
                "it (e.g. `x += layer(x)`), so its per-example gradients would be computed from the changed "
                "values. Use an out-of-place operation there (`x = x + layer(x)`)."
            )
        if self.batch_rows is None:
            self.batch_rows = cap.rows
        elif cap.rows != self.batch_rows:
            raise PrivacyUsageError(
                f"{cap.row.name!r} ({cap.row.type_name}) saw {cap.rows} rows in this backward pass, "
                f"other layers saw {self.batch_rows}. Every layer must see the batch along dim "
                f"{cap.bdim} (batch_first={self.batch_first}); per-example gradients are undefined otherwise."
            )
        if cap.rows % self.K:
            raise PrivacyUsageError(
                f"{cap.row.name!r} saw {cap.rows} rows, not a multiple of augmentation_multiplicity "
                f"K={self.K}. Feed the K augmented copies of each example as adjacent rows "
                "(dpkit.data.Multiplicity does this)."
            )
        if cap.row.mode == "ew":
            return
        self._take_parts(cap)
        if self.keep_records:
            # The norm modes apply the "mean" rescale to the norms and the clip weights (two scalars per
            # example) instead of to every output gradient.
            if self.keep_outputs and cap.row.norm_sampler is not None and not self._shared(cap):
                # Ghost needs only norms from this pass: take them now and free the record.
                with self.quiet():
                    norms = cap.row.call(cap.row.norm_sampler, cap.args, cap.grads, self.K, cap.bdim == 0)
                cap.squares = {p: n.to(torch.promote_types(n.dtype, torch.float32)).square() for p, n in norms.items()}
                cap.release()
            elif self.form_on_arrival is not None and self.form_on_arrival(cap) and not self._shared(cap):
                # Per-example gradients no bigger than the record: form them now and free the record.
                cap.formed = self.compute(cap)
                cap.release()
            if self.on_arrival is not None and cap.squares is None and not self._shared(cap) and self.on_arrival(cap):
                cap.release()  # clipped and summed already: no record outlives its layer's backward
                return
            self.completed.append(cap)
            return
        scale = cap.rows if self.rescale else 1
        if scale != 1:
            cap.grads = [g * scale if g is not None else None for g in cap.grads]
        for p, gs in self.compute(cap).items():
            self._add(p, gs)
        cap.release()

    def _shared(self, cap: Capture) -> bool:
        """Whether another call of this backward pass may use one of the call's parameters.

        True for a unit with a parameter of another unit (tied), whether or not that one ran, and for a unit
        called twice; counted once per pass, so deciding costs O(1) per record rather than a scan of them all.
        """
        if self._calls is None:  # no forward runs during a backward pass: the captures are all there
            self._calls = collections.Counter(id(c.row) for c in (*self.captures, *self.completed))
        return id(cap.row) in self._tied_rows or self._calls[id(cap.row)] > 1

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Switch capture off while units are recomputed (their hooks would fire again)."""
        self.computing = True
        try:
            yield
        finally:
            self.computing = False

    def compute(self, cap: Capture) -> dict[nn.Parameter, Tensor]:
        """Per-example gradients ``[B, *p.shape]`` (K-summed) of one call."""
        if cap.blocks is not None:
            return _parts.per_example(cap.blocks, self.K)
        with self.quiet():
            batch_first = self.batch_first if not cap.row.uses_activations else cap.bdim == 0
            return cap.row.compute(cap.args, cap.kwargs, cap.grads, cap.rows, self.K, batch_first, cap.unbatched)

    def _add(self, p: nn.Parameter, grad_sample: Tensor) -> None:
        self.grad_samples[p] = self.grad_samples[p] + grad_sample if p in self.grad_samples else grad_sample

    @eager
    def _backward_end(self) -> None:
        self._queued = False
        try:
            self._end_pass()
        except Exception as err:
            self._refuse(err)
            raise

    def _end_pass(self) -> None:
        for cap in self.captures:
            if not cap.done and any(g is not None for g in cap.grads):
                self._process(cap)  # a multi-output call some of whose outputs got no gradient
        self.captures = [c for c in self.captures if not c.done]
        self._collect_expanded_weights()
        if self.used_params:  # units run on stand-ins: the parameter itself was used outside its unit
            names = {n for row in self.plan for n, q in row.params.items() if q in self.used_params}
            raise PrivacyUsageError(
                f"parameter(s) {sorted(names)} received gradients from a use outside their module's forward "
                "(e.g. F.linear(h, emb.weight) or x @ layer.weight), which dpkit cannot clip per example, so "
                "this backward pass is refused. Call the module itself (tie weights by sharing the Parameter "
                "between modules), or use grad_sample_mode='functorch' if the use is inside the model's forward."
            )
        rows = self.batch_rows
        self.last_pass_batches, self._pass_batches = self._pass_batches - {None}, set()
        result = self.completed if self.keep_records else self.grad_samples
        self.grad_samples, self.completed, self.batch_rows, self.used_params = {}, [], None, set()
        self._calls = None
        if rows is not None:
            self.on_backward_end(result, rows)

    def _collect_expanded_weights(self) -> None:
        for row in self.plan:
            if row.mode != "ew":
                continue
            for p in row.local_params.values():
                gs = getattr(p, "grad_sample", None)
                if gs is None:
                    continue
                del p.grad_sample
                if isinstance(row.module, nn.Embedding) and row.module.padding_idx is not None:
                    gs[:, row.module.padding_idx] = 0  # ExpandedWeights ignores padding_idx; its gradient is 0
                rows = gs.shape[0]
                scale = rows if self.rescale else 1
                self._add(p, (gs * scale).reshape(rows // self.K, self.K, *p.shape).sum(1))
                if self.batch_rows is None:
                    self.batch_rows = rows
