"""The statistics of an audit: from right guesses about canaries to lower bounds on epsilon.

An accountant's epsilon is an upper bound, proven for the mechanism as specified. An audit measures a *lower*
bound from what the implementation actually released: m canaries, each included in the run with probability
1/2, a score per canary computed from the release, guesses of which canaries were included (the r scores
farthest from a threshold, by their side of it; the rest abstain), and a hypothesis test that turns the number
of right guesses into "this run is not (epsilon, delta)-DP for any epsilon below the bound", at a confidence
level. A bound above the accountant's epsilon proves a bug; a bound below it proves nothing (docs/auditing.md).

Three tests, all on counts of right guesses:

- **one-run** (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run", main theorem,
  p-value as in their App. D): if the run is (ε, δ)-DP, P[≥ v right of r guesses] is at most
  P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·α, with α = max_i P[v-i ≤ Binomial < v] / i. It assumes nothing
  beyond (ε, δ)-DP.
- **f-DP (ε, δ)** (Mahloujifar, Melis, Chaudhuri 2024, "Auditing f-Differential Privacy in One Run", their
  recursion with abstentions, for any trade-off curve) on the curve of (ε, δ)-DP itself,
  f(x) = max(0, 1 - δ - e^ε x, e^-ε (1 - δ - x)). (ε, δ)-DP *is* f-DP for that curve, so this test, too,
  assumes nothing else; it pays far less for δ than the one-run test's 2mδ term, which is what lets many
  canaries help.
- **f-DP Gaussian**: the same recursion on the trade-off curve of μ-Gaussian DP, tighter still; the largest μ
  refuted is reported as the epsilon of μ-GDP at delta. It refutes "the run is as private as a Gaussian
  mechanism with this (ε, δ)", which DP-SGD's composed curve only approximately is.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import attrs
import numpy as np
from scipy import optimize, special, stats
from torch import Tensor

__all__ = [
    "LowerBound", "ScoreAudit", "approx_dp_epsilon", "approx_dp_refutes", "audit_in_out", "audit_scores",
    "fdp_epsilon", "fdp_mu", "fdp_refutes", "gdp_epsilon", "guess_counts", "one_run_epsilon", "one_run_p_value",
]

_MU_GRID = np.geomspace(1e-3, 100.0, 97)  # the μ the f-DP search tries first, then refines between two of them
_EPS_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 64.0, 96)])  # the same for the ε of (ε, δ)


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


def _refuted(canaries: int, guesses: int, correct: int, curve: Callable[[np.ndarray], np.ndarray],
             significance: float, size: int) -> np.ndarray:
    """For each of ``size`` claims, whether ``correct`` right of ``guesses`` refutes it (Mahloujifar et al., with
    abstentions); ``curve(y)`` is f(1 - y) for each claim's trade-off curve f, vectorised over the claims.

    The recursion bounds, from the trade-off curve, how much probability the outcomes with i = correct-1, ..., 0
    right guesses must carry if those with ``correct`` or more carried ``significance``; when the total exceeds
    what is possible (guesses / canaries), the outcome is less likely than ``significance``. Both masses only
    grow, so a claim stops changing once its total exceeds that (refuted) or a step leaves it unchanged (a fixed
    point: every later step would too).
    """
    right = np.full(size, significance * correct / canaries)
    wrong = np.full(size, significance * (guesses - correct) / canaries)
    limit = guesses / canaries
    for i in range(correct - 1, -1, -1):
        grown = np.maximum(wrong, curve(right))
        settled = (grown == wrong) | (right + wrong > limit)
        if settled.all():
            break
        right = np.minimum(right + i / (guesses - i) * (grown - wrong), 1.0)
        wrong = grown
    return right + wrong > limit


def _gdp_curve(mus: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """μ-GDP: f(x) = Φ(Φ⁻¹(1 - x) - μ), so f(1 - y) = Φ(Φ⁻¹(y) - μ), decreasing in μ: refuted μ form [0, μ*)."""
    return lambda right: special.ndtr(special.ndtri(right) - mus)


def _approx_dp_curve(epsilons: np.ndarray, delta: float) -> Callable[[np.ndarray], np.ndarray]:
    """(ε, δ)-DP: f(x) = max(0, 1 - δ - e^ε x, e^-ε (1 - δ - x)), decreasing in ε: refuted ε form [0, ε*)."""
    grow, shrink = np.exp(epsilons), np.exp(-epsilons)
    return lambda right: np.maximum(np.maximum(shrink * (right - delta), 1 - delta - grow * (1 - right)), 0.0)


def _largest_refuted(grid: np.ndarray, refuted_on: Callable[[np.ndarray], np.ndarray]) -> float:
    """The largest value of an interval [0, x*) of refuted claims, found on ``grid`` then refined 128-fold
    between two of its points; always a refuted value (0 when even the grid's first is not)."""
    refuted = refuted_on(grid)
    if not refuted[0]:
        return 0.0
    last = int(np.flatnonzero(refuted)[-1])
    if last == len(grid) - 1:
        return float(grid[-1])
    fine = np.linspace(grid[last], grid[last + 1], 129)
    return float(fine[np.flatnonzero(refuted_on(fine))[-1]])


def fdp_refutes(canaries: int, guesses: int, correct: int, mu: float, confidence: float = 0.95) -> bool:
    """Whether ``correct`` right of ``guesses`` refutes μ-Gaussian DP at ``confidence``."""
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, 0.0)
    return bool(_refuted(canaries, guesses, correct, _gdp_curve(np.array([float(mu)])), 1 - confidence, 1)[0])


