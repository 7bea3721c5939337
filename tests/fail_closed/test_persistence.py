"""Persistence: checkpoints of other configurations, tampered or truncated ones, secure mode, a correct resume."""
from __future__ import annotations

import copy

import pytest
import torch

import dpkit
from dpkit.engine import checkpoint
from dpkit.errors import PrivacyUsageError

from ._setup import Capture, batch, dataset, make, net, train_step


def trained(steps=2, **kw):
    p = make(**kw)
    x, y = batch()
    for _ in range(steps):
        train_step(p, x, y)
    return p


def assert_untouched(p, steps, ledger, opt_state):
    assert p.steps == steps and p.ledger.steps == ledger
    assert p.optimizer.state_dict()["state"].keys() == opt_state.keys()


@pytest.mark.parametrize("theirs,mine,match", [
    ({"clipping": "automatic"}, {"clipping": "flat"}, r"clipping='automatic' there, 'flat' here"),
    ({"accountant": "rdp"}, {"accountant": "prv"}, r"accountant='rdp' there, 'prv' here"),
    ({"secure_mode": True, "noise_seed": None}, {}, r"secure_mode=True there, False here"),
    ({}, {"secure_mode": True, "noise_seed": None}, r"secure_mode=False there, True here"),
])
def test_checkpoint_of_another_configuration_is_refused(theirs, mine, match):
    state = trained(**theirs).state_dict()
    p = trained(1, **mine)
    before = (p.steps, p.ledger.steps, copy.deepcopy(p.optimizer.state_dict()["state"]))
    with pytest.raises(PrivacyUsageError, match=match):
        p.load_state_dict(state)
    assert_untouched(p, *before)


def resealed(state):
    """An edited checkpoint with its digest recomputed: the checks behind the digest must still refuse it."""
    return {**state, "digest": checkpoint.digest(state)}


def test_an_edited_or_corrupted_checkpoint_is_refused_by_its_digest():
    state = trained(3).state_dict()
    edited = copy.deepcopy(state)
    edited["ledger"]["entries"][0][0]["event"]["noise_multiplier"] *= 10  # would report a smaller epsilon
    p = make()
    with pytest.raises(PrivacyUsageError, match="does not match its digest"):
        p.load_state_dict(edited)
    flipped = copy.deepcopy(state)
    flipped["noise"]["cpu_calls"] -= 1  # the noise streams' count rewound: the next step would repeat a draw
    with pytest.raises(PrivacyUsageError, match="does not match its digest"):
        p.load_state_dict(flipped)
    assert p.steps == p.ledger.steps == 0
    p.load_state_dict(state)
    assert p.steps == 3


def test_checkpoint_whose_steps_disagree_with_its_ledger_is_refused():
    state = trained(3).state_dict()
    state["steps"] = 1  # edited to report less privacy spent
    state = resealed(state)
    p = make()
    with pytest.raises(PrivacyUsageError, match="says 1 steps, but its ledger records 3"):
        p.load_state_dict(state)
    assert p.steps == p.ledger.steps == 0


def test_checkpoint_with_negative_unbounded_steps_is_refused():
    state = trained(2).state_dict()
    state["steps"], state["unbounded_steps"] = 1, -1
    state = resealed(state)
    p = make()
    with pytest.raises(PrivacyUsageError, match="ledger records 2"):
        p.load_state_dict(state)
    assert p.steps == 0


@pytest.mark.parametrize("key", ["ledger", "steps", "noise", "clipper", "optimizer", "config", "format"])
def test_truncated_checkpoint_is_refused_naming_the_key(key):
    state = trained(1).state_dict()
    del state[key]
    p = make()
    with pytest.raises(ValueError, match=rf"lacks \['{key}'\]"):
        p.load_state_dict(state)
    assert p.steps == p.ledger.steps == 0


@pytest.mark.parametrize("bad", [None, [], "checkpoint.pt"])
def test_something_that_is_not_a_checkpoint_is_refused(bad):
    with pytest.raises(ValueError, match="a dpkit checkpoint is a dict"):
        make().load_state_dict(bad)


def test_malformed_ledger_is_refused():
    state = trained(1).state_dict()
    state["steps"] = "many"
    state = resealed(state)
    p = make()
    with pytest.raises(ValueError, match="ledger or step count is malformed"):
        p.load_state_dict(state)
    assert p.steps == 0


