"""``make_private``: attach DP-SGD to a model and optimizer without wrapping either.

The controller resolves every layer once (``plan.py``), hooks the model to
capture what per-example gradients need (``modes/_capture.py``), and hooks the
optimizer's ``step`` so that each step uses the clipped, noised gradient
(``optimizer.py``). ``detach()`` leaves the model and optimizer as they were.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpkit import amp, distributed, registry
from dpkit.accountants._base import _real
from dpkit.criterion import DPCriterion, DPLoss
from dpkit.data import DPDataLoader, PoissonBatchSampler, check_loader
from dpkit.errors import PluginOverrideWarning, PrivacyUsageError, UnsupportedModuleError
from dpkit.events import ClipEvent, ComposedEvent, DpEvent, Ledger, NoOpEvent, PoissonSampledEvent
from dpkit.modes import bk, ghost
from dpkit.modes._capture import Capturer, eager
from dpkit.optimizer import NonFiniteGradientError, StepAccumulator, privatize
from dpkit.plan import MIXING, MODES, NORM_MODES, build_plan, layer_type

_ATTACHED: weakref.WeakSet[PrivateTraining] = weakref.WeakSet()  # controllers with hooks on a model
STATE_FORMAT = 2  # of PrivateTraining.state_dict(); 1 had no "config"


def _number(value, name: str, low: float, *, low_ok: bool) -> float:
    """A finite real number above ``low`` (or equal, if ``low_ok``); numpy and 0-d tensor scalars count."""
    x = _real(value)
    if x is None or not math.isfinite(x) or x < low or (x == low and not low_ok):
        bound = ">=" if low_ok else ">"
        raise ValueError(f"{name} must be a finite number {bound} {low:g}, got {value!r}")
    return x


def _check_args(noise_multiplier, max_grad_norm, K, loss_reduction, mode) -> tuple[float, float]:
    # Explicit checks: attrs validators can be switched off process-wide, these cannot.
    sigma = _number(noise_multiplier, "noise_multiplier", 0, low_ok=True)
    clip = _number(max_grad_norm, "max_grad_norm", 0, low_ok=False)
    if isinstance(K, bool) or not (isinstance(K, int) and K >= 1):
        raise ValueError(f"augmentation_multiplicity must be an int >= 1, got {K!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if mode not in MODES:
        raise ValueError(f"grad_sample_mode must be one of {MODES}, got {mode!r}")
    return sigma, clip


def _check_objects(module, optimizer, noise_seed) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}; wrap a function in an "
                        "nn.Module whose parameters are attributes.")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over the model's parameters, got "
                        f"{type(optimizer).__name__}; e.g. torch.optim.SGD(model.parameters(), lr=0.1).")
    if noise_seed is not None and (isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral)):
        raise TypeError(f"noise_seed must be an int (or None for a seed from the OS), got {noise_seed!r}")
    mine = set(module.parameters())
    for other in list(_ATTACHED):
        if other.optimizer is optimizer or not mine.isdisjoint(other.module.parameters()):
            raise PrivacyUsageError(
                "this model or optimizer already has dpkit attached (make_private ran on it before, e.g. in a "
                "re-run notebook cell); two controllers would both count and clip every step. Call "
                "private.detach() on the earlier controller, or dpkit.detach(model), before make_private again.")


def detach(module: nn.Module) -> int:
    """Detach every dpkit controller attached to ``module`` (or to a part of it); returns how many."""
    owned = set(module.parameters())
    found = [c for c in list(_ATTACHED) if c.module is module or not owned.isdisjoint(c.module.parameters())]
    for c in found:
        c.detach()
    return len(found)


def step_event(noise: DpEvent, clipper: DpEvent) -> DpEvent:
    """One step's privacy event. A clipper that spends privacy (adaptive's noisy count) releases on the
    same Poisson sample as the gradient, so both mechanisms go under one sampling event: composing two
    independently sampled events would under-count ε."""
    if isinstance(clipper, NoOpEvent):
        return noise
    if (isinstance(noise, PoissonSampledEvent) and isinstance(clipper, PoissonSampledEvent)
            and noise.sample_rate == clipper.sample_rate):
        return PoissonSampledEvent(noise.sample_rate, ComposedEvent((noise.event, clipper.event)))
    return ComposedEvent((noise, clipper))


class PrivateTraining:
    """The controller ``make_private`` returns; unpacks to ``(module, optimizer, data_loader[, criterion])``."""

    def __init__(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader | None,
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str = "auto",
                 clipping: str = "flat", clipping_kwargs: dict | None = None, noise: str = "gaussian",
                 accountant: str = "prv", augmentation_multiplicity: int = 1, poisson_sampling: bool = True,
                 loss_reduction: str = "mean", batch_first: bool = True, criterion: nn.Module | None = None,
                 secure_mode: bool = False, noise_seed: int | None = None, sample_rate: float | None = None,
                 expected_batch_size: float | None = None, grad_scaler: torch.amp.GradScaler | None = None,
                 noise_kwargs: dict | None = None):
        K = augmentation_multiplicity
        _check_objects(module, optimizer, noise_seed)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        sigma, clip = _check_args(noise_multiplier, max_grad_norm, K, loss_reduction, grad_sample_mode)
        self.module, self.optimizer = module, optimizer
        self.noise_multiplier, self.max_grad_norm = sigma, clip
        self.mode, self.K, self.loss_reduction, self.batch_first = grad_sample_mode, K, loss_reduction, batch_first
        self.accountant, self.clipping, self.noise_name = accountant, clipping, noise
        self.secure_mode = bool(secure_mode)
        registry.lookup("dpkit_accountants", accountant, "accountant")
        self.clipper = registry.lookup("dpkit_clippers", clipping, "clipping").value(
            max_grad_norm=clip, **(clipping_kwargs or {}))
        if self.world_size > 1 and not secure_mode:  # independent streams: each rank noises its own coordinates
            noise_seed = distributed.rank_seed(distributed.shared_seed(noise_seed), self.rank)
        self.noise = registry.lookup("dpkit_noise_mechanisms", noise, "noise").value(
            seed=noise_seed, secure_mode=secure_mode, **(noise_kwargs or {}))
        self.data_loader, self.sample_rate, self.expected_batch_size = self._make_loader(
            data_loader, poisson_sampling, sample_rate, expected_batch_size)
        self._check_mechanism_sampling()
        self.poisson_sampling = poisson_sampling
        self.criterion = DPCriterion(criterion, loss_reduction, batch_first) if criterion is not None else None
        if self.criterion is not None:
            self.criterion.backward_fn = self.backward
        if grad_sample_mode == "ghost" and getattr(self.clipper, "per_layer", False):
            raise ValueError(f"clipping={clipping!r} clips each parameter on its own, which ghost's single "
                             "reweighted backward pass cannot do; use grad_sample_mode='bk' or 'hooks'.")
        if sigma == 0:
            warnings.warn("noise_multiplier=0: gradients are clipped but not noised, so training is NOT "
                          "differentially private (epsilon is infinite). Use it only to test or debug.",
                          stacklevel=3)
        self._check_optimizer()
        self.ledger = Ledger()
        self.steps = 0
        self._unbounded_steps = 0
        self._skip_step = False  # set by BatchMemoryManager: this step() ends a micro-batch, not the batch
        self._after_virtual = False  # the last call was a virtual step: zero_grad keeps the sum
        self._step_batch: object = None  # the logical batch the step's first backward pass came from
        self._batch_tag: object = None  # the logical batch declared in flight (BatchMemoryManager, micro_batches)
        self._refused: str | None = None  # why a backward pass of this step was refused
        self._pass_dropped = False  # the backward pass in flight was dropped for a loss-scale overflow
        self.scaler = amp.ScalerLink(grad_scaler, lambda: self.enabled) if grad_scaler is not None else None
        if self.scaler is not None and self.world_size > 1:
            raise PrivacyUsageError(
                "grad_scaler= under torch.distributed is not supported yet: a loss-scale overflow on one rank "
                "would skip the step there while the other ranks wait in the noised all-reduce. Use bf16 autocast "
                "without a scaler (docs/mixed-precision.md).")
        self._dropped: object = None  # the logical batch dropped for a loss-scale overflow, until the next one
        self.overflow_skips = 0  # batches dropped for a loss-scale overflow (the scaler skipped their step)
        self.norm_mode = grad_sample_mode in NORM_MODES
        self._ghost_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._streamed: dict[nn.Parameter, torch.Tensor] = {}  # norms of the layers streamed in the pass in flight
        self._streaming: bool | None = None  # whether the pass in flight streams (decided at its first record)
        self._in_ghost_backward = False
        self._wrapped: list[object] = []
        self._handles: list = []
        self._sharded = any(distributed.is_sharded(p) for p in module.parameters())
        if self._sharded:
            self._check_sharding()
        self._build()
        if not self.params:
            raise ValueError("the model has no trainable parameters (every requires_grad is False); unfreeze the "
                             "ones to train before make_private.")
        self._check_noise_range()
        self._warn_overrides()
        self._ddp = distributed.ddp_of(module) if self.world_size > 1 else None
        if self.world_size > 1:
            self._check_replicas()
        self._wrapping_checked = self.world_size == 1 or self._ddp is not None
        self.attached = False
        self.attach()

    # -- construction ------------------------------------------------------------------
    def _build(self) -> None:
        """The plan, the capture hooks (not attached) and the step's accumulator, for the trainable set now."""
        self.plan = build_plan(self.module, self.mode)
        if self._sharded:  # also when a changed trainable set is planned again
            self._check_recomputed_units()
        self.params = list(dict.fromkeys(p for row in self.plan for p in row.params.values()))
        self._planned = frozenset(id(p) for p in self.params)
        self.accumulator = StepAccumulator(self.params, self.clipper, self.K)
        early = functools.partial(bk.form_early, K=self.K) if self.mode == "auto" else None
        self.capturer = Capturer(self.module, self.plan, K=self.K, batch_first=self.batch_first,
                                 rescale=self.loss_reduction == "mean", keep_records=self.norm_mode,
                                 keep_outputs=self.mode == "ghost",
                                 grad_stand_ins=self.mode == "ghost",
                                 on_backward_end=self._on_backward_end, form_on_arrival=early,
                                 on_arrival=self._stream if self._streams() else None)
        self.capturer.on_refusal = self._on_refusal
        self.capturer.batch_of = getattr(self.data_loader, "batch_of", None)

    def _streams(self) -> bool:
        """Whether bk and auto clip each layer the moment its output gradients arrive (streaming).

        Possible when each parameter's factor depends on its own norm alone (the clipper has ``layer_factors``:
        per-layer clipping), so no record has to wait for the rest of the backward pass. Not with a GradScaler,
        whose overflow must drop the pass whole before anything is summed, nor under FSDP2.
        """
        return (self.mode in ("bk", "auto") and getattr(self.clipper, "per_layer", False)
                and callable(getattr(self.clipper, "layer_factors", None)) and self.scaler is None
                and not self._sharded)

    def _make_loader(self, loader, poisson: bool, sample_rate, expected_batch_size):
        """The loader to train on, the sample rate q, and the expected batch size (the "mean" divisor)."""
        if loader is None:
            if sample_rate is None:
                raise ValueError("give data_loader=, or sample_rate= (and expected_batch_size=) for a loop that "
                                 "samples its own batches")
            q = _number(sample_rate, "sample_rate", 0, low_ok=False)
            if q > 1:
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
            if expected_batch_size is None and self.loss_reduction == "mean":
                raise ValueError(
                    "with data_loader=None and loss_reduction='mean', give expected_batch_size= (q times the "
                    "dataset size): dividing by the actual batch size would reveal it through the noise scale.")
            self._warn_own_sampling("data_loader=None")
            if self.world_size > 1:
                warnings.warn(
                    f"data_loader=None under torch.distributed: sample_rate={q:g} and expected_batch_size are taken as "
                    "global, and dpkit cannot check that the ranks' batches together form one Poisson sample with "
                    "each example on one rank at most; dpkit.DPDataLoader(..., distributed=True) does.", stacklevel=4)
            return None, q, (None if expected_batch_size is None
                             else _number(expected_batch_size, "expected_batch_size", 0, low_ok=False))
        if sample_rate is not None or expected_batch_size is not None:
            raise ValueError("sample_rate= and expected_batch_size= go with data_loader=None; with a data loader "
                             "dpkit takes them from the loader (q = batch_size / len(dataset)).")
        n = check_loader(loader, poisson, world_size=self.world_size)
        if poisson:
            if not isinstance(loader, DPDataLoader):
                loader = DPDataLoader.from_data_loader(loader, secure_mode=self.secure_mode,
                                                       distributed=self.world_size > 1)
            elif self.secure_mode and not loader.secure_mode:
                raise PrivacyUsageError("secure_mode=True with a DPDataLoader that samples from a seeded generator; "
                                        "build it with DPDataLoader(..., secure_mode=True) or pass a plain DataLoader.")
            elif loader.world_size != self.world_size:
                raise PrivacyUsageError(
                    f"the DPDataLoader samples for world size {loader.world_size}, and torch.distributed runs with "
                    f"{self.world_size}: every rank would draw from the whole dataset, so the global batch would "
                    "not be the Poisson sample the accountant counts. Build it with DPDataLoader(..., "
                    "distributed=True) after init_process_group, or pass a plain DataLoader.")
            return loader, loader.sample_rate, loader.sample_rate * n
        batch_size = loader.batch_size * self.world_size  # each rank's loader yields its own share
        self._warn_own_sampling("poisson_sampling=False")
        warnings.warn("poisson_sampling=False: batches are not Poisson-sampled, but the privacy accounting "
                      "assumes they are (as every DP-SGD library does); the reported epsilon is not a proven "
                      "bound for shuffled fixed-size batches.", stacklevel=4)
        return loader, min(1.0, batch_size / n), float(batch_size)

    def _warn_own_sampling(self, why: str) -> None:
        if self.secure_mode:
            warnings.warn(f"secure_mode=True with {why}: the noise comes from the OS's CSPRNG, but the batches come "
                          "from your own sampling, which secure mode does not cover; sample them with a CSPRNG "
                          "(dpkit.secure.uniform) or let dpkit's loader do it.", stacklevel=5)

    def _check_optimizer(self) -> None:
        model_params = {id(p) for p in self.module.parameters()}
        foreign = [i for g in self.optimizer.param_groups for i, p in enumerate(g["params"])
                   if id(p) not in model_params]
        if foreign:
            raise ValueError(f"the optimizer holds {len(foreign)} parameter(s) that are not the model's; "
                             "build it from model.parameters() so every updated parameter is privatized.")

    def _check_mechanism_sampling(self) -> None:
        """A mechanism whose accounting needs its own sampling (BandMF: cyclic Poisson) checks the loader, and
        covers the gradient alone: a clipper that spends privacy too (adaptive's count) is outside its analysis."""
        check = getattr(self.noise, "check_loader", None)
        if check is None:
            from dpkit.data import CyclicPoissonLoader, ShuffledBatchLoader

            if isinstance(self.data_loader, (CyclicPoissonLoader, ShuffledBatchLoader)):
                raise PrivacyUsageError(
                    f"the data loader is a {type(self.data_loader).__name__}, whose sampling noise={self.noise_name!r} "
                    "does not account for: it assumes Poisson sampling of the whole dataset at every step, while "
                    "this loader visits each example at fixed steps. Use it with the mechanism it was made for "
                    "(noise='bandmf' for CyclicPoissonLoader, noise='tree' for ShuffledBatchLoader), or a DPDataLoader.")
            return
        if not isinstance(self.clipper.dp_event(self.sample_rate), NoOpEvent):
            raise PrivacyUsageError(
                f"noise={self.noise_name!r} accounts for the gradient's noise under its own sampling, and "
                f"clipping={self.clipping!r} spends privacy too, which that analysis does not cover. Use a clipper "
                "that spends none (flat, per_layer, automatic).")
        check(self.data_loader)

    def _check_replicas(self) -> None:
        """Every rank must start from the same weights and settings, or the replicas and the ledgers drift apart."""
        settings = repr((self.noise_multiplier, self.max_grad_norm, self.sample_rate, self.expected_batch_size,
                         self.mode, self.K, self.loss_reduction, self._config(), len(self.params)))
        distributed.check_same(
            torch.tensor([distributed.digest(settings)]), "make_private's arguments",
            "Call make_private with the same arguments (and the same data loader size) on every rank.")
        distributed.check_same(  # sharded (FSDP2) parameters have no replicas to compare
            distributed.fingerprint([p for p in self.params if not distributed.is_sharded(p)]),
            "the trainable parameters",
            "Start every rank from the same weights: seed the initialisation identically, or wrap the model in "
            "DistributedDataParallel (it broadcasts rank 0's weights) and pass the wrapper to make_private.")

    def _check_sharding(self) -> None:
        """FSDP2's layout (dim 0 over all ranks) is what the reduce-scatter and the noise split assume, and it
        gathers a parameter for its unit's forward and frees it after, so a mode that recomputes units from their
        parameters (torch.func, ExpandedWeights) would find them sharded."""
        odd = [n for n, p in self.module.named_parameters() if distributed.is_sharded(p) and (
            p.device_mesh.ndim != 1 or p.device_mesh.size() != self.world_size
            or [type(x).__name__ for x in p.placements] != ["Shard"] or p.placements[0].dim != 0)]
        if odd:
            raise UnsupportedModuleError(
                f"{odd[:5]} are DTensors sharded otherwise than along dim 0 over all ranks (FSDP2's "
                "fully_shard layout): HSDP, tensor parallelism and 2-D meshes are not supported yet, since dpkit's "
                "reduce-scatter and noise split assume that layout. Use fully_shard over one mesh dimension.")
        if self.mode in ("functorch", "ew"):
            self._refuse_recomputed(["every layer"])

    def _check_recomputed_units(self) -> None:
        """Under FSDP2, no unit of the plan may be recomputed from its parameters (auto's torch.func fallback)."""
        recomputed = [f"{row.name} ({row.type_name})" for row in self.plan if row.mode in ("functorch", "ew")]
        if recomputed:
            self._refuse_recomputed(recomputed)

    def _refuse_recomputed(self, units: list[str]) -> None:
        raise UnsupportedModuleError(
            f"the model's parameters are sharded by FSDP2 (fully_shard), and {units[:5]} would be recomputed from "
            f"its parameters (grad_sample_mode={self.mode!r}), which FSDP2 has freed by then. Use "
            "grad_sample_mode='bk', 'ghost', 'hooks' or 'auto' with layers that have samplers, or register a "
            "sampler for these layers.")

    def _check_noise_range(self) -> None:
        """The noisy sum must fit its float32-or-wider buffer, and the gradient the parameter's own dtype."""
        std = self.noise_multiplier * self.clipper.sensitivity()
        grad_std = std / (self.expected_batch_size or 1) if self.loss_reduction == "mean" else std
        for dtype in {p.dtype for p in self.params}:
            flat = torch.promote_types(dtype, torch.float32)
            if std >= torch.finfo(flat).max / 16 or grad_std >= torch.finfo(dtype).max / 16:
                raise ValueError(f"the noise std noise_multiplier * max_grad_norm = {std:g} overflows the {dtype} "
                                 "gradients; lower noise_multiplier or max_grad_norm.")

    def _warn_overrides(self) -> None:
        """A plugin replacing a built-in privacy-critical entry is allowed (newest wins), but never silently."""
        used = [("dpkit_clippers", self.clipping), ("dpkit_noise_mechanisms", self.noise_name),
                ("dpkit_accountants", self.accountant)]
        for row in self.plan:
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
                              PluginOverrideWarning, stacklevel=4)

    # -- control -----------------------------------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        _check_objects(self.module, self.optimizer, None)
        # Before FSDP2's own pre-forward hook, which swaps the root's sharded parameters for gathered ones.
        self._handles = [self.module.register_forward_pre_hook(self._on_forward_start, with_kwargs=True,
                                                               prepend=True),
                         self.optimizer.register_step_pre_hook(self._pre_step),
                         self.optimizer.register_step_post_hook(self._post_step)]
        self.capturer.attach()
        if self.scaler is not None:
            self.scaler.attach()
        for owner in (self.optimizer, self.module):
            original = owner.zero_grad

            @functools.wraps(original)
            def zero_grad(*args, _original=original, **kwargs):
                self._discard()
                return _original(*args, **kwargs)

            owner.__dict__["zero_grad"] = zero_grad
            self._wrapped.append(owner)
        self.attached = True
        _ATTACHED.add(self)

    def enable(self) -> None:
        """Resume private training after :meth:`disable`."""
        self.capturer.enabled = True

    def disable(self) -> None:
        """Pause: forward, backward and step run as without dpkit (NOT private, not counted)."""
        self.capturer.enabled = False
        self._clear()
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True

    @property
    def enabled(self) -> bool:
        return self.capturer.enabled

    def detach(self) -> None:
        """Remove every hook; the model and optimizer are as before ``make_private``."""
        self.capturer.detach()
        if self.scaler is not None:
            self.scaler.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner in self._wrapped:
            owner.__dict__.pop("zero_grad", None)
        self._wrapped = []
        self._clear()
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True
        self.attached = False
        _ATTACHED.discard(self)

    @contextlib.contextmanager
    def micro_batches(self) -> Iterator[None]:
        """The backward passes inside are micro-batches of one logical batch, for loops without a data loader.

        With ``data_loader=`` dpkit knows which batch each backward pass came from (``BatchMemoryManager`` splits
        one batch into micro-batches); with ``data_loader=None`` a second backward pass before ``step()`` is
        refused unless it is declared here, since accumulating several sampled batches into one step is a
        different mechanism from the one the accountant counts.
        """
        outer, self._batch_tag = self._batch_tag, object()
        try:
            yield
        finally:
            self._batch_tag = outer

    def __iter__(self) -> Iterator[Any]:
        yield self.module
        yield self.optimizer
        yield self.data_loader
        if self.criterion is not None:
            yield self.criterion

    def __repr__(self) -> str:
        return (f"PrivateTraining(mode={self.mode!r}, noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm}, sample_rate={self.sample_rate:.4g}, steps={self.steps}, "
                f"layers={len(self.plan)})")

    # -- checks at every forward and step ----------------------------------------------
    def _parameters(self) -> list[nn.Parameter]:
        if self._sharded:  # FSDP2 leaves gathered parameters in place after a forward without backward
            distributed.reshard(self.module)
        return list(self.module.parameters())

    def _trainable_change(self, params: list[nn.Parameter] | None = None) -> str | None:
        """What changed in the set of trainable parameters since planning (``params``: the model's, if walked)."""
        now = [p for p in (self._parameters() if params is None else params) if p.requires_grad]
        if len(now) == len(self._planned) and all(id(p) in self._planned for p in now):
            return None
        names = {id(p): n for n, p in self.module.named_parameters()}
        new = sorted(names.get(id(p), "?") for p in now if id(p) not in self._planned)
        ids = {id(p) for p in now}
        gone = sorted(names.get(id(p), "<removed from the model>") for p in self.params if id(p) not in ids)
        return ", ".join(part for part in (f"now trainable: {new}" if new else "",
                                           f"no longer trainable: {gone}" if gone else "") if part)

    @functools.partial(eager, reason="dpkit's forward checks and re-planning run eagerly: under dpkit, compile "
                                     "without fullgraph=True (docs/compile.md)")
    def _on_forward_start(self, module: nn.Module, args, kwargs) -> None:
        if not self.enabled or not torch.is_grad_enabled() or self.capturer._computing:
            return
        if self._ddp is not None:  # dpkit all-reduces the clipped sums itself; DDP would expect raw gradients
            self._ddp.require_backward_grad_sync = False
        if any(isinstance(m, MIXING) and m.training for m in self.module.modules()):
            mixing = [(n, m) for n, m in self.module.named_modules() if isinstance(m, MIXING) and m.training]
            raise UnsupportedModuleError(
                f"{[n for n, _ in mixing]} ({type(mixing[0][1]).__name__}) are in training mode, "
                "where batch statistics mix examples, so one example's gradient depends on the others "
                "(model.train() switches them back). Replace them with dpkit.fix(model) (BatchNorm → GroupNorm) "
                "and call make_private again.")
        change = self._trainable_change()
        if change is None:
            return
        if self.accumulator.backward_passes or self.capturer.captures:
            raise PrivacyUsageError(
                f"the trainable parameters changed in the middle of a step ({change}). Change requires_grad "
                "between optimizer.step() and the next forward pass.")
        warnings.warn(f"dpkit planned the model again: the trainable parameters changed ({change}).", stacklevel=3)
        self.capturer.detach()
        self._build()
        self.capturer.attach()
        self.capturer.start_forward(module, args, kwargs)  # this forward's root hooks were taken before the change

    def _check_release(self) -> None:
        """Before any gradient is released: exactly the planned parameters will move, and nothing else."""
        if distributed.world_size() != self.world_size:
            raise PrivacyUsageError(
                f"make_private ran with torch.distributed world size {self.world_size}, and it is now "
                f"{distributed.world_size()}: the sample rate, the noise split and the ledger assume the first. "
                "Call make_private after init_process_group, on every rank.")
        if not self._wrapping_checked:  # once: the scan of the garbage collector's referrers is O(heap)
            self._wrapping_checked = True
            if distributed.wrapped_after(self.module):
                raise PrivacyUsageError(
                    "the model was wrapped in DistributedDataParallel after make_private saw it bare; DDP would "
                    "expect gradients dpkit keeps to itself. Wrap first and pass the wrapper: "
                    "make_private(module=DistributedDataParallel(model), ...).")
        if self._refused is not None:
            raise PrivacyUsageError(f"a backward pass of this step was refused ({self._refused}); nothing was "
                                    "released. Call optimizer.zero_grad() to drop the batch, then continue.")
        if self.capturer.pass_died:
            raise PrivacyUsageError(
                "a backward pass of this step stopped with an error before its end, so it was never clipped whole "
                "(part of it may already be summed); nothing was released. Call optimizer.zero_grad() to drop the "
                "batch, then continue.")
        params = self._parameters()  # one walk of the model for both checks
        change = self._trainable_change(params)
        if change is not None:
            raise PrivacyUsageError(f"the trainable parameters changed after the forward pass ({change}); "
                                    "change requires_grad between optimizer.step() and the next forward pass.")
        model = {id(p) for p in params}
        raw = [p for g in self.optimizer.param_groups for p in g["params"]
               if id(p) not in self._planned and (p.grad is not None or id(p) not in model)]
        if raw:
            names = {id(p): n for n, p in self.module.named_parameters()}
            raw = [names.get(id(p), "<not the model's>") for p in raw]
            raise PrivacyUsageError(
                f"the optimizer would update {sorted(raw)} with gradients dpkit did not clip or noise (a frozen "
                "parameter with a gradient, an add_param_group after make_private, or a parameter that is not "
                "the model's). Call optimizer.zero_grad(), make them trainable in the model (dpkit plans them at "
                "the next forward), or remove them from the optimizer.")

    # -- the step ----------------------------------------------------------------------
    def _end_stream(self) -> None:
        self._streamed, self._streaming = {}, None

    def _on_refusal(self, err: BaseException) -> None:
        self._end_stream()
        self._refused = str(err).split(". ")[0][:300]
        self._after_virtual = False
        self.accumulator.reset()
        self._show_scaler()  # so that scaler.step reaches step(), which says why it refuses

    def _discard(self) -> None:
        """``zero_grad()``: forget this step's clipped sums, except between the micro-batches of one batch.

        Records of forward passes not yet back-propagated stay: ``out = model(x); zero_grad(); backward()``.
        """
        if self.enabled and self.capturer.pass_died:  # also between micro-batches: the whole step goes
            self.capturer.drop_dead_pass()
            self._end_stream()
            self._after_virtual = False
        if not self.enabled or self._after_virtual:
            return
        self.accumulator.reset()
        self._drop_grad_samples()
        self._refused = None
        if self._batch_tag is None:  # a batch split into micro-batches stays dropped until its last one
            self._dropped = None

    def _drop_grad_samples(self) -> None:
        for p in self.params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample

    def _admit_pass(self) -> object:
        """One backward pass's clipped sum may join the step only if it comes from the step's logical batch."""
        # Which batch: the loader's word for the tensors the forwards read, else the declared batch, else the
        # loader's last batch handed out. A declaration never overrides what the loader knows.
        read = self.capturer.last_pass_batches
        if len(read) > 1:
            raise PrivacyUsageError(
                f"one backward pass through forwards of {len(read)} different batches of the data loader: an "
                "example could then be in the step several times, which the recorded sample rate does not count. "
                "Train on one batch per optimizer.step().")
        batch = (next(iter(read)) if read else self._batch_tag if self._batch_tag is not None
                 else getattr(self.data_loader, "batches_drawn", None))
        if self.accumulator.backward_passes == 0:
            self._step_batch = batch
        elif batch is None:
            raise PrivacyUsageError(
                "a second backward pass before optimizer.step(), and dpkit cannot tell whether it comes from the "
                "same batch (data_loader=None, or poisson_sampling=False). Accumulating several sampled batches "
                "into one step is not the mechanism the accountant counts. If these are micro-batches of one "
                "batch, run them inside `with private.micro_batches():`; otherwise call optimizer.step() after "
                "each batch (and raise the batch size for a larger effective batch).")
        elif batch != self._step_batch:
            raise PrivacyUsageError(
                "backward passes from two batches of the data loader before one optimizer.step() (gradient "
                "accumulation across Poisson batches): an example could then be in the step several times, which "
                "the recorded sample rate does not count. Call optimizer.step() after each batch; for a larger "
                "effective batch raise the batch size, and use dpkit.BatchMemoryManager to split each batch into "
                "micro-batches that fit in memory.")
        self._after_virtual = False
        return batch

    def _on_backward_end(self, result, rows: int) -> None:
        crit_rows = self.criterion.rows if self.criterion is not None else None
        if crit_rows is not None:
            self.criterion.rows = None  # checked once, against the backward pass it fed
        if crit_rows is not None and crit_rows != rows:
            flattened = rows and crit_rows % rows == 0
            raise PrivacyUsageError(
                f"the loss has {crit_rows} rows but the model's layers saw {rows}; " + (
                    f"it looks flattened ({crit_rows // rows} rows per example, as logits.reshape(-1, V) gives): "
                    "keep one row per example, e.g. criterion(logits.transpose(1, 2), targets) with logits "
                    "[B, T, V] and targets [B, T], so that each example's loss is the mean over its tokens."
                    if flattened else "compute the loss on the same batch the model saw."))
        loss_scale = self.scaler.start_pass() if self.scaler is not None else 1.0
        self._pass_dropped = False
        if self.norm_mode:
            self._clip_records(result, rows)
            return
        batch = self._admit_pass()
        if not self._admit(batch):
            return
        if loss_scale != 1:
            for p in list(result):  # one at a time, so the scaled gradient is freed before the next is divided
                result[p] = result[p] / loss_scale
        before = {p: s.clone() for p, s in self.accumulator.current().items()} if self._observed() else None
        try:
            norms, factors, per_example = self.accumulator.add_backward(result, rows)
        except NonFiniteGradientError as err:
            self._overflow(err, batch)
            return
        for p, g in per_example.items():
            p.grad_sample = g
        if before is not None:
            self._notify(norms, factors, per_example, before)
        self._show_scaler()

    def _stream(self, cap) -> bool:
        """Clip and sum one record as its output gradients arrive; False leaves it for the end of the pass.

        The sums go straight into the step's buffers. Admission and the finiteness check still happen at the end
        of the pass (``_clip_records``), over the whole norm table: a refused pass resets the buffers before
        anything is released. A pass watched by ``dpkit_on_clip`` observers is not streamed, since they are
        shown the pass's sums as a difference of the buffers. ``auto`` streams only the records it formed on
        arrival: the others are those whose per-example gradients outgrow the record, and their norms, taken
        at the start of the backward pass, would add to its peak (a convnet's last convolution: 1.10× → 1.29×).
        """
        if self._streaming is None:
            self._streaming = not self._observed()
        if not self._streaming or (self.mode == "auto" and cap.formed is None):
            return False
        own = list(dict.fromkeys(cap.row.params.values()))
        norms, materialised = bk.record_norms([cap], own, cap.rows // self.K, self.K, self.capturer)
        scale = cap.rows if self.loss_reduction == "mean" else 1
        factors = self.clipper.layer_factors(norms * scale, len(self.params))
        self._streamed.update(zip(own, norms))
        self.accumulator.stream(bk.record_sums([cap], own, factors * scale, self.K, materialised, self.capturer))
        return True

    def _clip_records(self, records, rows: int) -> None:
        batch = rows // self.K
        streamed = self._streamed
        self._end_stream()
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        if self.mode == "ghost" and not self._in_ghost_backward:
            raise PrivacyUsageError(
                "grad_sample_mode='ghost' reweights per-example losses in a second backward pass, so the loss "
                "must come from private.criterion (make_private(criterion=...)); call loss.backward() on it.")
        tag = self._admit_pass()
        if self._admit(tag):
            norms, materialised = bk.record_norms(records, self.params, batch, self.K, self.capturer)
            if streamed:  # the rows of the layers already clipped and summed as they arrived
                norms = norms.to(torch.promote_types(norms.dtype, next(iter(streamed.values())).dtype))
                for i, p in enumerate(self.params):
                    if p in streamed:
                        norms[i] = streamed[p]
            # The records hold the gradients of the loss as back-propagated: the mean's (times rows gives the
            # sum's) times a GradScaler's scale, divided out here, before any norm is compared with C.
            scale = (rows if self.loss_reduction == "mean" else 1) / loss_scale
            try:
                clipper_norms, factors = self.accumulator.clip_factors(norms * scale)
            except NonFiniteGradientError as err:
                self._overflow(err, tag)
        if self._pass_dropped:
            if self.mode == "ghost":  # the reweighting pass still runs, with weight 0, to consume the forward
                zero = torch.zeros(batch, device=self.params[0].device)
                self._ghost_factors = (zero, zero)
            return
        if self.mode == "ghost":
            self._ghost_factors = (clipper_norms, factors)
            return
        sums = bk.record_sums(records, self.params, factors * scale, self.K, materialised, self.capturer)
        before = {p: s.clone() for p, s in self.accumulator.current().items()} if self._observed() else None
        self.accumulator.add(sums, batch)
        if before is not None:
            self._notify(clipper_norms, factors, None, before)
        self._show_scaler()

    # -- loss scaling (GradScaler) -------------------------------------------------------
    def _admit(self, batch: object) -> bool:
        """Whether a backward pass joins the step: not if its logical batch was dropped for an overflow, since a
        step over the batch's other micro-batches would be a step over a data-dependent part of it."""
        if self._dropped is not None and self._dropped == batch:
            self._pass_dropped = True
            self.scaler.show(self.params, overflow=True)
            return False
        self._dropped = None
        return True

    def _overflow(self, err: NonFiniteGradientError, batch: object) -> None:
        """A non-finite per-example gradient: the loss scale's overflow drops the logical batch (the scaler then
        skips its step and lowers the scale); any other is refused as without a scaler."""
        if self.scaler is None or not self.scaler.overflowed():
            raise err
        self.accumulator.reset()
        self._drop_grad_samples()
        self._dropped = batch if batch is not None else object()
        self._pass_dropped = True
        self.overflow_skips += 1
        self.scaler.show(self.params, overflow=True)

    def _show_scaler(self) -> None:
        if self.scaler is not None:
            self.scaler.show(self.params, overflow=False)

    def backward(self, loss: DPLoss) -> None:
        """``loss.backward()`` of a loss from ``private.criterion``: one pass, or ghost's two."""
        if self.mode != "ghost" or not self.enabled:
            loss.value.backward()
            return
        try:
            norms, factors, sums = ghost.backward(self, loss)
        except PrivacyUsageError as err:
            self._on_refusal(err)
            raise
        if self._pass_dropped:
            return
        if self.scaler is not None and self.scaler.scale != 1:  # the reweighted loss was the scaled one
            sums = {p: s / self.scaler.scale for p, s in sums.items()}
            if not all(bool(torch.isfinite(s).all()) for s in sums.values()):
                err = NonFiniteGradientError(
                    "the reweighted backward pass of ghost clipping gave a non-finite clipped sum from a non-finite "
                    "loss, so nothing is released. Look for bad inputs or log(0) in the loss, then call "
                    "optimizer.zero_grad() to drop the batch and go on.")
                try:
                    self._overflow(err, self._step_batch)
                except NonFiniteGradientError:
                    self._on_refusal(err)
                    raise
                return
        before = {p: s.clone() for p, s in self.accumulator.current().items()} if self._observed() else None
        self.accumulator.add(sums, loss.per_row.shape[0] // self.K)
        if before is not None:
            self._notify(norms, factors, None, before)
        self._show_scaler()

    def _observed(self) -> bool:
        return bool(registry.plugin_manager().hook.dpkit_on_clip.get_hookimpls())

    def _notify(self, norms, factors, per_example, before) -> None:
        names = {p: n for row in self.plan for n, p in row.params.items()}
        sums = {names[p]: s - before.get(p, 0) for p, s in self.accumulator.current().items()}
        grads = clipped = None
        if per_example is not None:
            grads, clipped = {}, {}
            for i, p in enumerate(self.params):
                if p in per_example:
                    f = factors[i] if factors.dim() == 2 else factors
                    grads[names[p]] = per_example[p]
                    clipped[names[p]] = per_example[p] * f.reshape(-1, *[1] * (per_example[p].dim() - 1))
        event = ClipEvent(step=self.steps, norms=norms, factors=factors, max_grad_norm=self.max_grad_norm,
                          clipped_sum=sums, grad_samples=grads, clipped_grad_samples=clipped)
        registry.plugin_manager().hook.dpkit_on_clip(event=event)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self.enabled:
            return
        if kwargs.get("closure") is not None or any(callable(a) for a in args[1:]):  # args[0] is the optimizer
            raise PrivacyUsageError(
                "optimizer.step(closure) evaluates the loss inside the step, after dpkit has formed the step's "
                "gradient (LBFGS and line searches re-evaluate it several times, each a release). Call "
                "loss.backward() and then optimizer.step() without a closure.")
        amp.refuse_fused(optimizer)
        amp.unregistered(amp.calling_scaler(), self.scaler.scaler if self.scaler is not None else None)
        self._check_release()
        if self._dropped is not None and self.accumulator.backward_passes == 0:
            raise PrivacyUsageError(
                "this step's batch was dropped: its gradients overflowed under the GradScaler's loss scale, so "
                "nothing is released for it. Step through scaler.step(optimizer), which skips the step, then "
                "scaler.update(), which lowers the scale.")
        if self._skip_step:
            for p in self.params:
                p.grad = None  # a virtual step: keep accumulating, update nothing
            self._after_virtual = True
            return
        if self.accumulator.backward_passes == 0:
            raise PrivacyUsageError(
                "optimizer.step() was called without a backward() since the last step (or zero_grad() dropped "
                "it). Call loss.backward() first, also for an empty Poisson batch (dpkit gives it the right shape "
                "and counts it).")
        flats = self.accumulator.buffers()
        # Always the expected batch size: the actual one would show through the scale of the noise.
        denominator = self.expected_batch_size if self.loss_reduction == "mean" else 1
        for norms in self.accumulator.observed:
            self.clipper.observe(norms)
        noisy = privatize(flats, self.noise, self.noise_multiplier * self.clipper.sensitivity(), denominator,
                          across_ranks=self.world_size > 1)
        for p in self.params:
            p.grad = noisy[p] if noisy[p].dtype == p.dtype else noisy[p].to(p.dtype)
        self._record_step()

    def _record_step(self) -> None:
        if self.noise_multiplier == 0:
            self._unbounded_steps += 1
        else:
            self.ledger.record(step_event(self.noise.dp_event(self.noise_multiplier, self.sample_rate),
                                          self.clipper.dp_event(self.sample_rate)))
        self.clipper.end_step(self.noise, expected_batch_size=self.expected_batch_size)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self.enabled or self._skip_step:
            return
        self.steps += 1
        self._clear()

    def _clear(self) -> None:
        self.accumulator.reset()
        self.capturer.reset()
        self._drop_grad_samples()

    # -- privacy -----------------------------------------------------------------------
    def epsilon(self, delta: float, accountant: str | None = None) -> float:
        """ε spent so far at ``delta``, by ``accountant`` (default: the one chosen at make_private)."""
        if self._unbounded_steps:
            return math.inf
        from dpkit.accounting import epsilon_of_ledger

        return epsilon_of_ledger(self.ledger, delta, accountant or self.accountant)

    def privacy_report(self, delta: float) -> str:
        """ε at ``delta`` from every installed accountant, side by side (approximations labelled)."""
        lines = [f"privacy after {self.steps} steps (sample rate {self.sample_rate:.4g}, noise multiplier "
                 f"{self.noise_multiplier:g}, delta {delta:g}):"]
        for name in sorted(registry.table("dpkit_accountants")):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    eps = f"{self.epsilon(delta, accountant=name):.4f}"
                except Exception as err:  # one accountant failing must not hide the others
                    eps = f"unavailable ({err})"
            note = "  (approximation: may under-report)" if caught else ""
            mark = "*" if name == self.accountant else " "
            lines.append(f" {mark} {name:<12} epsilon = {eps}{note}")
        return "\n".join(lines)

    def audit_report(self, delta: float, confidence: float = 0.95):
        """The accountant's ε next to the lower bounds a :class:`dpkit.audit.CanaryAudit` measured on this run."""
        from dpkit.audit import CanaryAudit

        if not isinstance(self.noise, CanaryAudit):
            raise PrivacyUsageError("no audit is attached to this run: call dpkit.audit.CanaryAudit.attach(private) "
                                    "before training, then private.audit_report(delta) (see docs/auditing.md).")
        return self.noise.report(delta, confidence)

    def _config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "noise": self.noise_name, "accountant": self.accountant,
                "secure_mode": self.secure_mode}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to report the same ε and draw the same noise and batches.

        Outside secure mode this holds the noise generator's state: whoever holds the checkpoint can regenerate
        the noise and subtract it from the released model. Keep checkpoints as private as the data.
        """
        state = {"format": STATE_FORMAT, "config": self._config(), "ledger": self.ledger.state_dict(),
                 "steps": self.steps, "unbounded_steps": self._unbounded_steps, "noise": self.noise.state_dict(),
                 "clipper": self.clipper.state_dict(), "optimizer": self.optimizer.state_dict()}
        sampler = getattr(self.data_loader, "batch_sampler", None)
        if isinstance(sampler, PoissonBatchSampler):
            state["sampler"] = sampler.state_dict()
        if self.world_size > 1:
            state.update(self._ranks_state(state))
        return state

    def _ranks_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Distributed: every rank's noise state (each rank noises its own coordinates) and a check that the
        ranks agree on the rest. A collective: call ``state_dict()`` on every rank, save it from one."""
        noises: list[Any] = [None] * self.world_size
        dist.all_gather_object(noises, state["noise"])
        shared = {k: v for k, v in state.items() if k not in ("noise", "optimizer")}
        distributed.check_same(torch.tensor([distributed.digest(shared)]), "the ranks' privacy states",
                               "The ranks fell out of step (a rank skipped a step or sampled on its own).")
        return {"world_size": self.world_size, "noise": noises}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a checkpoint of another configuration, or one whose step count
        disagrees with its ledger, is refused before anything is changed."""
        if not isinstance(state, dict):
            raise ValueError(f"a dpkit checkpoint is a dict from private.state_dict(), got {type(state).__name__}")
        if isinstance(state.get("format"), int) and state["format"] != STATE_FORMAT:
            raise ValueError(f"this checkpoint has state format {state['format']}; this dpkit reads format "
                             f"{STATE_FORMAT}. Load it with the dpkit version that wrote it.")
        missing = [k for k in ("format", "config", "ledger", "steps", "unbounded_steps", "noise", "clipper",
                               "optimizer") if k not in state]
        if missing:
            raise ValueError(f"this checkpoint lacks {missing}: it was not made by private.state_dict() of this dpkit "
                             f"version (state format {STATE_FORMAT}), or it was truncated.")
        if state.get("world_size", 1) != self.world_size:
            raise PrivacyUsageError(
                f"the checkpoint was made with torch.distributed world size {state.get('world_size', 1)}, this run "
                f"has {self.world_size}: each rank's noise stream belongs to its rank. Resume with the same number "
                "of ranks.")
        if self.world_size > 1:
            state = {**state, "noise": state["noise"][self.rank]}
        theirs, mine = state["config"], self._config()
        differ = {k: (theirs.get(k) if isinstance(theirs, dict) else None, v) for k, v in mine.items()
                  if not isinstance(theirs, dict) or theirs.get(k) != v}
        if differ:
            raise PrivacyUsageError(
                "the checkpoint was made with another configuration: " + ", ".join(
                    f"{k}={a!r} there, {b!r} here" for k, (a, b) in differ.items())
                + ". Resume with the make_private arguments the checkpoint was made with.")
        ledger = Ledger()
        try:
            ledger.load_state_dict(state["ledger"])
            steps, unbounded = int(state["steps"]), int(state["unbounded_steps"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the checkpoint's ledger or step count is malformed ({err!r}).") from err
        if unbounded < 0 or ledger.steps + unbounded != steps:
            raise PrivacyUsageError(
                f"the checkpoint says {steps} steps, but its ledger records {ledger.steps} (+{unbounded} without "
                "noise): it was altered or assembled from two runs, and its epsilon cannot be trusted.")
        if ("sampler" in state) != isinstance(getattr(self.data_loader, "batch_sampler", None), PoissonBatchSampler):
            raise PrivacyUsageError("the checkpoint's data sampling (Poisson loader or not) differs from this run's.")
        parts = [(self.noise, "noise"), (self.clipper, "clipper"), (self.optimizer, "optimizer")]
        if "sampler" in state:
            parts.append((self.data_loader.batch_sampler, "sampler"))
        saved = [(part, part.state_dict()) for part, _ in parts]
        try:
            for part, key in parts:
                part.load_state_dict(state[key])
        except Exception:
            for part, before in saved:  # all or nothing: a half-loaded run would draw or count wrongly
                part.load_state_dict(before)
            raise
        self.ledger, self.steps, self._unbounded_steps = ledger, steps, unbounded


def make_private(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader | None = None,
                 noise_multiplier: float | None = None, max_grad_norm: float,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 epochs: float | None = None, steps: int | None = None, **kwargs) -> PrivateTraining:
    """Make ``module``'s training with ``optimizer`` differentially private with DP-SGD; returns the controller.

    Nothing is wrapped: hooks go on the model and the optimizer, and ``private`` unpacks to ``(module, optimizer,
    data_loader[, criterion])``. Give ``noise_multiplier``, or ``target_epsilon`` with ``target_delta`` and
    ``epochs`` (or ``steps``) to have it calibrated. The contract is docs/design.md.

    Arguments (keyword only):
        module, optimizer: the model (or its ``DistributedDataParallel``/``fully_shard`` wrapper) and an optimizer
            over its parameters.
        data_loader: a ``DataLoader`` (replaced by its Poisson twin; ``batch_size`` is the expected batch size, per
            rank under torch.distributed), a ``dpkit.DPDataLoader``, or None with ``sample_rate=``.
        noise_multiplier: σ; the noise std on the clipped sum is σ·C. ``max_grad_norm``: C.
        target_epsilon, target_delta, epochs, steps: calibrate σ instead (``make_private_with_epsilon``).
        grad_sample_mode: "auto" (default), "bk", "ghost", "hooks", "functorch" or "ew" (docs/modes.md).
        clipping, clipping_kwargs: "flat" (default), "per_layer", "automatic", "adaptive" or a plugin's, and
            its factory's arguments.
        noise, noise_kwargs: "gaussian" (default), "bandmf-<b>" or a plugin's, and its factory's arguments.
        accountant: "prv" (default), "rdp", "gdp" or a plugin's.
        augmentation_multiplicity: K augmented copies of each example, adjacent rows, averaged before clipping.
        poisson_sampling: keep True; False keeps the loader's fixed-size batches and warns.
        loss_reduction: "mean" (divide by the expected batch size) or "sum".
        batch_first: whether layers see the batch along dim 0 (else dim 1).
        criterion: a torch loss with ``reduction``; returned wrapped, one loss per example (ghost needs it).
        secure_mode: sampling and noise from the OS's CSPRNG, no noise state. ``noise_seed``: an int for a
            reproducible noise stream.
        sample_rate, expected_batch_size: with ``data_loader=None``, the loop's own sampling rate and the
            "mean" divisor.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 loop (docs/mixed-precision.md).
    """
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give noise_multiplier=, or target_epsilon= with target_delta= and epochs= (or steps=)")
        return make_private_with_epsilon(module=module, optimizer=optimizer, data_loader=data_loader,
                                         max_grad_norm=max_grad_norm, target_epsilon=target_epsilon,
                                         target_delta=target_delta, epochs=epochs, steps=steps, **kwargs)
    if target_epsilon is not None:
        raise ValueError("give either noise_multiplier= or target_epsilon=, not both")
    return PrivateTraining(module=module, optimizer=optimizer, data_loader=data_loader,
                           noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, **kwargs)


def _full_signature(fn) -> inspect.Signature:
    """``fn``'s signature with the controller's keyword arguments in place of ``**kwargs``, for ``help()``."""
    own = inspect.signature(fn).parameters
    rest = [p for n, p in inspect.signature(PrivateTraining.__init__).parameters.items()
            if n not in own and n not in ("self", "noise_multiplier")]
    return inspect.Signature([p for n, p in own.items() if n != "kwargs"] + rest,
                             return_annotation=inspect.signature(fn).return_annotation)


make_private.__signature__ = _full_signature(make_private)


def make_private_with_epsilon(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader | None = None,
                              max_grad_norm: float, target_epsilon: float, target_delta: float | None,
                              epochs: float | None = None, steps: int | None = None, **kwargs) -> PrivateTraining:
    """``make_private`` with the smallest noise multiplier whose ε after ``epochs`` (or ``steps``) ≤ target."""
    from dpkit.accounting import get_noise_multiplier

    if target_delta is None:
        raise ValueError("target_delta= is required with target_epsilon= (e.g. 1e-5, below 1/N)")
    private = PrivateTraining(module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=1.0,
                              max_grad_norm=max_grad_norm, **kwargs)
    if steps is None and epochs is not None and private.data_loader is not None:
        # An epoch is as many steps as the loader yields (round(1/q) for Poisson), not 1/q.
        steps, epochs = math.ceil(epochs * len(private.data_loader)), None
    calibrate = getattr(private.noise, "calibrate", None)  # a mechanism with its own accounting (BandMF)
    if calibrate is not None:
        if steps is None:
            raise ValueError(f"noise={private.noise_name!r} calibrates over a number of steps: give steps=, or "
                             "epochs= with a data loader")
        sigma = calibrate(target_epsilon=target_epsilon, target_delta=target_delta, steps=steps,
                          accountant=private.accountant)
    else:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                     sample_rate=private.sample_rate, epochs=epochs, steps=steps,
                                     accountant=private.accountant)
    # A clipper that spends privacy (adaptive's noisy count) shares the budget: the gradient gets what is left.
    split = getattr(private.clipper, "gradient_noise_multiplier", None)
    private.noise_multiplier = split(sigma) if split is not None else sigma
    return private


make_private_with_epsilon.__signature__ = _full_signature(make_private_with_epsilon)
