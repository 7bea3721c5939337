"""Privacy loss distributions (PLDs) of the Poisson-subsampled Gaussian, discretized so they stay pessimistic.

A PLD here is the law, under the first distribution P of a dominating pair (P, Q), of
the privacy loss L = log(dP/dQ), kept as masses on the grid ``{i * step}`` plus a mass at
+infinity. For any epsilon, ``delta(eps) = E_P[(1 - exp(eps - L))_+]``, and composing
mechanisms adds independent losses, so composition is convolution.

Why the result is an upper bound (no probability of failure):

* Discretization is *connect-the-dots* (Doroshenko et al. 2022): the P-mass at loss l in
  the cell [a, a + h] is split between a and a + h so that both its P-mass and its
  Q-mass (P-mass times e^-l) are kept. Merging the two atoms again gives back the
  original pair, so the discrete pair dominates it, and dominating pairs compose
  (Zhu, Dong, Wang 2022).
* Tails are moved *up*: mass above the grid goes to +infinity, mass below it joins the
  lowest kept grid point. Both are garblings in the same sense.
* Floating-point rounding is outside the argument. It is estimated and subtracted from
  delta: the quadrature's few ulps per mass are a relative error of every delta
  (``rel``, about 2e-15 per step), the FFT's noise floor (measured against exact
  convolution: about u times the largest mass per entry) an absolute one (``fp``).
  Where float64 FFTs would leave too little room, long-double ones are used.

Why it is tight: a connect-the-dots split is a randomized rounding whose error has
range ``h`` and mean in [0, h^2/8]. Summed over T steps the errors give the rigorous
two-sided bound in :func:`epsilon_bounds` (Azuma-Hoeffding, as in Gopi, Lee, Wutschitz
2021); the actual error is of second order (about T h^2) and far smaller.
"""
from __future__ import annotations

import itertools
import math

import attrs
import numpy as np
import torch

# scipy is imported where it is used, not here: these modules load with every plugin manager (make_private,
# `dpkit plugins`), and scipy.signal alone costs a quarter of a second, more than the rest of a first query.

# Gauss-Legendre on [-1, 1], 8 points: numpy.polynomial.legendre.leggauss(8)'s values, written out because
# importing numpy.polynomial (about 0.5 MB of bytecode) cost the first epsilon query more than its arithmetic.
_GL_NODES = np.array([-0.9602898564975362, -0.7966664774136267, -0.525532409916329, -0.18343464249564978,
                      0.18343464249564978, 0.525532409916329, 0.7966664774136267, 0.9602898564975362])
_GL_WEIGHTS = np.array([0.10122853629037706, 0.22238103445337443, 0.3137066458778869, 0.36268378337836166,
                        0.36268378337836166, 0.3137066458778869, 0.22238103445337443, 0.10122853629037706])
_FAR = 38.0          # standard deviations beyond which a Gaussian has no float64 mass
_U = float(np.finfo(float).eps)
_SHORT = 4096        # grids this short are cheap to convolve: not worth coarsening
LFILTER_FROM = 1 << 16  # longer grids' tail sums use scipy.signal.lfilter (same numbers, a faster loop)


@attrs.frozen(eq=False)
class Pmf:
    """A discretized PLD: ``probs[j]`` is the P-mass at loss ``(start + j) * step``.

    ``var`` is the sum of squared ranges of all rounding errors inside (for the
    error bound), ``moved`` bounds the P-mass that cutting tails moved (up, or to
    +infinity). Floating-point error is estimated as ``rel * delta + fp``: relative
    error of the masses (quadrature; it scales every delta alike) plus absolute FFT noise.
    """

    start: int
    step: float
    probs: np.ndarray
    inf_mass: float = 0.0
    var: float = 0.0
    moved: float = 0.0
    fp: float = 0.0
    rel: float = 0.0


