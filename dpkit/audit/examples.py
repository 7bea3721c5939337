"""Example canaries: canaries that are examples of the run, so that clipping, sampling and normalisation show.

:class:`dpkit.audit.CanaryAudit` adds its canaries to the clipped sum, so a bug before that point (a layer the
clipper skips, batches that are not Poisson samples, a release divided by its realised batch size) is out of its
sight. Here each canary is an example in the training set: the run's loader samples it, its per-example gradient
is computed and clipped by the run's own mode and clipper, and the run's loop and optimizer release it. The model
(:class:`CanaryNet`) gives each example coordinates of its own, so its clipped contribution is known and can be
read back from the release, as a Dirac canary's is. Two things are measured:

- the canaries' scores (:mod:`dpkit.audit.scoring`, the same two families), hence lower bounds on ε;
- the accountant's premises (:mod:`dpkit.audit.premises`): the examples each release saw (watched at the model's
  forward) against Poisson sampling at the claimed rate, and the release's noise on rows no example touches
  against the claimed std.
"""
from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from dpkit.audit.bounds import ScoreAudit, audit_scores
from dpkit.audit.canary import FAMILIES, bound_lines
from dpkit.audit.premises import PremiseCheck, noise_scale_check, participation_checks
from dpkit.audit.scoring import REFERENCES, Tape
from dpkit.errors import PrivacyUsageError

__all__ = ["CanaryNet", "ClipAuditReport", "ExampleCanaries"]

TARGET = 1e4  # every example's target: far above any output, so an example's L1-loss gradient is -w on its rows


class CanaryNet(nn.Module):
    """Two embedding tables summed, times a fixed vector ``w`` of norm ``scale``: ``(first[i] + second[i]) · w``.

    Example i's gradient under an L1 loss towards :data:`TARGET` is ``-w`` on row i of each table and 0
    elsewhere: coordinates of its own, in two layers (so a clipper that skips one shows), with a norm √2·scale far
    above the clipping bound, so that a correct clipper scales it to exactly C along a direction the attacker
    knows. Rows no example uses hold only noise: they measure the release's noise.
    """

    def __init__(self, rows: int, width: int = 4, scale: float = 100.0):
        super().__init__()
        self.first, self.second = nn.Embedding(rows, width), nn.Embedding(rows, width)
        self.register_buffer("w", torch.full((width,), scale / math.sqrt(width)))

    def forward(self, ids: Tensor) -> Tensor:
        return (self.first(ids) + self.second(ids)) @ self.w


@attrs.frozen
class ClipAuditReport:
    """The accountant's ε next to the example canaries' lower bounds and the checks of its premises."""

    accountant: str
    accountant_epsilon: float
    bounds: ScoreAudit  # at confidence 1 - (1 - confidence)/2
    premises: tuple[PremiseCheck, ...]
    level: float  # each premise check is refuted at p <= level
    confidence: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    canaries: int
    included: int

    @property
    def violated(self) -> bool:
        """An assumption-free bound exceeds the accountant's ε: a proven violation."""
        return self.bounds.proven > self.accountant_epsilon

    @property
    def refuted(self) -> tuple[PremiseCheck, ...]:
        """The premises of the accountant that the run refuted."""
        return tuple(c for c in self.premises if c.p_value <= self.level)

    @property
    def failed(self) -> bool:
        """A proven violation or a refuted premise: either way the run is not what its ε was computed for."""
        return self.violated or bool(self.refuted)

    def __str__(self) -> str:
        one = self.bounds.one_run
        lines = [
            f"clip audit after {self.steps} releases (sample rate {self.sample_rate:.4g}, noise multiplier "
            f"{self.noise_multiplier:g}, {self.canaries} example canaries, {self.included} in the training set), "
            f"delta {one.delta:g}, confidence {self.confidence:.0%}:",
            f"  accountant {self.accountant:<6}      epsilon <= {self.accountant_epsilon:.4f}  (proven upper bound)",
        ]
        lines += bound_lines(self.bounds)
        for check in self.premises:
            mark = "REFUTED" if check.p_value <= self.level else "ok     "
            lines.append(f"  premise {mark} {check.name}: p = {check.p_value:.3g}; {check.seen}")
        if self.violated:
            lines.append("  VIOLATION: an assumption-free lower bound exceeds the accountant's epsilon; the run leaks "
                         "more than it claims (check the clipper, the loop's normalisation and the noise)")
        if self.refuted:
            lines.append("  MISMATCH: the run is not the mechanism its epsilon was computed for ("
                         + "; ".join(c.name for c in self.refuted) + "): check the sampling, gradient accumulation "
                         "and any division of the release by the realised batch size")
        if not self.failed:
            lines.append("  consistent: no lower bound exceeds the accountant's epsilon and no premise is refuted "
                         "(this does not prove the run private; see docs/auditing.md)")
        return "\n".join(lines)


