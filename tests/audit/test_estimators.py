"""dpkit.audit.estimators against jax_privacy's CanaryScoreAuditor on the same scores, and on their own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dpkit
from dpkit import audit
from dpkit.audit.estimators import CanaryScores

# jax_privacy 2.0.0 (pip install jax_privacy in a scratch venv, /work/scratch-audit/jax_ref.py), on the scores of
# _cases(): CanaryScoreAuditor(in, out) and its epsilon_clopper_pearson(0.05, delta, one_sided) ("cp_<delta>_<one
# sided>"), epsilon_raw_counts(10, delta, one_sided) ("raw_..."), epsilon_from_gdp(0.05, 1e-5) ("gdp") and
# (0.1, 1e-3), tpr_at_given_fpr([0, 0.01, 0.1, 0.37, 1]) and attack_auroc().
JAX_PRIVACY = {
    "gauss": {
        "cp_0.0_True": 1.152513943692972,
        "raw_0.0_True": 2.168237040462967,
        "cp_0.0_False": 1.152513943692972,
        "raw_0.0_False": 2.168237040462967,
        "cp_1e-05_True": 1.1523679370130608,
        "raw_1e-05_True": 2.168191287782342,
        "cp_1e-05_False": 1.1523679370130608,
        "raw_1e-05_False": 2.168191287782342,
        "gdp": 2.9856782332463427,
        "gdp_1e-3": 1.9291001360868603,
        "tpr": [0.08, 0.16, 0.3880851063829787, 0.7441880341880341, 1.0],
        "auroc": 0.7624166666666666,
    },
    "ties": {
        "cp_0.0_True": 2.0229520681169824,
        "raw_0.0_True": 1.9861986679694248,
        "cp_0.0_False": 2.0229520681169824,
        "raw_0.0_False": 1.9861986679694248,
        "cp_1e-05_True": 2.022866935833196,
        "raw_1e-05_True": 1.9861506412024972,
        "cp_1e-05_False": 2.022866935833196,
        "raw_1e-05_False": 1.9861506412024972,
        "gdp": 4.224927129714005,
        "gdp_1e-3": 3.314606193325912,
        "tpr": [0.176, 0.18727777777777777, 0.28877777777777774, 0.5730666666666666, 1.0],
        "auroc": 0.6804285714285715,
    },
    "reversed": {
        "cp_0.0_True": 0.0,
        "raw_0.0_True": 0.0,
        "cp_0.0_False": 0.0,
        "raw_0.0_False": 0.0,
        "cp_1e-05_True": 0.0,
        "raw_1e-05_True": 0.0,
        "cp_1e-05_False": 0.0,
        "raw_1e-05_False": 0.0,
        "gdp": 0.0,
        "gdp_1e-3": 0.0,
        "tpr": [0.0, 0.01, 0.1, 0.37, 1.0],
        "auroc": 0.5,
    },
    "strong": {
        "cp_0.0_True": 4.317270202172154,
        "raw_0.0_True": 4.401829261970061,
        "cp_0.0_False": 4.317270202172154,
        "raw_0.0_False": 4.401829261970061,
        "cp_1e-05_True": 4.317255473920244,
        "raw_1e-05_True": 4.401817006993008,
        "cp_1e-05_False": 4.317255473920244,
        "raw_1e-05_False": 4.401817006993008,
        "gdp": 15.454496317713902,
        "gdp_1e-3": 12.312197106837738,
        "tpr": [0.467, 0.816, 0.968, 0.9991680000000001, 1.0],
        "auroc": 0.988621,
    },
}


def _cases():
    rng = np.random.default_rng(0)
    yield "gauss", rng.normal(1.0, 1.0, 300).round(3), rng.normal(0.0, 1.0, 400).round(3)
    rng = np.random.default_rng(1)
    yield "ties", rng.integers(0, 12, 250) + 2, rng.integers(0, 12, 350)
    rng = np.random.default_rng(3)
    yield "reversed", rng.normal(-1.5, 1.0, 200).round(3), rng.normal(0.0, 1.0, 300).round(3)
    rng = np.random.default_rng(2)
    yield "strong", rng.normal(3.0, 1.0, 1000).round(4), rng.normal(0.0, 1.0, 1000).round(4)


@pytest.mark.parametrize(("name", "in_scores", "out_scores"), list(_cases()))
def test_matches_jax_privacy_on_the_same_scores(name, in_scores, out_scores):
    expected, scores = JAX_PRIVACY[name], CanaryScores(in_scores, out_scores)
    for delta in (0.0, 1e-5):
        for one_sided in (True, False):
            assert scores.epsilon_clopper_pearson(0.05, delta, one_sided) == pytest.approx(
                expected[f"cp_{delta}_{one_sided}"], abs=1e-6)
            assert scores.epsilon_raw_counts(10, delta, one_sided) == pytest.approx(
                expected[f"raw_{delta}_{one_sided}"], abs=1e-6)
    assert scores.epsilon_from_gdp(0.05, 1e-5) == pytest.approx(expected["gdp"], abs=1e-6)
    assert scores.epsilon_from_gdp(0.1, 1e-3) == pytest.approx(expected["gdp_1e-3"], abs=1e-6)
    assert scores.tpr_at_fpr(np.array([0.0, 0.01, 0.1, 0.37, 1.0])) == pytest.approx(expected["tpr"], abs=1e-9)
    assert scores.auroc() == pytest.approx(expected["auroc"], abs=1e-12)


def test_closed_forms():
    separated = CanaryScores([1.0, 2.0, 3.0], [0.0, -1.0])
    assert separated.auroc() == 1.0 and separated.tpr_at_fpr(0.0) == 1.0
    # three of four in-canaries above the one out-canary's score, one below: the hull joins (FPR, TPR) points
    # (0, 3/4) and (1, 1), so TPR at FPR 1/2 is 7/8 and the area is 7/8
    mixed = CanaryScores([1.0, 2.0, 3.0, -2.0], [0.0])
    assert mixed.tpr_at_fpr(0.5) == pytest.approx(7 / 8) and mixed.auroc() == pytest.approx(7 / 8)
    assert mixed.epsilon_raw_counts(1, 0.0) == 0.0  # at FPR 1 the TPR is 1: ln(1/1)


def test_the_bounds_refute_a_true_claim_at_most_alpha_of_the_time():
    """Independent canaries of exactly ε-DP randomized response (Clopper-Pearson) and of exactly μ-GDP Gaussian
    scores (Clopper-Pearson and the split GDP bound), 200 trials each: each bound exceeds the truth in at most 5%
    of them (10, or 12 for the split bound: its own ±2 of sampling error at 5% of 200), and the GDP bounds are the
    tighter ones on Gaussian scores. epsilon_from_gdp, which picks its thresholds from the same scores, exceeds
    the truth in 25 of these 200 Gaussian trials (jax_privacy's own, on its own 200 draws: 29; docs/auditing.md)."""
    rng = np.random.default_rng(0)
    eps, mu = 1.0, 1.0
    p = np.exp(eps) / (1 + np.exp(eps))
    truth = audit.gdp_epsilon(mu, 1e-5)
    over_rr = over_cp = over_split = 0
    for _ in range(200):
        rr = CanaryScores(rng.random(500) < p, rng.random(500) < 1 - p)
        over_rr += rr.epsilon_clopper_pearson(0.05) > eps
        gauss = CanaryScores(rng.normal(mu, 1, 500), rng.normal(0, 1, 500))
        over_cp += gauss.epsilon_clopper_pearson(0.05, 1e-5) > truth
        over_split += gauss.epsilon_from_gdp_split(0.05, 1e-5) > truth
    assert over_rr <= 10 and over_cp <= 10 and over_split <= 12
    strong = CanaryScores(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000))
    cp = strong.epsilon_clopper_pearson(0.05, 1e-5)
    assert strong.epsilon_from_gdp(0.05, 1e-5) > 2 * cp and strong.epsilon_from_gdp_split(0.05, 1e-5) > 1.5 * cp


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"in_scores": [], "out_scores": [0.0]}, "non-empty"),
    ({"in_scores": [float("nan")], "out_scores": [0.0]}, "NaN"),
])
def test_bad_scores_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CanaryScores(**kwargs)