def _loss(x: np.ndarray, q: float, sigma: float, remove: bool) -> np.ndarray:
    u = (2 * x - 1) / (2 * sigma**2)
    if q == 1.0:
        return u if remove else -u
    loss = np.log1p(q * np.expm1(np.minimum(u, 30.0)))
    big = u > 30.0  # where e^u could overflow, log(1 - q + q e^u) in log space
    if big.any():
        loss[big] = np.logaddexp(math.log1p(-q), math.log(q) + u[big])
    return loss if remove else -loss


def _x_of_loss(loss: np.ndarray, q: float, sigma: float, remove: bool) -> np.ndarray:
    """The inverse of ``_loss``; above loss 30 in log space, where ``e^loss`` would overflow to inf."""
    signed = loss if remove else -loss
    if q == 1.0:
        u = signed
    else:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            u = np.log1p(np.expm1(np.minimum(signed, 30.0)) / q)  # -inf or nan at and below the infimum log(1-q)
        u = np.where(np.isnan(u), -np.inf, u)
        big = signed > 30.0  # log(1 + (e^s - 1)/q) = s + log(1 - (1-q) e^-s) - log q
        u[big] = signed[big] + np.log1p(-(1 - q) * np.exp(-signed[big])) - math.log(q)
    return sigma**2 * u + 0.5


def _log_density(x: np.ndarray, q: float, sigma: float, remove: bool) -> np.ndarray:
    """log of P's density at x: remove's P is (1-q) N(0, s^2) + q N(1, s^2), add's is N(0, s^2).

    From its parts, not as Q's density times e^loss: at small sigma both are near
    ``1 / (2 s^2)`` in size, and their sum would lose every digit.
    """
    log_norm = math.log(sigma * math.sqrt(2 * math.pi))
    log_at_0 = -0.5 * (x / sigma) ** 2 - log_norm
    if not remove:
        return log_at_0
    log_at_1 = -0.5 * ((x - 1) / sigma) ** 2 - log_norm
    return log_at_1 if q == 1.0 else np.logaddexp(math.log1p(-q) + log_at_0, math.log(q) + log_at_1)


