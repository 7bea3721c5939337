"""The PLD of one step of truncated Poisson sampling (``TruncatedPoissonSampledEvent``), kept pessimistic.

The batch is a Poisson sample at rate ``q`` of ``N`` records, cut to a uniformly random ``B`` of them when it has
more. For the record that differs, condition on the other records' count ``M`` (the same law on both datasets):

* ``M < B`` (probability ``1 - p``): no truncation can involve it: the Poisson-subsampled Gaussian, rate ``q``.
* ``M >= B`` (probability ``p = P(Binom(N-1, q) >= B)``): it is kept with probability
  ``q' = B · P(Binom(N, q) >= B + 1) / (p N)``, and then displaces another record, so the sums differ by at
  most ``2C``: the subsampled Gaussian under replacement (centres ``-1, 0`` against ``0, 1`` at std ``σ/2``).

Revealing which case happened only helps the adversary, so the step's PLD is the mixture of the two PLDs with
weights ``1 - p`` and ``p``. This is the analysis of Google's dp_accounting
(``from_truncated_subsampled_gaussian_mechanism``, after arXiv 2508.15089); the code here is
dpkit's own, on ``_pld``'s connect-the-dots grid, so each part, and the mixture, dominate the true pair.
"""
from __future__ import annotations

import math

import numpy as np

from dpkit.accountants import _pld


def split(n: int, q: float, b: int) -> tuple[float, float]:
    """``(p, q')``: the probability the others fill the batch, and the record's rate given that they do."""
    from scipy import special  # bdtrc(k, n, q) = P(Binom(n, q) > k); scipy.stats would cost a second to import

    if b >= n:
        return 0.0, 0.0
    p = float(special.bdtrc(b - 1, n - 1, q))
    if p == 0.0:
        return 0.0, 0.0
    return p, min(1.0, float(special.bdtrc(b, n, q)) * b / (p * n))


def _loss(x: np.ndarray, q: float, s: float) -> np.ndarray:
    """``log P(x)/Q(x)`` for P = q N(-1, s²) + (1-q) N(0, s²), Q = q N(1, s²) + (1-q) N(0, s²); decreasing in x."""
    u, c = x / s**2, 0.5 / s**2
    if q == 1.0:
        return -2 * u
    keep, log_q = math.log1p(-q), math.log(q)
    return np.logaddexp(keep, log_q - u - c) - np.logaddexp(keep, log_q + u - c)


def _log_density(x: np.ndarray, q: float, s: float) -> np.ndarray:
    log_norm = math.log(s * math.sqrt(2 * math.pi))
    shifted = -0.5 * ((x + 1) / s) ** 2 - log_norm
    return shifted if q == 1.0 else np.logaddexp(math.log(q) + shifted, math.log1p(-q) - 0.5 * (x / s) ** 2 - log_norm)


def _x_of_loss(losses: np.ndarray, q: float, s: float, lo: float, hi: float) -> np.ndarray:
    """The x in [lo, hi] where the loss is ``losses`` (bisection: the loss is monotone, its inverse unwieldy)."""
    a, b = np.full(losses.shape, lo), np.full(losses.shape, hi)
    for _ in range(200):
        mid = (a + b) / 2
        above = _loss(mid, q, s) > losses
        a, b = np.where(above, mid, a), np.where(above, b, mid)
        if np.all((b - a) <= 4 * _pld._U * np.maximum(np.maximum(np.abs(a), np.abs(b)), s)):
            break
    return (a + b) / 2


