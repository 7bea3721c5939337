"""Checks of what an accountant assumes, against what a run showed: its batches and the scale of its noise.

An accountant's ε for DP-SGD rests on two premises besides the clipping bound: each release's batch is a
Poisson sample at rate q (each example independently, at most once), and each release carries Gaussian noise of
std σC in the units of the clipped sum. A bug that breaks a premise can leave every canary's score looking as
claimed while the run leaks: shuffled fixed-size batches, several sampled batches accumulated into one release,
or a release divided by its realised batch size (the noise's scale then tells the batch size, hence whether an
example was in it). These checks refute a premise at a stated significance; a refuted premise proves that the
run is not the mechanism its ε was computed for, not by how much ε is off.
"""
from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
from scipy import stats

__all__ = ["PremiseCheck", "noise_scale_check", "participation_checks"]


@attrs.frozen
class PremiseCheck:
    """One premise of the accountant, tested on the run: a p-value under the premise, and what was seen."""

    name: str
    p_value: float
    seen: str


def _two_sided(lower: float, upper: float) -> float:
    return float(min(1.0, 2 * min(lower, upper)))


def participation_checks(per_release: Sequence[int], per_example: Sequence[int], duplicates: int, examples: int,
                         sample_rate: float) -> list[PremiseCheck]:
    """Whether the batches of ``len(per_release)`` releases look like Poisson samples at ``sample_rate``.

    ``per_release``: the examples each release's backward passes saw; ``per_example``: the releases each of the
    ``examples`` examples was in; ``duplicates``: examples seen more than once in one release (impossible under
    Poisson sampling). Three tests: the total (a Binomial(examples·releases, q)), the spread of the batch sizes
    (Σ (B_t - nq)² / nq(1-q), about χ² with one degree per release) and the spread of the examples' counts (about
    χ² with one degree per example), both two-sided: shuffled fixed-size batches have no spread at all.
    """
    sizes, counts = np.asarray(per_release, dtype=np.float64), np.asarray(per_example, dtype=np.float64)
    releases, q, n = sizes.size, float(sample_rate), int(examples)
    checks = [PremiseCheck("no example twice in one release", 0.0 if duplicates else 1.0,
                           f"{duplicates} example(s) seen twice in one release")]
    total, mean = int(sizes.sum()), n * q
    checks.append(PremiseCheck(
        "examples per release (total)", _two_sided(stats.binom.cdf(total, n * releases, q),
                                                   stats.binom.sf(total - 1, n * releases, q)),
        f"{total / max(releases, 1):.1f} per release on average, {mean:.1f} expected"))
    if q < 1:
        spread = float(((sizes - mean) ** 2).sum() / (mean * (1 - q)))
        checks.append(PremiseCheck(
            "spread of the batch sizes", _two_sided(stats.chi2.cdf(spread, releases), stats.chi2.sf(spread, releases)),
            f"batch sizes {int(sizes.min())} to {int(sizes.max())}, variance {sizes.var():.1f} "
            f"(Poisson: {mean * (1 - q):.1f})"))
        per = releases * q
        spread = float(((counts - per) ** 2).sum() / (per * (1 - q)))
        checks.append(PremiseCheck(
            "spread of each example's releases", _two_sided(stats.chi2.cdf(spread, n), stats.chi2.sf(spread, n)),
            f"each example in {int(counts.min())} to {int(counts.max())} releases, variance {counts.var():.2f} "
            f"(Poisson: {per * (1 - q):.2f})"))
    return checks


def noise_scale_check(sum_of_squares: Sequence[float], coordinates: int, std: float) -> PremiseCheck:
    """Whether some release carried less noise than claimed, from coordinates where its clipped sum is 0.

    ``sum_of_squares[t]``: the squares of release t's values there (in the clipped sum's units) summed over
    ``coordinates`` coordinates; under the claim each divided by ``std``² is χ² with that many degrees. One-sided
    (too little noise is the privacy bug), the smallest p-value over the releases times their number (Bonferroni).
    """
    scaled = np.asarray(sum_of_squares, dtype=np.float64) / (std * std)
    p = stats.chi2.cdf(scaled, coordinates)
    worst = int(np.argmin(p))
    ratio = float(np.sqrt(scaled[worst] / coordinates))
    return PremiseCheck("noise std in each release", float(min(1.0, p[worst] * scaled.size)),
                        f"release {worst}: noise std {ratio:.3f}x the claimed one (the least of {scaled.size})")
