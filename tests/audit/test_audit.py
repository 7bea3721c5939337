"""dpkit.audit: the lower bounds against closed forms and exact error rates, then real runs with correct and broken
noise. Correct noise must keep every bound below the accountant's epsilon; broken noise must push it far above."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import special, stats

import dpkit
from dpkit import audit, distributed, registry
from dpkit.errors import PrivacyUsageError
from dpkit.hookspecs import hookimpl
from dpkit.noise.gaussian import GaussianNoise

ALPHA = 0.05


# --- the one-run test ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guesses", [1, 2, 10, 100, 1000])
def test_one_run_all_right_is_the_closed_form(guesses):
    """δ = 0 and every guess right: the p-value is p^r, so the bound is logit(α^(1/r)) (0 when that is negative)."""
    p = ALPHA ** (1 / guesses)
    expected = max(0.0, math.log(p / (1 - p)))
    assert audit.one_run_epsilon(1000, guesses, guesses, 0.0) == pytest.approx(expected, abs=1e-5)


def _p_value_exact(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al.'s p-value (their App. D) in exact binomial sums: an independent computation of the formula."""
    p = Fraction(math.exp(eps) / (1 + math.exp(eps)))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=Fraction(0))
    return float(min(beta + 2 * m * Fraction(delta) * alpha, Fraction(1)))


@pytest.mark.parametrize(("m", "r", "v"), [(100, 20, 20), (100, 20, 17), (1000, 40, 38), (50, 50, 40)])
def test_one_run_bound_sits_at_the_exact_p_value_boundary(m, r, v):
    delta = 1e-4  # 2mδ of 0.02 to 0.2: the δ term matters
    eps = audit.one_run_epsilon(m, r, v, delta)
    assert eps > 0
    assert _p_value_exact(m, r, v, eps, delta) <= ALPHA < _p_value_exact(m, r, v, eps + 1e-3, delta)
    assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(_p_value_exact(m, r, v, eps, delta), rel=1e-9)


@pytest.mark.parametrize(("m", "eps"), [(100, 1.0), (1000, 2.0), (300, 0.5)])
def test_one_run_refutes_a_true_claim_at_most_alpha_of_the_time_and_is_tight(m, eps):
    """Randomized response is exactly ε-DP and each guess is right with probability e^ε/(1+e^ε): the exact
    probability that the test refutes the true ε is at most α, and close to it (the test is tight there)."""
    right = np.arange(m + 1)
    pmf = stats.binom.pmf(right, m, special.expit(eps))
    refuted = np.array([audit.one_run_p_value(m, m, int(v), eps, 0.0) <= ALPHA for v in right])
    assert 0.03 < pmf[refuted].sum() <= ALPHA


# --- the f-DP test ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0])
def test_gdp_epsilon_matches_the_accountant_of_a_gaussian_mechanism(mu):
    """μ-GDP is the Gaussian mechanism with noise multiplier 1/μ: the prv accountant computes it independently."""
    expected = dpkit.get_epsilon(noise_multiplier=1 / mu, sample_rate=1.0, steps=1, delta=1e-5)
    assert audit.gdp_epsilon(mu, 1e-5) == pytest.approx(expected, rel=1e-3)