class ExampleCanaries:
    """``canaries`` example canaries, each in the training set by a fair coin, and ``references`` unused rows.

    :meth:`watch` a run made with :attr:`model` and :attr:`dataset` (an L1 loss, SGD without momentum or weight
    decay, so that each parameter's ``.grad`` after ``step()`` is the release), train, then :meth:`report`.
    """

    def __init__(self, canaries: int, references: int = 1024, *, seed: int = 0, width: int = 4):
        if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
            raise ValueError(f"canaries must be an int >= 1, got {canaries!r}")
        gen = torch.Generator().manual_seed(seed)
        self.canaries, self.references = canaries, references
        self.included = torch.rand(canaries, generator=gen) < 0.5
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = CanaryNet(canaries + references, width)
        ids = self.included.nonzero().flatten()
        self.dataset = torch.utils.data.TensorDataset(ids, torch.full((ids.numel(),), TARGET))
        self._position = torch.full((canaries + references,), -1, dtype=torch.int64)  # row -> dataset index
        self._position[ids] = torch.arange(ids.numel())
        w = self.model.w
        self._direction = -w / (math.sqrt(2) * float(w.norm()))  # a clipped canary's unit direction, on each row
        self._tape = Tape(canaries)
        self._seen: list[Tensor] = []
        self.per_release: list[int] = []
        self.per_example = torch.zeros(ids.numel(), dtype=torch.int64)
        self.duplicates = 0
        self._squares: list[float] = []
        self._private: Any = None
        self._handles: list[Any] = []

    def watch(self, private: Any) -> None:
        """Watch ``private``'s forwards (the examples each release saw) and releases (the values it shows)."""
        if private.module is not self.model:
            raise PrivacyUsageError("ExampleCanaries.watch: the run does not train this audit's CanaryNet.")
        self._private, self._done = private, private.steps
        self._handles = [self.model.register_forward_pre_hook(self._forward),
                         private.optimizer.register_step_post_hook(self._released)]

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self._seen.append(args[0].detach().reshape(-1).cpu())

    def _released(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        private = self._private
        if private.steps == self._done:  # a virtual step: nothing released
            return
        self._done = private.steps
        seen = torch.cat(self._seen) if self._seen else torch.zeros(0, dtype=torch.int64)
        self._seen = []
        self.per_release.append(seen.numel())
        rows, times = seen.unique(return_counts=True)
        self.duplicates += int((times > 1).sum())
        index = self._position[rows]
        self.per_example[index[index >= 0]] += 1
        scale = float(private.expected_batch_size) if private.loss_reduction == "mean" else 1.0
        first, second = (self._grad(p) * scale for p in (self.model.first.weight, self.model.second.weight))
        m = self.canaries
        shown = ((first[:m] + second[:m]) @ self._direction.double()).double()
        noise = torch.cat([first[m:].reshape(-1), second[m:].reshape(-1)]).double()
        self._squares.append(float(noise.square().sum()))
        C = float(private.clipper.sensitivity())
        q, std = float(private.sample_rate), float(private.noise_multiplier) * C
        self._tape.record(len(self.per_release) - 1, torch.arange(m), shown, torch.ones(m, dtype=torch.float64),
                          noise[:REFERENCES], C, q, std)

    def _grad(self, p: nn.Parameter) -> Tensor:
        return p.grad.detach().double().cpu() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)

    def report(self, delta: float, confidence: float = 0.95) -> ClipAuditReport:
        """Lower bounds at confidence 1 - α/2 and the premise checks sharing α/2, α = 1 - ``confidence``."""
        private = self._private
        if private is None or not self.per_release:
            raise PrivacyUsageError("ExampleCanaries.report: nothing was released while watched.")
        alpha = 1 - confidence
        bounds = audit_scores(self._tape.scores(), self.included, delta=delta, confidence=1 - alpha / 2,
                              families=FAMILIES)
        C = float(private.clipper.sensitivity())
        premises = participation_checks(self.per_release, self.per_example.tolist(), self.duplicates,
                                        len(self.dataset), float(private.sample_rate))
        premises.append(noise_scale_check(self._squares, 2 * self.references * self.model.w.numel(),
                                          float(private.noise_multiplier) * C))
        return ClipAuditReport(accountant=private.accountant, accountant_epsilon=private.epsilon(delta),
                               bounds=bounds, premises=tuple(premises), level=alpha / 2 / len(premises),
                               confidence=confidence, steps=len(self.per_release),
                               sample_rate=float(private.sample_rate), noise_multiplier=float(private.noise_multiplier),
                               canaries=self.canaries, included=int(self.included.sum()))
