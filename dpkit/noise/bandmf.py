"""Banded matrix factorization (BandMF): correlated Gaussian noise for many-step training.

The step's noisy gradient is ``x_t + (C⁻¹z)_t`` with ``z_t ~ N(0, (σC_clip)²)`` i.i.d. and ``C`` lower-triangular
banded Toeplitz with bands ``c_0..c_{b-1}`` (Choquette-Choo et al., NeurIPS 2023). Solving ``C y = z`` forwards,
``y_t = (z_t − Σ_{j=1}^{b-1} c_j y_{t−j}) / c_0``, needs the last ``b−1`` noise vectors of every flat buffer:
memory is ``(b−1) × parameters`` (stored, not regenerated from seeds). ``b = 1`` is DP-SGD.

Privacy (their Theorem 4; jax_privacy's ``DpsgdTrainingAccountant`` makes the same reduction): with the bands
normalised to ``Σ c_j² = 1`` (every column of ``C`` has norm ≤ 1) and cyclic Poisson sampling — the data split into
``L ≥ b`` fixed groups, step ``t`` Poisson-samples group ``t mod L`` at rate ``q`` — ``T`` steps are as private as
DP-SGD with rate ``q`` and noise ``σ`` for ``⌈T/L⌉`` steps. The ledger records ``PoissonSampledEvent(q,
GaussianEvent(σ))`` on steps ``0, L, 2L, …`` and ``NoOpEvent`` on the others: ``⌈T/L⌉`` events after ``T`` steps.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
from torch import Tensor

from dpkit import distributed
from dpkit.errors import PrivacyUsageError
from dpkit.events import DpEvent, GaussianEvent, NoOpEvent, PoissonSampledEvent
from dpkit.hookspecs import hookimpl
from dpkit.noise import _toeplitz
from dpkit.noise.gaussian import GaussianNoise
from dpkit.noise._loaders import refuse_distributed_or_seeded


def sqrt_coefficients(bands: int) -> tuple[float, ...]:
    """The Toeplitz square root of the prefix-sum matrix, ``(1−x)^{−1/2} = Σ C(2k,k)/4^k x^k``, cut to ``bands``
    and scaled to unit column norm. Needs no run length, and its error is within a log factor of optimal
    (Fichtenberger et al. 2023; Kalinin & Lampert 2024 for the banded cut)."""
    _check_bands(bands)
    coefficients = [1.0]
    for k in range(1, bands):
        coefficients.append(coefficients[-1] * (2 * k - 1) / (2 * k))
    return normalized(coefficients)


def normalized(coefficients: Sequence[float]) -> tuple[float, ...]:
    """``coefficients`` scaled to ``Σ c_j² = 1``: the sensitivity of one participation is then the clip norm."""
    values = [float(c) for c in coefficients]
    if not values or not all(math.isfinite(c) for c in values) or values[0] <= 0:
        raise ValueError(f"BandMF coefficients need c_0 > 0 and finite values, got {list(coefficients)!r}")
    norm = math.sqrt(sum(c * c for c in values))
    return tuple(c / norm for c in values)


def prefix_sum_error(coefficients: Sequence[float], steps: int) -> float:
    """Total squared error ``‖A C⁻¹‖_F²`` of the ``steps`` prefix sums (SGD's iterates) at unit column norm."""
    from scipy import signal  # on use: this plugin loads with every plugin manager, and scipy.signal costs ~0.25 s

    c = np.asarray(normalized(coefficients))
    impulse = np.zeros(steps)
    impulse[0] = 1.0
    return _toeplitz.prefix_sum_error(signal.lfilter([1.0], c, impulse))  # C⁻¹'s Toeplitz coefficients


def optimized_coefficients(bands: int, steps: int) -> tuple[float, ...]:
    """Bands that minimise :func:`prefix_sum_error` for a run of ``steps``, from the square root's (L-BFGS)."""
    from scipy import optimize

    start = sqrt_coefficients(bands)
    if bands == 1:
        return start
    result = optimize.minimize(lambda tail: prefix_sum_error((1.0, *tail), steps),
                               np.asarray(start[1:]) / start[0], method="L-BFGS-B")
    best = normalized((1.0, *result.x))
    stable = np.all(np.abs(np.roots(best)) < 1)  # C⁻¹'s recursion must not blow up over long runs
    return best if stable and prefix_sum_error(best, steps) < prefix_sum_error(start, steps) else start


def _check_bands(bands: object) -> int:
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ValueError(f"bands must be an int >= 1, got {bands!r}")
    return bands


@attrs.frozen
class BandMFConfig:
    """What ``noise="bandmf"`` builds: ``bands`` b, and the band coefficients (default: :func:`sqrt_coefficients`)."""

    bands: int = attrs.field(default=1, validator=lambda _, __, v: _check_bands(v))
    coefficients: tuple[float, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))

    def resolved(self) -> tuple[float, ...]:
        if self.coefficients is None:
            return sqrt_coefficients(self.bands)
        if len(self.coefficients) != self.bands:
            raise ValueError(f"{len(self.coefficients)} coefficients given for bands={self.bands}")
        resolved = normalized(self.coefficients)
        scale = resolved[0] / float(self.coefficients[0])
        if abs(scale - 1) > 1e-9:
            warnings.warn(
                f"BandMF coefficients {list(self.coefficients)!r} are scaled by {scale:.6g} to sum of squares 1, so that "
                "one participation's sensitivity is the clip norm: noise_multiplier applies to the scaled ones "
                "(the mechanism is the same). Pass normalised coefficients to silence this.", stacklevel=4)
        return resolved