def _ranked_gaussian_guesses(m: int, mu: float, trials: int, r: int, seed: int) -> np.ndarray:
    """Right guesses (top r/2 in, bottom r/2 out) on canaries whose scores are N(μ·included, 1): exactly μ-GDP."""
    rng = np.random.default_rng(seed)
    included = rng.random((trials, m)) < 0.5
    ranked = np.take_along_axis(included, np.argsort(rng.normal(size=(trials, m)) + mu * included, axis=1), axis=1)
    return ranked[:, m - (r + 1) // 2:].sum(1) + (~ranked[:, : r // 2]).sum(1)


def test_fdp_refutes_a_true_gaussian_claim_rarely_and_a_false_one_often():
    m, r, trials = 1000, 100, 2000
    right = _ranked_gaussian_guesses(m, 1.0, trials, r, seed=0)
    values, counts = np.unique(right, return_counts=True)

    def rate(mu: float) -> float:
        return sum(c for v, c in zip(values, counts) if audit.fdp_refutes(m, r, int(v), mu)) / trials

    assert rate(1.0) <= ALPHA  # the truth: refuted at most α of the time
    assert rate(0.5) > 0.8  # a claim twice as private: refuted most of the time


def test_fdp_mu_is_the_refutation_boundary():
    mu = audit.fdp_mu(1000, 200, 170)
    assert mu > 0
    assert audit.fdp_refutes(1000, 200, 170, mu)
    assert not audit.fdp_refutes(1000, 200, 170, mu * 1.01)
    assert audit.fdp_epsilon(1000, 200, 170, 1e-5) == audit.gdp_epsilon(mu, 1e-5)


def test_fdp_is_at_least_as_tight_as_one_run():
    """Mahloujifar et al.'s analysis under a Gaussian curve refutes at least what Steinke et al.'s does, wherever
    the evidence is worth reporting (below ε = 0.1 the one-run bound is sometimes a few hundredths higher)."""
    for m in (50, 1000):
        for r in audit.guess_counts(m):
            for v in range(r // 2, r + 1, max(1, r // 10)):
                one, fdp = audit.one_run_epsilon(m, r, v, 1e-5), audit.fdp_epsilon(m, r, v, 1e-5)
                assert fdp >= one * 0.98 or one < 0.1, (m, r, v, one, fdp)


def test_no_right_guess_refutes_nothing():
    assert audit.one_run_epsilon(100, 10, 0, 1e-5) == 0.0
    assert audit.fdp_epsilon(100, 10, 0, 1e-5) == 0.0


# --- from scores ---------------------------------------------------------------------------------------------------

def _released_scores(rng, m: int, steps: int, q: float, sigma: float, noise_scale: float) -> tuple[np.ndarray, ...]:
    """A DP-SGD run's release at m Dirac canaries (C = 1), simulated, and the log-likelihood-ratio scores that
    CanaryAudit computes from it under the claimed noise σ; ``noise_scale`` < 1 is a broken noise plugin."""
    included = rng.random(m) < 0.5
    sampled = included[:, None] & (rng.random((m, steps)) < q)
    shown = sampled + rng.normal(scale=noise_scale * sigma, size=(m, steps))
    a = (shown - 0.5) / sigma**2
    llr = a if q == 1 else np.logaddexp(math.log1p(-q), math.log(q) + a)
    return llr.sum(1), included


@pytest.mark.parametrize(("steps", "q", "sigma"), [(1, 1.0, 1.0), (100, 0.1, 1.0)])
def test_bounds_stay_below_the_accountant_over_many_seeds_and_exceed_it_with_broken_noise(steps, q, sigma):
    seeds, delta = 40, 1e-5
    eps = dpkit.get_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    rng = np.random.default_rng(0)
    cut = 0.0 if q == 1 else None  # as CanaryAudit guesses: by the sign of the exact LLR at q = 1, else the median
    correct = [audit.audit_scores(*_released_scores(rng, 1000, steps, q, sigma, 1.0), delta=delta, threshold=cut)
               for _ in range(seeds)]
    above = sum(b.epsilon > eps for b in correct)
    assert above <= 2, f"{above} of {seeds} runs put a lower bound above epsilon {eps:.3f}"  # ≤ 5% expected
    assert np.median([b.fdp.epsilon for b in correct]) > 0.2 * eps  # the audit has power: not a vacuous pass
    broken = [audit.audit_scores(*_released_scores(rng, 1000, steps, q, sigma, 0.1), delta=delta, threshold=cut)
              for _ in range(5)]
    assert all(b.proven > eps for b in broken) or eps > 5.0  # m = 1000 caps the proof near 5.0
    assert all(b.fdp.epsilon > eps for b in broken)


def test_audit_in_out_is_audit_scores_with_the_bits():
    rng = np.random.default_rng(1)
    scores, included = _released_scores(rng, 200, 1, 1.0, 0.5, 1.0)
    assert audit.audit_in_out(scores[included], scores[~included], delta=1e-5).epsilon == pytest.approx(
        audit.audit_scores(np.concatenate([scores[included], scores[~included]]),
                           np.repeat([True, False], [included.sum(), (~included).sum()]), delta=1e-5).epsilon)


@pytest.mark.parametrize(("scores", "included", "match"), [
    ([0.0, 1.0], [True], "one score per canary"),
    ([0.0, 1.0], [1, 0], "booleans"),
    ([0.0, float("nan")], [True, False], "NaN"),
])
def test_bad_scores_are_refused(scores, included, match):
    with pytest.raises(ValueError, match=match):
        audit.audit_scores(np.array(scores), np.array(included), delta=1e-5)


# --- gradient canaries in real runs --------------------------------------------------------------------------------

class ShrunkNoise(GaussianNoise):
    """A broken plugin: a tenth of the noise it is asked for."""

    def add(self, clipped_sum, *, std):
        return super().add(clipped_sum, std=0.1 * std)


class HalfNoise(GaussianNoise):
    """A broken plugin: noise on the first half of the buffer only."""

    def add(self, clipped_sum, *, std):
        super().add(clipped_sum.view(-1)[: clipped_sum.numel() // 2], std=std)
        return clipped_sum


class BrokenPlugins:
    @staticmethod
    @hookimpl
    def dpkit_noise_mechanisms():
        return {"shrunk": ShrunkNoise, "half": HalfNoise}


@pytest.fixture
def broken(fresh_registry):
    registry.register_plugin(BrokenPlugins, name="broken_noise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dpkit.PluginOverrideWarning)
        yield


RUN = {"steps": 25, "noise_multiplier": 10.0, "canaries": 1000}  # full batch: accountant epsilon 1.99 at 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_correct_noise_keeps_the_bounds_below_the_accountant(seed):
    report = audit.bundled_audit(seed=seed, **RUN)
    assert report.accountant_epsilon == pytest.approx(1.99, abs=0.01)
    assert 0 < report.bounds.one_run.epsilon <= report.bounds.fdp.epsilon < report.accountant_epsilon
    assert not report.violated and not report.suspect
    assert "consistent" in str(report)


@pytest.mark.parametrize("noise", ["shrunk", "half"])
def test_broken_noise_puts_the_bound_far_above_the_accountant(broken, noise):
    report = audit.bundled_audit(noise=noise, **RUN)
    assert report.bounds.proven > 1.5 * report.accountant_epsilon
    assert report.bounds.fdp.epsilon > 2.5 * report.accountant_epsilon
    assert report.violated and "VIOLATION" in str(report)


def test_run_bundled_audit_returns_the_report_text():
    text = audit.run_bundled_audit(steps=3, canaries=50, noise_multiplier=2.0)
    assert text.startswith("privacy audit after 3 steps") and "accountant prv" in text and "one-run" in text


def _private(noise_multiplier: float = 1.0, **kwargs) -> dpkit.PrivateTraining:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 2, (32,)))
    loader = dpkit.DPDataLoader(data, 1.0, generator=torch.Generator().manual_seed(0))
    return dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                              criterion=torch.nn.CrossEntropyLoss(), noise_seed=0, **kwargs)


def _step(private: dpkit.PrivateTraining) -> None:
    model, optimizer, loader, criterion = private
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()


def test_canaries_enter_the_step_as_examples_of_norm_C():
    """Without noise the released gradient is the clipped sum: it moves by ±C / (expected batch size) exactly at the
    included canaries' coordinates, and both score families read the inclusion back."""
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        plain, audited = _private(0.0), _private(0.0)
    canary = audit.CanaryAudit.attach(audited, canaries=40, seed=3)
    _step(plain)
    plain.detach()
    _step(audited)
    diff = torch.cat([(a.grad - b.grad).flatten() for a, b in zip(audited.params, plain.params)])
    moved = torch.zeros(diff.numel(), dtype=torch.bool)
    for p, rows, local in canary._where.values():
        start = sum(q.numel() for q in audited.params[: [id(q) for q in audited.params].index(id(p))])
        moved[start + local[canary.included[rows]]] = True
    assert torch.allclose(diff[moved].abs(), torch.full((int(moved.sum()),), 1.0 / 32), atol=1e-6)
    assert (diff[moved] > 0).any() and (diff[moved] < 0).any()  # each canary's sign is its own coin
    assert torch.all(diff[~moved].abs() < 1e-6)
    scores = canary.scores()
    assert scores.shape == (2, 40) and torch.isinf(scores).all()
    assert torch.equal(scores[0] > 0, canary.included) and torch.equal(scores[1] > 0, canary.included)


def test_audit_leaves_the_noise_interface_and_checkpoints_alone():
    private = _private(clipping="adaptive", clipping_kwargs={"count_noise_multiplier": 5.0,
                                                             "expected_batch_size": 32.0})
    noise = private.noise
    canary = audit.CanaryAudit.attach(private, canaries=10, seed=0)
    assert private.noise is canary and canary.seed == noise.seed and canary.secure_mode is False
    _step(private)  # adaptive clipping draws its count noise from noise.generator(), through the audit
    saved, own = private.state_dict()["noise"], noise.state_dict()
    assert saved["seed"] == own["seed"] and all(torch.equal(saved["generators"][d], g)
                                                for d, g in own["generators"].items())
    canary.detach()
    assert private.noise is noise


def test_audit_refuses_distributed_runs(monkeypatch):
    private, other = _private(), _private()
    canary = audit.CanaryAudit.attach(private, canaries=10, seed=0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(PrivacyUsageError, match="world size > 1"):
        audit.CanaryAudit.attach(other, canaries=10)
    with pytest.raises(PrivacyUsageError, match="world size > 1"):  # and at every step, before any canary
        canary.add(torch.zeros(3), std=1.0)


def test_audit_refuses_collisions():
    private = _private()
    audit.CanaryAudit.attach(private, canaries=10, seed=0)
    with pytest.raises(PrivacyUsageError, match="collide"):
        audit.CanaryAudit.attach(private, canaries=10, seed=1)
    with pytest.raises(ValueError, match="collide"):
        audit.CanaryAudit.attach(_private(), canaries=10_000)


def test_report_before_any_step_is_refused():
    with pytest.raises(PrivacyUsageError, match="no step"):
        audit.CanaryAudit.attach(_private(), canaries=10).report(1e-5)
