"""The fail-closed checks, as plain functions grouped by the moment they run.

- **At make** (``make_private``): the arguments, the objects, and settings that must agree with each other
  (a mechanism and its loader, a clipper and a mode, the noise's range).
- **At each forward**: layers that mix examples, a trainable set that changed, state that a forward moved.
- **At each release** (``optimizer.step()``): exactly the planned parameters move, nothing else; the model's
  state moved only through the release.

Each raises a :class:`~dpkit.errors.DPKitError` subclass that says what, why and what to do. The invariants
they enforce are listed in docs/design.md ("Fail closed").
"""
from __future__ import annotations

import dis
import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TYPE_CHECKING

import torch
from torch import nn
from torch.optim import Optimizer

from dpkit import distributed, registry
from dpkit.accountants._base import _real
from dpkit.errors import PluginOverrideWarning, PrivacyUsageError, UnsupportedModuleError
from dpkit.events import NoOpEvent
from dpkit.modes import _backward_code
from dpkit.plan import MIXING, MODES, layer_type

if TYPE_CHECKING:
    from dpkit.hookspecs import Clipper, NoiseMechanism
    from dpkit.plan import LayerPlan

Controller = Any  # a dpkit.engine.PrivateTraining; not imported, which would close an import circle


# -- at make ---------------------------------------------------------------------------------------------------
def number(value, name: str, low: float, *, low_ok: bool) -> float:
    """A finite real number above ``low`` (or equal, if ``low_ok``); numpy and 0-d tensor scalars count."""
    x = _real(value)
    if x is None or not math.isfinite(x) or x < low or (x == low and not low_ok):
        bound = ">=" if low_ok else ">"
        raise ValueError(f"{name} must be a finite number {bound} {low:g}, got {value!r}")
    return x


def flag(value, name: str) -> bool:
    """A real bool: ``secure_mode="no"`` must not read as True."""
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        also = f" (or {UNPROVEN!r}, the documented opt-out)" if name == "poisson_sampling" else ""
        raise TypeError(f"{name} must be True or False{also}, got {value!r}")
    return bool(value)


UNPROVEN = "unproven"  # poisson_sampling's opt-out: the loader's own batches, accounted as if Poisson


def sampling_flag(value) -> bool:
    """``poisson_sampling``: True, or the explicit opt-out ``"unproven"`` (False). A bare False is refused:
    shuffled batches accounted as Poisson samples can leak several times the reported ε (arXiv 2411.10614)."""
    if isinstance(value, str) and value == UNPROVEN:
        return False
    if value is False or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        raise PrivacyUsageError(
            "poisson_sampling=False keeps the loader's shuffled fixed-size batches, which Poisson accounting does "
            "not cover: auditing measured up to 4x (10x for common variants) the epsilon it reports (Annamalai et "
            "al., arXiv 2411.10614). Keep poisson_sampling=True; for batches of one shape use "
            "dpkit.data.TruncatedPoissonLoader (accounted for); for a benchmark whose epsilon does not matter, pass "
            f"poisson_sampling={UNPROVEN!r} (docs/privacy.md).")
    return flag(value, "poisson_sampling")


