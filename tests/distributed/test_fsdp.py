"""FSDP2 (fully_shard) on 2 gloo ranks: the same clipped step as one process, noise on each rank's shard only."""
from __future__ import annotations

import pytest
import torch

from dpkit.errors import UnsupportedModuleError
from tests.distributed import _launch
from tests.distributed._workers import train

VARIANTS = {
    **{f"fsdp-{m}": {"wrap": "fsdp", "mode": m} for m in ("bk", "ghost", "auto", "hooks")},
    "fsdp-bk-K3": {"wrap": "fsdp", "mode": "bk", "K": 3},
    "fsdp-bk-per_layer": {"wrap": "fsdp", "mode": "bk", "clipping": "per_layer"},
    "fsdp-auto-sum": {"wrap": "fsdp", "mode": "auto", "reduction": "sum"},
    "fsdp-bk-tied": {"wrap": "fsdp", "mode": "bk", "tied": True},
    "fsdp-bk-evaluated": {"wrap": "fsdp", "mode": "bk", "evaluate": True},
    "fsdp-ghost-tied": {"wrap": "fsdp", "mode": "ghost", "tied": True},
    "fsdp-auto-noisy": {"wrap": "fsdp", "mode": "auto", "sigma": 2.0},
    "fsdp-auto-clean": {"wrap": "fsdp", "mode": "auto", "sigma": 0.0},
    "fsdp-straight": {"wrap": "fsdp", "mode": "bk", "sigma": 1.0, "steps": 4, "q": 0.2},
    "fsdp-first-half": {"wrap": "fsdp", "mode": "bk", "sigma": 1.0, "steps": 2, "q": 0.2},
    "fsdp-functorch": {"wrap": "fsdp", "mode": "functorch"},
    "fsdp-ew": {"wrap": "fsdp", "mode": "ew"},
}


def _many(variants):
    from tests.distributed._workers import many

    out = many([("train", v) for v in variants])
    half = out[list(VARIANTS).index("fsdp-first-half")]  # resume it for 2 more steps, on every rank
    resumed = {**VARIANTS["fsdp-first-half"], "state": half["state"]}
    return out + many([("train", resumed)])


@pytest.fixture(scope="module")
def two():
    return dict(zip([*VARIANTS, "fsdp-resumed"], zip(*_launch.run(_many, 2, list(VARIANTS.values())))))


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items()
                                  if not v.get("sigma") and v["mode"] not in ("functorch", "ew")
                                  and n != "fsdp-auto-clean"])
def test_fsdp_step_equals_one_process(two, name):
    single = {k: v for k, v in VARIANTS[name].items() if k != "wrap"}
    ref = train(wrap="none", **single)
    ranks = two[name]
    assert [sorted(ranks[0]["batches"][s] + ranks[1]["batches"][s]) for s in range(3)] == ref["batches"]
    for r, res in enumerate(ranks):
        assert not isinstance(res, Exception), res
        for s, grads in enumerate(res["grads"]):
            for n, g in grads.items():
                torch.testing.assert_close(g, ref["grads"][s][n], atol=1e-6, rtol=1e-5, msg=f"rank {r} step {s} {n}")


def test_each_rank_noises_only_its_shard_with_std_sigma_c(two):
    noisy, clean = two["fsdp-auto-noisy"], two["fsdp-auto-clean"]
    for r in range(2):
        # Never a full-size draw: the noised sizes are this rank's shards, about half of the 275 coordinates.
        assert sum(noisy[r]["noised"]) < 275 * 3 * 0.6 and max(noisy[r]["noised"]) < 160
    diffs = torch.cat([(noisy[0]["grads"][s][n] - clean[0]["grads"][s][n]).flatten()
                       for s in range(3) for n in clean[0]["grads"][s]]) * noisy[0]["expected_batch_size"]
    assert abs(diffs.std().item() / (2.0 * 0.1) - 1) < 0.12
    assert diffs.unique().numel() == diffs.numel()  # the two ranks' shards drew independent noise
    assert noisy[0]["ledger"] == noisy[1]["ledger"] and noisy[0]["epsilon"] == noisy[1]["epsilon"]
    for n, p in noisy[0]["params"].items():
        assert torch.equal(p, noisy[1]["params"][n])


@pytest.mark.parametrize("name", ["fsdp-functorch", "fsdp-ew"])
def test_modes_that_recompute_from_parameters_are_refused_under_fsdp(two, name):
    for res in two[name]:
        assert isinstance(res, UnsupportedModuleError) and "FSDP2" in str(res), res


def test_a_resumed_fsdp_run_equals_an_uninterrupted_one_bit_for_bit(two):
    for straight, resumed in zip(two["fsdp-straight"], two["fsdp-resumed"]):
        assert len(straight["batches"]) == 4 and resumed["ledger"] == straight["ledger"]
        for n, p in straight["params"].items():
            assert torch.equal(p, resumed["params"][n]), n
