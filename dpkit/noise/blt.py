"""Buffered linear Toeplitz (BLT) noise: BandMF's error in a few buffers (McMahan, Xu & Zhang 2024, arXiv 2408.08868;
Dvijotham et al. 2024, arXiv 2404.16706).

**Mechanism.** ``C`` is lower-triangular Toeplitz with ``c_0 = 1`` and ``c_t = Σ_i ω_i θ_i^{t−1}`` (``d ≤ 8`` buffers,
decays ``θ_i`` and scales ``ω_i``). Its inverse is again a BLT, ``ĉ_t = Σ_i ω̂_i θ̂_i^{t−1}``: ``C(x) = P(x)/Q(x)`` with
``Q = Π(1 − θ_i x)``, so ``C⁻¹ = Q/P``, the ``θ̂_i`` the reciprocal roots of ``P`` and the ``ω̂_i`` its partial
fractions. Step ``t`` adds ``(C⁻¹z)_t = z_t + Σ_i ω̂_i s_i`` to the clipped sum and then updates
``s_i ← θ̂_i s_i + z_t``, ``z_t ~ N(0, (σC_clip)²)`` i.i.d.: ``d`` buffers of the parameters' size, where BandMF with
``b`` bands keeps ``b − 1``.

**Parameters.** ``θ_i = sigmoid(a_i)`` and ``ω_i = e^{b_i}/(1 + Σ_j e^{b_j})`` (so ``Σ ω_i < 1``) are optimised
(L-BFGS) for the run's length ``n`` and its loader's cycle ``L``: the mean squared prefix-sum error times the
sensitivity squared (jax_privacy's ``'mean'`` loss). This keeps three facts true by construction: ``C``'s
coefficients are positive and non-increasing (``c_1 = Σω < 1``, then geometric decay); ``P`` has ``d`` distinct real
roots (``C(x)`` increases between its poles), all with ``|θ̂| < 1`` (one may be in ``(−1, 0)`` since
``C(−1) = 1 − Σ ω/(1+θ) > 0``), so the noise recursion is stable; and the sensitivity below is exact.

**Privacy.** The loader is a :class:`dpkit.data.CyclicPoissonLoader` whose step ``t`` uses group ``t mod L``, so an
example's participations are at least ``L`` steps apart. For Toeplitz ``C`` with non-negative non-increasing
coefficients the worst such pattern is ``0, L, 2L, …`` (every Gram entry ``Σ_s c_s c_{s+|p−q|}`` over the rows that
exist grows as participations move earlier and closer; arXiv 2405.13763, Theorem 2): after ``t + 1`` steps
``Δ_t² = Σ_{r≤t} h_r²``, ``h_r = Σ_{m: mL ≤ r} c_{r−mL}``. The ``t + 1`` releases are ``C x + z`` up to an invertible
post-processing, a Gaussian mechanism of sensitivity ``Δ_t`` (adaptive inputs included, as ``C`` is lower-triangular:
Denisov et al. 2022). Sampling within a group is **not** credited: joint convexity of the hockey-stick divergence
bounds the Poisson mixture by its worst case, all slots taken, so the bound holds for any group rate and is exact at
rate 1 (fixed groups), over-stating ε below it. Amplified BLT accounting needs a harder analysis (MMCC).

**Ledger.** ``Δ_t²`` grows with ``t``; the ledger charges it in units ``GaussianEvent(32σ)`` (``1/1024`` of a unit
sensitivity², ``Δ_0² = 1``): after step ``t`` it holds ``⌈1024 Δ_t²⌉`` of them, never less than ``μ_t² = Δ_t²/σ²`` and at
most 1/1024 above it, and one atom for the accountants whatever the run's length. A restarted stream (a secure-mode
resume, a buffer that appears mid-run) makes ``C`` block-diagonal: each block's Gram entries are at most the
unbroken ``C``'s, so the charge still bounds it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from dpkit import distributed
from dpkit.errors import PrivacyUsageError
from dpkit.events import DpEvent, GaussianEvent, NoOpEvent, SelfComposedEvent
from dpkit.hookspecs import hookimpl
from dpkit.noise import _toeplitz
from dpkit.noise.gaussian import GaussianNoise
from dpkit.noise._loaders import refuse_distributed_or_seeded

MAX_BUFFERS = 8
UNITS = 1024  # ledger charges per unit of sensitivity² (1/64 over-reported ε by up to 0.25%)
_GAP = 1e-3  # the least gap between an optimised BLT's decays, and its inverse's


def _polynomials(decays: Sequence[float], scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q)`` in ascending powers of ``x`` with ``C(x) = P(x)/Q(x)``."""
    q = np.ones(1)
    for theta in decays:
        q = np.convolve(q, [1.0, -theta])
    p = np.concatenate([q, [0.0]])
    for i, omega in enumerate(scales):
        others = np.ones(1)
        for j, theta in enumerate(decays):
            if j != i:
                others = np.convolve(others, [1.0, -theta])
        p[1:len(others) + 1] += omega * others
    return p[:len(q)], q


