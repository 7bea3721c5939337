"""BLT's sensitivity and ε against jax_privacy's, for the same parameters (no amplification: one Gaussian release).

The parameters are what ``dpkit.noise.blt.optimized_parameters(buffers, n, min_sep)`` chose, fixed here so the test
does not optimise. jax_privacy 2.0.0 (with dp_accounting 0.5, in a scratch environment, never a dependency):
``BufferedToeplitz.build(buf_decay, output_scale)``, ``toeplitz.minsep_sensitivity_squared(blt.toeplitz_coefs(n),
min_sep)`` and ``SingleReleaseTrainingAccountant(PldAccountantConfig(1e-4)).compute_epsilon(n, DpParams(
noise_multipliers=σ/Δ, delta=1e-5, ...))``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from dpkit.accountants.prv import PRVAccountant
from dpkit.data import CyclicPoissonLoader
from dpkit.events import GaussianEvent
from dpkit.noise.blt import BLTNoise, BLTParameters

JAX_PRIVACY = [  # (n, min_sep, σ, decays, scales, their Δ², their ε at δ = 1e-5)
    (2000, 2000, 3.0, [0.5410698006176963, 0.7890764844826105, 0.9737398137306378, 0.9984575287460034],
     [0.16725369337900603, 0.15588602228667447, 0.12814888438250208, 0.052831812742660994],
     3.282273883394986, 2.462819141337181),
    (2000, 100, 10.0, [0.5738413434277501, 0.9845496247811178, 0.2868218163705834, 0.14340098847234517],
     [0.25566844454798743, 0.2529568597860059, 0.0004913272763694559, 0.0004908614872257629],
     94.44163237102666, 4.234779359106327),
    (512, 16, 8.0, [0.9169029156826918, 0.9179614258735102], [0.5583796144790335, 0.007444654701023],
     149.66999628022262, 7.216348589470446),
    (128, 64, 2.0, [0.503612461592972, 0.5136978443123587, 0.7059717503538796, 0.9595730028419075],
     [0.2007748572951017, 0.021806490581026496, 1.1179126586845926e-05, 0.28531378734922525],
     4.880569272403278, 4.913524766194361),
    (1000, 50, 12.0, [0.3403990977599634, 0.9693603113947044, 0.16998189429420052, 0.0849570892621032,
                      0.04248023225596688, 0.021239035271086594, 0.010619453059764203, 0.005309734136667333],
     [0.1715634555625763, 0.34863884911588056, 0.0004797287098426351, 0.00047917415385992737,
      0.0004787181621161347, 0.00047824027821757685, 0.00047773193371248755, 0.0004774031765118138],
     89.12331502152772, 3.3228078670544248),
]


def ledger_epsilon(n: int, min_sep: int, sigma: float, decays, scales) -> float:
    """ε of what the mechanism's ledger holds after ``n`` steps on a cyclic loader of ``min_sep`` groups."""
    mechanism = BLTNoise(decays=decays, scales=scales)
    loader = CyclicPoissonLoader(TensorDataset(torch.zeros(min_sep, 1)), 1.0, min_sep)
    mechanism.check_loader(loader)
    counter = PRVAccountant()
    for _ in range(n):
        counter.compose(mechanism.dp_event(sigma, loader.sample_rate))
    return counter.epsilon(1e-5)


@pytest.mark.parametrize(("n", "min_sep", "sigma", "decays", "scales", "their_sens2", "their_eps"), JAX_PRIVACY)
def test_sensitivity_and_epsilon_match_jax_privacy(n, min_sep, sigma, decays, scales, their_sens2, their_eps):
    """Δ² to 1e-12; ε of the exact sensitivity within 0.1% (measured: 4e-6 to 5e-5); the ledger's ε, which
    charges Δ² in 1/1024 units, above theirs by at most what a 1/1024 unit adds and within 0.1%."""
    sens2 = BLTParameters(decays, scales).sensitivity_squared(n, min_sep)[-1]
    assert sens2 == pytest.approx(their_sens2, rel=1e-12)
    exact = PRVAccountant().compose(GaussianEvent(sigma / math.sqrt(sens2))).epsilon(1e-5)
    assert exact == pytest.approx(their_eps, rel=1e-3)
    one_unit_more = PRVAccountant().compose(GaussianEvent(sigma / math.sqrt(sens2 + 1 / 1024))).epsilon(1e-5)
    ledger = ledger_epsilon(n, min_sep, sigma, decays, scales)
    assert their_eps * (1 - 1e-4) <= ledger <= one_unit_more and ledger == pytest.approx(their_eps, rel=1e-3)
