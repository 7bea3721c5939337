"""``make_private``: attach DP-SGD to a model and optimizer without wrapping either.

The controller resolves every layer once (``plan.py``), hooks the model to
capture what per-example gradients need (``modes/_capture.py``), and hooks the
optimizer's ``step`` so that each step uses the clipped, noised gradient
(``optimizer.py``). ``detach()`` leaves the model and optimizer as they were.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpkit import registry
from dpkit.criterion import DPCriterion, DPLoss
from dpkit.data import DPDataLoader, PoissonBatchSampler
from dpkit.errors import PrivacyUsageError
from dpkit.events import ClipEvent, ComposedEvent, DpEvent, Ledger, NoOpEvent, PoissonSampledEvent
from dpkit.modes import bk, ghost
from dpkit.modes._capture import Capturer
from dpkit.optimizer import StepAccumulator, all_reduce, privatize
from dpkit.plan import MODES, NORM_MODES, build_plan


def _check_args(noise_multiplier, max_grad_norm, K, loss_reduction, mode) -> None:
    # Explicit checks: attrs validators can be switched off process-wide, these cannot.
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if not (isinstance(K, int) and K >= 1):
        raise ValueError(f"augmentation_multiplicity must be an int >= 1, got {K!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if mode not in MODES:
        raise ValueError(f"grad_sample_mode must be one of {MODES}, got {mode!r}")


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
                 secure_mode: bool = False, noise_seed: int | None = None, sample_rate: float | None = None):
        K = augmentation_multiplicity
        _check_args(noise_multiplier, max_grad_norm, K, loss_reduction, grad_sample_mode)
        self.module, self.optimizer = module, optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.mode, self.K, self.loss_reduction = grad_sample_mode, K, loss_reduction
        self.accountant = accountant
        registry.lookup("dpkit_accountants", accountant, "accountant")
        self.clipper = registry.lookup("dpkit_clippers", clipping, "clipping").value(
            max_grad_norm=max_grad_norm, **(clipping_kwargs or {}))
        self.noise = registry.lookup("dpkit_noise_mechanisms", noise, "noise").value(
            seed=noise_seed, secure_mode=secure_mode)
        self.data_loader, self.sample_rate, self.expected_batch_size = self._make_loader(
            data_loader, poisson_sampling, sample_rate)
        self.poisson_sampling = poisson_sampling
        self.criterion = DPCriterion(criterion, loss_reduction, batch_first) if criterion is not None else None
        if self.criterion is not None:
            self.criterion.backward_fn = self.backward
        if grad_sample_mode == "ghost" and getattr(self.clipper, "per_layer", False):
            raise ValueError(f"clipping={clipping!r} clips each parameter on its own, which ghost's single "
                             "reweighted backward pass cannot do; use grad_sample_mode='bk' or 'hooks'.")
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: gradients are clipped but not noised, so training is NOT "
                          "differentially private (epsilon is infinite). Use it only to test or debug.",
                          stacklevel=3)
        self.plan = build_plan(module, grad_sample_mode)
        self.params = list(dict.fromkeys(p for row in self.plan for p in row.params.values()))
        self._check_optimizer()
        self.ledger = Ledger()
        self.steps = 0
        self._unbounded_steps = 0
        self._skip_step = False
        self.accumulator = StepAccumulator(self.params, self.clipper, K)
        self.norm_mode = grad_sample_mode in NORM_MODES
        self._ghost_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._in_ghost_backward = False
        early = functools.partial(bk.form_early, K=K) if grad_sample_mode == "auto" else None
        self.capturer = Capturer(module, self.plan, K=K, batch_first=batch_first, rescale=loss_reduction == "mean",
                                 keep_records=self.norm_mode, keep_outputs=grad_sample_mode == "ghost",
                                 skip_param_grads=grad_sample_mode in ("hooks", "bk", "auto"),
                                 on_backward_end=self._on_backward_end,
                                 form_on_arrival=early)
        self._optimizer_hooks: list = []
        self.attached = False
        self.attach()

    # -- construction ------------------------------------------------------------------
    def _make_loader(self, loader, poisson: bool, sample_rate: float | None):
        if loader is None:
            if sample_rate is None:
                raise ValueError("give data_loader=, or sample_rate= for a loop that samples its own batches")
            return None, float(sample_rate), None
        n = len(loader.dataset)
        if poisson:
            if not isinstance(loader, DPDataLoader):
                loader = DPDataLoader.from_data_loader(loader)
            return loader, loader.sample_rate, loader.sample_rate * n
        batch_size = loader.batch_size or n / max(len(loader), 1)
        warnings.warn("poisson_sampling=False: batches are not Poisson-sampled, but the privacy accounting "
                      "assumes they are (as every DP-SGD library does); the reported epsilon is not a proven "
                      "bound for shuffled fixed-size batches.", stacklevel=4)
        return loader, min(1.0, batch_size / n), None

    def _check_optimizer(self) -> None:
        model_params = {id(p) for p in self.module.parameters()}
        foreign = [i for g in self.optimizer.param_groups for i, p in enumerate(g["params"])
                   if id(p) not in model_params]
        if foreign:
            raise ValueError(f"the optimizer holds {len(foreign)} parameter(s) that are not the model's; "
                             "build it from model.parameters() so every updated parameter is privatized.")

    # -- control -----------------------------------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        self.capturer.attach()
        self._optimizer_hooks = [self.optimizer.register_step_pre_hook(self._pre_step),
                                 self.optimizer.register_step_post_hook(self._post_step)]
        self.attached = True

    def enable(self) -> None:
        """Resume private training after :meth:`disable`."""
        self.capturer.enabled = True

    def disable(self) -> None:
        """Pause: forward, backward and step run as without dpkit (NOT private, not counted)."""
        self.capturer.enabled = False
        self._clear()

    @property
    def enabled(self) -> bool:
        return self.capturer.enabled

    def detach(self) -> None:
        """Remove every hook; the model and optimizer are as before ``make_private``."""
        self.capturer.detach()
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []
        self._clear()
        self.attached = False

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

    # -- the step ----------------------------------------------------------------------
    def _on_backward_end(self, result, rows: int) -> None:
        crit_rows = self.criterion.rows if self.criterion is not None else None
        if crit_rows is not None:
            self.criterion.rows = None  # checked once, against the backward pass it fed
        if crit_rows is not None and crit_rows != rows:
            raise PrivacyUsageError(f"the loss has {crit_rows} rows but the model's layers saw {rows}; "
                                    "compute the loss on the same batch the model saw.")
        if self.norm_mode:
            self._clip_records(result, rows)
            return
        before = {p: s.clone() for p, s in self.accumulator.current().items()} if self._observed() else None
        norms, factors, per_example = self.accumulator.add_backward(result, rows)
        for p, g in per_example.items():
            p.grad_sample = g
        if before is not None:
            self._notify(norms, factors, per_example, before)

    def _clip_records(self, records, rows: int) -> None:
        batch = rows // self.K
        norms, materialised = bk.record_norms(records, self.params, batch, self.K, self.capturer)
        scale = rows if self.loss_reduction == "mean" else 1  # the records hold the mean loss's gradients
        clipper_norms, factors = self.accumulator.clip_factors(norms * scale)
        if self.mode == "ghost":
            if not self._in_ghost_backward:
                raise PrivacyUsageError(
                    "grad_sample_mode='ghost' reweights per-example losses in a second backward pass, so the loss "
                    "must come from private.criterion (make_private(criterion=...)); call loss.backward() on it.")
            self._ghost_factors = (clipper_norms, factors)
            return
        sums = bk.record_sums(records, self.params, factors * scale, self.K, materialised, self.capturer)
        before = {p: s.clone() for p, s in self.accumulator.current().items()} if self._observed() else None
        self.accumulator.add(sums, batch)
        if before is not None:
            self._notify(clipper_norms, factors, None, before)

    def backward(self, loss: DPLoss) -> None:
        """``loss.backward()`` of a loss from ``private.criterion``: one pass, or ghost's two."""
        if self.mode != "ghost" or not self.enabled:
            loss.value.backward()
            return
        norms, factors, sums = ghost.backward(self, loss)
        before = {p: s.clone() for p, s in self.accumulator.current().items()} if self._observed() else None
        self.accumulator.add(sums, loss.per_row.shape[0] // self.K)
        if before is not None:
            self._notify(norms, factors, None, before)

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
        if self._skip_step:
            for p in self.params:
                p.grad = None  # a virtual step: keep accumulating, update nothing
            return
        if self.accumulator.backward_passes == 0:
            raise PrivacyUsageError(
                "optimizer.step() was called without a backward() since the last step. Call loss.backward() "
                "first, also for an empty Poisson batch (dpkit gives it the right shape and counts it).")
        flats = self.accumulator.buffers()
        all_reduce([flat for flat, _ in flats])
        denominator = (self.expected_batch_size if self.expected_batch_size is not None
                       else max(self.accumulator.examples, 1)) if self.loss_reduction == "mean" else 1
        noisy = privatize(flats, self.noise, self.noise_multiplier * self.clipper.sensitivity(), denominator)
        for p in self.params:
            p.grad = noisy[p]
        self._record_step()

    def _record_step(self) -> None:
        if self.noise_multiplier == 0:
            self._unbounded_steps += 1
        else:
            self.ledger.record(step_event(self.noise.dp_event(self.noise_multiplier, self.sample_rate),
                                          self.clipper.dp_event(self.sample_rate)))
        self.clipper.end_step(self.noise, expected_batch_size=self.expected_batch_size
                              or max(self.accumulator.examples, 1))

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self.enabled or self._skip_step:
            return
        self.steps += 1
        self._clear()

    def _clear(self) -> None:
        self.accumulator.reset()
        self.capturer.reset()
        for p in self.params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample

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

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to report the same ε and draw the same noise and batches."""
        state = {"ledger": self.ledger.state_dict(), "steps": self.steps, "unbounded_steps": self._unbounded_steps,
                 "noise": self.noise.state_dict(), "clipper": self.clipper.state_dict(),
                 "optimizer": self.optimizer.state_dict()}
        sampler = getattr(self.data_loader, "batch_sampler", None)
        if isinstance(sampler, PoissonBatchSampler):
            state["sampler"] = sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self.steps, self._unbounded_steps = state["steps"], state["unbounded_steps"]
        self.noise.load_state_dict(state["noise"])
        self.clipper.load_state_dict(state["clipper"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "sampler" in state:
            self.data_loader.batch_sampler.load_state_dict(state["sampler"])


def make_private(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader | None = None,
                 noise_multiplier: float | None = None, max_grad_norm: float,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 epochs: float | None = None, steps: int | None = None, **kwargs) -> PrivateTraining:
    """Make ``module``'s training with ``optimizer`` differentially private (see DESIGN.md)."""
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
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                 sample_rate=private.sample_rate, epochs=epochs, steps=steps,
                                 accountant=private.accountant)
    # A clipper that spends privacy (adaptive's noisy count) shares the budget: the gradient gets what is left.
    split = getattr(private.clipper, "gradient_noise_multiplier", None)
    private.noise_multiplier = split(sigma) if split is not None else sigma
    return private