@attrs.frozen
class BLTParameters:
    """``C``'s decays ``θ`` and scales ``ω``; checked so that the accounting's facts (module docstring) hold."""

    decays: tuple[float, ...] = attrs.field(converter=lambda v: tuple(float(x) for x in v))
    scales: tuple[float, ...] = attrs.field(converter=lambda v: tuple(float(x) for x in v))

    def __attrs_post_init__(self):
        d = len(self.decays)
        if not 1 <= d <= MAX_BUFFERS or len(self.scales) != d:
            raise ValueError(f"a BLT needs 1 to {MAX_BUFFERS} decays and as many scales, got {self.decays!r}, "
                             f"{self.scales!r}")
        if not all(0 < t < 1 for t in self.decays) or not all(w > 0 for w in self.scales) or sum(self.scales) >= 1:
            raise ValueError(f"BLT parameters need decays in (0, 1), scales > 0 and sum(scales) < 1 (C's coefficients "
                             f"then decrease, which its sensitivity needs); got {self.decays!r}, {self.scales!r}")
        if d > 1 and min(np.diff(sorted(self.decays))) < 1e-6:
            raise ValueError(f"BLT decays must differ by at least 1e-6 (C⁻¹ is ill-conditioned), got {self.decays!r}")

    def strategy_coefficients(self, n: int) -> np.ndarray:
        """``c_0..c_{n−1}``."""
        powers = np.asarray(self.decays)[None, :] ** np.arange(max(n - 1, 0))[:, None]
        return np.concatenate([[1.0], powers @ np.asarray(self.scales)])[:n]

    def noise_coefficients(self, n: int) -> np.ndarray:
        """``ĉ_0..ĉ_{n−1}`` of ``C⁻¹ = Q/P``, by the rational recursion (not the partial fractions)."""
        p, q = _polynomials(self.decays, self.scales)
        impulse = np.zeros(n)
        impulse[0] = 1.0
        from scipy import signal  # on use: this plugin loads with every plugin manager

        return signal.lfilter(q, p, impulse)

    @functools.cached_property
    def inverse(self) -> tuple[np.ndarray, np.ndarray]:
        """``(θ̂, ω̂)`` of ``C⁻¹`` as a BLT: ``θ̂`` the reciprocal roots of ``P``, ``ω̂`` the residues."""
        p, q = _polynomials(self.decays, self.scales)
        roots = np.roots(p[::-1])
        if len(roots) != len(self.decays) or np.abs(roots.imag).max() > 1e-9:
            raise ValueError(f"C⁻¹ of the BLT {self} is not a real BLT of {len(self.decays)} buffers")
        decays = 1.0 / roots.real
        remainder = -(p - q)[1:]  # R(x) = (Q − P)/x
        scales = np.array([np.polyval(remainder[::-1], 1 / t) / np.prod(np.delete(1 - decays / t, i))
                           for i, t in enumerate(decays)])
        if np.abs(decays).max() >= 1:
            raise ValueError(f"C⁻¹ of the BLT {self} has a decay of modulus >= 1: its noise would grow without bound")
        return decays, scales

    def sensitivity_squared(self, n: int, min_sep: int) -> np.ndarray:
        """``Δ_t²`` for ``t < n``: participations ``0, L, 2L, …``, the worst for these coefficients."""
        c = self.strategy_coefficients(n)
        padded = np.zeros(math.ceil(n / min_sep) * min_sep)
        padded[:n] = c
        h = padded.reshape(-1, min_sep).cumsum(axis=0).reshape(-1)[:n]
        return np.cumsum(h * h)

    def rmse(self, n: int, min_sep: int) -> float:
        """``√(Δ_{n−1}² · ‖A C⁻¹‖_F² / n)``: the prefix sums' root mean squared error per unit ``σ``, at equal ε."""
        error = _toeplitz.prefix_sum_error(self.noise_coefficients(n)) / n
        return math.sqrt(self.sensitivity_squared(n, min_sep)[-1] * error)


