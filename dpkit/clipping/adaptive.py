"""Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping").

The bound C tracks a target quantile γ of the per-example gradient norms, so it
need not be tuned and follows the norms as they shrink during training. Each
step privately estimates the fraction b̄ of the batch with ‖g_i‖ ≤ C and moves C
geometrically: ``C ← C·exp(−η_C (b̄ − γ))``. Too many unclipped examples
(b̄ > γ) shrink C; too few grow it.

Privacy. The count is centred, Σ_i (1[‖g_i‖ ≤ C] − ½), so adding or removing one
example moves it by exactly ½; it gets N(0, σ_b²) noise and is divided by the
*expected* batch size m (the actual size of a Poisson batch is private). On its
own that is a Gaussian mechanism with noise multiplier 2σ_b on the Poisson
sample, which :meth:`AdaptiveClipper.dp_event` reports.

The count and the gradient are released on the *same* Poisson sample, so the
engine records both Gaussians under one ``PoissonSampledEvent`` (composing two
independently sampled events would under-count ε); together they are one Gaussian
with σ_eff = (σ⁻² + (2σ_b)⁻²)^(−1/2), so adaptive clipping costs more than flat
clipping at the same σ. To spend exactly the budget of plain DP-SGD at σ, give the
gradient σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) (:func:`gradient_noise_multiplier`, Andrew
et al. Theorem 1).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dpkit import distributed
from dpkit.clipping import ClipperBase, check_norm
from dpkit.clipping.flat import STABILITY
from dpkit.errors import PrivacyUsageError
from dpkit.events import DpEvent, GaussianEvent, PoissonSampledEvent
from dpkit.hookspecs import hookimpl


def gradient_noise_multiplier(total_noise_multiplier: float, count_noise_multiplier: float) -> float:
    """σ_Δ for the gradient such that the gradient at σ_Δ and the count at σ_b together cost what σ alone would."""
    rest = total_noise_multiplier ** -2 - (2 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise ValueError(f"count_noise_multiplier={count_noise_multiplier} spends the whole budget of noise "
                         f"multiplier {total_noise_multiplier}; it must exceed {total_noise_multiplier / 2}.")
    return rest ** -0.5


class AdaptiveClipper(ClipperBase):
    """Flat clipping at a bound C that follows the ``target_unclipped_quantile`` of the norms.

    Args:
        max_grad_norm: the initial C.
        target_unclipped_quantile: γ, the fraction of examples meant to stay unclipped.
        clip_lr: η_C, the step size of the geometric update of C.
        count_noise_multiplier: σ_b, the std of the noise on the centred count (required:
            it decides the privacy spent; Andrew et al. suggest expected_batch_size / 20).
        expected_batch_size: m, the divisor of the noisy count: the expected (public) batch
            size q·N. Takes precedence over the one an engine passes to :meth:`end_step`.
    """

    def __init__(self, max_grad_norm: float, target_unclipped_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_noise_multiplier: float | None = None, expected_batch_size: float | None = None):
        self.max_grad_norm = check_norm(max_grad_norm)
        if not (isinstance(target_unclipped_quantile, (int, float)) and 0 <= target_unclipped_quantile <= 1):
            raise ValueError(f"target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile!r}")
        if not (isinstance(clip_lr, (int, float)) and math.isfinite(clip_lr) and clip_lr >= 0):
            raise ValueError(f"clip_lr must be a finite number >= 0, got {clip_lr!r}")
        if count_noise_multiplier is None:
            raise ValueError("adaptive clipping spends privacy on a noisy count of unclipped examples: give "
                             "clipping_kwargs={'count_noise_multiplier': σ_b} (Andrew et al. suggest "
                             "expected_batch_size / 20).")
        self.target = float(target_unclipped_quantile)
        self.clip_lr = float(clip_lr)
        self.count_noise_multiplier = check_norm(count_noise_multiplier, "count_noise_multiplier")
        self.expected_batch_size = (None if expected_batch_size is None
                                    else check_norm(expected_batch_size, "expected_batch_size"))
        self._centred_count: Tensor | None = None  # Σ_i (1[‖g_i‖ ≤ C] − ½) of this step's backward passes

    def factors(self, norms: Tensor) -> Tensor:
        return (self.max_grad_norm / (norms + STABILITY)).clamp(max=1.0)

    def observe(self, norms: Tensor) -> None:
        centred = (norms <= self.max_grad_norm).float().sum() - norms.numel() / 2
        self._centred_count = centred if self._centred_count is None else self._centred_count + centred

    def end_step(self, noise: Any, expected_batch_size: float | None = None) -> None:
        """Noise the step's count with the noise mechanism's (checkpointed) generator and update C."""
        m = self.expected_batch_size or expected_batch_size
        if m is None:
            raise PrivacyUsageError(
                "adaptive clipping divides its noisy count by the expected batch size, which this run does not "
                "know; give clipping_kwargs={'expected_batch_size': sample_rate * len(dataset)}.")
        count = self._centred_count if self._centred_count is not None else torch.zeros(())
        if distributed.rank() == 0:  # the count is noised once, by rank 0, before the ranks' counts are summed
            if getattr(noise, "secure_mode", False):  # the OS's CSPRNG, as secure mode's gradient noise
                from dpkit import secure

                draw = secure.normal(1, device=count.device)[0]
            else:
                draw = torch.randn((), generator=noise.generator(count.device), device=count.device)
            count = count + self.count_noise_multiplier * draw
        if distributed.world_size() > 1:
            count = count.to(torch.float64)
            dist.all_reduce(count)  # every rank gets the same noisy global count, so the same new C
        unclipped_fraction = float(count) / m + 0.5
        self.max_grad_norm *= math.exp(-self.clip_lr * (unclipped_fraction - self.target))
        self._centred_count = None

    def dp_event(self, sample_rate: float) -> DpEvent:
        return PoissonSampledEvent(sample_rate, GaussianEvent(2 * self.count_noise_multiplier))

    def gradient_noise_multiplier(self, total_noise_multiplier: float) -> float:
        """The gradient's share of a budget calibrated for noise multiplier σ alone (σ_Δ of Andrew et al.)."""
        return gradient_noise_multiplier(total_noise_multiplier, self.count_noise_multiplier)

    def state_dict(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_grad_norm = float(state["max_grad_norm"])


@hookimpl
def dpkit_clippers():
    return {"adaptive": AdaptiveClipper}
