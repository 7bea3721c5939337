"""Which tensors of a forward pass derive from the batch: a taint carried through every torch call.

A layer's input need not come from the batch. nanoGPT looks up ``wpe(torch.arange(T))`` and broadcasts the
``[T, d]`` result over the batch; an attention mask is ``[T, T]``. Shapes cannot tell these apart from batched
tensors when ``T`` equals the batch size, and treating position t as example t is silently wrong. So the
model's batched inputs are marked, and every torch function or tensor method whose arguments include a
marked tensor marks its outputs (tensor factories like ``x.new_zeros`` excepted: only their device and dtype
come from ``x``). A layer whose inputs carry no mark did not see the batch.

Each mark also says where the batch's examples are (``_rows.py``): the trace refuses, naming the operation, a
call that mixes examples while its output needs a gradient. Given no ``batch_dim`` it only marks.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from dpkit.errors import PrivacyUsageError, RowMixingError
from dpkit.modes import _backward_code
from dpkit.modes._row_rules import generic
from dpkit.modes._rows import FREE, TRUSTED, Mixed, Summed, refusal, state_of

_FACTORIES = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "new_empty_strided"})
# Reading these attributes computes nothing from the batch: the tensor a view was made from (FSDP2 and autograd
# look at it), a gradient, a node of the graph.
_UNTRACKED_GETTERS = frozenset({torch.Tensor._base.__get__, torch.Tensor.grad.__get__, torch.Tensor.grad_fn.__get__,
                                torch.Tensor._grad.__get__, torch.Tensor._grad_fn.__get__})
_BACKWARD, _SETITEM, _GRAD = torch.Tensor.backward, torch.Tensor.__setitem__, torch.autograd.grad
_REGISTER_HOOK = torch.Tensor.register_hook
_AUTOGRAD_BACKWARD = torch.autograd.backward


class BatchTrace(TorchFunctionMode):
    """Active from the model's forward pre-hook to its forward hook; ``batched(t)`` asks about a tensor.

    ``batch_dim``: the dim of ``inputs`` that holds the examples, ``group`` rows each (K augmented copies), to
    check that rows stay independent; None only marks. ``source``: a trace that already knows some of
    ``inputs`` (the data loader's batch), whose states they keep."""

    def __init__(self, inputs: Iterable[Tensor], batch_dim: int | None = None, *, group: int = 1,
                 source: BatchTrace | None = None):
        super().__init__()
        self._marked: dict[int, tuple[weakref.ref, object]] = {}
        # Set by the capture while a unit whose sampler declares linear_calls runs: it runs each call instead, to
        # record the F.linear calls on the unit's parameters (dpkit/modes/_parts.py). None otherwise: one check.
        self.spy: Callable[[Callable, tuple, dict], object] | None = None
        self.batch_dim, self.group = batch_dim, group
        self._trusted = 0  # inside a function declared row-wise
        self.loop = False  # a trace of the training loop (the loader's batch, or the model's outputs to the loss)
        self.guarded: frozenset[int] = frozenset()  # ids of parameters whose gradients only dpkit may release
        self.finished = False  # a loop trace whose backward has run: it only passes calls through
        self.reduction: str | None = None  # a loss trace's: make_private's loss_reduction, "mean" or "sum"
        self.scaler: object = None  # a loss trace's: make_private's grad_scaler
        self.scaled_by: object = None  # the GradScaler that scaled the loss, if one did
        self.required: list[Tensor] = []  # a loop's: batch fields the loss must be weighted by (ByUser's weights)
        self.adopt(inputs, source)

    @contextlib.contextmanager
    def trusting(self) -> Iterator[None]:
        """Inside a function declared row-wise (:func:`rowwise`): its own operations are not checked."""
        self._trusted += 1
        try:
            yield
        finally:
            self._trusted -= 1

    def adopt(self, tensors: Iterable[Tensor], source: BatchTrace | None = None) -> None:
        """Mark tensors handed over (the model's outputs, to follow them to the loss): with ``source``'s state
        where it knows them, else with the examples along ``batch_dim``."""
        for t in tensors:
            s = source.state(t) if source is not None else None
            self._mark(t, self._fresh(t) if s is None else s)

    def _fresh(self, t: Tensor) -> object:
        if self.batch_dim is None or t.dim() == 0:
            return FREE
        d = self.batch_dim % t.dim()
        return FREE if t.shape[d] <= self.group else (d, self.group)  # one example cannot mix with another

    def _mark(self, t: Tensor, state: object) -> None:
        self._marked[id(t)] = (weakref.ref(t), state)

    def batched(self, t: object) -> bool:
        entry = self._marked.get(id(t))
        return entry is not None and entry[0]() is t

    def state(self, t: object) -> object:
        """``(dim, group)``, ``Summed``, ``Mixed``, ``FREE``/``TRUSTED``, or None for a tensor not from the batch."""
        entry = self._marked.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def tracked(self) -> list[Tensor]:
        """The live tensors this trace has marked (to hand them over to another trace)."""
        return [t for t in (ref() for ref, _ in self._marked.values()) if t is not None]

    def refuse_mixed(self, tensors: Iterable[object], where: str) -> None:
        """Refuse tensors whose rows mix examples (``where``: "the model's input"), e.g. a batch mixed with a
        permutation of itself between the data loader and the model."""
        for t in tensors:
            s = self.state(t)
            if type(s) is Mixed:
                raise RowMixingError(f"{where} mixes examples: {s.why}. Each row the model sees must be one "
                                     "example's (mixup and similar augmentations across examples break per-example "
                                     "clipping); augment each example on its own, or declare a row-wise "
                                     "function with dpkit.rowwise(fn).")

    def check_loss(self, loss: Tensor, gradient: Tensor | None = None, training: bool = True) -> None:
        """At ``backward``: the loss must reduce its rows by a plain sum or a mean over a count fixed by shapes
        (or be per-row losses with a gradient per row); a normaliser taken from the batch mixes examples. A sum
        where ``loss_reduction`` says mean (or the reverse) is refused too, for a loss whose gradient trains
        (``backward``; not ``autograd.grad``, whose result dpkit does not release)."""
        s = self.state(loss)
        if s is not None:  # a custom Function that made the loss itself is not seen by a later call
            _backward_code.refuse_custom_functions([(loss, s)])
        if self.scaled_by is not None and self.scaled_by is not self.scaler:
            raise PrivacyUsageError(
                "the loss was scaled by a torch.amp.GradScaler that make_private does not know: dpkit would clip the "
                "per-example gradients still multiplied by its scale, and scaler.step would find no gradient to "
                "unscale. Pass it to make_private(grad_scaler=scaler) (docs/mixed-precision.md).")
        if type(s) is Summed and self.reduction is not None and training:
            _check_reduction(s, self.reduction)
        if training and self.required:
            _check_weighted(loss, self.required)
        if type(s) is tuple and gradient is not None and self.state(gradient) not in (None, s, FREE):
            s = Mixed(f"the gradient passed to backward is computed from other rows ({self.state(gradient)})")
        if type(s) is Mixed:
            raise RowMixingError(
                f"the loss is not a plain sum of per-example losses (or their mean over a fixed count): {s.why}. "
                "dpkit needs loss = sum over examples of each example's own loss, or that sum divided by a "
                "number that does not depend on the data; average each example's tokens by its own count "
                "(private.criterion does), then sum or mean over examples.")

    def suspend(self) -> bool:
        """Leave the torch-function stack while dpkit's own hooks run, if on top of it; ``True`` if it left."""
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is self:
            torch._C._pop_torch_function_stack()
            return True
        return False

    def resume(self) -> None:
        """Back on the stack after ``suspend``."""
        torch._C._push_on_torch_function_stack(self)

    def found(self, args: tuple, kwargs: dict | None) -> list[tuple[Tensor, object]]:
        """The marked tensors among a call's arguments (one level of lists and tuples: ``torch.cat``'s) and their
        states. Walked by hand: pytree costs ~20 us a call."""
        marked, found = self._marked, []
        for group in (args, kwargs.values() if kwargs else ()):
            for v in group:
                if isinstance(v, Tensor):
                    entry = marked.get(id(v))
                    if entry is not None and entry[0]() is v:
                        found.append((v, entry[1]))
                elif isinstance(v, (list, tuple)):
                    for w in v:
                        entry = marked.get(id(w))
                        if entry is not None and entry[0]() is w:
                            found.append((w, entry[1]))
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.finished:
            return func(*args, **(kwargs or {}))
        if torch.compiler.is_compiling():  # Dynamo inlines the mode; marks need real tensors' ids
            return _eagerly(self, func, args, kwargs)
        return self._traced(func, args, kwargs)

    def _traced(self, func, args, kwargs):
        if (func is _BACKWARD or func is _GRAD or func is _AUTOGRAD_BACKWARD) and self._marked:
            self._check_backward(func, args, kwargs or {})
        if func is _REGISTER_HOOK and not self._trusted and self.batched(args[0]):  # hooks may observe, not change
            args, kwargs = _guarded_hook(args, kwargs or {})
        out = func(*args, **(kwargs or {})) if self.spy is None else self.spy(func, args, kwargs or {})
        if not self._marked:
            return out
        target = out
        if out is None:
            if func is not _SETITEM:
                return out
            target = args[0]  # x[idx] = v changes x
        elif type(out) is torch.Size or not isinstance(out, (Tensor, tuple, list)):
            return out
        found = self.found(args, kwargs)
        if not found or getattr(func, "__name__", "") in _FACTORIES or func in _UNTRACKED_GETTERS:
            return out
        if self._trusted:
            self._mark_all(target, TRUSTED)
            return out
        if torch.is_grad_enabled():  # code the backward pass would run on these rows
            _backward_code.refuse_custom_functions(found)
            _backward_code.refuse_saved_tensor_hooks()
        state = state_of(self, func, args, kwargs or {}, target, found)
        if type(state) is Mixed and _packing():
            state = TRUSTED  # torch's packing sorts and gathers rows by length, and the RNN puts them back
        if (type(state) is tuple or state is FREE) and type(target) is Tensor:  # the common case, no walk
            self._marked[id(target)] = (weakref.ref(target), state)
        else:
            self._settle(func, target, state)
        return out

    def _check_backward(self, func, args: tuple, kwargs: dict) -> None:
        """Tensor.backward, torch.autograd.backward and torch.autograd.grad: each loss, with its gradient."""
        if self.loop:
            self.finished = True  # the loss is formed: what the loop does after it is not the gradient's
        if func is _GRAD and self.guarded:
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else ())
            inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
            if any(id(t) in self.guarded for t in inputs):
                raise PrivacyUsageError(
                    "torch.autograd.grad(loss, parameters) would hand back the parameters' gradients unclipped and "
                    "without noise (and dpkit runs each layer on stand-ins of its parameters, so torch has none to "
                    "give). Call loss.backward() and optimizer.step(): dpkit clips, noises and releases them.")
        if func is _BACKWARD:
            self.check_loss(args[0], kwargs.get("gradient", args[1] if len(args) > 1 else None))
            return
        (first, second), at = (("outputs", "grad_outputs"), 2) if func is _GRAD else (("tensors", "grad_tensors"), 1)
        losses = kwargs.get(first, args[0] if args else ())
        grads = kwargs.get(second, args[at] if len(args) > at else None)
        losses = [losses] if isinstance(losses, Tensor) else list(losses)
        grads = [grads] if isinstance(grads, Tensor) else list(grads) if grads is not None else [None] * len(losses)
        for loss, grad in zip(losses, grads):
            self.check_loss(loss, grad, training=func is not _GRAD)

    def settle(self, func: Callable, args: tuple, kwargs: dict, out: object, found: list,
               rule: Callable | None = None) -> None:
        """Mark a call's outputs with their state (``rule``'s, else the table's), and refuse one that mixes
        examples and needs a gradient."""
        self._settle(func, out, state_of(self, func, args, kwargs, out, found, rule))

    def _settle(self, func: Callable, out: object, state: object) -> None:
        if type(state) is list:
            for o, s in zip(out if isinstance(out, (tuple, list)) else (out,), state):
                if s is not None:
                    self._settle_one(func, o, s)
        elif state is not None:
            self._settle_one(func, out, state)

    def _settle_one(self, func: Callable, out: object, state: object) -> None:
        if type(state) is Mixed and torch.is_grad_enabled() and _requires_grad(out):
            # A loop trace stays on the stack until the next forward, release or detach, which a loop stopped
            # by this error may never reach: from here on it only passes calls through.
            self.finished = self.finished or self.loop
            raise refusal(state, func)
        self._mark_all(out, state)

    def _mark_all(self, out: object, state: object) -> None:
        """Mark every tensor of a torch function's result: a tensor, or (nested) tuples and lists of them, as
        torch's ops return (``torch.return_types`` are tuples)."""
        if isinstance(out, Tensor):
            self._mark(out, state)
        elif isinstance(out, (tuple, list)):
            for t in out:
                self._mark_all(t, state)
        elif isinstance(out, dict):
            for t in out.values():
                self._mark_all(t, state)


