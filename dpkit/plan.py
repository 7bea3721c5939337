"""Model → one row per unit that owns trainable parameters: which mode, which sampler, from which plugin.

Made once, at attach; nothing is looked up per step. A layer resolves by its
exact type (a subclass may change ``forward``); the MRO is walked only to write
the error message. ``print(private.plan)`` shows it as the table ``dpkit check`` prints.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import attrs
import torch
from torch import Tensor, nn

from dpkit import registry
from dpkit.errors import PrivacyUsageError, UnsupportedLayerError, UnsupportedModuleError
from dpkit.modes import functorch as fn_mode

MODES = ("hooks", "ghost", "bk", "functorch", "ew", "auto")
NORM_MODES = ("ghost", "bk", "auto")  # clip from per-example norms, without keeping per-example gradients
FALLBACK = "dpkit.modes.functorch"
# Layer types PyTorch's ExpandedWeights can differentiate per example.
EW_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm,
            nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
MIXING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def type_label(t: type) -> str:
    """``torch.nn.Linear`` for torch.nn's own layers, ``package.module.Class`` otherwise."""
    if getattr(nn, t.__name__, None) is t:
        return f"torch.nn.{t.__name__}"
    return f"{t.__module__}.{t.__qualname__}"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "") -> str:
    """Left-aligned columns, as wide as their widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join(indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in (header, *rows))


@attrs.frozen(eq=False, repr=False)
class LayerPlan:
    """One unit of the model: a layer with a sampler, or a subtree handled by ``torch.func``."""

    name: str
    module: nn.Module
    mode: str  # "hooks" | "functorch" | "ew" | "ghost" | "bk"
    provider: str
    params: dict[str, nn.Parameter]  # full dotted names
    local_params: dict[str, nn.Parameter]  # names on ``module``: own, or dotted for a subtree sampler
    sampler: Callable | None = None
    norm_sampler: Callable | None = None
    norm_provider: str | None = None
    # (owning module, attribute, parameter) for each local parameter: where ``call`` looks for what the module
    # holds now, found once rather than by a dotted-path walk per sampler call
    owners: tuple[tuple[nn.Module, str, nn.Parameter], ...] = attrs.field(
        init=False, default=attrs.Factory(lambda self: self._find_owners(), takes_self=True))

    def _find_owners(self) -> tuple[tuple[nn.Module, str, nn.Parameter], ...]:
        found = []
        for n, p in self.local_params.items():
            path, _, leaf = n.rpartition(".")
            found.append((self.module.get_submodule(path), leaf, p))
        return tuple(found)

    @property
    def type_name(self) -> str:
        t = type(self.module)
        return f"{t.__module__}.{t.__qualname__}"

    @property
    def sampler_label(self) -> str:
        """How this unit's per-example gradients (or norms) are computed, in words."""
        if self.mode == "functorch":
            return "torch.func (whole model)" if self.name == "<root>" else "torch.func fallback"
        if self.mode == "ew":
            return "ExpandedWeights"
        return "norm sampler" if self.mode in ("ghost", "bk") and self.norm_sampler is not None else "grad sampler"

    @property
    def sampler_provider(self) -> str:
        """The plugin whose sampler ``sampler_label`` names."""
        return (self.norm_provider or self.provider) if self.sampler_label == "norm sampler" else self.provider

    def cells(self) -> tuple[str, str, str, str, str]:
        """This row of the plan's table: module, type, mode, sampler, provider."""
        return self.name, type_label(type(self.module)), self.mode, self.sampler_label, self.sampler_provider

    def __repr__(self) -> str:  # the attrs repr printed every parameter tensor in full
        name, kind, mode, sampler, provider = self.cells()
        return f"LayerPlan({name!r}, {kind}, mode={mode!r}, sampler={sampler!r}, provider={provider!r})"

    @property
    def uses_activations(self) -> bool:
        return self.sampler is not None or self.norm_sampler is not None

    def param_name(self, p: nn.Parameter) -> str | None:
        return next((n for n, q in self.params.items() if q is p), None)

    def compute(self, args: list, kwargs: dict, grads: list, rows: int, K: int, batch_first: bool,
                unbatched: frozenset[int] = frozenset()) -> dict[nn.Parameter, Tensor]:
        """Per-example gradients ``[B, *p.shape]`` (summed over K copies) of one captured call.

        ``unbatched``: ids of input tensors that do not derive from the batch (shared by every example).
        """
        if not self.uses_activations:
            params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
            return fn_mode.per_example_grads(self.module, params, args, kwargs, grads, rows, K, batch_first,
                                             unbatched)
        return self.call(self.sampler, args, grads, K, batch_first)

    def call(self, sampler: Callable, args: list, grads: list[Tensor | None], K: int, batch_first: bool
             ) -> dict[nn.Parameter, Tensor]:
        """Call a sampler of this layer in the batch-first layout samplers expect; keep own parameters.

        ``grads`` are the gradients of the call's output tensors (``None`` where one got none). A sampler gets the
        first, or all of them if it sets ``all_outputs = True`` (an LSTM's ``h_n`` and ``c_n``); one that reads the
        first only is refused when another got a gradient, which it would leave out of the example's gradient.
        Under autocast a layer's inputs and output gradient can differ in dtype; both go to the wider one.
        """
        every = getattr(sampler, "all_outputs", False)
        if not every and (grads[0] is None or any(g is not None for g in grads[1:])):
            raise PrivacyUsageError(
                f"{self.name!r} ({self.type_name}): a gradient reached an output other than its first, and its "
                "sampler reads the first output's gradient only, so the example's gradient would miss a part. Use "
                "the first output only, or a sampler that sets all_outputs = True.")
        if not batch_first:
            args = [a.movedim(1, 0) if isinstance(a, Tensor) and a.dim() > 1 else a for a in args]
            grads = [grads[0].movedim(1, 0) if grads[0] is not None else None, *grads[1:]]
        floats = [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]
        floats += [g for g in grads if g is not None]
        if len({t.dtype for t in floats}) > 1:
            wide = functools.reduce(torch.promote_types, (t.dtype for t in floats))
            args = [a.to(wide) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
            grads = [g.to(wide) if g is not None else None for g in grads]
        out = sampler(self.module, args, list(grads) if every else grads[0], K)
        # Keyed by what the module holds now: the parameter, or under FSDP2 the one gathered for its backward.
        own = {id(p): p for p in self.local_params.values()}
        for owner, leaf, p in self.owners:
            current = owner._parameters.get(leaf)
            if current is not None and current is not p:
                own[id(current)] = p
        return {own[id(k)]: g for k, g in out.items() if id(k) in own}


class Plan(list):
    """The rows of a plan; a list (the engine iterates it) that prints as a table."""

    HEADER = ("module", "type", "mode", "sampler", "provider")

    def __repr__(self) -> str:
        return format_table(self.HEADER, [row.cells() for row in self]) if self else "Plan([])"

    __str__ = __repr__


def check_module(model: nn.Module) -> None:
    """Refuse layers that mix examples (BatchNorm): per-example gradients would be meaningless."""
    bad = [f"  {name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
           if isinstance(m, MIXING) and m.training]
    if bad:
        raise UnsupportedModuleError(
            "these layers mix examples within a batch, so one example's gradient depends on the others "
            "and cannot be clipped per example:\n" + "\n".join(bad)
            + "\nReplace them with dpkit.fix(model) (BatchNorm → GroupNorm). Putting them in eval mode is not "
            "enough: model.train() switches them back, and dpkit then refuses the forward pass."
        )


def build_plan(model: nn.Module, mode: str) -> Plan:
    """The plan of ``model`` in ``mode``; every uncovered layer is reported in one error."""
    if mode not in MODES:
        raise ValueError(f"grad_sample_mode={mode!r} is not one of {MODES}")
    check_module(model)
    if mode == "functorch":
        params = fn_mode.trainable_params(model)
        return Plan([LayerPlan("<root>", model, "functorch", FALLBACK, params, {})] if params else [])
    samplers = registry.table("dpkit_grad_samplers")
    norms = registry.table("dpkit_norm_samplers") if mode in NORM_MODES else {}
    rows = Plan()
    missing: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        kind = layer_type(module)
        entry, norm = samplers.get(kind), norms.get(kind)
        # A sampler that sets covers_children = True computes its children's parameters too (MultiheadAttention
        # reads out_proj's weight without calling out_proj): its unit is the subtree, with dotted local names.
        whole = any(getattr(e.value, "covers_children", False) for e in (entry, norm) if e is not None)
        local = {n: p for n, p in module.named_parameters(recurse=whole) if p.requires_grad}
        full = {f"{prefix}{n}": p for n, p in local.items()}
        name = prefix[:-1]
        if local and mode == "ew" and type(module) in EW_TYPES:
            rows.append(LayerPlan(name, module, "ew", "torch.nn.utils._expanded_weights", full, local))
        elif local and mode == "hooks" and entry is not None:
            rows.append(LayerPlan(name, module, "hooks", entry.provider, full, local, entry.value))
            if whole:
                return
        elif local and mode in NORM_MODES and (entry is not None or norm is not None):
            rows.append(LayerPlan(name, module, "bk" if mode == "auto" else mode,
                                  entry.provider if entry else norm.provider, full, local,
                                  entry.value if entry else None, norm.value if norm else None,
                                  norm.provider if norm else None))
            if whole:
                return
        elif local and mode == "auto":
            subtree = {f"{prefix}{n}": p for n, p in module.named_parameters() if p.requires_grad}
            rows.append(LayerPlan(name, module, "functorch", FALLBACK, subtree, local))
            return  # the subtree is recomputed as one unit
        elif local:
            missing.append(_missing_message(prefix[:-1], module, mode, samplers))
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    if missing:
        raise UnsupportedLayerError(
            f"grad_sample_mode={mode!r} cannot compute per-example gradients for:\n" + "\n".join(missing)
        )
    return rows


def layer_type(module: nn.Module) -> type:
    """The type samplers are keyed by. FSDP2's ``fully_shard`` swaps a module's class for ``FSDP<Name>``, a
    subclass of ``FSDPModule`` and the original that adds hooks and no computation: the original's samplers hold."""
    t = type(module)
    if t.__name__.startswith("FSDP") and "torch.distributed.fsdp" in t.__module__:
        from torch.distributed.fsdp import FSDPModule

        bases = [b for b in t.__bases__ if b is not FSDPModule]
        if FSDPModule in t.__bases__ and len(bases) == 1:
            return bases[0]
    return t


def _missing_message(name: str, module: nn.Module, mode: str, samplers: dict) -> str:
    t = type(module)
    where = f"  {name or '<root>'} ({t.__module__}.{t.__qualname__})"
    if mode == "ew":
        return f"{where}: ExpandedWeights does not support it; use 'auto' or 'hooks'."
    kind = "grad or norm sampler" if mode in NORM_MODES else "grad sampler"
    base = next((b for b in t.__mro__[1:] if b in samplers), None)
    hint = ""
    if base is not None:
        hint = (f" Its base class {base.__name__} has one ({samplers[base].provider}); if "
                f"{t.__name__}.forward computes the same function, register it: "
                f"dpkit.register_grad_sampler({t.__name__})(<the {base.__name__} sampler>).")
    return (f"{where} has no {kind}.{hint} Register one with @dpkit.register_grad_sampler"
            f"({t.__name__}), install a plugin that provides it, or use grad_sample_mode='auto' "
            "(torch.func fallback for this layer) or 'functorch'.")
