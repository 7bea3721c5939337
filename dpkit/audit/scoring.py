"""Canary scores from what a DP-SGD run released: what :class:`dpkit.audit.CanaryAudit` records and how it scores.

Two score families, each a function of the released noisy sums, the other examples' clipped sums (which DP's
adversary knows) and the canaries' public gradients (coordinate and per-step sign), never of the inclusion bits:

- **claimed**: the log-likelihood ratio of each canary's releases under the *claimed* mechanism, independent
  Gaussian noise of the step's std with inclusion at rate q, summed over steps. The optimal test when the noise is
  what it claims to be, and the one that sees noise that is too small.
- **whitened**: the same Gaussian test under the noise's covariance *across steps* as measured on reference
  coordinates (no canary there, so their noise is the released value minus the known clipped sum), in blocks of
  :data:`BLOCK` steps. Noise that repeats or cancels across steps (the same draw every step, antithetic pairs)
  has directions with no variance, and the canaries' sign changes along them show without noise.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

BLOCK = 20  # steps whitened together: a BLOCK x BLOCK covariance per block; even, so step pairs stay in one block
REFERENCES = 4096  # at most this many reference coordinates


class Tape:
    """Records each step's released values at the canaries and the noise at the references, and scores them.

    ``record`` takes one buffer's part of one step; steps are numbered by the run's step counter, the same for
    every buffer of a step. Memory: m x BLOCK values for the open block, whatever the run's length.
    """

    def __init__(self, canaries: int):
        self.llr = torch.zeros(canaries, dtype=torch.float64)  # the claimed family, summed over steps
        self.exact = torch.ones(canaries, dtype=torch.bool)  # every value so far on the lattice {0, ±C}
        self.showed = torch.zeros(canaries, dtype=torch.bool)  # some value equalled the canary's gradient exactly
        self.steps = torch.zeros(canaries, dtype=torch.int64)
        self.whitened = torch.zeros(canaries, dtype=torch.float64)  # the whitened family over closed blocks
        self._block = -1
        self._shown = torch.zeros(canaries, BLOCK, dtype=torch.float64)
        self._signal = torch.zeros(canaries, BLOCK, dtype=torch.float64)  # q·C·sign where recorded, else 0
        self._references: list[list[Tensor]] = [[] for _ in range(BLOCK)]
        self._variance = np.zeros(BLOCK)  # the claimed noise variance of each step of the block

    def record(self, step: int, rows: Tensor, shown: Tensor, signs: Tensor, reference_noise: Tensor, C: float,
               q: float, std: float) -> None:
        """One buffer's canaries ``rows`` showed ``shown`` (released minus the others' clipped sum) at ``step``."""
        block, slot = divmod(step, BLOCK)
        if block != self._block:
            self._close()
            self._block = block
        gradient = signs * C
        tol = 1e-5 * (shown.abs() + C)  # rounding of the float32 sums, far below any noise worth the name
        on_c = (shown - gradient).abs() <= tol
        self.exact[rows] &= on_c | (shown.abs() <= tol)
        self.showed[rows] |= on_c
        self.steps[rows] += 1
        if std > 0:
            a = (gradient * shown - C * C / 2) / (std * std)
            llr = a if q >= 1 else torch.logaddexp(torch.full_like(a, math.log1p(-q)), math.log(q) + a)
        else:
            llr = signs * shown  # no noise claimed: epsilon is infinite anyway
        self.llr[rows] += llr
        self._shown[rows, slot] = shown
        self._signal[rows, slot] = q * gradient
        self._references[slot].append(reference_noise)
        self._variance[slot] = std * std

    def _close(self) -> None:
        if self._block >= 0:
            self.whitened += self._whitened_block()
        self._shown.zero_()
        self._signal.zero_()
        self._references = [[] for _ in range(BLOCK)]
        self._variance[:] = 0

    def _whitened_block(self) -> Tensor:
        """The open block's whitened scores: (qCs)ᵀ Σ⁻¹ (y - qCs/2), Σ the references' covariance across steps.

        Σ is shrunk towards a multiple of the identity by BLOCK/(BLOCK + K), K references, so that it is invertible
        however few references there are; a step not recorded for a canary has signal and value 0 (no evidence).
        """
        used = [k for k in range(BLOCK) if self._references[k]]
        if not used:
            return torch.zeros_like(self.whitened)
        refs = [torch.cat(self._references[k]) for k in used]
        k = min(r.numel() for r in refs)
        variance = float(self._variance[used].mean()) or 1.0
        if k:
            noise = torch.stack([r[:k] for r in refs], 1).double()  # K x b
            cov = noise.T @ noise / k
            target = float(cov.diagonal().mean()) or variance
            rho = len(used) / (len(used) + k)
            cov = (1 - rho) * cov + rho * target * torch.eye(len(used), dtype=torch.float64)
        else:
            target = variance
            cov = torch.diag(torch.as_tensor(self._variance[used], dtype=torch.float64))
        cov += 1e-12 * max(target, variance) * torch.eye(len(used), dtype=torch.float64)
        signal, shown = self._signal[:, used], self._shown[:, used]
        weights = torch.linalg.solve(cov, signal.T).T
        return (weights * (shown - signal / 2)).sum(1)

    def scores(self) -> Tensor:
        """(2, m): the claimed and the whitened family; a canary whose values were all on {0, ±C} (no noise) is
        scored by what it showed, +inf when it ever showed its gradient, -inf when not."""
        exact = self.exact & (self.steps > 0)
        decided = torch.where(self.showed, math.inf, -math.inf)
        whitened = self.whitened + self._whitened_block()
        return torch.stack([torch.where(exact, decided, self.llr), torch.where(exact, decided, whitened)])