_PACKING = os.path.join("torch", "nn", "utils", "rnn.py")


def _check_weighted(loss: Tensor, weights: list[Tensor], nodes: int = 64) -> None:
    """Warn when a batch's weight column (``ByUser``'s, with padding rows of weight 0) did not reach the loss.

    Looked for among the tensors the loss's last ``nodes`` autograd nodes saved (``loss * w`` saves ``w``, also
    moved to another device), by value: padding rows trained at full weight change no bound, only the result.
    """
    wanted = [w.detach().flatten().cpu() for w in weights]
    queue, seen = [loss.grad_fn], 0
    while queue and seen < nodes and wanted:
        node, seen = queue.pop(0), seen + 1
        if node is None:
            continue
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    saved = getattr(node, name)
                except RuntimeError:  # freed
                    continue
                if isinstance(saved, Tensor):
                    flat = saved.detach().flatten()
                    wanted = [w for w in wanted if not (flat.numel() == w.numel() and torch.equal(flat.cpu(), w))]
        queue.extend(f for f, _ in node.next_functions)
    if wanted:
        warnings.warn(
            "the batch's last field (the weights of ByUser or TruncatedPoissonLoader: 0 for padding rows) did not "
            "weight the loss, so the padding rows are trained on as if they were examples. Multiply each row's "
            "loss by its weight before averaging: (per_row_loss * weight).mean() (docs/privacy.md).",
            stacklevel=4)


