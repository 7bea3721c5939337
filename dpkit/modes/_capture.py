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
import functools
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from dpkit.errors import PrivacyUsageError
from dpkit.modes import _parts
from dpkit.modes import functorch as fn_mode
from dpkit.modes._arrivals import Arrivals
from dpkit.modes._records import (_ATOMS, Arrival, Capture, _broadcast, _call_rows, _detach, _rows_at, _slots,
                                  _tensors, eager, forward_arguments)
from dpkit.modes import _trace
from dpkit.modes._trace import BatchTrace
from dpkit.plan import LayerPlan


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


class Capturer(Arrivals):
    """Owns the hooks of one attached model (the forward half; the backward half is :class:`Arrivals`)."""

    def __init__(self, model: nn.Module, rows: list[LayerPlan], *, K: int, batch_first: bool, rescale: bool,
                 arrival: Arrival, on_backward_end: Callable[..., None]):
        self.model = model
        self.plan = rows
        self.K = K
        self.batch_first = batch_first
        self.bdim = 0 if batch_first else 1
        self.rescale = rescale  # loss_reduction="mean": output grads are 1/rows of the sum's; scale them back
        self.arrival = arrival
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
        self.stand_ins: list[tuple[nn.Parameter, Tensor]] = []  # the stand-ins that require grad, in ghost
        self._replaced: dict[int, list[tuple[nn.Module, str, Tensor]]] = {}  # per unit in flight: what it held
        self._watched: set[int] = set()  # ids of FSDP2's unsharded parameters with an outside-use hook
        self.on_refusal: Callable[[BaseException], None] = lambda err: None
        self._trace: BatchTrace | None = None  # which tensors of the forward in flight derive from the batch
        self._loss_trace: BatchTrace | None = None  # the last forward's outputs followed to the loss
        self._loop_before: BatchTrace | None = None  # the loop's trace the forward in flight took over
        self._guarded = frozenset(id(p) for row in rows for p in row.params.values())
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
        self.end_loop_trace()
        self.reset()

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
        loop = _trace.active_loop_trace()  # the loader's batch, or an earlier forward's outputs on their way
        if loop is not None:
            _trace.remove(loop)
        batched = [t for t in inputs if _rows_at(t, self.bdim) == self.batch_hint]
        # Rows that are not whole groups of K are refused by the capture, with its own message; nothing to follow.
        whole = self.batch_hint is not None and self.batch_hint % self.K == 0
        trace = BatchTrace(batched, batch_dim=self.bdim if whole else None, group=self.K, source=loop)
        trace.refuse_mixed(batched, where="the model's input")  # before the trace goes on the stack
        self._trace, self._loop_before = trace, loop
        trace.__enter__()
        for row in self.plan:
            if row.module is model:
                if row.mode == "ew":
                    self._expand(row, model, args, kwargs)
                else:
                    self._stand_in(row, model, args)

    def _from_batch(self, t: Tensor, ndim: bool = True) -> bool:
        """Whether ``t`` is the batch's: derived from the model's batched inputs (the trace says), or built for the
        batch from its size: ``buffer.expand(B, T)`` (stride 0, BERT's token types) and, with ``ndim``,
        ``arange(T).repeat(B, 1)`` or ``zeros(B, T)``, as many dims as the model's input (``arange(T)`` has fewer)."""
        if self._trace is None or self._trace.batched(t):
            return True
        hint, dim = self.batch_hint, self.bdim
        if hint is None or t.dim() <= dim or t.shape[dim] != hint:
            return False
        return (hint > 1 and t.stride(dim) == 0) or (ndim and t.dim() >= self._input_dims)

    @eager
    def _end_forward(self, model=None, args=None, output=None) -> None:
        """The model's forward hook: the forward's trace ends, and a loop trace follows its outputs to the loss."""
        if self._trace is None:
            return
        trace, self._trace = self._trace, None
        trace.__exit__(None, None, None)
        outputs = _tensors(output) if output is not None else []
        if self._active() and trace.batch_dim is not None and any(t.requires_grad for t in outputs):
            self._loss_trace = _trace.loss_trace(outputs, trace, self.bdim, self.K, self._guarded,  # and the loop's
                                                 "mean" if self.rescale else "sum", self.grad_scaler, self._loop_before)
        self._loop_before = None

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
        grad = self.arrival.ghost or not any(
            t.requires_grad for t in (args if all(isinstance(a, Tensor) for a in args) else _tensors(args)))
        made: dict[int, Tensor] = {}
        replaced = []
        for owner, name, p in self._slots[id(row)]:
            # The slot holds ``p``, or under FSDP2 the unsharded parameter gathered for this forward.
            current = owner._parameters[name]
            if id(p) not in made:
                made[id(p)] = current.detach().requires_grad_(grad) if p.requires_grad else current
                if grad and self.arrival.ghost and p.requires_grad:
                    self.stand_ins.append((p, made[id(p)]))
                if current is not p and id(current) not in self._watched:
                    self._watch(current, p)
            replaced.append((owner, name, current))
            owner._parameters[name] = made[id(p)]
        self._replaced[id(row)] = replaced

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
        plain = not kwargs and all(isinstance(a, Tensor) for a in args)  # the common call, f(x): no walks
        inputs = list(args) if plain else _tensors((args, kwargs))
        # A unit recomputed per example (torch.func) shares an input unless it derives from the batch: an
        # attention mask is [T, T] also when T == B. A sampler layer's call is broadcast unless some input
        # derives from the batch or was built in its shape.
        batched = [self._from_batch(t, ndim=False) for t in inputs]
        call_batched = any(b or self._from_batch(t) for t, b in zip(inputs, batched))
        if plain:
            args = detached = [a.detach() for a in inputs]
        else:
            args = [a.detach() if isinstance(a, Tensor) else a if type(a) in _ATOMS else pytree.tree_map(_detach, a)
                    for a in args]
            kwargs = {k: v.detach() if isinstance(v, Tensor) else v if type(v) in _ATOMS
                      else pytree.tree_map(_detach, v) for k, v in kwargs.items()}
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
        if self.arrival.ghost:
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
        self._spy.open(id(row), list(stands.values()), getattr(row.sampler, "linear_forms", None))
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

__all__ = ["Arrival", "Capture", "Capturer", "eager"]