def _segments(left: np.ndarray, right: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts of the cells ``[left, right]`` within ``_FAR`` sigma of 0 or 1: (cell index, left, right).

    Only there has either Gaussian any float64 mass, so only there must the quadrature
    resolve sigma: with a small sigma this keeps the pieces near the number of cells,
    not ``1 / sigma``.
    """
    reach = _FAR * sigma
    windows = [(-reach, 1 + reach)] if 2 * reach >= 1 else [(-reach, reach), (1 - reach, 1 + reach)]
    parts = [(np.maximum(left, lo), np.minimum(right, hi)) for lo, hi in windows]
    lefts, rights = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    cells = np.tile(np.arange(len(left)), len(windows))
    keep = rights > lefts
    return cells[keep], lefts[keep], rights[keep]


def leaf(q: float, sigma: float, remove: bool, step: float, tail: float, max_cells: int = 1 << 16) -> Pmf:
    """One step of ``PoissonSampled(q, Gaussian(sigma))`` in one direction, on the grid ``step``.

    ``remove``: P = (1-q) N(0, s^2) + q N(1, s^2) against Q = N(0, s^2); otherwise the
    reverse pair (for q = 1 both directions have the same PLD). ``tail``: the P-mass cut
    off an end of the x-line, sent to +infinity (high losses) or up into the grid (low
    losses). The step is doubled while the grid would exceed ``max_cells`` (time, memory).
    """
    remove = remove or q == 1.0
    z = -float(torch.special.ndtri(torch.tensor(tail, dtype=torch.float64)))  # Cephes' ndtri, as scipy's
    x_lo = 1 - z * sigma if q == 1.0 else -_FAR * sigma  # q < 1: no float64 mass is left below
    x_hi = (1.0 if remove else 0.0) + z * sigma
    lo_loss, hi_loss = np.sort(_loss(np.array([x_lo, x_hi]), q, sigma, remove))
    while math.ceil(hi_loss / step) - math.floor(lo_loss / step) > max_cells:
        step *= 2
    first = math.floor(lo_loss / step)
    grid = np.arange(first, math.ceil(hi_loss / step) + 1) * step
    bounds = np.clip(_x_of_loss(grid, q, sigma, remove), x_lo, x_hi)
    left, right = (bounds[:-1], bounds[1:]) if remove else (bounds[1:], bounds[:-1])  # x of cell [l_k, l_k+1]
    cells, left, right = _segments(left, right, sigma)
    # Gauss-Legendre on pieces no wider than sigma/8, where the integrands are smooth.
    pieces = np.maximum(np.ceil((right - left) / (sigma / 8)), 1).astype(np.int64)
    seg = np.repeat(np.arange(len(left)), pieces)
    cell = cells[seg]
    offset = np.arange(len(seg)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    width = (right - left)[seg] / pieces[seg]
    x = (left[seg] + offset * width)[:, None] + (width / 2)[:, None] * (_GL_NODES + 1)
    loss = _loss(x, q, sigma, remove)
    mass = (width / 2)[:, None] * _GL_WEIGHTS * np.exp(_log_density(x, q, sigma, remove))
    d = np.clip(loss - grid[cell][:, None], 0.0, step)
    up = np.expm1(-d) / math.expm1(-step)  # connect-the-dots share of the cell's upper point
    probs = np.bincount(cell, (mass * (1 - up)).sum(1), len(grid))
    probs += np.bincount(cell + 1, (mass * up).sum(1), len(grid))
    beyond = _ndtr(-z)  # P-mass past x_hi, and (q = 1) below x_lo
    inf_mass = 0.0 if not remove else beyond if q == 1.0 else (1 - q) * _ndtr(-x_hi / sigma) + q * beyond
    lumped = beyond if (q == 1.0 or not remove) else 0.0
    probs[1] += lumped  # their losses lie below the first cell: moved up past it
    probs *= (1 - inf_mass) / probs.sum()  # the total is known exactly; T steps would amplify its error
    # Each mass is good to a few ulps, so is every delta built from them (x2: the rescaling).
    return Pmf(first, step, probs, inf_mass, var=step**2, moved=lumped + inf_mass, rel=16 * _U)


def loss_std(q: float, sigma: float, remove: bool) -> float:
    """The standard deviation of one step's privacy loss under P (sets the grid step)."""
    if q == 1.0:
        return 1 / sigma
    z = np.linspace(-_FAR, _FAR, 20001)  # in standard deviations of each Gaussian: resolved at any sigma
    gauss = np.exp(-0.5 * z**2)
    gauss /= gauss.sum()
    parts = ((1 - q, 0.0), (q, 1.0)) if remove else ((1.0, 0.0),)  # P's components: (weight, mean)
    weight = np.concatenate([w * gauss for w, _ in parts])
    loss = np.concatenate([_loss(mean + sigma * z, q, sigma, remove) for _, mean in parts])
    mean = np.sum(weight * loss)
    return float(np.sqrt(np.sum(weight * (loss - mean) ** 2)))


def _clean(probs: np.ndarray, start: int, unit: float) -> tuple[np.ndarray, int, float, float, float]:
    """Cut the FFT noise floor off both ends, pessimistically, and zero negative noise.

    Entries below ``2 unit max`` cannot be told from rounding noise (measured: the
    error is about ``unit * max``, ``unit`` the FFT's roundoff). Returns the kept
    masses (float64), their start index, the (positive) mass sent to +inf from the top,
    the mass moved in all, and a float error allowance.
    """
    probs = probs.astype(float)
    noise = 2 * unit * float(probs.max())
    body = np.flatnonzero(probs > noise)
    lo, hi = (int(body[0]), int(body[-1]) + 1) if body.size else (0, 1)
    positive = np.maximum(probs, 0.0)
    below, above = float(positive[:lo].sum()), float(positive[hi:].sum())
    kept = probs[lo:hi].copy()
    negative = float(-kept[kept < 0].sum())
    kept[kept < 0] = 0.0
    kept[0] += below  # losses below the kept grid move up to its first point
    return kept, start + lo, above, below + above, negative + math.sqrt(len(probs)) * noise


def _ndtr(x: float) -> float:
    """The standard normal CDF, accurate in the lower tail (erfc, not 1 - erf)."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: an FFT length with only small factors (numpy's FFT is fast on them).

    numpy's FFT, not scipy's: importing scipy.fft costs more than most epsilon queries (issue 23.3).
    """
    best, p2 = 1 << max(n - 1, 0).bit_length(), 1
    while p2 < best:
        p3 = p2
        while p3 < best:
            p5 = p3
            while p5 < n:
                p5 *= 5
            best = min(best, p5)
            p3 *= 3
            if p3 >= n:
                best = min(best, p3)
                break
        p2 *= 2
    return best


def convolve(a: Pmf, b: Pmf, extended: bool = False) -> Pmf:
    """The PLD of the composition: losses add, so masses convolve (FFT); tails are cut pessimistically.

    ``extended``: FFT in long double, for ~2000x less noise at ~3.5x the time.
    """
    if a.step != b.step:
        raise ValueError("convolve needs PLDs on the same grid")
    dtype = np.longdouble if extended else np.float64
    n = len(a.probs) + len(b.probs) - 1
    size = _fast_length(n)
    fa = np.fft.rfft(a.probs.astype(dtype), size)
    fb = fa if b is a else np.fft.rfft(b.probs.astype(dtype), size)
    unit = float(np.finfo(dtype).eps)
    probs, start, above, moved, fp = _clean(np.fft.irfft(fa * fb, size)[:n], a.start + b.start, unit)
    inf_mass = 1 - (1 - a.inf_mass) * (1 - b.inf_mass) + above
    return Pmf(
        start, a.step, probs, inf_mass, a.var + b.var, a.moved + b.moved + moved, a.fp + b.fp + fp, a.rel + b.rel
    )


def coarsen(a: Pmf) -> Pmf:
    """The same PLD on the grid ``2 * step``: odd points split connect-the-dots to their neighbours."""
    probs, start = a.probs, a.start
    if start % 2:
        probs, start = np.concatenate([[0.0], probs]), start - 1
    if len(probs) % 2:
        probs = np.concatenate([probs, [0.0]])
    even, odd = probs[0::2], probs[1::2]
    up = 1 / (1 + math.exp(-a.step))  # d = step, new spacing 2 * step
    out = np.zeros(len(even) + 1)
    out[:-1] += even + (1 - up) * odd
    out[1:] += up * odd
    return attrs.evolve(a, start=start // 2, step=2 * a.step, probs=out, var=a.var + (2 * a.step) ** 2)


def align(a: Pmf, step: float) -> Pmf:
    """Coarsen ``a`` until its grid is ``step`` (a power-of-two multiple of it)."""
    while a.step < step * (1 - 1e-9):
        a = coarsen(a)
    return a


def power(base: Pmf, count: int, budget: float, extended: bool = False) -> Pmf:
    """``count``-fold composition by repeated squaring.

    The squared term is moved to a coarser grid whenever it is long and the added
    rounding error, times the number of copies of that term in the result, fits in
    ``budget`` (a share of the error bound's variance): coarse grids late, fine early.
    """
    acc: Pmf | None = None
    node = base
    while True:
        if count & 1:
            acc = node if acc is None else convolve(align(acc, node.step), node, extended)
        count >>= 1
        if not count:
            return acc
        node = convolve(node, node, extended)
        while len(node.probs) > _SHORT and count * (2 * node.step) ** 2 <= budget:
            node = coarsen(node)


def _tail_sums(p: Pmf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid losses ``l_k`` and, per k, ``A_k = P(L >= l_k)`` and ``C_k = E[e^(l_(k-1) - L); L >= l_k]``."""
    losses = (p.start + np.arange(len(p.probs))) * p.step
    decay = math.exp(-p.step)
    tail = np.cumsum(p.probs[::-1])[::-1]
    return losses, tail, decayed_sums(p.probs[::-1], decay)[::-1]


def decayed_sums(x: np.ndarray, decay: float) -> np.ndarray:
    """``y[n] = decay * x[n] + decay * y[n-1]``, as ``scipy.signal.lfilter([decay], [1, -decay], x)`` computes it.

    The same two products and one sum per entry, so the same floats; a Python loop spares short grids (all but
    refined ones) the import of scipy.signal.
    """
    if len(x) >= LFILTER_FROM or x.dtype != np.float64:
        from scipy import signal

        return signal.lfilter([decay], [1.0, -decay], x)
    sums = itertools.accumulate(x.tolist(), lambda y, xn: decay * xn + decay * y, initial=0.0)
    return np.fromiter(itertools.islice(sums, 1, None), dtype=x.dtype, count=len(x))


def delta_at(p: Pmf, eps: float) -> float:
    """``delta(eps)`` of the discrete PLD, including the mass at +infinity."""
    keep = (p.start + np.arange(len(p.probs))) * p.step > eps
    losses = (p.start + np.nonzero(keep)[0]) * p.step
    return float(np.sum(p.probs[keep] * -np.expm1(eps - losses))) + p.inf_mass


def epsilon_at(p: Pmf, delta: float) -> float:
    """The smallest ``eps >= 0`` with ``delta_at(p, eps) <= delta`` (``inf`` if none)."""
    if p.inf_mass >= delta:
        return math.inf
    if delta_at(p, 0.0) <= delta:
        return 0.0
    losses, tail, weighted = _tail_sums(p)
    meets = tail - weighted + p.inf_mass <= delta  # delta at eps = l_(k-1), decreasing in k
    m = max(int(np.argmax(meets)) - 1, 0) if meets.any() else len(losses) - 1
    # On [l_(m-1), l_m]: delta(eps) = A_m + inf - e^(eps - l_(m-1)) C_m; solve for eps. delta(l_m) <= delta,
    # so l_m bounds it too (and answers where a coarse grid's e^-step underflows C_m to 0).
    if weighted[m] <= 0:
        return max(0.0, float(losses[m]))
    eps = losses[m] - p.step + math.log((tail[m] + p.inf_mass - delta) / weighted[m])
    return max(0.0, min(float(eps), float(losses[m])))


def epsilon_bounds(pmfs: tuple[Pmf, ...], delta: float) -> tuple[float, float]:
    """(upper, lower) bounds on the exact epsilon at ``delta``; the worse direction counts.

    Upper: the discrete PLDs dominate the true ones, so their epsilon at ``delta`` less
    the float allowance is an upper bound. Lower: each rounding error has range ``r_j`` and mean in
    ``[0, r_j^2/8]``, so by Azuma-Hoeffding the true total loss is at least the
    discrete one minus ``var/8 + sqrt(var log(1/eta) / 2)`` except with probability eta.
    """
    upper = lower = 0.0
    for p in pmfs:
        room = delta * (1 - p.rel) - p.fp
        upper = max(upper, epsilon_at(p, room) if room > 0 else math.inf)
        for eta in (delta / 10, delta / 100, delta / 1000):
            if eta <= 0:  # a subnormal delta: eta underflows, and this bound has nothing to say
                continue
            shift = p.var / 8 + math.sqrt(p.var * math.log(1 / eta) / 2)
            lower = max(lower, epsilon_at(p, delta * (1 + p.rel) + eta + p.moved + p.fp) - shift)
    return upper, min(lower, upper)