def replace_leaf(q: float, s: float, step: float, tail: float, max_cells: int) -> _pld.Pmf:
    """The subsampled Gaussian under replacement on ``_pld``'s grid (symmetric: both directions are this one)."""
    from scipy import special

    z = -special.ndtri(tail)
    x_lo, x_hi = -1 - z * s, z * s  # P's mass outside: to +infinity below, moved up into the grid above
    hi_loss, lo_loss = (float(v) for v in _loss(np.array([x_lo, x_hi]), q, s))
    while math.ceil(hi_loss / step) - math.floor(lo_loss / step) > max_cells:
        step *= 2
    first = math.floor(lo_loss / step)
    grid = np.arange(first, math.ceil(hi_loss / step) + 1) * step
    bounds = np.clip(_x_of_loss(grid, q, s, x_lo, x_hi), x_lo, x_hi)
    left, right = bounds[1:], bounds[:-1]  # the loss decreases in x: cell [l_k, l_k+1] is x in [x(l_k+1), x(l_k)]
    reach = _pld._FAR * s
    windows = [(-1 - reach, reach)] if 2 * reach >= 1 else [(-1 - reach, -1 + reach), (-reach, reach)]
    parts = [(np.maximum(left, w_lo), np.minimum(right, w_hi)) for w_lo, w_hi in windows]
    lefts, rights = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    cells = np.tile(np.arange(len(left)), len(windows))
    keep = rights > lefts
    cells, left, right = cells[keep], lefts[keep], rights[keep]
    pieces = np.maximum(np.ceil((right - left) / (s / 8)), 1).astype(np.int64)
    seg = np.repeat(np.arange(len(left)), pieces)
    cell = cells[seg]
    offset = np.arange(len(seg)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    width = (right - left)[seg] / pieces[seg]
    x = (left[seg] + offset * width)[:, None] + (width / 2)[:, None] * (_pld._GL_NODES + 1)
    mass = (width / 2)[:, None] * _pld._GL_WEIGHTS * np.exp(_log_density(x, q, s))
    d = np.clip(_loss(x, q, s) - grid[cell][:, None], 0.0, step)
    up = np.expm1(-d) / math.expm1(-step)
    probs = np.bincount(cell, (mass * (1 - up)).sum(1), len(grid))
    probs += np.bincount(cell + 1, (mass * up).sum(1), len(grid))
    below = q * float(special.ndtr(-z)) + (1 - q) * float(special.ndtr(x_lo / s))  # x < x_lo: the highest losses
    above = q * float(special.ndtr(-(x_hi + 1) / s)) + (1 - q) * float(special.ndtr(-z))  # x > x_hi: the lowest
    probs[1] += above
    probs *= (1 - below) / probs.sum()
    return _pld.Pmf(first, step, probs, below, var=step**2, moved=above + below, rel=16 * _pld._U)


def replace_loss_std(q: float, s: float) -> float:
    """The standard deviation of the replacement pair's loss under P (for the grid step)."""
    z = np.linspace(-_pld._FAR, _pld._FAR, 20001)
    gauss = np.exp(-0.5 * z**2)
    gauss /= gauss.sum()
    weight = np.concatenate([q * gauss, (1 - q) * gauss])
    loss = np.concatenate([_loss(-1 + s * z, q, s), _loss(s * z, q, s)])
    mean = np.sum(weight * loss)
    return float(np.sqrt(np.sum(weight * (loss - mean) ** 2)))


def mix(a: _pld.Pmf, b: _pld.Pmf, p: float) -> _pld.Pmf:
    """``(1 - p) a + p b`` on the coarser of their grids: the PLD of a pair chosen at random, the choice revealed."""
    step = max(a.step, b.step)
    a, b = _pld.align(a, step), _pld.align(b, step)
    start = min(a.start, b.start)
    probs = np.zeros(max(a.start + len(a.probs), b.start + len(b.probs)) - start)
    probs[a.start - start:a.start - start + len(a.probs)] += (1 - p) * a.probs
    probs[b.start - start:b.start - start + len(b.probs)] += p * b.probs
    return _pld.Pmf(start, step, probs, (1 - p) * a.inf_mass + p * b.inf_mass, var=max(a.var, b.var),
                    moved=(1 - p) * a.moved + p * b.moved, fp=(1 - p) * a.fp + p * b.fp, rel=max(a.rel, b.rel))


def leaf(n: int, q: float, b: int, sigma: float, remove: bool, step: float, tail: float, max_cells: int) -> _pld.Pmf:
    """One truncated step in one direction (add or remove): the mixture of the module docstring."""
    p, rate = split(n, q, b)
    plain = _pld.leaf(q, sigma, remove, step, tail, max_cells)
    if p == 0.0 or rate == 0.0:
        return plain
    return mix(plain, replace_leaf(rate, sigma / 2, step, tail, max_cells), p)


def loss_std(n: int, q: float, b: int, sigma: float) -> float:
    """A spread of the step's loss for the grid: the root mean square of the two parts' spreads."""
    p, rate = split(n, q, b)
    plain = max(_pld.loss_std(q, sigma, True), _pld.loss_std(q, sigma, False))
    if p == 0.0 or rate == 0.0:
        return plain
    return math.sqrt((1 - p) * plain**2 + p * replace_loss_std(rate, sigma / 2) ** 2)
