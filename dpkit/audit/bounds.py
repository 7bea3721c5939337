"""Privacy auditing: an empirical lower bound on epsilon from what one training run released.

An accountant's epsilon is an upper bound, proven for the mechanism as specified. An audit measures a *lower*
bound from what the implementation actually released: m canaries, each included in the run with probability
1/2, a score per canary computed from the release, guesses of which canaries were included (only the k highest
and k lowest scores; the rest abstain), and a hypothesis test that turns the number of right guesses into
"this run is not (epsilon, delta)-DP for any epsilon below the bound", at a confidence level. A bound above the
accountant's epsilon proves a bug (in the noise, the sampling or the accounting); a bound below it proves
nothing about privacy (docs/auditing.md).

Two tests, both on counts of right guesses:

- **one-run** (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run", main theorem,
  p-value as in their App. D): if the run is (ε, δ)-DP, P[≥ v right of r guesses] is at most
  P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·α, with α = max_i P[v-i ≤ Binomial < v] / i. It assumes nothing
  beyond (ε, δ)-DP.
- **f-DP** (Mahloujifar, Melis, Chaudhuri 2024, "Auditing f-Differential Privacy in One Run", their
  recursion with abstentions): tests the trade-off curve of μ-Gaussian DP, which is tighter; the largest μ
  refuted is reported as the epsilon of μ-GDP at delta. It refutes "the run is as private as a Gaussian
  mechanism with this (ε, δ)", which DP-SGD's composed curve only approximately is.

:class:`CanaryAudit` runs the white-box test on DP-SGD: Dirac canaries (one coordinate set to the clipping
bound C) join the clipped sum like examples, each Poisson-sampled at the run's rate, so the accountant's epsilon
covers each of them, and each is scored from the released noisy sums.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from scipy import optimize, special, stats
from torch import Tensor

from dpkit import distributed
from dpkit.errors import PrivacyUsageError

if TYPE_CHECKING:
    from dpkit.engine import PrivateTraining
    from dpkit.events import DpEvent

__all__ = [
    "AuditReport", "CanaryAudit", "LowerBound", "ScoreAudit", "audit_in_out", "audit_scores", "bundled_audit",
    "fdp_epsilon", "fdp_mu", "fdp_refutes", "gdp_epsilon", "guess_counts", "one_run_epsilon", "one_run_p_value",
    "run_bundled_audit",
]

_MU_GRID = np.geomspace(1e-3, 100.0, 97)  # the μ the f-DP search tries first, then refines between two of them


# --- the tests on counts -------------------------------------------------------------------------------------------

def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    integers = all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in (canaries, guesses, correct))
    if not (integers and 0 <= correct <= guesses <= canaries and canaries >= 1):
        raise ValueError(f"need integers 0 <= correct <= guesses <= canaries, canaries >= 1; got "
                         f"canaries={canaries!r}, guesses={guesses!r}, correct={correct!r}")


def _check_level(confidence: float, delta: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The largest probability that an (ε, δ)-DP run lets ``correct`` or more of ``guesses`` guesses be right.

    Steinke et al. (2023), main theorem with δ: each of ``canaries`` canaries included independently with probability
    1/2; a guess is right when it names the canary's inclusion. A value below 1 - confidence refutes (ε, δ).
    """
    _check_counts(canaries, guesses, correct)
    if correct == 0:
        return 1.0
    tail = stats.binom.sf(np.arange(-1, correct), guesses, special.expit(epsilon))  # tail[j] = P[B >= j]
    beta = float(tail[correct])
    if delta == 0:
        return min(beta, 1.0)
    i = np.arange(1, correct + 1)
    alpha = float(np.max((tail[correct - i] - beta) / i))
    return min(beta + 2 * canaries * delta * alpha, 1.0)