def check_args(noise_multiplier, max_grad_norm, K, loss_reduction, mode) -> tuple[float, float]:
    """σ, C, K, the reduction and the mode. Explicit checks: attrs validators can be switched off process-wide."""
    sigma = number(noise_multiplier, "noise_multiplier", 0, low_ok=True)
    if isinstance(max_grad_norm, (list, tuple)):
        raise ValueError(
            "max_grad_norm must be one number C, got a list: Opacus's per-layer bounds (one per parameter) are "
            "not dpkit's; clipping='per_layer' splits one C as C/sqrt(P) over the P parameters, so that the "
            "sensitivity stays C. Give max_grad_norm=C.")
    clip = number(max_grad_norm, "max_grad_norm", 0, low_ok=False)
    if isinstance(K, bool) or not (isinstance(K, int) and K >= 1):
        raise ValueError(f"augmentation_multiplicity must be an int >= 1, got {K!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if mode not in MODES:
        raise ValueError(f"grad_sample_mode must be one of {MODES}, got {mode!r}")
    return sigma, clip


def check_objects(module, optimizer, noise_seed, attached: Iterable) -> None:
    """A module, an optimizer, an int seed, and no other controller on either."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}; wrap a function in an "
                        "nn.Module whose parameters are attributes.")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over the model's parameters, got "
                        f"{type(optimizer).__name__}; e.g. torch.optim.SGD(model.parameters(), lr=0.1).")
    if noise_seed is not None and (isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral)):
        raise TypeError(f"noise_seed must be an int (or None for a seed from the OS), got {noise_seed!r}")
    mine = set(module.parameters())
    for other in list(attached):
        if other.optimizer is optimizer or not mine.isdisjoint(other.module.parameters()):
            raise PrivacyUsageError(
                "this model or optimizer already has dpkit attached (make_private ran on it before, e.g. in a "
                "re-run notebook cell); two controllers would both count and clip every step. Call "
                "private.detach() on the earlier controller, or dpkit.detach(model), before make_private again.")


def check_optimizer(module: nn.Module, optimizer: Optimizer) -> None:
    model_params = {id(p) for p in module.parameters()}
    foreign = [i for g in optimizer.param_groups for i, p in enumerate(g["params"]) if id(p) not in model_params]
    if foreign:
        raise ValueError(f"the optimizer holds {len(foreign)} parameter(s) that are not the model's; "
                         "build it from model.parameters() so every updated parameter is privatized.")


def check_mechanism_sampling(noise: NoiseMechanism, noise_name: str, clipper: Clipper, clipping: str,
                             loader, sample_rate: float) -> None:
    """A mechanism whose accounting needs its own sampling (BandMF: cyclic Poisson) checks the loader, and
    covers the gradient alone: a clipper that spends privacy too (adaptive's count) is outside its analysis."""
    check = getattr(noise, "check_loader", None)
    if check is None:
        from dpkit.data import CyclicPoissonLoader, ShuffledBatchLoader

        if isinstance(loader, (CyclicPoissonLoader, ShuffledBatchLoader)):
            raise PrivacyUsageError(
                f"the data loader is a {type(loader).__name__}, whose sampling noise={noise_name!r} "
                "does not account for: it assumes Poisson sampling of the whole dataset at every step, while "
                "this loader visits each example at fixed steps. Use it with the mechanism it was made for "
                "(noise='bandmf' for CyclicPoissonLoader, noise='tree' for ShuffledBatchLoader), or a DPDataLoader.")
        return
    if not isinstance(clipper.dp_event(sample_rate), NoOpEvent):
        raise PrivacyUsageError(
            f"noise={noise_name!r} accounts for the gradient's noise under its own sampling, and "
            f"clipping={clipping!r} spends privacy too, which that analysis does not cover. Use a clipper "
            "that spends none (flat, per_layer, automatic).")
    check(loader)


def check_truncation(truncation: tuple[int, int] | None, sample_rate: float, clipper: Clipper, clipping: str,
                     accountant: str) -> None:
    """A truncated Poisson loader's steps are counted by an accountant that knows them (``prv``), and its padding
    rows would count as examples in a clipper's noisy count: a clipper that spends privacy is refused."""
    if truncation is None:
        return
    from dpkit.events import GaussianEvent, TruncatedPoissonSampledEvent

    if not isinstance(clipper.dp_event(sample_rate), NoOpEvent):
        raise PrivacyUsageError(
            f"clipping={clipping!r} spends privacy on a count of the batch's examples, and a TruncatedPoissonLoader's "
            "padding rows would be counted. Use a clipper that spends none (flat, per_layer, automatic).")
    event = TruncatedPoissonSampledEvent(truncation[0], sample_rate, truncation[1], GaussianEvent(1.0))
    if not registry.lookup("dpkit_accountants", accountant, "accountant").value().supports(event):
        raise PrivacyUsageError(
            f"accountant={accountant!r} cannot count the truncated Poisson steps of a TruncatedPoissonLoader; use "
            "accountant='prv'.")


def check_dataset_multiplicity(loader, K: int) -> None:
    """A dataset that fixes K (``Multiplicity``, ``ByUser``) must agree with ``augmentation_multiplicity``."""
    from dpkit.data import Multiplicity

    dataset = getattr(loader, "dataset", None)
    fixed = dataset.K if isinstance(dataset, Multiplicity) else None
    if fixed is not None and fixed != K:
        raise PrivacyUsageError(
            f"the dataset is a {type(dataset).__name__} that yields {fixed} rows per example, and "
            f"augmentation_multiplicity={K}: dpkit would clip groups of {K} rows as one example, so one "
            f"example's rows would be clipped apart (or two examples together). Pass augmentation_multiplicity="
            f"{fixed}.")


def check_mode_clipper(mode: str, clipper: Clipper, clipping: str) -> None:
    if mode == "ghost" and getattr(clipper, "per_layer", False):
        raise ValueError(f"clipping={clipping!r} clips each parameter on its own, which ghost's single "
                         "reweighted backward pass cannot do; use grad_sample_mode='bk' or 'hooks'.")


def warn_no_noise(sigma: float) -> None:
    if sigma == 0:
        warnings.warn("noise_multiplier=0: gradients are clipped but not noised, so training is NOT "
                      "differentially private (epsilon is infinite). Use it only to test or debug.", stacklevel=4)


def check_noise_range(sigma: float, clipper: Clipper, params: list[nn.Parameter], expected_batch_size,
                      loss_reduction: str) -> None:
    """The noisy sum must fit its float32-or-wider buffer, and the gradient the parameter's own dtype."""
    std = sigma * clipper.sensitivity()
    grad_std = std / (expected_batch_size or 1) if loss_reduction == "mean" else std
    for dtype in {p.dtype for p in params}:
        flat = torch.promote_types(dtype, torch.float32)
        if std >= torch.finfo(flat).max / 16 or grad_std >= torch.finfo(dtype).max / 16:
            raise ValueError(f"the noise std noise_multiplier * max_grad_norm = {std:g} overflows the {dtype} "
                             "gradients; lower noise_multiplier or max_grad_norm.")


def warn_overrides(plan: list[LayerPlan], clipping: str, noise: str, accountant: str) -> None:
    """A plugin replacing a built-in privacy-critical entry is allowed (newest wins), but never silently."""
    used = [("dpkit_clippers", clipping), ("dpkit_noise_mechanisms", noise), ("dpkit_accountants", accountant)]
    for row in plan:
        if row.uses_activations:
            used += [("dpkit_grad_samplers", layer_type(row.module)), ("dpkit_norm_samplers", layer_type(row.module))]
    for hook, key in dict.fromkeys(used):
        found = registry.overridden(hook, key)
        if found is not None:
            winner, builtins = found
            label = key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"
            warnings.warn(f"plugin {winner!r} overrides dpkit's built-in {hook[6:-1].replace('_', ' ')} "
                          f"{label!r} (from {', '.join(builtins)}); the privacy guarantee now rests on it. If "
                          "that is not intended, uninstall it or set DPKIT_DISABLE_PLUGIN_AUTOLOAD=1.",
                          PluginOverrideWarning, stacklevel=5)


# -- at each forward -------------------------------------------------------------------------------------------
def check_modules(module: nn.Module, forward: bool = True) -> None:
    """Each forward (and at ``make_private``, ``forward=False``), one walk of the model: layers whose training mode
    mixes examples (BatchNorm's batch statistics) are refused, and backward hooks are made to observe only
    (``dpkit/modes/_backward_code.py``). The model's own and the global ones were collected by this forward before
    its pre-hooks ran: one new since the last forward has not been wrapped in time, so the forward is refused."""
    if _backward_code.guard_module_hooks([module]) and forward:
        raise PrivacyUsageError(
            "a backward hook was registered on the model itself or globally (register_full_backward_hook, "
            "register_full_backward_pre_hook, or their register_module_* forms) since make_private or the last "
            "forward: the model collects those before dpkit's forward hook can make them observe-only, so this "
            "forward would run it as registered. It is wrapped now: run the forward again.")
    mixing, hooked = False, []
    for m in module.modules():
        mixing = mixing or isinstance(m, MIXING) and m.training
        if m._backward_hooks or m._backward_pre_hooks:
            hooked.append(m)
    _backward_code.guard_module_hooks(hooked)
    if mixing:
        mixing = [(n, m) for n, m in module.named_modules() if isinstance(m, MIXING) and m.training]
        raise UnsupportedModuleError(
            f"{[n for n, _ in mixing]} ({type(mixing[0][1]).__name__}) are in training mode, "
            "where batch statistics mix examples, so one example's gradient depends on the others "
            "(model.train() switches them back). Replace them with dpkit.fix(model) (BatchNorm → GroupNorm) "
            "and call make_private again.")


def trainable_change(module: nn.Module, planned: frozenset[int], params: list[nn.Parameter],
                     now: list[nn.Parameter]) -> str | None:
    """What changed in the set of trainable parameters since planning (``now``: the model's parameters)."""
    with torch._C.DisableTorchFunction():  # reading flags: no batch trace needs to see it (see StateWatch)
        trainable = [p for p in now if p.requires_grad]
    if len(trainable) == len(planned) and all(id(p) in planned for p in trainable):
        return None
    names = {id(p): n for n, p in module.named_parameters()}
    new = sorted(names.get(id(p), "?") for p in trainable if id(p) not in planned)
    ids = {id(p) for p in trainable}
    gone = sorted(names.get(id(p), "<removed from the model>") for p in params if id(p) not in ids)
    return ", ".join(part for part in (f"now trainable: {new}" if new else "",
                                       f"no longer trainable: {gone}" if gone else "") if part)


def restore_module_hooks(module: nn.Module, last: bool) -> None:
    """At ``detach``: the model's backward hooks as the user registered them (and the global ones, ``last``)."""
    _backward_code.unguard_module_hooks(module.modules(), globals_too=last)


# -- state changes only through the release (invariant 3) -------------------------------------------------------
class StateWatch:
    """The model's parameters and buffers, by slot, so that the engine can tell whether a training forward moved
    any of them: in place (their version counter) or by assigning a new tensor to the slot.

    Nothing that dpkit hands back may change as a function of the data except through the clipped, noised
    update; the forward is where a model moves its own state (a renorm, a running statistic). Under DDP, whose forward broadcasts rank 0's buffers in
    place, only parameters are watched; under FSDP2, which swaps parameters for gathered ones, nothing is (the
    docs say so). ``public`` names buffers that do not depend on the data (a step counter).
    """

    def __init__(self, module: nn.Module, public: frozenset[str], topology) -> None:
        self.names: list[str] = []
        self.slots: list[tuple[dict, str]] = []  # (the module's _parameters or _buffers, the attribute)
        if topology.sharded:
            return
        ddp = topology.ddp
        buffers = ddp is None or not getattr(ddp, "broadcast_buffers", False)
        for prefix, m in module.named_modules():
            kinds = (m._parameters, m._buffers) if buffers else (m._parameters,)
            for table in kinds:
                for key, t in table.items():
                    full = f"{prefix}.{key}" if prefix else key
                    if t is not None and full not in public and not t.is_inference():
                        self.names.append(full)
                        self.slots.append((table, key))

    def snapshot(self) -> list[tuple[object, int]]:
        # Outside any torch-function mode: under the batch trace every ``_version`` read is a Python call of the
        # trace's (about 4 us each, two per Linear); a version counter is not data to follow.
        with torch._C.DisableTorchFunction():
            return [(t, t._version if t is not None else -1) for t in (table.get(key) for table, key in self.slots)]

    def refuse_moved(self, before: list[tuple[object, int]]) -> None:
        with torch._C.DisableTorchFunction():
            moved = [name for name, (table, key), (t, version) in zip(self.names, self.slots, before)
                     if table.get(key) is not t or (t is not None and t._version != version)]
        if moved:
            raise PrivacyUsageError(
                f"{sorted(moved)[:5]} changed during the model's forward (an in-place renorm such as "
                "nn.Embedding(max_norm=...), a buffer updated from the inputs, or a parameter edited in forward): "
                "that change depends on the batch and is not covered by the clipped, noised step, so nothing is "
                "released. Make the layer stateless (for Embedding, max_norm=None), or, for a buffer that does "
                "not depend on the data (a step counter), declare it: make_private(public_buffers=['name']).")


# -- at each release -------------------------------------------------------------------------------------------
def check_release(private: Controller) -> None:
    """Before any gradient is released: exactly the planned parameters will move, and nothing else."""
    if distributed.world_size() != private.world_size:
        raise PrivacyUsageError(
            f"make_private ran with torch.distributed world size {private.world_size}, and it is now "
            f"{distributed.world_size()}: the sample rate, the noise split and the ledger assume the first. "
            "Call make_private after init_process_group, on every rank.")
    private.topology.check_wrapping(private.module)
    private.gate.check_release()
    if private.capturer.pass_died and private.capturer.compiled_autograd:
        raise PrivacyUsageError(
            "this step's backward pass ran under compiled autograd (torch._dynamo.config.compiled_autograd, or "
            "compiled_autograd's enable()), which never runs the callback that ends dpkit's pass, so nothing was "
            "clipped whole or released. Run loss.backward() without compiled autograd (torch.compile of the model "
            "works: docs/compile.md), then call optimizer.zero_grad() and continue.")
    if private.capturer.pass_died:
        raise PrivacyUsageError(
            "a backward pass of this step stopped with an error before its end, so it was never clipped whole "
            "(part of it may already be summed); nothing was released. Call optimizer.zero_grad() to drop the "
            "batch, then continue.")
    params = private.topology.parameters(private.module)  # one walk of the model for both checks
    change = trainable_change(private.module, private.planned, private.params, params)
    if change is not None:
        raise PrivacyUsageError(f"the trainable parameters changed after the forward pass ({change}); "
                                "change requires_grad between optimizer.step() and the next forward pass.")
    refuse_stray_gradients(private.module, private.optimizer, private.planned, params)


def refuse_closure(args, kwargs) -> None:
    if kwargs.get("closure") is not None or any(callable(a) for a in args[1:]):  # args[0] is the optimizer
        raise PrivacyUsageError(
            "optimizer.step(closure) evaluates the loss inside the step, after dpkit has formed the step's "
            "gradient (LBFGS and line searches re-evaluate it several times, each a release). Call "
            "loss.backward() and then optimizer.step() without a closure.")


def refuse_stray_gradients(module: nn.Module, optimizer: Optimizer, planned: frozenset[int],
                           params: list[nn.Parameter]) -> None:
    """The optimizer moves exactly the planned parameters: nothing with a gradient dpkit did not form."""
    model = {id(p) for p in params}
    raw = [p for g in optimizer.param_groups for p in g["params"]
           if id(p) not in planned and (p.grad is not None or id(p) not in model)]
    if raw:
        names = {id(p): n for n, p in module.named_parameters()}
        raw = [names.get(id(p), "<not the model's>") for p in raw]
        raise PrivacyUsageError(
            f"the optimizer would update {sorted(raw)} with gradients dpkit did not clip or noise (a frozen "
            "parameter with a gradient, an add_param_group after make_private, or a parameter that is not "
            "the model's). Call optimizer.zero_grad(), make them trainable in the model (dpkit plans them at "
            "the next forward), or remove them from the optimizer.")


def refuse_nothing_to_release(backward_passes: int) -> None:
    if backward_passes == 0:
        raise PrivacyUsageError(
            "optimizer.step() was called without a backward() since the last step (or zero_grad() dropped "
            "it). Call loss.backward() first, also for an empty Poisson batch (dpkit gives it the right shape "
            "and counts it).")


def unpacked(values: list, has_criterion: bool) -> Iterator[Any]:
    """The items of ``make_private``'s result, or a ValueError that says the rule when the caller's ``a, b, c = ...``
    asks for another count (Python's own "too many values to unpack" says neither why nor what to do)."""
    frame = sys._getframe(2)  # the caller of PrivateTraining.__iter__
    wanted = next((i.arg for i in dis.get_instructions(frame.f_code)
                   if i.offset == frame.f_lasti and i.opname == "UNPACK_SEQUENCE"), None)
    if wanted is not None and wanted != len(values):
        raise ValueError(
            f"make_private's result unpacks to {len(values)} values, not {wanted}: (module, optimizer, data_loader"
            f"{', criterion' if has_criterion else ''}), since {'a' if has_criterion else 'no'} criterion= was "
            "given. It gives 4 values with make_private(criterion=...) and 3 without; or keep the result whole "
            "(private = make_private(...)) and use private.module, private.optimizer, private.data_loader, "
            "private.criterion.")
    return iter(values)