@functools.lru_cache(maxsize=4096)
def fdp_mu(canaries: int, guesses: int, correct: int, confidence: float = 0.95) -> float:
    """The largest μ found whose μ-GDP the outcome refutes (to 0.1% relative), 0 when none; at most 100."""
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, 0.0)
    if correct == 0:
        return 0.0
    return _largest_refuted(_MU_GRID, lambda mus: _refuted(canaries, guesses, correct, _gdp_curve(mus),
                                                           1 - confidence, mus.size))


def approx_dp_refutes(canaries: int, guesses: int, correct: int, epsilon: float, delta: float,
                      confidence: float = 0.95) -> bool:
    """Whether ``correct`` right of ``guesses`` refutes (ε, δ)-DP at ``confidence`` (the f-DP recursion)."""
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, delta)
    curve = _approx_dp_curve(np.array([float(epsilon)]), delta)
    return bool(_refuted(canaries, guesses, correct, curve, 1 - confidence, 1)[0])


@functools.lru_cache(maxsize=4096)
def approx_dp_epsilon(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The f-DP (ε, δ) lower bound: the largest ε found whose (ε, δ)-DP the outcome refutes, 0 when none.

    Assumes nothing beyond (ε, δ)-DP, like :func:`one_run_epsilon`; at most 64 (then more canaries are needed).
    """
    _check_counts(canaries, guesses, correct)
    _check_level(confidence, delta)
    if correct == 0:
        return 0.0
    return _largest_refuted(_EPS_GRID, lambda eps: _refuted(canaries, guesses, correct,
                                                            _approx_dp_curve(eps, delta), 1 - confidence, eps.size))


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

    method: str  # "one-run" (Steinke et al.), "f-DP (eps, delta)" or "f-DP" (Gaussian curve; Mahloujifar et al.)
    epsilon: float
    delta: float
    confidence: float
    canaries: int  # m, each included with probability 1/2
    guesses: int  # r: the r scores farthest from the threshold, guessed by their side of it; the rest abstain
    correct: int  # of the r guesses
    family: str = "scores"  # the score family that gave this bound (CanaryAudit has two)


@attrs.frozen
class ScoreAudit:
    """The three tests on the same scores; each took the best of every family and guess count, Bonferroni-corrected
    so that each bound, and ``proven`` (the two assumption-free tests together), holds at the stated confidence."""

    one_run: LowerBound
    approx_dp: LowerBound
    fdp: LowerBound

    @property
    def proven(self) -> float:
        """The larger assumption-free bound (one-run or f-DP (ε, δ)): above the claimed ε, a proven violation."""
        return max(self.one_run.epsilon, self.approx_dp.epsilon)

    @property
    def epsilon(self) -> float:
        """The largest of the three bounds."""
        return max(self.proven, self.fdp.epsilon)


def guess_counts(canaries: int) -> tuple[int, ...]:
    """The guess counts tried, fixed before any score is seen: m, m/√2, m/2, ... (24 at most, each >= 1)."""
    return tuple(sorted({max(1, round(canaries / 2 ** (j / 2))) for j in range(24)}, reverse=True))


def _right_guesses(scores: np.ndarray, included: np.ndarray, counts: Sequence[int], threshold: float) -> list[int]:
    """For each r: right guesses when the r scores farthest from ``threshold`` are guessed in above it, out below.

    Ties in distance are broken by canary index, which does not depend on the inclusion bits.
    """
    order = np.argsort(-np.abs(scores - threshold), kind="stable")
    right = (scores > threshold) == included
    return [int(right[order[:r]].sum()) for r in counts]


def _as_scores(scores: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(scores, Tensor):
        return scores.detach().cpu().double().numpy()
    return np.asarray(scores, dtype=np.float64)


def audit_scores(scores: Sequence[float] | np.ndarray | Tensor, included: Sequence[bool] | np.ndarray | Tensor, *,
                 delta: float, confidence: float = 0.95, threshold: float | None = None,
                 families: Sequence[str] | None = None) -> ScoreAudit:
    """Lower bounds on ε at ``delta`` from canary scores (higher: more likely included) and inclusion bits.

    ``scores`` is one score per canary, or a (k, m) array of k score families (each a different attack on the
    same canaries). Each family guesses "in" above ``threshold`` and "out" below it, for its r scores farthest
    from it (None: the median of its finite scores; a log-likelihood ratio's natural threshold is 0). Valid when
    each canary was included independently with probability 1/2 and the scores were computed from what the run
    released, without the inclusion bits. Every family and guess count of :func:`guess_counts` is tried; the two
    assumption-free tests share the significance 1 - confidence (each try at (1 - confidence) / (2·k·counts)),
    the Gaussian f-DP test has its own, so ``proven`` and each bound hold at ``confidence``.
    """
    scores = _as_scores(scores)
    scores = scores[None, :] if scores.ndim == 1 else scores
    included = np.asarray(included.detach().cpu() if isinstance(included, Tensor) else included)
    if scores.ndim != 2 or included.shape != scores.shape[1:] or scores.size == 0:
        raise ValueError(f"scores must be 1-D, or 2-D with one row per score family, with one score per canary; "
                         f"got scores of shape {scores.shape} and included of shape {included.shape}")
    if included.dtype != np.bool_:
        raise ValueError(f"included must hold booleans (the canaries' inclusion bits), got {included.dtype}")
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN; a NaN cannot be ranked")
    names = list(families) if families is not None else [f"scores {k}" if len(scores) > 1 else "scores"
                                                          for k in range(len(scores))]
    if len(names) != len(scores):
        raise ValueError(f"{len(scores)} score families need as many names, got {len(names)}")
    _check_level(confidence, delta)
    if delta == 0:
        raise ValueError("delta must be > 0: the f-DP bound converts μ-GDP to epsilon at delta, infinite at 0")
    m = scores.shape[1]
    counts = guess_counts(m)
    tries = len(scores) * len(counts)
    proof_level, gauss_level = 1 - (1 - confidence) / (2 * tries), 1 - (1 - confidence) / tries
    found: dict[str, list[tuple[float, int, int, str]]] = {"one-run": [], "f-DP (eps, delta)": [], "f-DP": []}
    for row, name in zip(scores, names):
        finite = row[np.isfinite(row)]
        cut = float(np.median(finite)) if threshold is None and finite.size else (threshold or 0.0)
        for r, v in zip(counts, _right_guesses(row, included, counts, cut)):
            found["one-run"].append((one_run_epsilon(m, r, v, delta, proof_level), r, v, name))
            found["f-DP (eps, delta)"].append((approx_dp_epsilon(m, r, v, delta, proof_level), r, v, name))
            found["f-DP"].append((fdp_epsilon(m, r, v, delta, gauss_level), r, v, name))
    best = {}
    for method, tried in found.items():
        eps, r, v, name = max(tried, key=lambda t: (t[0], t[1]))  # ties: the most guesses
        best[method] = LowerBound(method=method, epsilon=eps, delta=delta, confidence=confidence, canaries=m,
                                  guesses=r, correct=v, family=name)
    return ScoreAudit(one_run=best["one-run"], approx_dp=best["f-DP (eps, delta)"], fdp=best["f-DP"])


def audit_in_out(in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray, *,
                 delta: float, confidence: float = 0.95, threshold: float | None = None) -> ScoreAudit:
    """:func:`audit_scores` from the scores of the included and of the left-out canaries.

    The canaries must still have been split by independent fair coins: the test counts on that randomness.
    """
    in_scores, out_scores = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    scores = np.concatenate([in_scores, out_scores])
    included = np.concatenate([np.ones(in_scores.size, bool), np.zeros(out_scores.size, bool)])
    return audit_scores(scores, included, delta=delta, confidence=confidence, threshold=threshold)
