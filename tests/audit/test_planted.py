"""The planted-bug suite: noise plugins broken on purpose, registered as plugins and audited by ``dpkit audit`` at
its defaults (100 full-batch steps, noise multiplier 10, claimed epsilon 4.38, 100,000 canaries). Each must be a
proven violation (exit 1); the correct mechanism must pass in every seed. Correlated noise without a whitening is
refused (the tree, BandMF and BLT are audited: tests/audit/test_tree_audit.py, tests/audit/test_correlated.py)."""
from __future__ import annotations

import ast
import json
import pathlib
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import dpkit
from dpkit import audit, cli, registry
from dpkit.audit import correlated
from dpkit.cli._common import EXIT_NO, EXIT_OK, EXIT_USAGE
from dpkit.errors import PrivacyUsageError
from dpkit.hookspecs import hookimpl
from dpkit.noise.gaussian import GaussianNoise


class HalfStd(GaussianNoise):
    """Half the std it is asked for: the true epsilon about twice the claim."""

    def add(self, clipped_sum, *, std):
        return super().add(clipped_sum, std=0.5 * std)


class Replayed(GaussianNoise):
    """The right std, but the same draw at every step: differences of releases are noise-free (epsilon infinite)."""

    def add(self, clipped_sum, *, std):
        draws = self.__dict__.setdefault("_draws", {})
        if clipped_sum.numel() not in draws:
            draws[clipped_sum.numel()] = torch.zeros_like(clipped_sum).view(-1).normal_(
                0, std, generator=self.generator(clipped_sum.device))
        clipped_sum.view(-1).add_(draws[clipped_sum.numel()])
        return clipped_sum


class Antithetic(GaussianNoise):
    """The right std, drawn as pairs (z, -z) on consecutive steps: the sum of a pair's releases is noise-free."""

    def add(self, clipped_sum, *, std):
        last = self.__dict__.pop("_last", None)
        if last is None:
            last = torch.zeros_like(clipped_sum).view(-1).normal_(0, std, generator=self.generator(clipped_sum.device))
            self._last = last
            clipped_sum.view(-1).add_(last)
        else:
            clipped_sum.view(-1).sub_(last)
        return clipped_sum


class Planted:
    @staticmethod
    @hookimpl
    def dpkit_noise_mechanisms():
        return {"half-std": HalfStd, "replayed": Replayed, "antithetic": Antithetic}


@pytest.fixture
def planted(fresh_registry):
    registry.register_plugin(Planted, name="planted_noise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dpkit.PluginOverrideWarning)
        yield


@pytest.mark.parametrize(("noise", "seed"), [("half-std", 0), ("half-std", 1), ("replayed", 0), ("antithetic", 0)])
def test_dpkit_audit_proves_each_planted_bug_at_its_defaults(planted, capsys, noise, seed):
    assert cli.main(["audit", "--noise", noise, "--seed", str(seed), "--json"]) == EXIT_NO
    out = json.loads(capsys.readouterr().out)
    assert out["violated"] and max(out["one_run_epsilon"], out["approx_dp_epsilon"]) > out["accountant_epsilon"]
    assert out["accountant_epsilon"] == pytest.approx(4.38, abs=0.01)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_correct_mechanism_passes_in_every_seed(seed):
    report = audit.bundled_audit(seed=seed)
    assert not report.violated and not report.suspect, str(report)
    assert report.bounds.proven > 0.3 * report.accountant_epsilon  # not a vacuous pass: the audit has power


def test_structure_is_what_catches_replayed_noise(planted):
    """Replayed noise has the claimed std at every step, so only the whitened family (across steps) sees it."""
    report = audit.bundled_audit(noise="replayed", steps=20, canaries=20_000)
    assert report.violated and report.bounds.approx_dp.family == "whitened"


def test_correlated_noise_without_a_whitening_is_refused_and_the_tree_in_clip_mode(capsys):
    """Noise with its own sampling rule that is neither a Toeplitz factorization (BandMF, BLT) nor the tree has no
    whitening (those are audited: tests/audit/test_correlated.py, tests/audit/test_tree_audit.py); the clip mode's
    canaries are examples of a Poisson loader, which the tree's accounting does not cover."""

    class Unknown:
        def check_loader(self, loader):
            pass

    with pytest.raises(PrivacyUsageError, match="Unknown.*correlated across steps.*Toeplitz"):
        correlated.refuse_unwhitenable(Unknown())
    for noise in ("tree", "tree-honaker"):
        assert cli.main(["audit", "--mode", "clip", "--noise", noise]) == EXIT_USAGE  # a refusal, not a verdict
        assert "own sampling rule" in capsys.readouterr().err


def test_the_report_is_found_on_the_noise_mechanism():
    """PrivateTraining.audit_report looks up ``audit_report`` on ``private.noise``; the audit provides it."""
    model = torch.nn.Linear(6, 2)
    data = TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,)))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=dpkit.DPDataLoader(data, 1.0, generator=torch.Generator().manual_seed(0)),
                                 noise_multiplier=1.0, max_grad_norm=1.0, criterion=torch.nn.CrossEntropyLoss())
    canary = audit.CanaryAudit.attach(private, canaries=10, seed=0)
    model, optimizer, loader, criterion = private
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    assert str(private.noise.audit_report(1e-5)) == str(canary.report(1e-5)) == str(private.audit_report(1e-5))
    assert cli.main(["audit", "--steps", "2", "--canaries", "100"]) == EXIT_OK


def test_the_audit_imports_no_training_code():
    """Issue 20: dpkit.audit is typed against a Protocol; only the bundled runs import training code (the engine
    and the data loader), inside their functions (and the audit's default Poisson sampler, the data loader)."""
    root = pathlib.Path(audit.__file__).parent
    allowed = {"dpkit.errors", "dpkit.distributed", "dpkit.registry"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" if node.module == "dpkit" else node.module for a in node.names]
            else:
                names = []
            for name in names:
                if name.startswith("dpkit") and not name.startswith("dpkit.audit") and name not in allowed:
                    allowed_here = {"bundled.py": ("dpkit.engine", "dpkit.data"), "loops.py": ("dpkit.data",)}
                    assert name in allowed_here.get(path.name, ()) and node not in tree.body, (path.name, name)
        if path.name != "bundled.py":
            assert "dpkit.engine" not in path.read_text(), path.name
