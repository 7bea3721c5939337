"""``PrivateTraining``: the controller ``make_private`` returns. It owns the parts and routes the hooks to them.

- the plan (``plan.py``) and the capture of each planned unit (``modes/_capture.py``);
- the :class:`~dpkit.engine.gate.StepGate` (which sampled batch each pass belongs to, one release per batch);
- :class:`~dpkit.engine.passes.PassEnd` (each backward pass clipped and summed into the step's accumulator);
- the topology (one process, replicas or shards), the GradScaler link, the noise mechanism, the clipper and the
  ledger. ``optimizer.step()`` runs the checks at release (``guards.py``), then ``privatize``: the clipped sum
  plus noise, once.

Nothing is wrapped: hooks go on the model and the optimizer, and ``detach()`` leaves both as they were.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from dpkit import amp, distributed
from dpkit.criterion import DPCriterion, DPLoss
from dpkit.engine import checkpoint, guards, report
from dpkit.engine.gate import Phase, StepGate
from dpkit.engine.passes import PassEnd
from dpkit.engine.sampling import Sampling
from dpkit.engine.topology import Single
from dpkit.errors import PrivacyUsageError
from dpkit.events import ComposedEvent, DpEvent, Ledger, NoOpEvent, PoissonSampledEvent
from dpkit.modes import bk
from dpkit.modes._capture import Arrival, Capturer, eager
from dpkit.modes._trace import drop_loop_traces
from dpkit.optimizer import StepAccumulator, privatize
from dpkit.plan import NORM_MODES, build_plan

ATTACHED: weakref.WeakSet[PrivateTraining] = weakref.WeakSet()  # controllers with hooks on a model


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


def _run_before_zero_grad(owner: nn.Module | Optimizer, discard) -> None:
    """``owner.zero_grad()`` also drops the step's clipped sums (an instance attribute, removed by ``detach``)."""
    original = owner.zero_grad

    @functools.wraps(original)
    def zero_grad(*args, **kwargs):
        discard()
        return original(*args, **kwargs)

    owner.__dict__["zero_grad"] = zero_grad