@functools.lru_cache(maxsize=4096)
def one_run_epsilon(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The one-run lower bound: an ε that :func:`one_run_p_value` refutes at ``confidence``, as large as found.

    Bisection keeps a refuted ε at its lower end, so the answer is always one the test refutes (a refuted ε is a
    valid bound: (ε, δ)-DP implies (ε', δ)-DP for every ε' > ε). 0 when even ε = 0 is not refuted.
    """
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, delta)
    significance = 1 - confidence

    def refuted(eps: float) -> bool:
        return one_run_p_value(canaries, guesses, correct, eps, delta) <= significance

    if not refuted(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while refuted(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6 * max(1.0, lo):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


def _fdp_refuted(canaries: int, guesses: int, correct: int, mus: np.ndarray, significance: float) -> np.ndarray:
    """For each μ, whether ``correct`` right of ``guesses`` refutes μ-GDP (Mahloujifar et al., with abstentions).

    The recursion bounds, from the trade-off curve, how much probability the outcomes with i = correct-1, ..., 0
    right guesses must carry if those with ``correct`` or more carried ``significance``; when the total exceeds
    what is possible (guesses / canaries), the outcome is less likely than ``significance``. The inverse of the
    μ-GDP blow-up is y -> Φ(Φ⁻¹(y) - μ), decreasing in μ, so the refuted μ form an interval [0, μ*).
    """
    right = np.full(mus.shape, significance * correct / canaries)
    wrong = np.full(mus.shape, significance * (guesses - correct) / canaries)
    for i in range(correct - 1, -1, -1):
        grown = np.maximum(wrong, special.ndtr(special.ndtri(right) - mus))
        if np.array_equal(grown, wrong):
            break  # a fixed point: nothing changes in the remaining steps
        right = np.minimum(right + i / (guesses - i) * (grown - wrong), 1.0)
        wrong = grown
    return right + wrong > guesses / canaries


def fdp_refutes(canaries: int, guesses: int, correct: int, mu: float, confidence: float = 0.95) -> bool:
    """Whether ``correct`` right of ``guesses`` refutes μ-Gaussian DP at ``confidence``."""
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, 0.0)
    return bool(_fdp_refuted(canaries, guesses, correct, np.array([float(mu)]), 1 - confidence)[0])


@functools.lru_cache(maxsize=4096)
def fdp_mu(canaries: int, guesses: int, correct: int, confidence: float = 0.95) -> float:
    """The largest μ found whose μ-GDP the outcome refutes (to 0.1% relative), 0 when none; at most 100."""
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, 0.0)
    significance = 1 - confidence
    if correct == 0:
        return 0.0
    refuted = _fdp_refuted(canaries, guesses, correct, _MU_GRID, significance)
    if not refuted[0]:
        return 0.0
    last = int(np.flatnonzero(refuted)[-1])
    if last == len(_MU_GRID) - 1:
        return float(_MU_GRID[-1])
    fine = np.linspace(_MU_GRID[last], _MU_GRID[last + 1], 129)
    refuted = _fdp_refuted(canaries, guesses, correct, fine, significance)
    return float(fine[np.flatnonzero(refuted)[-1]])


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε at δ of μ-GDP: δ = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) solved for ε (Dong, Roth, Su 2019, Cor. 2.13)."""
    if not (mu >= 0 and math.isfinite(mu)):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if mu == 0:
        return 0.0

    def log_delta(eps: float) -> float:  # in logs: both terms underflow long before their difference matters
        a = special.log_ndtr(-eps / mu + mu / 2)
        b = eps + special.log_ndtr(-eps / mu - mu / 2)
        return -math.inf if b >= a else float(a + math.log1p(-math.exp(b - a)))

    target = math.log(delta)
    if log_delta(0.0) <= target:
        return 0.0
    hi = max(1.0, mu * mu)
    while log_delta(hi) > target:
        hi *= 2
    return float(optimize.brentq(lambda e: log_delta(e) - target, 0.0, hi, xtol=1e-10, rtol=1e-10))


def fdp_epsilon(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The f-DP lower bound: ε at ``delta`` of the largest μ-GDP the outcome refutes (:func:`fdp_mu`)."""
    _check_level(confidence, delta)
    mu = fdp_mu(canaries, guesses, correct, confidence)
    return gdp_epsilon(mu, delta) if delta > 0 else (math.inf if mu > 0 else 0.0)


# --- from scores to bounds -----------------------------------------------------------------------------------------

@attrs.frozen
class LowerBound:
    """One test's empirical lower bound: the run is not (epsilon, delta)-DP, with probability ``confidence``."""

    method: str  # "one-run" (Steinke et al. 2023) or "f-DP" (Mahloujifar et al. 2024, Gaussian curve)
    epsilon: float
    delta: float
    confidence: float
    canaries: int  # m, each included with probability 1/2
    guesses: int  # r: the highest ceil(r/2) scores guessed in, the lowest floor(r/2) out, the rest abstain
    correct: int  # of the r guesses


@attrs.frozen
class ScoreAudit:
    """Both tests on the same scores; each took the best of the same guess counts, Bonferroni-corrected."""

    one_run: LowerBound
    fdp: LowerBound

    @property
    def epsilon(self) -> float:
        """The larger of the two bounds."""
        return max(self.one_run.epsilon, self.fdp.epsilon)


def guess_counts(canaries: int) -> tuple[int, ...]:
    """The guess counts tried, fixed before any score is seen: m, m/2, m/4, ... (10 at most, each >= 1)."""
    return tuple(sorted({max(1, round(canaries / 2**j)) for j in range(10)}, reverse=True))


def _right_guesses(scores: np.ndarray, included: np.ndarray, counts: Sequence[int]) -> list[int]:
    """For each r: right guesses when the top ceil(r/2) scores are guessed in and the bottom floor(r/2) out.

    Ties are broken by canary index, which does not depend on the inclusion bits.
    """
    order = np.argsort(scores, kind="stable")
    ranked = included[order]
    right = []
    for r in counts:
        top, bottom = (r + 1) // 2, r // 2
        right.append(int(ranked[len(ranked) - top:].sum()) + int((~ranked[:bottom]).sum()))
    return right


def audit_scores(scores: Sequence[float] | np.ndarray | Tensor, included: Sequence[bool] | np.ndarray | Tensor, *,
                 delta: float, confidence: float = 0.95) -> ScoreAudit:
    """Lower bounds on ε at ``delta`` from canary scores (higher: more likely included) and inclusion bits.

    Valid when each canary was included independently with probability 1/2 and the scores were computed from
    what the run released, without the inclusion bits. Every guess count of :func:`guess_counts` is tried, each
    test at significance (1 - confidence) / len(counts), so the best of them holds at ``confidence``.
    """
    scores = np.asarray(torch.as_tensor(scores).detach().cpu().double() if isinstance(scores, Tensor) else scores,
                        dtype=np.float64)
    included = np.asarray(included.detach().cpu() if isinstance(included, Tensor) else included)
    if scores.ndim != 1 or included.shape != scores.shape or scores.size == 0:
        raise ValueError(f"scores and included must be 1-D of the same non-zero length, got {scores.shape} and "
                         f"{included.shape}")
    if included.dtype != np.bool_:
        raise ValueError(f"included must hold booleans (the canaries' inclusion bits), got {included.dtype}")
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN; a NaN cannot be ranked")
    _check_level(confidence, delta)
    if delta == 0:
        raise ValueError("delta must be > 0: the f-DP bound converts μ-GDP to epsilon at delta, infinite at 0")
    m = scores.size
    counts = guess_counts(m)
    right = _right_guesses(scores, included, counts)
    level = 1 - (1 - confidence) / len(counts)
    bounds = {}
    for method, bound in (("one-run", one_run_epsilon), ("f-DP", fdp_epsilon)):
        found = [(bound(m, r, v, delta, level), r, v) for r, v in zip(counts, right)]
        eps, r, v = max(found, key=lambda t: (t[0], -t[1]))
        bounds[method] = LowerBound(method=method, epsilon=eps, delta=delta, confidence=confidence, canaries=m,
                                    guesses=r, correct=v)
    return ScoreAudit(one_run=bounds["one-run"], fdp=bounds["f-DP"])


def audit_in_out(in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray, *,
                 delta: float, confidence: float = 0.95) -> ScoreAudit:
    """:func:`audit_scores` from the scores of the included and of the left-out canaries.

    The canaries must still have been split by independent fair coins: the test counts on that randomness.
    """
    in_scores, out_scores = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    scores = np.concatenate([in_scores, out_scores])
    included = np.concatenate([np.ones(in_scores.size, bool), np.zeros(out_scores.size, bool)])
    return audit_scores(scores, included, delta=delta, confidence=confidence)


# --- gradient canaries in DP-SGD -----------------------------------------------------------------------------------

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
        """The assumption-free one-run bound exceeds the accountant's epsilon: a proven bug."""
        return self.bounds.one_run.epsilon > self.accountant_epsilon

    @property
    def suspect(self) -> bool:
        """The f-DP bound exceeds it: a bug, unless the run is less private than a Gaussian mechanism of that ε."""
        return self.bounds.fdp.epsilon > self.accountant_epsilon

    def __str__(self) -> str:
        one, fdp = self.bounds.one_run, self.bounds.fdp
        lines = [
            f"privacy audit after {self.steps} steps (sample rate {self.sample_rate:.4g}, noise multiplier "
            f"{self.noise_multiplier:g}, {one.canaries} gradient canaries, {self.included} included), delta "
            f"{one.delta:g}, confidence {one.confidence:.0%}:",
            f"  accountant {self.accountant:<6} epsilon <= {self.accountant_epsilon:.4f}  (proven upper bound)",
        ]
        for bound, label in ((one, "one-run"), (fdp, "f-DP   ")):
            lines.append(f"  audit {label}     epsilon >= {bound.epsilon:.4f}  ({bound.correct} of {bound.guesses} "
                         "guesses right)")
        if self.violated:
            verdict = ("VIOLATION: the one-run lower bound exceeds the accountant's epsilon; the run leaks more than "
                       "it claims (check the noise plugin, the sampling and the accountant)")
        elif self.suspect:
            verdict = ("SUSPECT: the f-DP lower bound exceeds the accountant's epsilon: the run is less private than "
                       "a Gaussian mechanism with that epsilon, which full-batch DP-SGD cannot be and subsampled "
                       "DP-SGD should not be (the one-run bound assumes nothing; more canaries would settle it)")
        else:
            verdict = ("consistent: no lower bound exceeds the accountant's epsilon (this does not prove the run "
                       "private; see docs/auditing.md)")
        lines.append("  " + verdict)
        return "\n".join(lines)


class CanaryAudit:
    """White-box audit of a DP-SGD run: Dirac gradient canaries in the clipped sum, scored from the release.

    Installed as ``private.noise`` around the run's noise mechanism (same interface), so the engine is untouched:
    at each step, before delegating ``add`` on a clipped-sum buffer, it adds C·e_j for each included canary j that
    the step samples (probability q, the run's sample rate), exactly as an example whose clipped gradient is C·e_j
    would be added; after, it reads the released noisy sum at those coordinates. Each canary is thus an example
    the accountant counts. A canary's score is the log-likelihood ratio, under the claimed mechanism (Gaussian
    noise of the step's std, inclusion with probability q), of the released value minus the other examples'
    clipped sum, summed over steps; a coordinate whose values lie on {0, C} at every step got no noise and is
    scored by what it shows (included when it ever showed C). Subtracting the other examples' sum is fair: DP's
    adversary knows every other example, and the accountant's bound holds whatever their sampling.
    """

    def __init__(self, private: PrivateTraining, noise: Any, canaries: int, generator: torch.Generator):
        self.private, self.noise, self.canaries = private, noise, canaries
        self._generator = generator
        total = sum(p.numel() for p in private.params)
        picked = torch.randperm(total, generator=generator)[:canaries]
        self.included = torch.rand(canaries, generator=generator) < 0.5
        starts = np.cumsum([0] + [p.numel() for p in private.params])
        owner = np.searchsorted(starts, picked.numpy(), side="right") - 1
        # per parameter (by id, the parameter kept so the id stays its own): its canaries, their indices in it
        self._where: dict[int, tuple[Any, Tensor, Tensor]] = {}
        for k, p in enumerate(private.params):
            mine = np.flatnonzero(owner == k)
            if mine.size:
                self._where[id(p)] = (p, torch.as_tensor(mine), picked[mine] - int(starts[k]))
        self._llr = torch.zeros(canaries, dtype=torch.float64)
        self._exact = torch.ones(canaries, dtype=torch.bool)  # every value so far on the lattice {0, C}
        self._showed = torch.zeros(canaries, dtype=torch.bool)  # some value equalled C exactly
        self._steps = torch.zeros(canaries, dtype=torch.int64)

    @classmethod
    def attach(cls, private: PrivateTraining, canaries: int = 1000, *, seed: int | None = None) -> CanaryAudit:
        """Put ``canaries`` Dirac canaries on distinct random coordinates of ``private``'s trainable parameters.

        Attach before the first step to audit the whole run (the report compares with the accountant's epsilon
        of every step it counted). Refused under torch.distributed with world size > 1, on a run that already
        has an audit (two audits' canaries would share coordinates), and when there are fewer coordinates than
        canaries. ``seed`` makes the canaries' coordinates, inclusion and sampling reproducible.
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
        audit = cls(private, private.noise, canaries, torch.Generator().manual_seed(seed))
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

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent:
        return self.noise.dp_event(noise_multiplier, sample_rate)

    def state_dict(self) -> dict[str, Any]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.load_state_dict(state)

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        """Canaries into the clipped sum, the run's noise, then the released values at the canaries read back."""
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
        rows, index = self._canaries_in(group)
        if not rows.numel():
            return self.noise.add(clipped_sum, std=std)
        flat = clipped_sum.view(-1)
        index = index.to(flat.device)
        C, q = float(self.private.clipper.sensitivity()), float(self.private.sample_rate)
        sampled = self.included[rows] & (torch.rand(rows.numel(), generator=self._generator) < q)
        others = flat[index].detach().to("cpu", torch.float64)  # the other examples' clipped sum there
        flat[index] += (sampled.to(torch.float64) * C).to(flat.device, flat.dtype)
        noisy = self.noise.add(clipped_sum, std=std)
        shown = noisy.reshape(-1)[index].detach().to("cpu", torch.float64) - others
        self._score(rows, shown, others, C, q, std)
        return noisy

    def _canaries_in(self, group: list[Any]) -> tuple[Tensor, Tensor]:
        """The canaries on the parameters of one buffer, and their positions in it."""
        rows, index, offset = [], [], 0
        for p in group:
            if id(p) in self._where:
                mine, local = self._where[id(p)][1:]
                rows.append(mine)
                index.append(local + offset)
            offset += p.numel()
        empty = torch.zeros(0, dtype=torch.int64)
        return (torch.cat(rows), torch.cat(index)) if rows else (empty, empty)

    def _score(self, rows: Tensor, shown: Tensor, others: Tensor, C: float, q: float, std: float) -> None:
        tol = 1e-5 * (others.abs() + C)  # rounding of the float32 sums, far below any noise worth the name
        on_c = (shown - C).abs() <= tol
        self._exact[rows] &= on_c | (shown.abs() <= tol)
        self._showed[rows] |= on_c
        self._steps[rows] += 1
        if std > 0:
            a = (C * shown - C * C / 2) / (std * std)
            llr = a if q >= 1 else torch.logaddexp(torch.full_like(a, math.log1p(-q)), math.log(q) + a)
        else:
            llr = shown  # no noise claimed: epsilon is infinite anyway
        self._llr[rows] += llr

    # -- results -------------------------------------------------------------------------------------------------------
    def scores(self) -> Tensor:
        """Each canary's score (higher: more likely included), from the released values only."""
        exact = self._exact & (self._steps > 0)
        decided = torch.where(self._showed, math.inf, -math.inf)
        return torch.where(exact, decided, self._llr)

    def bounds(self, delta: float, confidence: float = 0.95) -> ScoreAudit:
        """The one-run and f-DP lower bounds on ε at ``delta`` from the scores so far."""
        return audit_scores(self.scores(), self.included, delta=delta, confidence=confidence)

    def report(self, delta: float, confidence: float = 0.95) -> AuditReport:
        """The run's accountant epsilon next to the measured lower bounds (``print`` it)."""
        if not int(self._steps.max()):
            raise PrivacyUsageError("CanaryAudit.report: no step has been taken since attach, nothing was released.")
        return AuditReport(accountant=self.private.accountant, accountant_epsilon=self.private.epsilon(delta),
                           bounds=self.bounds(delta, confidence), steps=self.private.steps,
                           sample_rate=self.private.sample_rate, noise_multiplier=self.private.noise_multiplier,
                           included=int(self.included.sum()))


def _refuse_distributed(private: PrivateTraining) -> None:
    if distributed.world_size() > 1 or private.world_size > 1:
        raise PrivacyUsageError("CanaryAudit does not support torch.distributed with world size > 1 yet: each rank "
                                "noises its own slice of the sum, and the canaries' values would be read before the "
                                "ranks' sums are added. Audit a single-process run.")


# --- a bundled run ------------------------------------------------------------------------------------------------

def bundled_audit(*, steps: int = 100, canaries: int = 1000, noise_multiplier: float = 10.0,
                  sample_rate: float = 1.0, delta: float = 1e-5, confidence: float = 0.95, noise: str = "gaussian",
                  accountant: str = "prv", seed: int = 0) -> AuditReport:
    """Train a small MLP on synthetic data with an audit attached and return the report.

    Full-batch (``sample_rate=1``) by default: a Dirac canary's summed score is then the optimal test, so the
    lower bound gets closest to the accountant's epsilon. ``noise`` names the noise plugin to audit.
    """
    import dpkit  # the engine imports plugins lazily; so does the audit

    gen = torch.Generator().manual_seed(seed)
    n, d = 512, 24
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, generator=gen) > 0).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(d, 96), torch.nn.ReLU(), torch.nn.Linear(96, 2))
    loader = dpkit.DPDataLoader(torch.utils.data.TensorDataset(x, y), sample_rate,
                                generator=torch.Generator().manual_seed(seed))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                 data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                                 criterion=torch.nn.CrossEntropyLoss(), noise=noise, accountant=accountant,
                                 noise_seed=seed, grad_sample_mode="hooks")
    model, optimizer, loader, criterion = private
    audit = CanaryAudit.attach(private, canaries=canaries, seed=seed)
    try:
        done = 0
        while done < steps:
            for xb, yb in loader:
                optimizer.zero_grad()
                criterion(model(xb), yb).backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
        return audit.report(delta, confidence)
    finally:
        audit.detach()
        private.detach()


def run_bundled_audit(*, steps: int = 100, canaries: int = 1000, noise_multiplier: float = 10.0,
                      sample_rate: float = 1.0, delta: float = 1e-5, confidence: float = 0.95,
                      noise: str = "gaussian", accountant: str = "prv", seed: int = 0) -> str:
    """:func:`bundled_audit`'s report as text, for ``dpkit audit``."""
    return str(bundled_audit(steps=steps, canaries=canaries, noise_multiplier=noise_multiplier,
                             sample_rate=sample_rate, delta=delta, confidence=confidence, noise=noise,
                             accountant=accountant, seed=seed))
