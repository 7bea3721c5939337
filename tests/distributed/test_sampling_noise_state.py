"""Global Poisson sampling, noise of std σC once per coordinate, checkpoints, and what is refused."""
from __future__ import annotations

import math

import pytest
import torch

import dpkit
from dpkit.errors import PrivacyUsageError
from tests.distributed import _launch
from tests.distributed._workers import N, train

STEPS, Q = 300, 0.2
CALLS = {  # name: (function, kwargs), all run in one launch of 2 ranks
    "sample": ("sample", {"steps": STEPS, "q": Q}),
    "sample-secure": ("sample", {"steps": STEPS, "q": Q, "secure": True}),
    "noisy": ("train", {"wrap": "ddp", "mode": "bk", "sigma": 2.0, "steps": 3}),
    "clean": ("train", {"wrap": "ddp", "mode": "bk", "sigma": 0.0, "steps": 3}),
    "straight": ("train", {"wrap": "ddp", "mode": "auto", "sigma": 1.0, "steps": 4, "q": 0.2}),  # 5 steps an epoch
    "first-half": ("train", {"wrap": "ddp", "mode": "auto", "sigma": 1.0, "steps": 2, "q": 0.2}),
    "other-noise-seeds": ("train", {"wrap": "ddp", "noise_seed": "rank"}),
    "other-weights": ("train", {"wrap": "none", "weights_seed": "rank"}),
    "local-loader": ("train", {"wrap": "ddp", "loader": "local"}),
    "wrapped-after": ("train", {"wrap": "ddp-after"}),
    "own-sampling": ("own_sampling", {}),
}


def _run(calls):
    from tests.distributed._workers import many

    rank = torch.distributed.get_rank()
    resolved = [(f, {k: (rank + 1 if v == "rank" else v) for k, v in kw.items()}) for f, kw in calls]
    out = many(resolved)
    half = out[list(CALLS).index("first-half")]  # resume the 2-step run for 2 more steps
    out.append(many([("train", {"wrap": "ddp", "mode": "auto", "sigma": 1.0, "steps": 2, "q": 0.2,
                               "state": half["state"]})])[0])
    return out


@pytest.fixture(scope="module")
def ranks():
    results = _launch.run(_run, 2, list(CALLS.values()))
    return [dict(zip([*CALLS, "resumed"], r)) for r in results]


@pytest.mark.parametrize("name", ["sample", "sample-secure"])
def test_every_example_is_in_the_global_batch_with_rate_q_and_at_most_once(ranks, name):
    counts = torch.zeros(N)
    for step in range(STEPS):
        local = [set(r[name][step]) for r in ranks]
        assert not local[0] & local[1], "an example on two ranks"
        assert all(i % 2 == rank for rank, part in enumerate(local) for i in part), "an example off its shard"
        for part in local:
            counts[list(part)] += 1
    # Each count is Binomial(STEPS, Q): 5 standard deviations either side, for each of the N examples.
    sd = math.sqrt(STEPS * Q * (1 - Q))
    assert ((counts - STEPS * Q).abs() < 5 * sd).all(), counts
    assert abs(counts.mean().item() - STEPS * Q) < 5 * sd / math.sqrt(N)


def test_the_seeded_ranks_draw_the_single_process_sample():
    loader = dpkit.DPDataLoader(torch.utils.data.TensorDataset(torch.arange(N)), sample_rate=Q, steps=5,
                                generator=torch.Generator().manual_seed(3))
    single = [sorted(b.tolist()) for (b,) in loader]
    ranks = _launch.run(_sample_both, 2)
    assert [sorted(ranks[0][s] + ranks[1][s]) for s in range(5)] == single


def _sample_both():
    from tests.distributed._workers import sample

    return sample(5, Q)


def test_the_final_gradient_carries_noise_of_std_sigma_c_once(ranks):
    # Same batches, same clipped sums: the difference is the noise, divided by the expected batch size.
    noisy, clean = ranks[0]["noisy"], ranks[0]["clean"]
    diffs = torch.cat([(noisy["grads"][s][n] - clean["grads"][s][n]).flatten() * noisy["expected_batch_size"]
                       for s in range(3) for n in clean["grads"][s]])
    std = diffs.std().item()
    assert abs(std / (2.0 * 0.1) - 1) < 0.12, std  # σC = 0.2; σC·√2 or σC/√2 would be 41% or 29% off
    assert diffs.unique().numel() == diffs.numel(), "two coordinates drew the same noise"


def test_replicas_hold_the_same_bits(ranks):
    for name in ("noisy", "straight", "resumed"):
        for n, p in ranks[0][name]["params"].items():
            assert torch.equal(p, ranks[1][name]["params"][n]), (name, n)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(ranks):
    for r in ranks:
        for n, p in r["straight"]["params"].items():
            assert torch.equal(p, r["resumed"]["params"][n]), n
        assert len(r["straight"]["batches"]) == 4 and r["resumed"]["ledger"] == r["straight"]["ledger"]
        assert r["resumed"]["epsilon"] == r["straight"]["epsilon"]


def test_the_ledger_counts_the_global_sample_rate(ranks):
    ref = train(wrap="none", mode="auto", sigma=1.0, steps=4, q=0.2)
    for r in ranks:
        assert r["straight"]["ledger"] == ref["ledger"] and r["straight"]["epsilon"] == ref["epsilon"]


@pytest.mark.parametrize("name, words", [
    ("other-noise-seeds", "different seeds"),
    ("other-weights", "trainable parameters differ"),
    ("local-loader", "world size 1"),
    ("wrapped-after", "after make_private"),
])
def test_misuse_is_refused_on_every_rank(ranks, name, words):
    for r in ranks:
        assert isinstance(r[name], PrivacyUsageError) and words in str(r[name]), r[name]


def test_a_distributed_checkpoint_is_refused_by_one_process(ranks):
    with pytest.raises(PrivacyUsageError, match="world size 2"):
        train(wrap="none", mode="auto", sigma=1.0, steps=1, state=ranks[0]["first-half"]["state"])


def test_own_sampling_across_ranks_is_not_taken_on_trust_silently(ranks):
    for r in ranks:
        assert any("taken as global" in w and "DPDataLoader(..., distributed=True)" in w for w in r["own-sampling"])


def test_rank_noise_seeds_never_share_a_cpu_stream(monkeypatch):
    """torch's CPU generator keeps only a seed's low 32 bits: two ranks on one stream would noise their slices
    alike (the noise cancels in a difference of released coordinates). A hash whose low 32 bits agree for every
    input must still give every rank its own stream."""
    from dpkit import distributed

    monkeypatch.setattr(distributed, "digest", lambda material: 7 + (hash(repr(material)) % 1000) * 2**32)
    seeds = [distributed.rank_seed(12345, rank) for rank in range(64)]
    assert len({s & 0xFFFFFFFF for s in seeds}) == 64 and all(0 <= s < 2**63 for s in seeds)
    draws = {tuple(torch.randn(4, generator=torch.Generator().manual_seed(s)).tolist()) for s in seeds[:8]}
    assert len(draws) == 8