class PrivateTraining:
    """The controller ``make_private`` returns; unpacks to ``(module, optimizer, data_loader[, criterion])``.
    Built by :func:`dpkit.make_private` once σ is final (calibrated first), so every check sees the run's σ."""

    def __init__(self, *, module: nn.Module, optimizer: Optimizer, sampling: Sampling, topology: Single,
                 noise, noise_name: str, clipper, clipping: str, accountant: str, noise_multiplier: float,
                 max_grad_norm: float, mode: str, K: int, loss_reduction: str, batch_first: bool,
                 criterion: nn.Module | None, secure_mode: bool, grad_scaler: torch.amp.GradScaler | None,
                 public_buffers: frozenset[str] = frozenset()):
        self.module, self.optimizer, self.topology = module, optimizer, topology
        self.world_size, self.rank, self.data_loader = topology.world_size, topology.rank, sampling.loader
        self.sample_rate, self.expected_batch_size = sampling.sample_rate, sampling.expected_batch_size
        self.poisson_sampling, self.sampling = sampling.poisson, sampling
        self.noise, self.noise_name, self.clipper, self.clipping = noise, noise_name, clipper, clipping
        self.accountant, self.noise_multiplier, self.max_grad_norm = accountant, noise_multiplier, max_grad_norm
        self.mode, self.K, self.loss_reduction, self.batch_first = mode, K, loss_reduction, batch_first
        self.secure_mode, self.public_buffers, self.norm_mode = secure_mode, public_buffers, mode in NORM_MODES
        self.positional = (  # why every step must release the loader's next batch, if it must
            f"noise={noise_name!r} accounts for each example's participation at fixed positions"
            if callable(getattr(noise, "check_loader", None)) else
            "a TruncatedPoissonLoader's accounting is for its batches as drawn (skipping some, such as the cut "
            "ones, would change the sampling)" if sampling.truncation is not None else None)
        self.criterion = DPCriterion(criterion, loss_reduction, batch_first) if criterion is not None else None
        if self.criterion is not None:
            self.criterion.backward_fn = self.backward
        self.ledger, self.steps = Ledger(), 0
        self.calibrated_for: tuple[float, float, int] | None = None  # (target ε, δ, steps) σ was calibrated for
        self.unbounded_steps = 0  # steps with noise_multiplier=0: epsilon is infinite
        self.overflowed_examples = 0  # examples whose gradient the GradScaler's scale overflowed (counted as 0)
        self.gate = StepGate()
        self.passes = PassEnd(self)
        self.scaler = amp.link(grad_scaler, lambda: self.enabled)
        if grad_scaler is not None and grad_scaler.is_enabled() and not grad_scaler.get_scale() > 0:
            raise ValueError(f"grad_scaler's scale is {grad_scaler.get_scale()!r}: it must be > 0 (init_scale=).")
        self._state_before: list | None = None  # the model's state when the forward in flight started (invariant 3)
        self._wrapped: list[object] = []
        self._handles: list = []
        self._build()
        if not self.params:
            raise ValueError("the model has no trainable parameters (every requires_grad is False); unfreeze the "
                             "ones to train before make_private.")
        guards.check_noise_range(noise_multiplier, clipper, self.params, self.expected_batch_size, loss_reduction)
        guards.warn_overrides(self.plan, clipping, noise_name, accountant)
        topology.check_at_make({**checkpoint.config(self), "grad_sample_mode": mode,
                                "expected_batch_size": self.expected_batch_size, "loss_reduction": loss_reduction,
                                "data_loader": type(self.data_loader).__name__, "trainable tensors": len(self.params),
                                "trainable names": [n for n, p in module.named_parameters() if p.requires_grad]},
                               self.params)
        self.attached = False
        self.attach()

    # -- construction ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        """The plan, the capture hooks (not attached) and the step's accumulator, for the trainable set now."""
        self.plan = build_plan(self.module, self.mode)
        if self.topology.sharded:  # also when a changed trainable set is planned again
            self.topology.check_plan(self.plan)
        self.params = list(dict.fromkeys(p for row in self.plan for p in row.params.values()))
        self.planned = frozenset(id(p) for p in self.params)
        self.plan_digest = distributed.digest([f"{row.name}.{n}" for row in self.plan for n in row.params])
        self.accumulator = StepAccumulator(self.params, self.clipper, self.K)
        arrival = Arrival("norms" if self.mode == "ghost" else "records" if self.norm_mode else "per_example",
                          form=(bk.arrival_form(self.plan, self.K, self._streams())
                                if self.mode in ("auto", "bk") else None),
                          stream=self.passes.stream if self._streams() else None)
        self.capturer = Capturer(self.module, self.plan, K=self.K, batch_first=self.batch_first,
                                 rescale=self.loss_reduction == "mean", arrival=arrival,
                                 on_backward_end=self.passes.end)
        self.capturer.on_refusal, self.capturer.guard_overflow = self.on_refusal, self.scaler.guards_pass
        self.capturer.grad_scaler = self.scaler.scaler
        self.capturer.batch_of = getattr(self.data_loader, "batch_of", None)
        self._state_watch = guards.StateWatch(self.module, self.public_buffers, self.topology)

    def _streams(self) -> bool:
        """Whether bk and auto clip each layer as its output gradients arrive: when each parameter's factor depends
        on its own norm alone (per-layer ``layer_factors``); not with a GradScaler, whose overflow in a lower layer
        zeroes an example's contribution to the layers already summed, nor under FSDP2."""
        return (self.mode in ("bk", "auto") and getattr(self.clipper, "per_layer", False)
                and callable(getattr(self.clipper, "layer_factors", None))
                and isinstance(self.scaler, amp.NoScaler) and not self.topology.sharded)

    # -- control -----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        guards.check_objects(self.module, self.optimizer, None, ATTACHED)
        # Before FSDP2's own pre-forward hook, which swaps the root's sharded parameters for gathered ones.
        self._handles = [self.module.register_forward_pre_hook(self._on_forward_start, with_kwargs=True,
                                                               prepend=True),
                         self.module.register_forward_hook(self._on_forward_end, always_call=True),
                         self.optimizer.register_step_pre_hook(self._pre_step),
                         self.optimizer.register_step_post_hook(self._post_step)]
        guards.check_modules(self.module, forward=False)  # wraps backward hooks before a forward collects them
        self.capturer.attach()
        self.scaler.attach()
        for owner in (self.optimizer, self.module):
            _run_before_zero_grad(owner, self._discard)
            self._wrapped.append(owner)
        self.attached = True
        ATTACHED.add(self)

    def enable(self) -> None:
        """Resume private training after :meth:`disable`."""
        self.capturer.enabled = True

    def disable(self) -> None:
        """Pause: forward, backward and step run as without dpkit (NOT private, not counted)."""
        self.capturer.enabled = False
        self._clear()
        self.topology.sync_gradients(True)

    @property
    def enabled(self) -> bool:
        return self.capturer.enabled

    def detach(self) -> None:
        """Remove every hook; the model and optimizer are as before ``make_private``."""
        self.capturer.detach()
        self.scaler.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner in self._wrapped:
            owner.__dict__.pop("zero_grad", None)
        self._wrapped = []
        self._clear()
        self.topology.sync_gradients(True)
        self.attached = False
        ATTACHED.discard(self)
        guards.restore_module_hooks(self.module, last=not ATTACHED)

    @contextlib.contextmanager
    def micro_batches(self) -> Iterator[None]:
        """The backward passes inside are micro-batches of one logical batch (else a second backward pass before
        ``step()`` is refused: several sampled batches in one step are not what the accountant counts). Cutting
        the batch into pieces does not mix its rows: the loader's trace of it ends here."""
        drop_loop_traces()
        with self.gate.batch(object()):
            yield

    def __iter__(self) -> Iterator[Any]:
        """(module, optimizer, data_loader), and criterion when make_private was given one."""
        values = [self.module, self.optimizer, self.data_loader]
        values += [self.criterion] if self.criterion is not None else []
        return guards.unpacked(values, self.criterion is not None)

    def __repr__(self) -> str:
        return (f"PrivateTraining(mode={self.mode!r}, noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm}, sample_rate={self.sample_rate:.4g}, steps={self.steps}, "
                f"layers={len(self.plan)})")

    # -- each forward ------------------------------------------------------------------------------------------
    @functools.partial(eager, reason="dpkit's forward checks and re-planning run eagerly: under dpkit, compile "
                                     "without fullgraph=True (docs/compile.md)")
    def _on_forward_start(self, module: nn.Module, args, kwargs) -> None:
        if not self.enabled or not torch.is_grad_enabled() or self.capturer.computing:
            return
        self.topology.sync_gradients(False)  # dpkit all-reduces the clipped sums itself
        self._state_before = self._state_watch.snapshot()  # before any stand-in takes a parameter's slot
        guards.check_modules(self.module)
        change = guards.trainable_change(self.module, self.planned, self.params,
                                         self.topology.parameters(self.module))
        if change is not None:
            if self.accumulator.backward_passes or self.capturer.captures:
                raise PrivacyUsageError(
                    f"the trainable parameters changed in the middle of a step ({change}). Change requires_grad "
                    "between optimizer.step() and the next forward pass.")
            warnings.warn(f"dpkit planned the model again: the trainable parameters changed ({change}).",
                          stacklevel=3)
            self.capturer.detach()
            self._build()
            self._state_before = self._state_watch.snapshot()  # of the modules as planned now
            self.capturer.attach()
            self.capturer.start_forward(module, args, kwargs)  # this forward's root hooks were taken before

    @functools.partial(eager, reason="dpkit's forward checks run eagerly: under dpkit, compile without "
                                     "fullgraph=True (docs/compile.md)")
    def _on_forward_end(self, *_) -> None:
        """Invariant 3: the forward moved none of the model's state (the release is the only way it may move)."""
        before, self._state_before = self._state_before, None
        if before is not None:
            self._state_watch.refuse_moved(before)

    # -- each backward pass ------------------------------------------------------------------------------------
    def backward(self, loss: DPLoss) -> None:
        """``loss.backward()`` of a loss from ``private.criterion``: one pass, or ghost's two."""
        if self.mode != "ghost" or not self.enabled:
            loss.value.backward()
            return
        self.passes.ghost_backward(loss)

    def on_refusal(self, err: BaseException) -> None:
        """A backward pass was refused: nothing of this step may be released until ``zero_grad()``."""
        self.passes.end_stream()
        self.gate.refuse(str(err).split(". ")[0][:300])
        self.accumulator.reset()
        self.scaler.show(self.params)  # so that scaler.step reaches step(), which says why

    def _discard(self) -> None:
        """``zero_grad()``: forget this step's clipped sums, except between the micro-batches of one batch; records
        of forwards not yet back-propagated stay (``out = model(x); zero_grad(); backward()``)."""
        if self.enabled and self.capturer.pass_died:  # also between micro-batches: the whole step goes
            self.capturer.drop_dead_pass()
            self.passes.end_stream()
            self.gate.forget_virtual()
        if not self.enabled or not self.gate.discard():
            return
        self.accumulator.reset()
        self.drop_grad_samples()

    def drop_grad_samples(self) -> None:
        for p in self.params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample

    # -- the release -------------------------------------------------------------------------------------------
    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self.enabled:
            return
        self.capturer.end_loop_trace()
        guards.refuse_closure(args, kwargs)
        amp.refuse_fused(optimizer)
        amp.unregistered(amp.calling_scaler(), self.scaler.scaler)
        guards.check_release(self)
        if self.gate.virtual:
            for p in self.params:
                p.grad = None  # a virtual step: keep accumulating, update nothing
            self.gate.enter_virtual()
            return
        guards.refuse_nothing_to_release(self.accumulator.backward_passes)
        sampler = getattr(self.data_loader, "batch_sampler", None)
        self.gate.check_once(self.steps, getattr(sampler, "position", None), self.positional)
        self.topology.check_in_step(self.steps, getattr(self.data_loader, "batches_drawn", -1), self.plan_digest)
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

    def step_event(self) -> DpEvent:
        """The privacy event of one release of this run."""
        return self.sampling.event(step_event(self.noise.dp_event(self.noise_multiplier, self.sample_rate),
                                              self.clipper.dp_event(self.sample_rate)))

    def _record_step(self) -> None:
        if self.noise_multiplier == 0:
            self.unbounded_steps += 1
        else:
            self.ledger.record(self.step_event())
        self.clipper.end_step(self.noise, expected_batch_size=self.expected_batch_size)
        self.gate.released()
        report.warn_past_target(self)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self.enabled or self.gate.phase is Phase.VIRTUAL:
            return
        self.steps += 1
        self._clear()

    def _clear(self) -> None:
        self.capturer.end_loop_trace()
        self.accumulator.reset()
        self.capturer.reset()
        self.drop_grad_samples()

    # -- privacy -----------------------------------------------------------------------------------------------
    def epsilon(self, delta: float, accountant: str | None = None) -> float:
        """ε spent so far at ``delta``, by ``accountant`` (default: the one chosen at make_private)."""
        if self.unbounded_steps:
            return math.inf
        from dpkit.accounting import epsilon_of_ledger

        return epsilon_of_ledger(self.ledger, delta, accountant or self.accountant)

    def privacy_report(self, delta: float) -> str:
        """ε at ``delta`` from every installed accountant, side by side (approximations labelled)."""
        return report.privacy_report(self, delta)

    def audit_report(self, delta: float, confidence: float = 0.95):
        """The accountant's ε next to the lower bounds an audit attached to this run measured (docs/auditing.md)."""
        report = getattr(self.noise, "audit_report", None)
        if report is None:
            raise PrivacyUsageError("no audit is attached to this run: call dpkit.audit.CanaryAudit.attach(private) "
                                    "before training, then private.audit_report(delta) (see docs/auditing.md).")
        return report(delta, confidence)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to report the same ε and draw the same noise and batches: outside secure
        mode the noise generator's state too, which lets its holder subtract the noise (keep it private)."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a checkpoint of another configuration, a corrupted one, or one whose
        step count disagrees with its ledger, is refused before anything is changed."""
        checkpoint.load_state_dict(self, state)
