"""The clip mode's planted-bug suite: a clipper, loops and a sampler broken on purpose, registered as a plugin and
in dpkit.audit.loops, and audited with example canaries. Each must fail the audit (exit 1 from ``dpkit audit
--mode clip``) in every seed; the correct mechanism must pass in every seed."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader

import dpkit
from dpkit import audit, cli, registry
from dpkit.audit import loops
from dpkit.cli._common import EXIT_NO, EXIT_OK, EXIT_USAGE
from dpkit.clipping import ClipperBase
from dpkit.errors import PrivacyUsageError
from dpkit.hookspecs import hookimpl


class OneLayerUnclipped(ClipperBase):
    """Flat clipping that forgets the last layer: its part of every example's gradient goes in unclipped."""

    per_layer = True

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm

    def factors(self, norms):
        flat = (self.max_grad_norm / (norms.square().sum(0).sqrt() + 1e-6)).clamp(max=1.0)
        factors = flat.expand_as(norms).clone()
        factors[-1] = 1.0
        return factors


class PlantedClippers:
    @staticmethod
    @hookimpl
    def dpkit_clippers():
        return {"one-layer-unclipped": OneLayerUnclipped}


def _realised_mean(private, loader, steps):
    """loss_reduction="sum", then each release divided by the batch's realised size (a step pre-hook after dpkit's):
    the noise's scale then tells the batch size."""
    model, optimizer, data, criterion = private
    size = {"b": 1}

    def divide(optimizer, args, kwargs):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(size["b"])

    handle = optimizer.register_step_pre_hook(divide)
    try:
        for done, (x, y) in enumerate(loops.batches(data)):
            if done == steps:
                return
            size["b"] = max(len(x), 1)
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    finally:
        handle.remove()


def _accumulate(private, loader, steps, k=4):
    """Four Poisson batches per release, declared to dpkit as micro-batches of one (data_loader=None, so dpkit
    cannot see the loader): the accountant counts one batch at rate q per release."""
    model, optimizer, _, criterion = private
    batches = loops.batches(loader)
    for _ in range(steps):
        optimizer.zero_grad()
        with private.micro_batches():
            for _ in range(k):
                x, y = next(batches)
                criterion(model(x), y).backward()
        optimizer.step()


def _own_sampling(loader):
    return {"data_loader": None, "sample_rate": loader.sample_rate,
            "expected_batch_size": loader.sample_rate * len(loader.dataset)}


def _shuffled(dataset, sample_rate, generator):
    """Shuffled fixed-size batches, with poisson_sampling="unproven" (False is refused): dpkit warns and accounts
    them as Poisson at b/n."""
    return DataLoader(dataset, batch_size=round(sample_rate * len(dataset)), shuffle=True, generator=generator,
                      drop_last=True), "unproven"


BUGS = [("clipping", "one-layer-unclipped"), ("loop", "realised-mean"), ("loop", "accumulate"), ("sampler", "shuffled")]


@pytest.fixture
def planted(fresh_registry, monkeypatch):
    registry.register_plugin(PlantedClippers, name="planted_clippers")
    monkeypatch.setitem(loops.LOOPS, "realised-mean",
                        loops.AuditLoop(_realised_mean, lambda loader: {"loss_reduction": "sum"}))
    monkeypatch.setitem(loops.LOOPS, "accumulate", loops.AuditLoop(_accumulate, _own_sampling))
    monkeypatch.setitem(loops.SAMPLERS, "shuffled", _shuffled)
    with warnings.catch_warnings():  # dpkit's own warnings about these configurations, which the audit proves
        warnings.simplefilter("ignore")
        yield


SMALL = {"steps": 15, "canaries": 1500}  # claimed epsilon 0.45: each run well under a second


@pytest.mark.parametrize(("option", "name"), BUGS)
def test_dpkit_audit_clip_mode_fails_each_planted_bug_at_its_defaults(planted, capsys, option, name):
    assert cli.main(["audit", "--mode", "clip", f"--{option}", name, "--json"]) == EXIT_NO
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "clip" and out["accountant_epsilon"] == pytest.approx(1.10, abs=0.01)
    assert out["violated"] or out["refuted_premises"]


@pytest.mark.parametrize(("option", "name"), BUGS)
def test_each_planted_bug_fails_in_5_of_5_seeds(planted, option, name):
    expected = {"one-layer-unclipped": "violated", "realised-mean": "noise std in each release",
                "accumulate": "examples per release (total)", "shuffled": "spread of the batch sizes"}[name]
    for seed in range(5):
        report = audit.bundled_clip_audit(seed=seed, **{option: name}, **SMALL)
        assert report.failed, str(report)
        assert report.violated if expected == "violated" else expected in [c.name for c in report.refuted]


def test_the_unclipped_layer_is_a_proven_violation_not_only_a_mismatch(planted):
    report = audit.bundled_clip_audit(clipping="one-layer-unclipped", **SMALL)
    assert report.violated and not report.refuted and report.bounds.proven > 3 * report.accountant_epsilon


def test_the_correct_mechanism_passes_in_every_seed():
    for seed in range(5):
        report = audit.bundled_clip_audit(seed=seed, **SMALL)
        assert not report.failed, str(report)
        assert all(c.p_value > 0.01 for c in report.premises), str(report)
    assert cli.main(["audit", "--mode", "clip"]) == EXIT_OK