def test_bad_levels_are_refused():
    scores = CanaryScores([1.0, 2.0], [0.0])
    for call, match in [(lambda: scores.epsilon_clopper_pearson(0.7), "significance"),
                        (lambda: scores.epsilon_from_gdp(0.05, 0.0), "delta must be > 0"),
                        (lambda: scores.epsilon_raw_counts(0), "min_count"),
                        (lambda: scores.tpr_at_fpr(1.5), "fpr")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_an_audit_hands_its_scores_to_the_estimators():
    """CanaryAudit.canary_scores: the claimed family split by the coins. On a full-batch run at noise multiplier 1
    (4 steps) the split Gaussian-based bound is above Clopper-Pearson's, and both are below the accountant's ε."""
    model = torch.nn.Linear(30, 40)
    data = torch.utils.data.TensorDataset(torch.randn(64, 30), torch.randint(0, 40, (64,)))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=dpkit.DPDataLoader(data, 1.0, generator=torch.Generator().manual_seed(0)),
                                 noise_multiplier=1.0, max_grad_norm=1.0, criterion=torch.nn.CrossEntropyLoss())
    canary = audit.CanaryAudit.attach(private, canaries=1200, seed=0)
    model, optimizer, loader, criterion = private
    for _ in range(4):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    scores = canary.canary_scores()
    assert scores.positives == int(canary.included.sum()) and scores.negatives == 1200 - scores.positives
    eps = private.epsilon(1e-5)
    cp, gdp = scores.epsilon_clopper_pearson(0.05, 1e-5), scores.epsilon_from_gdp_split(0.05, 1e-5)
    assert 0 < cp < gdp < eps and scores.auroc() > 0.8