def _check_reduction(s: Summed, expected: str) -> None:
    """Refuse the plain swap, a sum over the rows for a mean or the reverse; any other weight is the user's."""
    if s.weight is None or not s.rows or s.rows < 2:
        return
    found = "sum" if math.isclose(abs(s.weight), 1.0) else "mean" if math.isclose(abs(s.weight), 1 / s.rows) else None
    if found is None or found == expected:
        return
    factor = f"{s.rows} times" if found == "sum" else f"1/{s.rows} of"
    raise PrivacyUsageError(
        f"the loss is the {found} over the batch's {s.rows} rows ({s.what}), but make_private(loss_reduction="
        f"{expected!r}) expects their {expected}: every per-example gradient would be clipped at {factor} its "
        f"true value, and the step would be wrong. Pass loss_reduction={found!r} to make_private, or reduce the "
        f"loss with a {expected}, or pass criterion= (which reduces as loss_reduction says).")


def _packing() -> bool:
    """Whether the op runs inside torch's PackedSequence helpers (``pack_padded_sequence`` sorts the examples by
    length; the RNN and ``pad_packed_sequence`` restore their order). Looked up only for an op that mixes rows."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(_PACKING):
            return True
        frame = frame.f_back
    return False


def loop_trace(tensors: Iterable[Tensor], group: int = 1, required: list[Tensor] | None = None) -> BatchTrace:
    """A trace of the training loop on a batch handed out (rows along dim 0, ``group`` rows per example), pushed
    on this thread's torch-function stack until :func:`remove`: the model's forward takes over its marks, so
    that mixing the batch in the loop (mixup) is seen."""
    trace = BatchTrace(tensors, batch_dim=0, group=group)
    trace.loop, trace.required = True, required or []
    torch._C._push_on_torch_function_stack(trace)
    return trace


def loss_trace(outputs: Iterable[Tensor], source: BatchTrace, batch_dim: int, group: int,
               guarded: frozenset[int] = frozenset(), reduction: str | None = None, scaler: object = None,
               loop: BatchTrace | None = None) -> BatchTrace:
    """A trace of the loop from the model's outputs to the loss's ``backward()``, pushed until :func:`remove`: it
    checks that the loss is a plain sum (or fixed-count mean) of per-example losses. ``loop``: the loop's trace
    the forward took over, whose other tensors (the labels, an earlier forward's outputs) may join the loss."""
    trace = BatchTrace([], batch_dim=batch_dim, group=group)
    trace.adopt(outputs, source)
    if loop is not None:
        trace.adopt(loop.tracked(), loop)
        trace.required = loop.required
    trace.loop, trace.guarded, trace.reduction, trace.scaler = True, guarded, reduction, scaler
    torch._C._push_on_torch_function_stack(trace)
    return trace


def active_loop_trace() -> BatchTrace | None:
    """The innermost loop trace on this thread's stack, if any."""
    trace = active_trace()
    return trace if trace is not None and trace.loop else None


def drop_loop_traces() -> None:
    """Every loop trace still on this thread's stack goes (at a release: a batch drawn and never trained on)."""
    while (trace := active_loop_trace()) is not None:
        remove(trace)


def remove(trace: BatchTrace) -> bool:
    """Take ``trace`` off this thread's torch-function stack wherever it is (a user's modes entered above it stay,
    in order); False if it is not there."""
    above = []
    found = False
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is trace:
            found = True
            break
        above.append(top)
    for mode in reversed(above):
        torch._C._push_on_torch_function_stack(mode)
    return found


def _requires_grad(out: object) -> bool:
    if isinstance(out, Tensor):
        return out.requires_grad
    return isinstance(out, (tuple, list)) and any(_requires_grad(o) for o in out)


def active_trace() -> BatchTrace | None:
    """The innermost batch trace on the torch-function stack, if any."""
    for i in range(torch._C._len_torch_function_stack() - 1, -1, -1):
        mode = torch._C._get_function_stack_at(i)
        if isinstance(mode, BatchTrace):
            return mode
    return None


def rowwise(fn: Callable) -> Callable:
    """Declare ``fn`` row-wise: each output row depends only on the same row of its inputs (its examples). dpkit
    then does not check the operations inside it, and its outputs hold the batch where its inputs do.

    Given a custom ``torch.autograd.Function`` class (or a ``torch.library`` custom op with an autograd formula),
    declares its forward *and* its backward row-wise (each input's gradient row depends only on the same rows of
    the output gradients) and returns it unchanged: dpkit refuses undeclared ones on the batch, whose backward it
    cannot read."""
    if _backward_code.is_function(fn):
        return _backward_code.declare(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        trace = active_trace()
        if trace is None:
            return fn(*args, **kwargs)
        found = trace.found(args, kwargs)
        with trace.trusting():
            out = fn(*args, **kwargs)
        if found:
            trace.settle(fn, args, kwargs, out, found, generic)
        return out
    return wrapper


def _guarded_hook(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``Tensor.register_hook``'s arguments with the hook wrapped to observe only (``_backward_code``)."""
    if "hook" in kwargs:
        return args, {**kwargs, "hook": _backward_code.guard_tensor_hook(kwargs["hook"])}
    return (args[0], _backward_code.guard_tensor_hook(args[1]), *args[2:]), kwargs


_EAGERLY: Callable | None = None  # made on first use: torch.compiler.disable imports torch._dynamo (about a second)


def _eagerly(trace: BatchTrace, func, args, kwargs):
    global _EAGERLY
    if _EAGERLY is None:
        _EAGERLY = torch.compiler.disable(
            _traced_call, reason="dpkit's batch trace keys its marks by real tensors, so each torch call it sees runs "
                                 "eagerly: under dpkit, compile without fullgraph=True (docs/compile.md)")
    return _EAGERLY(trace, func, args, kwargs)


def _traced_call(trace: BatchTrace, func, args, kwargs):
    return trace._traced(func, args, kwargs)