def test_clip_mode_misuse_is_refused(planted, capsys, monkeypatch):
    assert cli.main(["audit", "--mode", "clip", "--loop", "nonesuch"]) == EXIT_USAGE
    assert "unknown audit loop 'nonesuch'; known: accumulate, realised-mean, standard" in capsys.readouterr().err
    assert cli.main(["audit", "--mode", "clip", "--sampler", "nonesuch"]) == EXIT_USAGE
    assert cli.main(["audit", "--loop", "accumulate"]) == EXIT_USAGE  # the noise mode has no loop to choose
    assert "Add --mode clip" in capsys.readouterr().err
    assert cli.main(["audit", "--mode", "clip", "--noise", "bandmf"]) == EXIT_USAGE

    def short(private, loader, steps):
        loops.LOOPS["standard"].train(private, loader, steps - 1)

    monkeypatch.setitem(loops.LOOPS, "short", loops.AuditLoop(short))
    with pytest.raises(PrivacyUsageError, match="released 4 steps, asked for 5"):
        audit.bundled_clip_audit(loop="short", steps=5, canaries=100)


def test_example_canaries_show_exactly_their_clipped_gradients():
    """Reference: without noise, each canary's score at a release is C times the times its example was in the
    batch, counted from the batches themselves; the reference rows show 0, and the example canary refuses a run
    that does not train its model and a report before any release."""
    canaries = audit.ExampleCanaries(200, references=8, seed=1)
    with pytest.raises(PrivacyUsageError, match="nothing was released"):
        canaries.report(1e-5)
    model = canaries.model
    loader = dpkit.DPDataLoader(canaries.dataset, 0.2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=0.0, max_grad_norm=3.0,
                                     criterion=torch.nn.L1Loss(), grad_sample_mode="hooks")
    other = torch.nn.Linear(2, 2)
    with pytest.raises(PrivacyUsageError, match="does not train this audit's CanaryNet"):
        canaries.watch(dpkit.make_private(module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0))
    canaries.watch(private)
    model_, optimizer, data, criterion = private
    seen = []
    for x, y in loops.batches(data):
        optimizer.zero_grad()
        criterion(model_(x), y).backward()
        optimizer.step()
        times = torch.zeros(200)
        times.index_add_(0, x, torch.ones(len(x)))
        seen.append(times)
        release = torch.cat([model.first.weight.grad, model.second.weight.grad], 1) * private.expected_batch_size
        assert torch.all(release[200:] == 0)
        if len(seen) == 3:
            break
    canaries.unwatch()
    scores = canaries._tape.scores()[0]  # all on {0, C}: scored by what they showed
    assert torch.equal(scores > 0, torch.stack(seen).sum(0) > 0)
    assert canaries.per_release == [int(s.sum()) for s in seen]
    assert torch.allclose(canaries._tape._shown[:, :3], 3.0 * torch.stack(seen, 1).double(), atol=1e-4)


# --- the premise checks on their own -------------------------------------------------------------------------------

def _participation(rng, n, q, releases, shuffled=False):
    if shuffled:  # fixed-size batches, each example once per epoch
        b = round(q * n)
        order = np.concatenate([rng.permutation(n) for _ in range(releases * b // n + 1)])
        picks = [order[t * b:(t + 1) * b] for t in range(releases)]
    else:
        picks = [np.flatnonzero(rng.random(n) < q) for _ in range(releases)]
    per_example = np.bincount(np.concatenate(picks), minlength=n)
    return [len(p) for p in picks], per_example


def test_participation_checks_refute_poisson_batches_at_most_alpha_of_the_time_and_shuffled_ones_always():
    rng = np.random.default_rng(0)
    runs = [audit.participation_checks(*_participation(rng, 400, 0.05, 40), 0, 400, 0.05) for _ in range(300)]
    for k in range(1, 4):  # each of the three counting tests
        assert np.mean([checks[k].p_value <= 0.05 for checks in runs]) <= 0.05 + 0.03
        assert np.mean([checks[k].p_value <= 0.5 for checks in runs]) > 0.3  # and not vacuous: near uniform
    for _ in range(5):
        checks = audit.participation_checks(*_participation(rng, 400, 0.05, 40, shuffled=True), 0, 400, 0.05)
        assert checks[2].p_value < 1e-6 and checks[3].p_value < 1e-6
    assert audit.participation_checks([20], [1] * 20, 1, 400, 0.05)[0].p_value == 0.0  # an example twice


def test_noise_scale_check_is_the_chi_square_lower_tail_with_bonferroni():
    coordinates, std = 1000, 2.0
    squares = [std**2 * coordinates] * 9 + [std**2 * stats.chi2.ppf(1e-3, coordinates)]
    check = audit.noise_scale_check(squares, coordinates, std)
    assert check.p_value == pytest.approx(1e-2, rel=1e-6) and "release 9" in check.seen
    rng = np.random.default_rng(0)
    correct = [audit.noise_scale_check((rng.normal(0, std, (50, coordinates)) ** 2).sum(1), coordinates, std).p_value
               for _ in range(100)]
    assert np.mean(np.array(correct) <= 0.05) <= 0.1
    half = (rng.normal(0, 0.97 * std, (50, coordinates)) ** 2).sum(1)  # 3% too little noise, 50 releases
    assert audit.noise_scale_check(half, coordinates, std).p_value < 0.05
