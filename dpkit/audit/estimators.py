"""Bounds and estimates from the scores of held-in and held-out canaries, as jax_privacy's ``CanaryScoreAuditor``
(version 2.0) computes them, for comparison with it and for canaries from independent runs.

Each reads the canaries' ROC curve: every threshold on the scores, "in" above it, keeping only the thresholds
that no mix of two others beats (the upper concave hull of (false negatives, true negatives): randomising
between two thresholds is allowed). They treat the canaries as **independent** trials, which they are when each
canary comes from its own training run and only approximately when all come from one run; that is why
:func:`dpkit.audit.audit_scores`, whose tests hold in one run, gives the audit's verdicts.

- :meth:`CanaryScores.epsilon_clopper_pearson`: ln((TPR - δ)/FPR) at Clopper-Pearson bounds on both error rates,
  Bonferroni-corrected over the thresholds (Jagielski et al. 2020, arXiv:2006.07709);
- :meth:`CanaryScores.epsilon_from_gdp`: the Gaussian-based bound (Nasr et al. 2023, arXiv:2302.07956): the same
  error-rate bounds read as a μ-GDP trade-off curve, μ = Φ⁻¹(1 - FPR) - Φ⁻¹(FNR), then ε at δ. Much tighter
  where the mechanism is close to Gaussian, as DP-SGD is, since one threshold's rates fix the whole curve; it
  refutes μ-GDP, not (ε, δ)-DP, like the f-DP Gaussian bound of :mod:`dpkit.audit.bounds`;
- :meth:`CanaryScores.epsilon_raw_counts` (ln(TPR/FPR) as measured: an estimate, not a bound),
  :meth:`CanaryScores.tpr_at_fpr` and :meth:`CanaryScores.auroc`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from dpkit.audit.bounds import gdp_epsilon

__all__ = ["CanaryScores"]


def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds on a rate from k successes of n trials (1 where k = n)."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, n - k), 1.0)


def _upper_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The indices of the vertices of the upper concave hull of points sorted by x (collinear points dropped)."""
    hull: list[int] = []
    for i, (px, py) in enumerate(zip(x.tolist(), y.tolist())):
        while len(hull) > 1:
            a, b = hull[-2], hull[-1]
            if (x[b] - x[a]) * (py - y[a]) - (y[b] - y[a]) * (px - x[a]) < 0:
                break
            hull.pop()
        hull.append(i)
    return np.asarray(hull, dtype=np.int64)


def _best_log_ratio(numerator: np.ndarray, denominator: np.ndarray, delta: float) -> float:
    """max of log(numerator - δ) - log(denominator) where numerator > δ, and 0 at least."""
    ok = numerator > delta
    if not ok.any():
        return 0.0
    with np.errstate(divide="ignore"):
        return max(0.0, float(np.max(np.log(numerator[ok] - delta) - np.log(denominator[ok]))))


