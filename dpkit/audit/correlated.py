"""Canaries for Toeplitz correlated noise (BandMF, BLT): on the mechanism's participation schedule, scored after
whitening by its matrix.

Both mechanisms release ``x + C⁻¹z`` over the steps, ``C`` lower-triangular Toeplitz with coefficients
``c_0, c_1, …`` and ``z`` i.i.d. Gaussian of std σC, and both account for examples that join only the steps of
their group in a :class:`dpkit.data.CyclicPoissonLoader` (steps ``t ≡ group (mod L)``, each at the group rate).
So a canary here belongs to a random group and joins its group's steps at the loader's group rate, as an example
would, and the attacker whitens the canary's released values with ``C``: ``C·release = C·x + z``, independent
noise again, where a participation at step ``s`` with gradient ``g`` shows as ``c_k·g`` at step ``s + k``.

- At group rate 1 (fixed groups, where the accounting is exact) the canary joins every step of its group with one
  gradient ``±C·e_j`` throughout, the worst case the accounting bounds, so its whitened signal ``u = C·d`` (``d``
  its participations) is known and the score is the Gaussian log-likelihood ratio of the whole whitened sequence,
  ``Σ_t (w_t u_t - u_t²/2)/std_t²``: the optimal test, whose power is the mechanism's sensitivity over its noise.
- Below it, the coin of each step signs the gradient, and the score sums over the group's steps ``s`` the
  log-likelihood ratio of ``v_s = Σ_k c_k w_{s+k}``, which is ``N(ρ_s C, ρ_s σ²C²)`` when the canary joined and
  ``N(0, ρ_s σ²C²)`` when not (``ρ_s = Σ_{k < T−s} c_k²``), mixed at the group rate.
"""
from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from dpkit.errors import PrivacyUsageError

CHUNK = 8192  # canaries whitened at once: 2 x CHUNK x 2T doubles in flight

__all__ = ["Schedule", "WhitenedTape", "is_tree", "refuse_unwhitenable", "schedule_of"]


@attrs.frozen
class Schedule:
    """Which steps each canary may join (its group of the loader's cycle), at which rate, and ``C``'s coefficients."""

    cycle: int
    rate: float
    groups: Tensor  # per canary, in [0, cycle)
    signs: Tensor  # per canary, ±1: its gradient at every step when every group step is joined (rate 1)
    mechanism: Any  # the noise mechanism, asked for C's coefficients when the run is scored

    def joins(self, step: int, rows: Tensor, generator: torch.Generator) -> Tensor:
        """Which of ``rows`` join ``step``: those of its group, each at the group rate."""
        draws = torch.rand(rows.numel(), generator=generator) < self.rate
        return draws & (self.groups[rows] == step % self.cycle)

    def coefficients(self, steps: int) -> np.ndarray:
        """``c_0..c_{steps-1}`` of the mechanism's ``C``."""
        c = np.zeros(steps)
        if hasattr(self.mechanism, "coefficients"):  # BandMF: b bands, then zeros
            bands = np.asarray(self.mechanism.coefficients, dtype=np.float64)[:steps]
            c[: bands.size] = bands
            return c
        return np.asarray(self.mechanism.resolved(steps).strategy_coefficients(steps), dtype=np.float64)

    def tape(self, canaries: int) -> WhitenedTape:
        return WhitenedTape(canaries, self)


def is_tree(mechanism: Any) -> bool:
    """Whether ``mechanism`` is tree aggregation (told by its sampling rule and ``honaker`` flag; the audit imports
    no noise code): :mod:`dpkit.audit.tree` whitens it."""
    return getattr(mechanism, "check_loader", None) is not None and getattr(mechanism, "honaker", None) in (True, False)


def refuse_unwhitenable(mechanism: Any) -> None:
    """Refuse correlated noise that is neither a Toeplitz factorization nor the tree: the audit has no whitening for it."""
    if getattr(mechanism, "check_loader", None) is not None and not (
            hasattr(mechanism, "coefficients") or hasattr(mechanism, "resolved") or is_tree(mechanism)):
        name = type(mechanism).__name__
        raise PrivacyUsageError(
            f"CanaryAudit cannot audit the noise mechanism {name} yet: its noise is correlated across steps and is "
            "neither a Toeplitz factorization (BandMF, BLT), whose matrix the audit whitens with, nor the tree's. "
            "Audit noise='gaussian', a BandMF, BLT or tree, or another independent-noise plugin "
            "(docs/auditing.md).")