def _from_free(x: np.ndarray) -> BLTParameters:
    d = len(x) // 2
    e = np.exp(np.clip(x[d:], -50, 50))
    return BLTParameters(1 / (1 + np.exp(-np.clip(x[:d], -50, 50))), e / (1 + e.sum()))


@functools.lru_cache(maxsize=32)
def optimized_parameters(buffers: int, steps: int, min_sep: int) -> BLTParameters:
    """The BLT of ``buffers`` buffers with the least :meth:`BLTParameters.rmse` for ``steps`` steps and cycle
    ``min_sep`` that L-BFGS finds (a local optimum, deterministic) from geometric spreads of decays and from the
    best BLT of one buffer fewer with a small buffer added, so that more buffers never do worse."""
    for name, value in (("buffers", buffers), ("steps", steps), ("min_sep", min_sep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if buffers > MAX_BUFFERS:
        raise ValueError(f"at most {MAX_BUFFERS} buffers, got {buffers}")

    def loss(x: np.ndarray) -> float:
        try:
            params = _from_free(x)
            inverse = params.inverse[0]  # a BLT whose inverse is not a stable real BLT is infeasible
        except ValueError:
            return 1e3
        if buffers > 1 and min(np.diff(np.sort(params.decays)).min(), np.diff(np.sort(inverse)).min()) < _GAP:
            return 1e3  # near-equal decays: partial fractions lose digits, and the buffer is wasted
        return math.log(params.rmse(steps, min_sep))

    starts = []
    for spread in (0.5, 1.0):
        rates = np.log(max(steps, 2)) * (np.arange(buffers) + 1) / buffers * spread
        decays = np.clip(1 - np.exp(-rates), 1e-3, 1 - 1e-9)  # memories of n^(k/d) steps
        starts.append(np.concatenate([np.log(decays / (1 - decays)), np.full(buffers, -math.log(buffers))]))
    if buffers > 1:
        fewer = optimized_parameters(buffers - 1, steps, min_sep)
        decays = np.array([*fewer.decays, min(fewer.decays) / 2])
        scales = np.array([*fewer.scales, 1e-3 * (1 - sum(fewer.scales))])
        starts.append(np.concatenate([np.log(decays / (1 - decays)), np.log(scales / (1 - scales.sum()))]))
    best, best_loss = starts[0], math.inf
    for start in starts:
        from scipy import optimize

        result = optimize.minimize(loss, start, method="L-BFGS-B")
        if result.fun < best_loss:
            best, best_loss = result.x, result.fun
    return _from_free(best)


@attrs.frozen
class _Binding:
    """What the checked loader tells the mechanism: its cycle (the min separation) and sample rate."""

    min_sep: int
    sample_rate: float


class BLTNoise:
    """BLT noise; a fresh instance per ``make_private``. Refuses to noise until :func:`check_loader` has bound it to a
    :class:`dpkit.data.CyclicPoissonLoader`, and then any step whose batch is not the loader's next one (a skipped
    batch, or a second step on one batch, would bring an example's participations closer than the cycle).

    ``steps`` is the run length the parameters are optimised for (``make_private_with_epsilon``'s ``steps`` serves
    too); ``decays`` and ``scales`` give the parameters instead. A run may go on past ``steps``: the accounting is
    per step, only the error is no longer optimal.
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False, buffers: int = 4, steps: int | None = None,
                 decays: Sequence[float] | None = None, scales: Sequence[float] | None = None):
        if distributed.world_size() > 1:
            raise PrivacyUsageError("noise='blt' does not support torch.distributed yet (world size "
                                    f"{distributed.world_size()}): train on one process, or use noise='gaussian'.")
        if (decays is None) != (scales is None):
            raise ValueError("give both decays= and scales= (a BLT's parameters), or neither")
        self.parameters = None if decays is None else BLTParameters(decays, scales)
        self.buffers = len(self.parameters.decays) if self.parameters else buffers
        if self.parameters is None:
            if isinstance(buffers, bool) or not isinstance(buffers, int) or not 1 <= buffers <= MAX_BUFFERS:
                raise ValueError(f"buffers must be an int in [1, {MAX_BUFFERS}], got {buffers!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.planned_steps, self.secure_mode = steps, secure_mode
        self._draws = GaussianNoise(seed=seed, secure_mode=secure_mode)
        self._state: dict[str, Tensor] = {}  # per flat buffer, the d buffers s_i as one (d, numel) tensor
        self._std: float | None = None
        self._released = 0
        self._binding: _Binding | None = None
        self._sampler: Any = None
        self._charged: np.ndarray | None = None  # ⌈1024 Δ_t²⌉ for the steps computed so far

    @property
    def seed(self) -> int | None:
        return self._draws.seed

    def check_loader(self, loader: object) -> None:
        check_loader(loader, self)

    def memory_bytes(self) -> int:
        """Bytes of noise state held: ``d × parameters × element size``."""
        return sum(t.numel() * t.element_size() for t in self._state.values())

    def resolved(self, steps: int | None = None) -> BLTParameters:
        """The parameters: given, or optimised for the run's length and the loader's cycle (fixed once chosen)."""
        if self.parameters is None:
            steps = self.planned_steps or steps
            if steps is None or self._binding is None:
                raise PrivacyUsageError(
                    "noise='blt' optimises its parameters for the run's length and its loader's cycle: check the "
                    "loader first (make_private does), and give noise_kwargs={'steps': n} or make_private_with_epsilon"
                    "(..., steps=n); or give the parameters as noise_kwargs={'decays': [...], 'scales': [...]}.")
            self.parameters = optimized_parameters(self.buffers, steps, self._binding.min_sep)
        return self.parameters

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        """Adds ``(C⁻¹z)_t = z_t + Σ ω̂_i s_i`` in place, then ``s_i ← θ̂_i s_i + z_t``."""
        self._check_step(std)
        decays, scales = self.resolved().inverse
        out = clipped_sum.contiguous().view(-1)
        key = f"{out.device}|{out.dtype}|{out.numel()}"
        state = self._state.get(key)
        if state is None:  # a new buffer starts its own stream (module docstring: the charge still bounds it)
            state = self._state[key] = torch.zeros(len(decays), out.numel(), dtype=out.dtype, device=out.device)
        z = self._draws.add(torch.zeros_like(out), std=std)
        out.add_(z)
        for i, (decay, scale) in enumerate(zip(decays.tolist(), scales.tolist())):
            out.add_(state[i], alpha=scale)
            state[i].mul_(decay).add_(z)
        return out.view(clipped_sum.shape)

    def _check_step(self, std: float) -> None:
        if self._binding is None:
            raise PrivacyUsageError(
                "noise='blt' is private only when an example's steps are at least a cycle apart: build the loader with "
                "dpkit.data.CyclicPoissonLoader(dataset, group_sample_rate, cycle_length) and call "
                "dpkit.noise.blt.check_loader(loader, mechanism) (make_private does) before the first step.")
        if std <= 0:
            raise PrivacyUsageError("noise='blt' needs noise_multiplier > 0: the engine does not count steps without "
                                    "noise, and the accounting follows the step count. Debug with noise='gaussian'.")
        if self._std is not None and std != self._std:
            raise PrivacyUsageError(f"the noise std changed from {self._std:g} to {std:g} during a BLT run; its "
                                    "accounting assumes one noise multiplier and clip norm throughout.")
        if self._sampler.position != self._released + 1:
            raise PrivacyUsageError(
                f"this step would be step {self._released + 1} of the BLT, but the loader has drawn "
                f"{self._sampler.position} batches: every step must use the loader's next batch, one step per batch, "
                "with num_workers=0 (a skipped batch or a second step on one batch brings an example's steps closer "
                "than the cycle the sensitivity assumes).")
        self._std = std

    def _units(self, step: int) -> int:
        """``⌈1024 Δ_step²⌉`` (0-based step), computed for a doubling horizon as the run goes on."""
        if self._charged is None or step >= len(self._charged):
            horizon = max(2 * step + 2, self.planned_steps or 0, 64)
            sensitivity = self.resolved().sensitivity_squared(horizon, self._binding.min_sep)
            self._charged = np.ceil(sensitivity * UNITS * (1 + 1e-12)).astype(np.int64)
        return int(self._charged[step])

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent:
        """The growth of ``⌈1024 Δ_t²⌉`` in ``GaussianEvent(32σ)`` units (module docstring)."""
        binding = self._binding
        if binding is None or sample_rate != binding.sample_rate:
            raise PrivacyUsageError(
                f"BLT was asked for the event of sample rate {sample_rate}, but its checked cyclic loader has "
                f"{None if binding is None else binding.sample_rate}: the accounting would not match the sampling.")
        step = self._released
        count = self._units(step) - (self._units(step - 1) if step else 0)
        self._released += 1
        if count == 0:
            return NoOpEvent()
        return SelfComposedEvent(GaussianEvent(noise_multiplier * math.sqrt(UNITS)), count)

    def calibrate(self, *, target_epsilon: float, target_delta: float, steps: int, accountant: str = "prv") -> float:
        """The smallest noise multiplier whose ε after ``steps`` steps of this BLT is at most the target."""
        from dpkit.accounting import get_noise_multiplier

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.resolved(steps)
        units = self._units(steps - 1)
        return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=1.0,
                                    steps=units, accountant=accountant) / math.sqrt(UNITS)

    def state_dict(self) -> dict[str, Any]:
        """The parameters, the generator, the step count and (outside secure mode) the buffers: a resumed run draws
        exactly the noise an uninterrupted one would. Secure mode saves no noise: the streams restart."""
        params = self.resolved()
        state = {"mechanism": "blt", "decays": list(params.decays), "scales": list(params.scales),
                 "released": self._released, "std": self._std, "draws": self._draws.state_dict()}
        if not self.secure_mode:
            state["buffers"] = {k: t.clone() for k, t in self._state.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the streams; the engine restores the loader's position after this."""
        if not isinstance(state, Mapping) or state.get("mechanism") != "blt":
            raise ValueError("noise state is not a state_dict() of BLTNoise")
        saved = BLTParameters(state["decays"], state["scales"])
        if saved != (self.parameters or saved) or len(saved.decays) != self.buffers:
            raise PrivacyUsageError(f"the checkpoint's BLT {saved} differs from this run's {self.parameters}; resume "
                                    "with the same parameters (or buffers and steps).")
        buffers = {} if self.secure_mode else state.get("buffers", {})
        if any(t.dim() != 2 or t.shape[0] != len(saved.decays) for t in buffers.values()):
            raise ValueError("noise state: BLT buffers of the wrong shape")
        released = state.get("released")
        if isinstance(released, bool) or not isinstance(released, int) or released < 0:
            raise ValueError(f"noise state: 'released' must be an int >= 0, got {released!r}")
        self._draws.load_state_dict(state["draws"])
        self.parameters, self._charged = saved, None
        self._state = {k: t.clone() for k, t in buffers.items()}
        self._released, self._std = released, state["std"]


def check_loader(loader: object, mechanism: BLTNoise) -> None:
    """Raise unless ``loader`` samples as ``mechanism``'s accounting requires, then bind them: a
    :class:`dpkit.data.CyclicPoissonLoader` (its cycle the min separation) on one process, secure if the mechanism
    is, that has drawn as many batches as the mechanism has released steps."""
    from dpkit.data import CyclicPoissonLoader

    if not isinstance(mechanism, BLTNoise):
        raise TypeError(f"check_loader checks a BLTNoise mechanism, got {type(mechanism).__name__}")
    if not isinstance(loader, CyclicPoissonLoader):
        raise PrivacyUsageError(
            f"noise='blt' needs cyclic Poisson sampling, and the data loader is a {type(loader).__name__}: its "
            "sensitivity holds only when an example's steps are at least a cycle apart, which Poisson sampling of the "
            "whole dataset or a fresh shuffle each epoch does not guarantee. Use dpkit.data.CyclicPoissonLoader("
            "dataset, group_sample_rate, cycle_length) (group rate 1: fixed groups, where BLT's bound is tight).")
    refuse_distributed_or_seeded(loader, mechanism, "blt")
    binding = _Binding(loader.cycle_length, loader.sample_rate)
    if mechanism._binding not in (None, binding):
        raise PrivacyUsageError("this BLT mechanism is already bound to a loader with another cycle or rate.")
    if loader.batch_sampler.position != mechanism._released:
        raise PrivacyUsageError(
            f"the loader has drawn {loader.batch_sampler.position} batches and the BLT has released "
            f"{mechanism._released} steps: they would be out of step. Use a fresh CyclicPoissonLoader for a new run.")
    mechanism._binding, mechanism._sampler = binding, loader.batch_sampler


@hookimpl
def dpkit_noise_mechanisms():
    return {"blt": BLTNoise}
