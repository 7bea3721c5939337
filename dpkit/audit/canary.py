"""Gradient canaries in a DP-SGD run: :class:`CanaryAudit`, which sits at ``private.noise``, and its report.

The audit imports no training code: it is typed against :class:`Trainable`, the few public attributes of the
controller it reads, and the controller finds the report through ``private.noise.audit_report``.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import attrs
import numpy as np
import torch
from torch import Tensor

from dpkit import distributed
from dpkit.audit.bounds import ScoreAudit, audit_scores
from dpkit.audit.correlated import Schedule, WhitenedTape, is_tree, schedule_of
from dpkit.audit.estimators import CanaryScores
from dpkit.audit.scoring import REFERENCES, Tape
from dpkit.audit.tree import TreeSchedule, TreeTape, tree_schedule
from dpkit.errors import PrivacyUsageError

__all__ = ["AuditReport", "CanaryAudit", "Trainable", "refuse_correlated"]

FAMILIES = ("claimed", "whitened")


class Trainable(Protocol):
    """What the audit reads of a private training run (``dpkit.PrivateTraining`` has all of it)."""

    noise: Any  # the noise mechanism: add(clipped_sum, *, std), dp_event, state_dict, load_state_dict
    accumulator: Any  # .flats: the step's (clipped-sum buffer, parameters) pairs
    params: list[torch.nn.Parameter]
    clipper: Any  # .sensitivity(): the clipping bound C
    sample_rate: float
    noise_multiplier: float
    accountant: str
    steps: int
    world_size: int

    def epsilon(self, delta: float) -> float: ...


@attrs.frozen
class AuditReport:
    """The accountant's epsilon next to the audit's lower bounds; ``str()`` is the printed report."""

    accountant: str
    accountant_epsilon: float
    bounds: ScoreAudit
    steps: int
    sample_rate: float
    noise_multiplier: float
    included: int  # canaries that were in the run

    @property
    def violated(self) -> bool:
        """An assumption-free bound (one-run or f-DP (ε, δ)) exceeds the accountant's epsilon: a proven bug."""
        return self.bounds.proven > self.accountant_epsilon

    @property
    def suspect(self) -> bool:
        """The Gaussian f-DP bound exceeds it: a bug, unless the run is less private than a Gaussian mechanism."""
        return self.bounds.fdp.epsilon > self.accountant_epsilon

    def __str__(self) -> str:
        one = self.bounds.one_run
        lines = [
            f"privacy audit after {self.steps} steps (sample rate {self.sample_rate:.4g}, noise multiplier "
            f"{self.noise_multiplier:g}, {one.canaries} gradient canaries, {self.included} included), delta "
            f"{one.delta:g}, confidence {one.confidence:.0%}:",
            f"  accountant {self.accountant:<6}      epsilon <= {self.accountant_epsilon:.4f}  (proven upper bound)",
        ]
        lines += bound_lines(self.bounds)
        if self.violated:
            verdict = ("VIOLATION: an assumption-free lower bound exceeds the accountant's epsilon; the run leaks more "
                       "than it claims (check the noise plugin, the sampling and the accountant)")
        elif self.suspect:
            verdict = ("SUSPECT: the Gaussian f-DP lower bound exceeds the accountant's epsilon: the run is less "
                       "private than a Gaussian mechanism with that epsilon, which full-batch DP-SGD cannot be and "
                       "subsampled DP-SGD should not be (more canaries would settle it)")
        else:
            verdict = ("consistent: no lower bound exceeds the accountant's epsilon (this does not prove the run "
                       "private; see docs/auditing.md)")
        lines.append("  " + verdict)
        return "\n".join(lines)


