"""Which tensors of a forward pass derive from the batch: a taint carried through every torch call.

A layer's input need not come from the batch. nanoGPT looks up ``wpe(torch.arange(T))`` and broadcasts the
``[T, d]`` result over the batch; an attention mask is ``[T, T]``. Shapes cannot tell these apart from batched
tensors when ``T`` equals the batch size, and treating position t as example t is silently wrong. So the
model's batched inputs are marked, and every torch function or tensor method whose arguments include a
marked tensor marks its outputs (tensor factories like ``x.new_zeros`` excepted: only their device and dtype
come from ``x``). A layer whose inputs carry no mark did not see the batch.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_FACTORIES = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "new_empty_strided"})


class BatchTrace(TorchFunctionMode):
    """Active from the model's forward pre-hook to its forward hook; ``batched(t)`` asks about a tensor."""

    def __init__(self, inputs: list[Tensor]):
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        # Set by the capture while a unit whose sampler declares linear_calls runs: it runs each call instead, to
        # record the F.linear calls on the unit's parameters (dpkit/modes/_parts.py). None otherwise: one check.
        self.spy: Callable[[Callable, tuple, dict], object] | None = None
        for t in inputs:
            self._mark(t)

    def _mark(self, t: Tensor) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def batched(self, t: object) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

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

    def _any_batched(self, values) -> bool:
        for v in values:
            if isinstance(v, Tensor):
                if self.batched(v):
                    return True
            elif isinstance(v, (list, tuple)):
                if self._any_batched(v):
                    return True
            elif isinstance(v, dict) and self._any_batched(v.values()):
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.compiler.is_compiling():  # Dynamo inlines the mode; marks need real tensors' ids
            return _eagerly(self, func, args, kwargs)
        return self._traced(func, args, kwargs)

    def _traced(self, func, args, kwargs):
        out = func(*args, **(kwargs or {})) if self.spy is None else self.spy(func, args, kwargs or {})
        if self._marked and (self._any_batched(args) or (kwargs and self._any_batched(kwargs.values()))):
            if getattr(func, "__name__", "") in _FACTORIES:
                return out
            self._mark_all(out)
        return out

    def _mark_all(self, out: object) -> None:
        """Mark every tensor of a torch function's result: a tensor, or (nested) tuples and lists of them, as
        torch's ops return (``torch.return_types`` are tuples). Walked by hand: pytree costs ~20 µs a call."""
        if isinstance(out, Tensor):
            self._mark(out)
        elif isinstance(out, (tuple, list)):
            for t in out:
                self._mark_all(t)
        elif isinstance(out, dict):
            for t in out.values():
                self._mark_all(t)


@torch.compiler.disable(reason="dpkit's batch trace keys its marks by real tensors, so each torch call it sees runs "
                               "eagerly: under dpkit, compile without fullgraph=True (docs/compile.md)")
def _eagerly(trace: BatchTrace, func, args, kwargs):
    return trace._traced(func, args, kwargs)
