"""Lower-triangular Toeplitz helpers shared by the correlated-noise mechanisms (BandMF, BLT)."""
from __future__ import annotations

import numpy as np


def prefix_sum_error(noise_coefficients: np.ndarray) -> float:
    """Total squared error ``‖A C⁻¹‖_F²`` of the prefix sums (SGD's iterates) of ``n = len(noise_coefficients)``
    steps, given the Toeplitz coefficients of ``C⁻¹``: row ``t`` of ``A C⁻¹`` holds the partial sums ``b_0..b_t``
    of those coefficients, so the total is ``Σ_j (n − j)·b_j²``."""
    partial = np.cumsum(noise_coefficients)
    return float(np.dot(np.arange(len(partial), 0, -1), partial**2))