def test_checkpoint_of_a_run_without_a_poisson_loader_into_one_with_it_is_refused():
    state = trained(1).state_dict()  # data_loader=None: no sampler state
    p = make(data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8))
    with pytest.raises(PrivacyUsageError, match="data sampling|dataset_size=None there"):
        p.load_state_dict(state)


def test_checkpoint_of_an_unknown_format_is_refused():
    state = trained(1).state_dict()
    state["format"] = 999
    p = make()
    with pytest.raises((ValueError, PrivacyUsageError), match="format"):
        p.load_state_dict(state)


def test_correct_resume_continues_the_ledger_the_noise_and_the_batches():
    def run(resume):
        torch.manual_seed(0)
        model = net()
        p = make(model, data_loader=dpkit.DPDataLoader(dataset(), 0.25, generator=torch.Generator().manual_seed(3)),
                 noise_seed=7)
        it = iter(p.data_loader)
        for _ in range(2):
            train_step(p, *next(it))
        if resume:  # a fresh process: another noise seed and sampler seed, replaced by the checkpoint's
            state, weights = copy.deepcopy(p.state_dict()), copy.deepcopy(model.state_dict())
            p.detach()
            model = net()
            model.load_state_dict(weights)
            p = make(model, noise_seed=123, data_loader=dpkit.DPDataLoader(
                dataset(), 0.25, generator=torch.Generator().manual_seed(99)))
            p.load_state_dict(state)
            assert p.steps == p.ledger.steps == 2
            it = iter(p.data_loader)
        for _ in range(2):
            train_step(p, *next(it))
        return p, torch.cat([q.detach().flatten() for q in model.parameters()])

    straight, w1 = run(False)
    resumed, w2 = run(True)
    assert resumed.steps == resumed.ledger.steps == straight.steps == 4
    assert resumed.epsilon(1e-5) == pytest.approx(straight.epsilon(1e-5), rel=1e-12)
    assert torch.equal(w1, w2), "the resumed run drew other noise or other batches"


def test_secure_checkpoint_holds_no_noise_seed_or_generator_state():
    p = trained(1, secure_mode=True, noise_seed=None,
                data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8))
    state = p.state_dict()
    assert state["noise"] == {"secure_mode": True}
    assert state["sampler"] == {"secure_mode": True}
    text = repr(state["noise"]) + repr(state.get("sampler")) + repr(state["config"])
    assert "seed" not in text and "generator" not in text


def test_secure_mode_refuses_a_noise_seed_or_ignores_it():
    """A noise seed makes secure noise replayable: it must be refused, or have no effect on the draws."""
    try:
        p1 = make(secure_mode=True, noise_seed=5)
    except (ValueError, TypeError, PrivacyUsageError) as err:
        assert "seed" in str(err)
        return
    p2 = make(secure_mode=True, noise_seed=5)
    x, y = batch()
    c1, c2 = Capture(p1), Capture(p2)
    p2.module.load_state_dict(p1.module.state_dict())
    train_step(p1, x, y)
    train_step(p2, x, y)
    assert not torch.equal(torch.cat([g.flatten() for g in c1.first.values()]),
                           torch.cat([g.flatten() for g in c2.first.values()]))


def test_overflowed_examples_survive_a_resume():
    """The docs tell users to check overflowed_examples before stating their guarantee: a resume must keep it."""
    p = trained(2)
    p.overflowed_examples = 3
    state = p.state_dict()
    q = make()
    q.load_state_dict(state)
    assert q.overflowed_examples == 3


def test_checkpoint_of_another_dataset_size_is_refused():
    state = trained(1, data_loader=torch.utils.data.DataLoader(dataset(32), batch_size=8)).state_dict()
    p = make(data_loader=torch.utils.data.DataLoader(dataset(64), batch_size=16))  # the same q, another dataset
    with pytest.raises(PrivacyUsageError, match="dataset_size=32 there, 64 here"):
        p.load_state_dict(state)


def test_save_is_atomic(tmp_path, monkeypatch):
    p = trained(1)
    path = tmp_path / "private.pt"
    dpkit.engine.save(p.state_dict(), path)
    first = torch.load(path, weights_only=False)

    def killed(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-save

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        dpkit.engine.save(p.state_dict(), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["steps"] == first["steps"]  # the previous checkpoint is whole
    assert [f.name for f in tmp_path.iterdir()] == ["private.pt"]  # no temporary file left behind
