"""DDP and plain replicas on 2 and 3 gloo ranks: the same step as one process on the same global batch."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import _launch
from tests.distributed._workers import train

MODES = ("hooks", "ghost", "bk", "functorch", "ew", "auto")
VARIANTS = {  # name: train() arguments
    **{f"ddp-{m}": {"wrap": "ddp", "mode": m} for m in MODES},
    "ddp-bk-K3": {"wrap": "ddp", "mode": "bk", "K": 3},
    "ddp-bk-per_layer": {"wrap": "ddp", "mode": "bk", "clipping": "per_layer"},
    "ddp-hooks-sum": {"wrap": "ddp", "mode": "hooks", "reduction": "sum"},
    "ddp-auto-adaptive": {"wrap": "ddp", "mode": "auto", "clipping": "adaptive", "sigma": 0.7},
    "ddp-auto-noisy": {"wrap": "ddp", "mode": "auto", "sigma": 1.0},
    "ddp-ghost-noisy": {"wrap": "ddp", "mode": "ghost", "sigma": 1.0},
    "ddp-bk-grad_scaler": {"wrap": "ddp", "mode": "bk", "scaler": True},
    "ddp-distributed_sampler": {"wrap": "ddp", "mode": "bk", "batch_size_per_rank": 4,
                                "loader": "distributed_sampler"},
}
PLAIN = {  # 3 ranks; q = 0.1 leaves local batches empty
    **{f"plain-{m}": {"wrap": "none", "mode": m, "q": 0.1, "steps": 4} for m in MODES},
    "ddp-ghost": {"wrap": "ddp", "mode": "ghost", "q": 0.1, "steps": 4},
    "fsdp-bk": {"wrap": "fsdp", "mode": "bk", "q": 0.1, "steps": 4},  # uneven shards: 8 rows as 3, 3, 2
    # Local batches of different sizes in micro-batches of 1: every rank must run as many forwards (FSDP2 gathers)
    "fsdp-auto-micro-batches": {"wrap": "fsdp", "mode": "auto", "q": 0.3, "steps": 3, "physical": 1},
    "plain-auto-noisy-secure": {"wrap": "none", "mode": "auto", "sigma": 1.0, "secure": True, "noise_seed": None,
                                "q": 0.1, "steps": 4},
}


@pytest.fixture(scope="module")
def two():
    return dict(zip(VARIANTS, zip(*_launch.run(_many, 2, list(VARIANTS.values())))))


@pytest.fixture(scope="module")
def three():
    return dict(zip(PLAIN, zip(*_launch.run(_many, 3, list(PLAIN.values())))))


def _many(variants):
    from tests.distributed._workers import many

    return many([("train", v) for v in variants])


def _reference(variant: dict) -> dict:
    single = {k: v for k, v in variant.items() if k not in ("wrap", "loader", "scaler")}  # one process, no scaler
    if "batch_size_per_rank" in single:
        single["batch_size_per_rank"] *= 2  # one process: the global expected batch size
    return train(wrap="none", **single)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if not v.get("sigma") and "loader" not in v])
def test_ddp_step_equals_one_process(two, name):
    ranks, ref = two[name], _reference(VARIANTS[name])
    assert [sorted(sum((x["batches"][s] for x in ranks), [])) for s in range(3)] == ref["batches"]
    for r, res in enumerate(ranks):
        assert not isinstance(res, Exception), res
        assert res["sample_rate"] == ref["sample_rate"] and res["expected_batch_size"] == ref["expected_batch_size"]
        for s, grads in enumerate(res["grads"]):
            for n, g in grads.items():
                torch.testing.assert_close(g, ref["grads"][s][n], atol=1e-6, rtol=1e-5, msg=f"rank {r} step {s} {n}")


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_replicas_on_three_ranks(three, name):
    ranks = three[name]
    for res in ranks:
        assert not isinstance(res, Exception), res
    for s in range(len(ranks[0]["batches"])):  # the local batches partition the global one
        union = sum((res["batches"][s] for res in ranks), [])
        assert len(union) == len(set(union))
    if PLAIN[name]["q"] == 0.1:
        assert any(not res["batches"][s] for res in ranks for s in range(len(res["batches"]))), "no empty batch"
    for res in ranks[1:]:
        for n, p in res["params"].items():
            assert torch.equal(p, ranks[0]["params"][n]), n
    if not PLAIN[name].get("sigma"):
        ref = _reference(PLAIN[name])
        steps = PLAIN[name]["steps"]
        assert [sorted(sum((res["batches"][s] for res in ranks), [])) for s in range(steps)] == ref["batches"]
        for n, p in ranks[0]["params"].items():
            torch.testing.assert_close(p, ref["params"][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.get("sigma")])
def test_noisy_replicas_stay_identical_and_count_as_one_process(two, name):
    ranks, ref = two[name], _reference(VARIANTS[name])
    for res in ranks:
        assert not isinstance(res, Exception), res
        assert res["ledger"] == ref["ledger"] and res["epsilon"] == ref["epsilon"]
        assert res["clip"] == ranks[0]["clip"]  # adaptive clipping: one noisy global count
        for n, p in res["params"].items():
            assert torch.equal(p, ranks[0]["params"][n]), n


def test_a_distributed_sampler_loader_is_replaced_by_global_poisson_sampling(two):
    ranks = two["ddp-distributed_sampler"]
    for res in ranks:
        assert not isinstance(res, Exception), res
        assert res["sample_rate"] == pytest.approx(2 * 4 / 24) and res["expected_batch_size"] == pytest.approx(8)
    for s in range(3):
        assert not set(ranks[0]["batches"][s]) & set(ranks[1]["batches"][s])
