"""Canaries for BandMF and BLT: on the cyclic loader's schedule, scored after whitening by the mechanism's C.
The whitened scores against a dense-matrix computation, then real runs with correct and broken noise."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import dpkit
from dpkit import audit, cli, registry
from dpkit.audit.correlated import Schedule, WhitenedTape
from dpkit.cli._common import EXIT_OK
from dpkit.errors import PrivacyUsageError
from dpkit.hookspecs import hookimpl
from dpkit.noise.bandmf import BandMF
from dpkit.noise.blt import BLTNoise


def test_whitened_scores_are_the_dense_log_likelihood_ratios():
    """Releases x + C⁻¹z of a 3-band C over 12 steps, with canaries on a cycle of 3 joining at rate 1/2: each score
    is the sum over its group's steps s of the LLR of v_s = Σ_k c_k (C y)_{s+k}, here computed with dense matrices."""
    rng = np.random.default_rng(0)
    m, T, L, q, C, std = 50, 12, 3, 0.5, 2.0, 3.0
    c = np.array([0.8, 0.5, 0.33])
    c = c / np.linalg.norm(c)
    matrix = sum(np.diag(np.full(T - k, c[k]), -k) for k in range(3))
    groups = rng.integers(0, L, m)
    schedule = Schedule(L, q, torch.as_tensor(groups), torch.ones(m, dtype=torch.float64), BandMF(bands=3, coefficients=c))
    signs = rng.choice([-1.0, 1.0], (m, T))
    joined = (np.arange(T)[None, :] % L == groups[:, None]) & (rng.random((m, T)) < q)
    released = joined * signs * C + rng.normal(0, std, (m, T)) @ np.linalg.inv(matrix).T  # rows: y = x + C⁻¹z
    tape = WhitenedTape(m, schedule)
    for t in range(T):
        tape.record(t, torch.arange(m), torch.as_tensor(released[:, t]), torch.as_tensor(signs[:, t]),
                    torch.zeros(0), C, q, std)
    whitened = released @ matrix.T
    expected = np.zeros(m)
    for j in range(m):
        for s in range(groups[j], T, L):
            window = min(3, T - s)
            rho = float((c[:window] ** 2).sum())
            v = float(whitened[j, s:s + window] @ c[:window]) * signs[j, s]
            a = (v - C * rho / 2) * C / std**2
            expected[j] += math.log(1 - q + q * math.exp(a))
    assert torch.allclose(tape.scores()[0], torch.as_tensor(expected), rtol=1e-5, atol=1e-4)
    assert tape.threshold() is None and tape.families == ("whitened by C",)


class ShrunkBandMF(BandMF):
    """BandMF-4 drawing a fifth of the noise it is asked for."""

    def __init__(self, seed=None, secure_mode=False):
        super().__init__(seed=seed, secure_mode=secure_mode, bands=4)

    def add(self, clipped_sum, *, std):
        return super().add(clipped_sum, std=0.2 * std)


class ShrunkBLT(BLTNoise):
    """BLT whose fresh draws are a fifth of the std asked for."""

    def add(self, clipped_sum, *, std):
        draw = self._draws.add
        self._draws.add = lambda t, std: draw(t, std=0.2 * std)
        try:
            return super().add(clipped_sum, std=std)
        finally:
            del self._draws.add


class Shrunk:
    @staticmethod
    @hookimpl
    def dpkit_noise_mechanisms():
        return {"shrunk-bandmf": ShrunkBandMF, "shrunk-blt": ShrunkBLT}


@pytest.fixture
def shrunk(fresh_registry):
    registry.register_plugin(Shrunk, name="shrunk_correlated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dpkit.PluginOverrideWarning)
        yield


RUN = {"steps": 40, "canaries": 3000}  # cycle 4: 10 steps per canary's group; claimed epsilon 1.20 (BandMF)


@pytest.mark.parametrize("noise", ["bandmf-4", "blt"])
def test_correct_correlated_noise_passes(noise):
    report = audit.bundled_audit(noise=noise, **RUN)
    assert not report.violated and not report.suspect, str(report)
    assert report.bounds.fdp.epsilon > 0.1  # the whitened scores carry evidence: not a vacuous pass
    assert report.bounds.one_run.family == "whitened by C"


@pytest.mark.parametrize("noise", ["shrunk-bandmf", "shrunk-blt"])
def test_a_fifth_of_the_noise_is_a_proven_violation(shrunk, noise):
    report = audit.bundled_audit(noise=noise, **RUN)
    assert report.violated and report.bounds.proven > 1.5 * report.accountant_epsilon, str(report)


def test_dpkit_audit_runs_on_bandmf_and_blt():
    assert cli.main(["audit", "--noise", "bandmf", "--steps", "4", "--canaries", "100"]) == EXIT_OK
    assert cli.main(["audit", "--noise", "blt", "--steps", "4", "--canaries", "100"]) == EXIT_OK


def test_an_audit_attached_mid_run_is_refused_at_scoring():
    model = torch.nn.Linear(6, 2)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 2, (32,)))
    loader = dpkit.data.CyclicPoissonLoader(data, 1.0, 2, generator=torch.Generator().manual_seed(0))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, noise="bandmf-2",
                                 criterion=torch.nn.CrossEntropyLoss())
    model, optimizer, loader, criterion = private
    batches = iter(loader)

    def step():
        x, y = next(batches)
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    step()
    canary = audit.CanaryAudit.attach(private, canaries=10, seed=0)
    step()
    with pytest.raises(PrivacyUsageError, match="attach it before the first step"):
        canary.report(1e-5)


def test_at_group_rate_1_the_score_is_the_whole_sequence_likelihood_ratio():
    """Fixed groups (rate 1): each canary joins every step of its group with one gradient ±C, so its whitened
    signal u = C·d is known and the score is Σ_t (w_t u_t C - C² u_t²/2) / std², here with dense matrices."""
    rng = np.random.default_rng(1)
    m, T, L, C, std = 40, 10, 2, 1.5, 2.0
    c = np.array([0.9, 0.4])
    c = c / np.linalg.norm(c)
    matrix = np.diag(np.full(T, c[0])) + np.diag(np.full(T - 1, c[1]), -1)
    groups, signs = rng.integers(0, L, m), rng.choice([-1.0, 1.0], m)
    d = (np.arange(T)[None, :] % L == groups[:, None]) * signs[:, None]  # each canary's signed participations
    included = rng.random(m) < 0.5
    released = included[:, None] * d * C + rng.normal(0, std, (m, T)) @ np.linalg.inv(matrix).T
    schedule = Schedule(L, 1.0, torch.as_tensor(groups), torch.as_tensor(signs), BandMF(bands=2, coefficients=c))
    tape = WhitenedTape(m, schedule)
    for t in range(T):
        tape.record(t, torch.arange(m), torch.as_tensor(released[:, t]), torch.as_tensor(d[:, t]), torch.zeros(0),
                    C, 1.0, std)
    w, u = released @ matrix.T, d @ matrix.T
    expected = ((w * u * C - C * C * u * u / 2) / std**2).sum(1)
    assert torch.allclose(tape.scores()[0], torch.as_tensor(expected), rtol=1e-5, atol=1e-4)
    assert tape.threshold() == 0.0
    assert ((tape.scores()[0].numpy() > 0) == included).mean() > 0.6  # it tells the included apart
