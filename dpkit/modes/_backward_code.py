"""Code that runs in the backward pass: hooks on gradients, custom autograd Functions, saved-tensor hooks.

The batch trace checks that every row of the forward depends on its own example only, and takes the backward to
be autograd's transpose of that forward. Code that runs *in* the backward breaks that premise unseen: a tensor
hook returning ``g.mean(0)``, a module's full backward hook, a custom ``autograd.Function`` whose backward mixes
rows, or a saved-tensor hook whose unpack mixes them. Each gives every example's computed gradient a share of
the others', so clipping no longer bounds one example's influence (measured: sensitivity 2.3-3.3 C).

So, while a batch is traced:

* hooks on batch-derived gradients (``Tensor.register_hook``, modules' full backward and backward pre-hooks,
  global ones too) may observe, not change: each is wrapped so that a hook returning a gradient, or writing
  into one, stops the backward pass with an error before anything is released;
* a custom ``autograd.Function`` whose output derives from the batch is refused unless it is torch's or
  dpkit's own, or declared row-wise in its forward and its backward with ``dpkit.rowwise(MyFunction)``; so is a
  ``torch.library`` custom op with a registered autograd formula (``dpkit.rowwise(my_op)``);
* saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) around a batch-derived operation are
  refused unless they are torch's own (activation checkpointing, ``save_on_cpu``), which give back what they
  packed.

Not covered: hooks registered on autograd nodes directly (``t.grad_fn.register_hook``), which torch gives no way
to see (docs/design.md, "What the trace does not see").
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from dpkit.errors import PrivacyUsageError, RowMixingError

_TRUSTED_PREFIXES = ("torch.", "dpkit.", "dpkit_")
_USERS_CODE = "torch._library"  # torch.library custom ops: a generated Function around the user's backward
_declared: weakref.WeakSet = weakref.WeakSet()  # autograd.Function classes declared row-wise (``rowwise``)
_declared_ops: set[str] = set()  # the generated Functions' names of torch.library custom ops declared row-wise
_node_verdicts: dict[type, str | None] = {}  # autograd node class -> None (allowed) or the Function's name
_GUARDED = "_dpkit_guarded"


def declare(function):
    """Declare a custom ``autograd.Function`` (or a ``torch.library`` custom op with a registered autograd formula)
    row-wise in its forward and its backward; returns it unchanged."""
    if isinstance(function, type):
        _declared.add(function)
    else:  # the name torch gives the op's generated Function (torch/_library/autograd.py)
        _declared_ops.add(f"GeneratedBackwardFor_{function._namespace}_{function._name}_default")
    _node_verdicts.clear()
    return function


def _trusted(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.startswith(_TRUSTED_PREFIXES) and not module.startswith(_USERS_CODE)


def _custom_function(node: object) -> str | None:
    """The name of the custom Function behind an autograd node, if it is neither trusted nor declared."""
    kind = type(node)
    if kind not in _node_verdicts:
        forward = getattr(node, "_forward_cls", None)
        bad = forward is not None and not (_trusted(forward) or forward in _declared
                                           or forward.__name__ in _declared_ops)
        _node_verdicts[kind] = f"{forward.__module__}.{forward.__qualname__}" if bad else None
    return _node_verdicts[kind]


def refuse_custom_functions(found: list) -> None:
    """Refuse batch-derived tensors (``found``: the trace's (tensor, state) pairs) made by a custom autograd
    Function that is neither trusted nor declared."""
    for t, _ in found:
        node = t.grad_fn
        if node is None:
            continue
        kind = type(node)
        name = _node_verdicts[kind] if kind in _node_verdicts else _custom_function(node)
        if name is not None:
            what, declared = (("the torch.library custom op behind", "your_op (the op torch.library.custom_op made)")
                              if name.startswith(_USERS_CODE) else ("the custom autograd.Function", name.rsplit(".")[-1]))
            raise RowMixingError(
                f"{what} {name} made a tensor derived from the batch, and its backward is code dpkit cannot read: if "
                "it mixes the rows of the gradient, each example's clipped gradient carries the others'. If its "
                "forward and its backward are both row-wise (row i of each output, and of each input's gradient, "
                f"depends only on row i), declare it once: dpkit.rowwise({declared}).")


def refuse_saved_tensor_hooks() -> None:
    """Refuse saved-tensor hooks that are not torch's own around a batch-derived operation."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is not None and not all(_trusted(h) for h in hooks):
        pack = hooks[0]
        raise RowMixingError(
            f"saved-tensor hooks ({getattr(pack, '__module__', '?')}.{getattr(pack, '__qualname__', pack)}) are "
            "active around an operation on the batch: the tensors they give back to the backward pass are "
            "not checked, and one that mixes rows gives each example's gradient a share of the others'. Use "
            "torch's own (activation checkpointing, torch.autograd.graph.save_on_cpu), or run this code outside "
            "saved_tensors_hooks.")


def _changed(what: str, hook: Callable) -> PrivacyUsageError:
    name = getattr(hook, "__qualname__", repr(hook))
    return PrivacyUsageError(
        f"{what} {name} changed a gradient of the batch in the backward pass: dpkit clips the gradients autograd "
        "computes from the traced forward, and a hook that rewrites them can mix examples' rows, so nothing is "
        "released. Hooks on the model's gradients may observe them (return None, write nothing); change the "
        "forward instead, or compute the change after optimizer.step(). Call optimizer.zero_grad() to go on.")


def _versions(grads) -> list[int]:
    return [g._version for g in grads if isinstance(g, Tensor)]


def guard_tensor_hook(hook: Callable) -> Callable:
    """``hook`` for ``Tensor.register_hook``, allowed to observe the gradient only; torch's and dpkit's own hooks
    (FSDP2's, dpkit's capture under a user's torch-function mode) as they are."""
    if _trusted(hook.func if isinstance(hook, functools.partial) else hook):
        return hook

    @functools.wraps(hook)
    def observed(grad: Tensor):
        before = grad._version
        if hook(grad) is not None or grad._version != before:
            raise _changed("the tensor hook", hook)
        return None

    return observed


def _guard_module_hook(hook: Callable, what: str) -> Callable:
    @functools.wraps(hook)
    def observed(module, *grads):
        before = [_versions(g) for g in grads]
        if hook(module, *grads) is not None or [_versions(g) for g in grads] != before:
            raise _changed(what, hook)
        return None

    setattr(observed, _GUARDED, True)
    return observed


def _guard_table(table: dict, what: str) -> bool:
    new = [key for key, hook in table.items() if not getattr(hook, _GUARDED, False)]
    for key in new:
        table[key] = _guard_module_hook(table[key], what)
    return bool(new)


def guard_module_hooks(modules) -> bool:
    """Wrap the full backward (pre-)hooks of ``modules`` and the global ones so that they may only observe; whether
    any was not wrapped yet.

    A module collects its backward hooks when it is called, before its forward pre-hooks run: the model's own
    and the global ones are collected before dpkit's per-forward walk can wrap them. So they are wrapped at
    ``make_private`` too, and one found unwrapped at the release (registered since) refuses it."""
    from torch.nn.modules import module as torch_module

    found = _guard_table(torch_module._global_backward_hooks, "the global module backward hook")
    found |= _guard_table(torch_module._global_backward_pre_hooks, "the global module backward pre-hook")
    for m in modules:
        if m._backward_hooks:
            found |= _guard_table(m._backward_hooks, f"the full backward hook of {type(m).__name__}")
        if m._backward_pre_hooks:
            found |= _guard_table(m._backward_pre_hooks, f"the backward pre-hook of {type(m).__name__}")
    return found


def unguard_module_hooks(modules, globals_too: bool) -> None:
    """The backward hooks of ``modules`` (and the global ones) as the user registered them: at ``detach``."""
    from torch.nn.modules import module as torch_module

    tables = [t for m in modules for t in (m._backward_hooks, m._backward_pre_hooks) if t]
    if globals_too:
        tables += [torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks]
    for table in tables:
        for key, hook in list(table.items()):
            if getattr(hook, _GUARDED, False):
                table[key] = hook.__wrapped__


def is_function(fn: object) -> bool:
    """Whether ``fn`` is a custom autograd Function class or a ``torch.library`` custom op (which ``rowwise``
    declares rather than wraps)."""
    from torch._library.custom_ops import CustomOpDef

    return isinstance(fn, type) and issubclass(fn, torch.autograd.Function) or isinstance(fn, CustomOpDef)


__all__ = ["declare", "guard_module_hooks", "guard_tensor_hook", "is_function", "refuse_custom_functions",
           "refuse_saved_tensor_hooks", "unguard_module_hooks"]