class CanaryAudit:
    """White-box audit of a DP-SGD run: Dirac gradient canaries in the clipped sum, scored from the release.

    Installed as ``private.noise`` around the run's noise mechanism (same interface), so the engine is untouched:
    at each step, before delegating ``add`` on a clipped-sum buffer, it adds ±C·e_j for each included canary j
    that the step samples (probability q, the run's sample rate; the sign a public coin per canary and step), as an
    example whose clipped gradient is ±C·e_j would be added; after, it reads the released noisy sum at those
    coordinates and, at up to 4096 reference coordinates without canaries, the noise itself (released minus the
    clipped sum). Each canary is thus an example the accountant counts. The scores (:mod:`dpkit.audit.scoring`)
    subtract the other examples' clipped sum: DP's adversary knows every other example, and the accountant's
    bound holds whatever their sampling. The signs make a canary's gradient change across steps, so noise that
    repeats or cancels across steps cannot hide it.
    """

    def __init__(self, private: Trainable, noise: Any, canaries: int, generator: torch.Generator,
                 schedule: Schedule | TreeSchedule | None = None):
        self.private, self.noise, self.canaries, self.schedule = private, noise, canaries, schedule
        self._generator = generator
        sizes = [p.numel() for p in private.params]
        total = sum(sizes)
        order = torch.randperm(total, generator=generator)
        picked, references = order[:canaries], order[canaries:canaries + REFERENCES]
        self.included = torch.rand(canaries, generator=generator) < 0.5
        starts = np.cumsum([0] + sizes)
        # per parameter (by id, the parameter kept so the id stays its own): its canaries, their indices in it
        self._where: dict[int, tuple[Any, Tensor, Tensor]] = {}
        self._references: dict[int, Tensor] = {}  # per parameter: the reference coordinates in it
        owner, ref_owner = (np.searchsorted(starts, t.numpy(), side="right") - 1 for t in (picked, references))
        for k, p in enumerate(private.params):
            mine = np.flatnonzero(owner == k)
            if mine.size:
                self._where[id(p)] = (p, torch.as_tensor(mine), picked[mine] - int(starts[k]))
            refs = references[torch.as_tensor(np.flatnonzero(ref_owner == k))]
            if refs.numel():
                self._references[id(p)] = refs - int(starts[k])
        self._tape: Tape | WhitenedTape | TreeTape = Tape(canaries) if schedule is None else schedule.tape(canaries)

    @classmethod
    def attach(cls, private: Trainable, canaries: int = 1000, *, seed: int | None = None) -> CanaryAudit:
        """Put ``canaries`` Dirac canaries on distinct random coordinates of ``private``'s trainable parameters.

        Attach before the first step to audit the whole run (the report compares with the accountant's epsilon
        of every step it counted). Refused under torch.distributed with world size > 1, on a run that already
        has an audit (two audits' canaries would share coordinates), and when there are fewer coordinates than
        canaries. On BandMF or BLT the canaries follow the run's cyclic loader and are scored after whitening
        (:mod:`dpkit.audit.correlated`); on the tree they join one step of each epoch of its shuffled loader
        and are scored after whitening by its covariance (:mod:`dpkit.audit.tree`). ``seed`` makes the canaries'
        coordinates, signs, inclusion and sampling reproducible.
        """
        _refuse_distributed(private)
        if isinstance(private.noise, CanaryAudit):
            raise PrivacyUsageError("this run already has a CanaryAudit attached; a second one's canaries would "
                                    "collide with the first's coordinates. Use the one attached, or detach() it.")
        if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
            raise ValueError(f"canaries must be an int >= 1, got {canaries!r}")
        total = sum(p.numel() for p in private.params)
        if canaries > total:
            raise ValueError(f"{canaries} canaries need as many distinct coordinates, and the trainable parameters "
                             f"have {total}: two canaries on one coordinate would collide. Use fewer canaries.")
        seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        generator = torch.Generator().manual_seed(seed)
        find = tree_schedule if is_tree(private.noise) else schedule_of
        schedule = find(private.noise, getattr(private, "data_loader", None), canaries,
                        torch.Generator().manual_seed(seed + 1))
        audit = cls(private, private.noise, canaries, generator, schedule)
        private.noise = audit
        return audit

    def detach(self) -> None:
        """Give the run its own noise mechanism back; the scores so far are kept."""
        if self.private.noise is self:
            self.private.noise = self.noise

    # -- the noise mechanism's interface, delegated ------------------------------------------------------------------
    @property
    def seed(self) -> Any:
        return self.noise.seed

    @seed.setter
    def seed(self, value: Any) -> None:
        self.noise.seed = value

    @property
    def secure_mode(self) -> bool:
        return self.noise.secure_mode

    def __getattr__(self, name: str) -> Any:  # e.g. generator(device), which adaptive clipping draws from
        if name.startswith("__") or name == "noise":
            raise AttributeError(name)
        return getattr(self.noise, name)

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> Any:
        return self.noise.dp_event(noise_multiplier, sample_rate)

    def state_dict(self) -> dict[str, Any]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.load_state_dict(state)

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        """Canaries into the clipped sum, the run's noise, then the released values read back."""
        _refuse_distributed(self.private)
        flats = self.private.accumulator.flats
        group = next((g for flat, g in flats if flat is clipped_sum), None)
        if group is None:
            raise PrivacyUsageError("CanaryAudit: the noise was asked to noise a tensor that is not one of the step's "
                                    "clipped-sum buffers; the audit cannot tell which canaries it holds.")
        trainable = {id(p) for _, g in flats for p in g}
        if not trainable.issuperset(self._where):
            raise PrivacyUsageError("CanaryAudit: a parameter holding canaries is no longer trainable, so its canaries "
                                    "are no longer released; attach a new audit after changing requires_grad.")
        rows, index, refs = self._positions(group)
        if not rows.numel() and not refs.numel():
            return self.noise.add(clipped_sum, std=std)
        flat = clipped_sum.view(-1)
        index, refs = index.to(flat.device), refs.to(flat.device)
        C, q = float(self.private.clipper.sensitivity()), float(self.private.sample_rate)
        signs = torch.randint(0, 2, (rows.numel(),), generator=self._generator).to(torch.float64) * 2 - 1
        if self.schedule is not None and self.schedule.rate >= 1:  # fixed groups: the worst case, one gradient
            signs = self.schedule.signs[rows]
        joins = (torch.rand(rows.numel(), generator=self._generator) < q if self.schedule is None
                 else self.schedule.joins(int(self.private.steps), rows, self._generator))
        sampled = self.included[rows] & joins
        others = flat[index].detach().to("cpu", torch.float64)  # the other examples' clipped sum there
        before = flat[refs].detach().to("cpu", torch.float64)
        flat[index] += (sampled.to(torch.float64) * signs * C).to(flat.device, flat.dtype)
        noisy = self.noise.add(clipped_sum, std=std)
        released = noisy.reshape(-1)
        shown = released[index].detach().to("cpu", torch.float64) - others
        reference_noise = released[refs].detach().to("cpu", torch.float64) - before
        self._tape.record(int(self.private.steps), rows, shown, signs, reference_noise, C, q, std)
        return noisy

    def _positions(self, group: list[Any]) -> tuple[Tensor, Tensor, Tensor]:
        """The canaries on the parameters of one buffer, their positions in it, and its reference positions."""
        rows, index, refs, offset = [], [], [], 0
        for p in group:
            if id(p) in self._where:
                mine, local = self._where[id(p)][1:]
                rows.append(mine)
                index.append(local + offset)
            if id(p) in self._references:
                refs.append(self._references[id(p)] + offset)
            offset += p.numel()
        empty = torch.zeros(0, dtype=torch.int64)
        return tuple(torch.cat(t) if t else empty for t in (rows, index, refs))  # type: ignore[return-value]

    # -- results -------------------------------------------------------------------------------------------------------
    def scores(self) -> Tensor:
        """(2, m): each canary's claimed and whitened score (higher: more likely included), from the release only."""
        return self._tape.scores()

    def canary_scores(self, family: int = 0) -> CanaryScores:
        """One score family split by the inclusion coins, for jax_privacy's estimators (:mod:`dpkit.audit.estimators`,
        which treat the canaries as independent trials; the audit's own bounds do not need that)."""
        row = self.scores()[family].double()
        finite = row.clamp(-1e300, 1e300)  # a canary seen without noise (±inf) ranks first or last
        return CanaryScores(finite[self.included].numpy(), finite[~self.included].numpy())

    def bounds(self, delta: float, confidence: float = 0.95) -> ScoreAudit:
        """The lower bounds on ε at ``delta`` from both score families so far.

        Full batch, the scores are Gaussian log-likelihood ratios whose sign is the best guess whatever the noise's
        true scale, so the guesses split at 0; subsampled, the claimed ratio weighs a step's evidence by the claimed
        noise, and the median of the scores is the sturdier split (too little noise makes 0 far too cautious).
        """
        if self.schedule is None:
            threshold, families = (0.0 if float(self.private.sample_rate) >= 1 else None), FAMILIES
        else:
            threshold, families = self._tape.threshold(), self._tape.families
        return audit_scores(self.scores(), self.included, delta=delta, confidence=confidence, threshold=threshold,
                            families=families)

    def report(self, delta: float, confidence: float = 0.95) -> AuditReport:
        """The run's accountant epsilon next to the measured lower bounds (``print`` it)."""
        if not int(self._tape.steps.max()):
            raise PrivacyUsageError("CanaryAudit.report: no step has been taken since attach, nothing was released.")
        return AuditReport(accountant=self.private.accountant, accountant_epsilon=self.private.epsilon(delta),
                           bounds=self.bounds(delta, confidence), steps=self.private.steps,
                           sample_rate=self.private.sample_rate, noise_multiplier=self.private.noise_multiplier,
                           included=int(self.included.sum()))

    def audit_report(self, delta: float, confidence: float = 0.95) -> AuditReport:
        """:meth:`report`, under the name ``PrivateTraining.audit_report`` looks up on its noise mechanism."""
        return self.report(delta, confidence)