@attrs.frozen
class _Binding:
    """What the checked loader tells the accounting: the cycle length L and the rate within a group."""

    cycle_length: int
    group_sample_rate: float
    sample_rate: float  # the loader's fraction of the dataset per step, as the engine passes it to dp_event


class BandMF:
    """BandMF noise; a fresh instance per ``make_private``. Refuses to noise until :func:`check_loader` has bound
    it to a :class:`dpkit.data.CyclicPoissonLoader`, as its accounting is valid only for that sampling.

    Step boundaries need no engine help: each flat buffer (one per device and dtype) gets one ``add`` per step,
    so each buffer runs its own recursion. ``dp_event`` counts the released steps for the ledger.
    """

    default: ClassVar[BandMFConfig] = BandMFConfig()

    def __init__(self, seed: int | None = None, secure_mode: bool = False, bands: int | None = None,
                 coefficients: Sequence[float] | None = None):
        if distributed.world_size() > 1:
            raise PrivacyUsageError("noise='bandmf' does not support torch.distributed yet (world size "
                                    f"{distributed.world_size()}): train on one process, or use noise='gaussian'.")
        config = self.default if bands is None and coefficients is None else BandMFConfig(
            bands if bands is not None else len(coefficients), coefficients)
        self.coefficients = config.resolved()
        self.bands = len(self.coefficients)
        self.secure_mode = secure_mode
        self._draws = GaussianNoise(seed=seed, secure_mode=secure_mode)
        self._history: dict[str, list[Tensor]] = {}  # per buffer, y_{t-1}, y_{t-2}, … (at most b−1)
        self._std: float | None = None
        self._released = 0
        self._binding: _Binding | None = None

    @classmethod
    def configure(cls, bands: int, coefficients: Sequence[float] | None = None) -> None:
        """Sets what ``noise="bandmf"`` builds from now on (until the engine passes factory arguments itself)."""
        config = BandMFConfig(bands, coefficients)
        config.resolved()  # bad coefficients fail here, leaving the default as it was
        cls.default = config

    @property
    def seed(self) -> int | None:
        return self._draws.seed

    def check_loader(self, loader: object) -> None:
        check_loader(loader, self)

    def memory_bytes(self) -> int:
        """Bytes of noise history held: ``(b−1) × parameters × element size`` once ``b−1`` steps have run."""
        return sum(t.numel() * t.element_size() for ts in self._history.values() for t in ts)

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        """Adds ``y_t = (z_t − Σ c_j y_{t−j}) / c_0`` in place and keeps ``y_t`` for the next ``b−1`` steps."""
        if self._binding is None:
            raise PrivacyUsageError(
                "noise='bandmf' is private only under cyclic Poisson sampling: build the loader with "
                "dpkit.data.CyclicPoissonLoader(..., cycle_length=bands) and call "
                "dpkit.noise.bandmf.check_loader(private.data_loader, private.noise) before the first step.")
        if self._std is not None and std != self._std:
            raise PrivacyUsageError(f"the noise std changed from {self._std:g} to {std:g} during a BandMF run; its "
                                    "accounting assumes one noise multiplier and clip norm throughout.")
        self._std = std
        if std == 0:
            return clipped_sum
        out = clipped_sum.contiguous().view(-1)
        key = f"{out.device}|{out.dtype}|{out.numel()}"
        history = self._history.setdefault(key, [])
        y = self._draws.add(torch.zeros_like(out), std=std)  # z_t; every y_{t−j} is still needed, so a new buffer
        for c, past in zip(self.coefficients[1:], history):
            y.sub_(past, alpha=c)
        y.div_(self.coefficients[0])
        out.add_(y)
        if self.bands > 1:
            history.insert(0, y)
            del history[self.bands - 1:]
        return out.view(clipped_sum.shape)

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent:
        """One group's Poisson-sampled Gaussian every ``L`` released steps, nothing in between."""
        binding = self._binding
        if binding is None or sample_rate != binding.sample_rate:
            raise PrivacyUsageError(
                f"BandMF was asked for the event of sample rate {sample_rate}, but its checked cyclic loader has "
                f"{None if binding is None else binding.sample_rate}: the accounting would not match the sampling.")
        first_of_cycle = self._released % binding.cycle_length == 0
        self._released += 1
        if not first_of_cycle:
            return NoOpEvent()
        return PoissonSampledEvent(binding.group_sample_rate, GaussianEvent(noise_multiplier))

    def calibrate(self, *, target_epsilon: float, target_delta: float, steps: int, accountant: str = "prv") -> float:
        """The smallest noise multiplier whose ε after ``steps`` steps of this mechanism is at most the target."""
        from dpkit.accounting import get_noise_multiplier

        if self._binding is None:
            raise PrivacyUsageError("calibrate needs the cyclic loader: call check_loader(loader, mechanism) first.")
        return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                    sample_rate=self._binding.group_sample_rate,
                                    steps=math.ceil(steps / self._binding.cycle_length), accountant=accountant)

    def state_dict(self) -> dict[str, Any]:
        """Outside secure mode: the generator, the step count and the last ``b−1`` noise vectors, so a resumed run
        draws exactly the noise an uninterrupted one would. In secure mode no noise is kept (see load_state_dict)."""
        state = {"coefficients": list(self.coefficients), "released": self._released, "std": self._std,
                 "draws": self._draws.state_dict()}
        if not self.secure_mode:
            state["history"] = {k: [t.clone() for t in ts] for k, ts in self._history.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the recursion. A secure-mode checkpoint holds no noise, so the recursion restarts: the run's
        ``C`` becomes block-diagonal in two banded blocks, each column still of norm ≤ 1, so the accounting holds."""
        if not isinstance(state, Mapping) or "coefficients" not in state:
            raise ValueError("noise state is not a state_dict() of BandMF")
        if tuple(state["coefficients"]) != self.coefficients:
            raise PrivacyUsageError(f"the checkpoint's BandMF coefficients {state['coefficients']} differ from this "
                                    f"run's {list(self.coefficients)}; resume with the same bands.")
        self._draws.load_state_dict(state["draws"])
        history = state.get("history", {})
        if not self.secure_mode and any(len(ts) > self.bands - 1 for ts in history.values()):
            raise ValueError("noise state: a BandMF history longer than bands − 1")
        self._history = {k: [t.clone() for t in ts] for k, ts in history.items()}
        self._released, self._std = int(state["released"]), state["std"]


def check_loader(loader: object, mechanism: BandMF) -> None:
    """Raise unless ``loader`` samples as ``mechanism``'s accounting requires, then bind them.

    The loader must be a :class:`dpkit.data.CyclicPoissonLoader` whose cycle is at least the bands (any two
    participations of an example are then ≥ b steps apart, so they touch disjoint rows of ``C``), on one process.
    """
    from dpkit.data import CyclicPoissonLoader

    if not isinstance(mechanism, BandMF):
        raise TypeError(f"check_loader checks a BandMF mechanism, got {type(mechanism).__name__}")
    if not isinstance(loader, CyclicPoissonLoader):
        raise PrivacyUsageError(
            f"noise='bandmf' needs cyclic Poisson sampling, and the data loader is a {type(loader).__name__}: its "
            "privacy analysis (Choquette-Choo et al. 2023) holds only when each example can join one step in every "
            f"{mechanism.bands}. Use dpkit.data.CyclicPoissonLoader(dataset, group_sample_rate, "
            f"cycle_length={mechanism.bands}).")
    if loader.cycle_length < mechanism.bands:
        raise PrivacyUsageError(f"the loader's cycle of {loader.cycle_length} steps is shorter than BandMF's "
                                f"{mechanism.bands} bands: one example could touch overlapping rows of C.")
    refuse_distributed_or_seeded(loader, mechanism, "bandmf")
    binding = _Binding(loader.cycle_length, loader.group_sample_rate, loader.sample_rate)
    if mechanism._binding not in (None, binding):
        raise PrivacyUsageError("this BandMF mechanism is already bound to a loader with another cycle or rate.")
    mechanism._binding = binding


_NAMED_BANDS = (2, 4, 8, 16, 32, 64)


@hookimpl
def dpkit_noise_mechanisms():
    table: dict[str, Any] = {"bandmf": BandMF}
    for b in _NAMED_BANDS:
        table[f"bandmf-{b}"] = _with_bands(b)
    return table


def _with_bands(bands: int):
    def factory(seed: int | None = None, secure_mode: bool = False) -> BandMF:
        return BandMF(seed=seed, secure_mode=secure_mode, bands=bands)

    factory.__qualname__ = factory.__name__ = f"BandMF[bands={bands}]"
    return factory
