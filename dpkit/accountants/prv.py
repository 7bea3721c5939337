"""The numerical PLD accountant (``accountant="prv"``, the default): tight, and an upper bound.

It composes privacy loss distributions by FFT (Koskela et al. 2020; Gopi, Lee,
Wutschitz 2021), discretized connect-the-dots so that every approximation errs
upward (``_pld``). Both add/remove directions are composed; the worse one counts.

Accuracy. ``epsilon(delta)`` is never below the exact value. Its excess is second
order in the grid step, which is set from the spread of one step's privacy loss:
measured against 8x finer grids and the Gaussian closed form it stays below 0.05%.
``epsilon_and_error(delta)`` also returns a *proven* bound on that excess; the proof
(Azuma-Hoeffding on the rounding errors) is first order, so the bound is looser
(typically 1-2%, a few % for very skewed losses); pass ``max_error`` to refine the
grid until it is below that fraction of epsilon.

Floating point. Rounding is estimated and taken off delta. Where float64 FFT noise,
amplified by the number of steps, would not leave delta room (delta below about
1e-11 times the steps), the FFTs run in long double (about 3x slower); where even that is not
enough (about 1e-12 at a million steps) the answer is the RDP bound.

Speed. The composed distributions are cached per ledger (its multiset of steps), so
fresh accountants replaying the same ledger, and further deltas, reuse them (~2 ms);
100,000 steps compose in 0.02-0.15 s on two cores.
"""
from __future__ import annotations

import functools
import math

from dpkit.accountants import _pld, _pld_truncated
from dpkit.accountants._base import SampledGaussianAccountant, check_delta
from dpkit.accountants.rdp import RDPAccountant
from dpkit.hookspecs import hookimpl

_POINTS_PER_STD = 40   # grid steps per standard deviation of one step's loss
_TAIL = 1e-16          # P-mass all leaves together may cut off the x-line
_MAX_REFINE = 8
_SLACK = 1e-3          # float allowance and mass at +inf may take this share of delta
_LEAF_CELLS_LOG2 = 16  # at most 2**16 grid points per step's PLD before refinement

Key = tuple  # (q, sigma) for a Poisson step, (N, q, B, sigma) for a truncated one (_pld_truncated)
Atoms = tuple[tuple, ...]  # (*key, count), sorted


def _loss_std(key: Key) -> float:
    if len(key) == 4:
        return _pld_truncated.loss_std(*key)
    q, s = key
    return max(_pld.loss_std(q, s, True), _pld.loss_std(q, s, False))


def _leaf(key: Key, remove: bool, step: float, tail: float, max_cells: int) -> _pld.Pmf:
    if len(key) == 4:
        return _pld_truncated.leaf(*key, remove, step, tail, max_cells)
    return _pld.leaf(*key, remove, step, tail, max_cells)


def _grid_step(atoms: Atoms) -> float:
    """A power of two below (RMS spread of one step's loss) / ``_POINTS_PER_STD``."""
    steps = sum(a[-1] for a in atoms)
    spread = sum(a[-1] * _loss_std(a[:-1]) ** 2 for a in atoms)
    return 2.0 ** math.floor(math.log2(max(math.sqrt(spread / steps), 1e-300) / _POINTS_PER_STD))


@functools.lru_cache(maxsize=16)
def _compose(atoms: Atoms, refine: int, extended: bool) -> tuple[_pld.Pmf, ...]:
    """The composed PLD of each direction (one if every step is an unsampled Gaussian).

    ``extended``: long-double FFTs, when float64 noise (amplified by the number of
    steps) would not leave delta room.
    """
    step = _grid_step(atoms) / 2**refine
    tail = _TAIL / sum(a[-1] for a in atoms)
    max_cells = 1 << min(_LEAF_CELLS_LOG2 + refine, 20)  # very skewed losses: a coarser grid, bounded cost
    directions = (True,) if all(len(a) == 3 and a[0] == 1 for a in atoms) else (True, False)
    out = []
    for remove in directions:
        leaves = [(_leaf(a[:-1], remove, step, tail, max_cells), a[-1]) for a in atoms]
        parts = [_pld.power(leaf, n, n * leaf.step**2 / 8, extended) for leaf, n in leaves]
        coarsest = max(p.step for p in parts)
        total = _pld.align(parts[0], coarsest)
        for part in parts[1:]:
            total = _pld.convolve(total, _pld.align(part, coarsest), extended)
        out.append(total)
    return tuple(out)


class PRVAccountant(SampledGaussianAccountant):
    """Privacy-loss-distribution accountant: an upper bound on epsilon within a small error. It also counts
    truncated Poisson steps (``TruncatedPoissonSampledEvent``, ``dpkit.accountants._pld_truncated``).

    Args:
        max_error: if given, refine the grid until the proven error bound of
            :meth:`epsilon_and_error` is at most this fraction of epsilon (slower:
            the time grows like 1 / max_error).
    """

    TRUNCATED = True

    def __init__(self, max_error: float | None = None) -> None:
        super().__init__()
        if max_error is not None and not (isinstance(max_error, (int, float)) and 0 < max_error < 1):
            raise ValueError(f"max_error must be a fraction in (0, 1) or None, got {max_error!r}")
        self.max_error = max_error

    def _atoms_key(self) -> Atoms:
        """The ledger's steps, sorted; unsampled Gaussians merged into one (they compose exactly)."""
        sampled = sorted((q, s, n) for (q, s), n in self._atoms.items() if q < 1)
        inverse_variance = sum(n / s**2 for (q, s), n in self._atoms.items() if q == 1)
        truncated = sorted((*key, n) for key, n in self._truncated.items())
        return tuple(sampled) + tuple(truncated) + (((1.0, inverse_variance**-0.5, 1),) if inverse_variance else ())

    def epsilon_and_error(self, delta: float) -> tuple[float, float]:
        """``(epsilon, error)``: the exact epsilon lies in ``[epsilon - error, epsilon]``."""
        delta = check_delta(delta)
        settled = self.settled(delta)  # e.g. nothing spent, or a loss beyond float64 (see _base)
        if settled is not None:
            return settled, 0.0
        atoms = self._atoms_key()
        refine, extended = 0, False
        while True:
            pmfs = _compose(atoms, refine, extended)
            if not extended and max(p.fp + p.inf_mass for p in pmfs) > delta * _SLACK:  # float64 noise
                extended = True
                continue
            upper, lower = _pld.epsilon_bounds(pmfs, delta)
            if math.isinf(upper) and not self._truncated:  # delta below what long doubles resolve: RDP, also a bound
                rdp = RDPAccountant()
                rdp._atoms = dict(self._atoms)
                upper = rdp.epsilon(delta)
            error = upper - lower
            if self.max_error is None or error <= self.max_error * upper or refine >= _MAX_REFINE:
                return upper, error
            refine = min(_MAX_REFINE, refine + max(1, math.ceil(math.log2(error / (self.max_error * upper)))))

    def epsilon(self, delta: float) -> float:
        """An upper bound on the smallest epsilon at which everything composed is (epsilon, delta)-DP."""
        return self.epsilon_and_error(delta)[0]


@hookimpl
def dpkit_accountants():
    return {"prv": PRVAccountant}