def refuse_correlated(mechanism: Any, what: str = "CanaryAudit") -> None:
    """Refuse a noise mechanism with its own sampling rule (``check_loader``), correlated noise, for ``what``.

    Its accounting covers examples that join the steps its loader picks, and its noise is correlated across
    steps: an audit whose canaries join every step, or whose scores assume independent noise, would compare
    unlike things. ``CanaryAudit`` handles BandMF, BLT and the tree itself (:mod:`dpkit.audit.correlated`,
    :mod:`dpkit.audit.tree`).
    """
    if getattr(mechanism, "check_loader", None) is not None:
        raise PrivacyUsageError(
            f"{what} cannot audit the noise mechanism {type(mechanism).__name__}: it has its own sampling rule "
            "(check_loader), as correlated noise (tree, bandmf, blt) has, which this audit's canaries do not "
            "follow, so the accountant's epsilon would not cover them. dpkit audit --mode noise audits BandMF, "
            "BLT and the tree (docs/auditing.md).")


def _refuse_distributed(private: Trainable) -> None:
    if distributed.world_size() > 1 or private.world_size > 1:
        raise PrivacyUsageError("CanaryAudit does not support torch.distributed with world size > 1 yet: each rank "
                                "noises its own slice of the sum, and the canaries' values would be read before the "
                                "ranks' sums are added. Audit a single-process run.")


def bound_lines(bounds) -> list[str]:
    """A report's lines for its three lower bounds (one-run, f-DP (ε, δ), f-DP Gaussian)."""
    return [f"  audit {label}epsilon >= {bound.epsilon:.4f}  ({bound.correct} of {bound.guesses} guesses right, "
            f"{bound.family} scores)"
            for bound, label in ((bounds.one_run, "one-run      "), (bounds.approx_dp, "f-DP (e, d)  "),
                                 (bounds.fdp, "f-DP Gauss   "))]