class CanaryScores:
    """The scores of held-in (``in_scores``) and held-out (``out_scores``) canaries; higher means "in"."""

    def __init__(self, in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray):
        self.in_scores = np.asarray(in_scores, dtype=np.float64).reshape(-1)
        self.out_scores = np.asarray(out_scores, dtype=np.float64).reshape(-1)
        if not self.in_scores.size or not self.out_scores.size:
            raise ValueError("in_scores and out_scores must both be non-empty (held-in and held-out canaries)")
        if np.isnan(self.in_scores).any() or np.isnan(self.out_scores).any():
            raise ValueError("the scores hold NaN; a NaN cannot be ranked")
        thresholds = np.append(np.union1d(self.in_scores, self.out_scores), np.inf)
        fn = np.searchsorted(np.sort(self.in_scores), thresholds, side="left")  # in, scored below: missed
        tn = np.searchsorted(np.sort(self.out_scores), thresholds, side="left")
        kept = _upper_hull(fn, tn)
        self.thresholds, self.fn, self.tn = thresholds[kept], fn[kept], tn[kept]
        self.positives, self.negatives = int(self.fn[-1]), int(self.tn[-1])

    def epsilon_clopper_pearson(self, significance: float, delta: float = 0.0, one_sided: bool = True) -> float:
        """ln((TPR - δ) / FPR) at the error rates' Clopper-Pearson bounds, each at significance / (2·thresholds)."""
        _check(significance, delta)
        fnr, fpr = self._rate_bounds(significance / (2 * self.fn.size))
        bound = _best_log_ratio(1 - fnr, fpr, delta)
        return bound if one_sided else max(bound, _best_log_ratio(1 - fpr, fnr, delta))

    def _rate_bounds(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Upper bounds on the false negative and false positive rate at each threshold, each at ``level``."""
        return (_cp_upper(self.fn, self.positives, level),
                _cp_upper(self.negatives - self.tn, self.negatives, level))

    def tpr_at_fpr(self, fpr: float | np.ndarray) -> float | np.ndarray:
        """The largest true positive rate at false positive rate ``fpr``, mixing two thresholds if need be."""
        fpr = np.asarray(fpr, dtype=np.float64)
        if not np.all((fpr >= 0) & (fpr <= 1)):
            raise ValueError(f"fpr must be in [0, 1], got {fpr!r}")
        return _tpr_at(fpr, (self.positives - self.fn)[::-1], (self.negatives - self.tn)[::-1])

    def auroc(self) -> float:
        """The area under the ROC curve (of the hull: randomised thresholds allowed)."""
        fn, tn = self.fn.astype(np.float64), self.tn.astype(np.float64)
        return float(0.5 * np.dot(tn[:-1] + tn[1:], np.diff(fn)) / (self.positives * self.negatives))

    def epsilon_raw_counts(self, min_count: int = 50, delta: float = 0.0, one_sided: bool = True) -> float:
        """ln((TPR - δ) / FPR) as measured, over thresholds with at least ``min_count`` false positives."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count!r}")
        if not 0 <= delta <= 1:
            raise ValueError(f"delta must be in [0, 1], got {delta!r}")
        eps = _raw_counts((self.positives - self.fn)[::-1], (self.negatives - self.tn)[::-1], min_count, delta)
        if not one_sided:  # the reverse rule, "in" below the threshold: out-canaries are its positives
            eps = max(eps, _raw_counts(self.tn, self.fn, min_count, delta))
        return max(eps, 0.0)

    def epsilon_from_gdp(self, significance: float, delta: float) -> float:
        """The Gaussian-based bound: the largest |Φ⁻¹(1 - FPR) - Φ⁻¹(FNR)| over thresholds, at the rates'
        Clopper-Pearson bounds (each at significance / (2·thresholds)), as μ-GDP in ε at ``delta``."""
        _check(significance, delta)
        if delta == 0:
            raise ValueError("delta must be > 0: μ-GDP is not (ε, 0)-DP for any finite ε")
        fnr, fpr = self._rate_bounds(significance / (2 * self.fn.size))
        kept = np.maximum(fpr, fnr) < 1 - delta
        if not kept.any():
            return 0.0
        mu = float(np.max(np.abs(stats.norm.isf(fpr[kept]) - stats.norm.ppf(fnr[kept]))))
        return min(gdp_epsilon(mu, delta), 100.0)  # jax_privacy searches [0, 100]


    def epsilon_from_gdp_split(self, significance: float, delta: float, *, seed: int = 0) -> float:
        """The Gaussian-based bound with its threshold chosen on half of the canaries (by a ``seed``-ed shuffle)
        and the bound computed on the other half at that one threshold: valid at 1 - ``significance`` for
        independent canaries, unlike :meth:`epsilon_from_gdp`, whose thresholds are the scores themselves."""
        _check(significance, delta)
        if delta == 0:
            raise ValueError("delta must be > 0: μ-GDP is not (ε, 0)-DP for any finite ε")
        rng = np.random.default_rng(seed)
        (pick_in, test_in), (pick_out, test_out) = (_halves(s, rng) for s in (self.in_scores, self.out_scores))
        if not min(pick_in.size, pick_out.size, test_in.size, test_out.size):
            raise ValueError("epsilon_from_gdp_split needs at least 2 held-in and 2 held-out canaries")
        chooser = CanaryScores(pick_in, pick_out)
        fnr, fpr = chooser._rate_bounds(significance / 2)
        with np.errstate(invalid="ignore"):
            mu = np.nan_to_num(stats.norm.isf(fpr) - stats.norm.ppf(fnr), nan=-np.inf, posinf=-np.inf)
        threshold = chooser.thresholds[int(np.argmax(mu))]
        fnr = _cp_upper(np.sum(test_in < threshold), test_in.size, significance / 2)
        fpr = _cp_upper(np.sum(test_out >= threshold), test_out.size, significance / 2)
        if max(fnr, fpr) >= 1 - delta:
            return 0.0
        return min(gdp_epsilon(max(0.0, float(stats.norm.isf(fpr) - stats.norm.ppf(fnr))), delta), 100.0)


def _halves(scores: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(scores.size)
    return scores[order[: scores.size // 2]], scores[order[scores.size // 2:]]


def _check(significance: float, delta: float) -> None:
    if not 0 < significance < 0.5:
        raise ValueError(f"significance must be in (0, 0.5), got {significance!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")


def _tpr_at(fpr: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> float | np.ndarray:
    """TPR at ``fpr`` on the hull given by increasing true and false positive counts, interpolated."""
    target = fp[-1] * fpr
    right = np.minimum(np.searchsorted(fp, target, side="right"), fp.size - 1)
    share = (target - fp[right - 1]) / (fp[right] - fp[right - 1])
    return (tp[right - 1] + share * (tp[right] - tp[right - 1])) / tp[-1]


def _raw_counts(tp: np.ndarray, fp: np.ndarray, min_count: int, delta: float) -> float:
    """ln((TPR - δ)/FPR) over the hull's thresholds with at least ``min_count`` false positives, and at exactly
    that many (interpolated)."""
    positives, negatives = tp[-1], fp[-1]
    if min_count >= negatives:
        return 0.0
    least = min_count / negatives
    tpr_there = float(_tpr_at(np.asarray(least), tp, fp))
    if delta == 0:
        return math.log(tpr_there / least)
    keep = fp >= min_count
    return _best_log_ratio(np.append(tp[keep] / positives, tpr_there), np.append(fp[keep] / negatives, least), delta)