def schedule_of(mechanism: Any, loader: Any, canaries: int, generator: torch.Generator) -> Schedule | None:
    """The schedule for ``mechanism`` (None for noise independent across steps, which needs none)."""
    if getattr(mechanism, "check_loader", None) is None:
        return None
    refuse_unwhitenable(mechanism)
    name = type(mechanism).__name__
    cycle, rate = getattr(loader, "cycle_length", None), getattr(loader, "group_sample_rate", None)
    if cycle is None or rate is None:
        raise PrivacyUsageError(
            f"CanaryAudit on {name} needs the run's dpkit.data.CyclicPoissonLoader (private.data_loader): the "
            "canaries follow its cycle and group rate, the participation the mechanism's accounting covers.")
    groups = torch.randint(0, int(cycle), (canaries,), generator=generator)
    signs = torch.randint(0, 2, (canaries,), generator=generator).to(torch.float64) * 2 - 1
    return Schedule(int(cycle), float(rate), groups, signs, mechanism)


class WhitenedTape:
    """Every step's released values at the canaries, scored at the end after whitening by ``C``.

    Memory: 5 bytes per canary and step (float32 values, int8 coins), for the whole run.
    """

    families = ("whitened by C",)

    def __init__(self, canaries: int, schedule: Schedule):
        self.schedule = schedule
        self.steps = torch.zeros(canaries, dtype=torch.int64)
        self._shown: dict[int, Tensor] = {}
        self._signs: dict[int, Tensor] = {}
        self._scale: dict[int, tuple[float, float]] = {}  # per step: (C, std)
        self._canaries = canaries

    def record(self, step: int, rows: Tensor, shown: Tensor, signs: Tensor, reference_noise: Tensor, C: float,
               q: float, std: float) -> None:
        """One buffer's canaries ``rows`` showed ``shown`` (released minus the others' clipped sum) at ``step``."""
        if step not in self._shown:
            self._shown[step] = torch.zeros(self._canaries, dtype=torch.float32)
            self._signs[step] = torch.zeros(self._canaries, dtype=torch.int8)
        self._shown[step][rows] = shown.float()
        self._signs[step][rows] = signs.to(torch.int8)
        self._scale[step] = (C, std)
        self.steps[rows] += 1

    def threshold(self) -> float | None:
        """Guess by the sign of the exact log-likelihood ratio at rate 1, else at the median."""
        return 0.0 if self.schedule.rate >= 1 else None

    def checked_steps(self) -> list[int]:
        """The steps recorded, refused unless they are every step from the run's first (the whitening needs all)."""
        steps = sorted(self._shown)
        if steps != list(range(len(steps))):
            raise PrivacyUsageError("CanaryAudit on correlated noise must see every step from the run's first: "
                                    "attach it before the first step.")
        return steps

    def scores(self) -> Tensor:
        """(1, m): each canary's log-likelihood ratio after whitening (module docstring)."""
        steps = self.checked_steps()
        T = len(steps)
        c = torch.as_tensor(self.schedule.coefficients(T))
        rho = torch.flip(torch.cumsum(c * c, 0), [0])  # ρ_s = Σ_{k < T-s} c_k²
        C, std = (torch.as_tensor([self._scale[t][i] for t in steps], dtype=torch.float64) for i in (0, 1))
        q, total = self.schedule.rate, torch.zeros(self._canaries, dtype=torch.float64)
        spectrum = torch.fft.rfft(c, 2 * T)
        weight = torch.where(std > 0, C / std.clamp(min=1e-300) ** 2, torch.ones_like(std))
        for start in range(0, self._canaries, CHUNK):
            rows = slice(start, start + CHUNK)
            shown = torch.stack([self._shown[t][rows] for t in steps], 1).double()  # chunk x T
            signs = torch.stack([self._signs[t][rows] for t in steps], 1).double()
            whitened = torch.fft.irfft(torch.fft.rfft(shown, 2 * T) * spectrum, 2 * T)[:, :T]  # C·shown
            mine = self.schedule.groups[rows, None] == torch.arange(T)[None, :] % self.schedule.cycle
            if q >= 1:  # the whole sequence against the known signal u = C·(signed participations), in units of C
                u = torch.fft.irfft(torch.fft.rfft(mine * signs, 2 * T) * spectrum, 2 * T)[:, :T]
                total[rows] = ((whitened * u - C * u * u / 2) * weight).sum(1)
                continue
            v = torch.fft.irfft(torch.fft.rfft(whitened, 2 * T) * spectrum.conj(), 2 * T)[:, :T]  # Σ_k c_k w_{s+k}
            a = (v * signs - C * rho / 2) * weight
            a = torch.logaddexp(torch.full_like(a, math.log1p(-q)), math.log(q) + a)
            total[rows] = (a * mine).sum(1)
        return total[None, :]
