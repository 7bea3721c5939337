"""Canaries for tree aggregation: one step per epoch of its shuffled loader, scored after whitening by the tree's
covariance. The covariance against the mechanism's own nodes, the scores against dense matrices, the ledger against
the canaries' power, then real runs with correct and broken noise."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

import dpkit
from dpkit import audit, cli, registry
from dpkit.audit.tree import TreeSchedule, prefix_matrix, tree_schedule
from dpkit.cli._common import EXIT_NO, EXIT_OK
from dpkit.data import ShuffledBatchLoader
from dpkit.hookspecs import hookimpl
from dpkit.noise.tree import TreeAggregation, charged_nodes, check_loader, levels


@pytest.mark.parametrize("honaker", [False, True])
def test_the_prefix_matrix_maps_the_mechanisms_own_nodes_to_its_prefix_sums(honaker):
    """Epochs of 6 steps (not a power of two): each epoch's cumulated releases are A·n, n the nodes the mechanism
    regenerates from their seeds, read one by one."""
    T, std, d = 6, 1.5, 7
    data = TensorDataset(torch.zeros(12, 1))
    loader = ShuffledBatchLoader(data, 2, generator=torch.Generator().manual_seed(0))
    tree = TreeAggregation(seed=3, honaker=honaker)
    check_loader(loader, tree)
    released = []
    for _ in range(2):
        for _ in loader:
            released.append(tree.add(torch.zeros(d, dtype=torch.float64), std=std).numpy().copy())
            tree.dp_event(1.0, loader.sample_rate)
    A = prefix_matrix(T, honaker)
    nodes = [(j, i) for j in range(T.bit_length()) for i in range(1, (T >> j) + 1)]
    assert A.shape == (T, len(nodes))
    for epoch in range(2):
        n = np.stack([_node(tree, epoch, node, std, d) for node in nodes])
        prefix = np.cumsum(np.stack(released[epoch * T:(epoch + 1) * T]), 0)
        np.testing.assert_allclose(prefix, A @ n, rtol=1e-10, atol=1e-10)


def _node(tree, epoch, node, std, d):
    out = torch.zeros(d, dtype=torch.float64)
    tree._draw(out, f"cpu|torch.float64|{d}|0", epoch, node, std, 1.0)
    return out.numpy()


@pytest.mark.parametrize("honaker", [False, True])
def test_whitened_scores_are_the_dense_log_likelihood_ratios(honaker):
    """Releases x + z over 2.5 epochs of 4 steps, z of covariance std²·block_diag(D·AAᵀ·Dᵀ) (D: differences),
    with canaries joining one public step per epoch: each score is uᵀΣ⁻¹y − uᵀΣ⁻¹u/2, here with the dense Σ."""
    rng = np.random.default_rng(0)
    m, T, steps, C, std = 60, 4, 10, 1.5, 2.0
    schedule = TreeSchedule(T, honaker, torch.as_tensor(rng.choice([-1.0, 1.0], m)), seed=5)
    d = np.zeros((m, steps))  # each canary's signed participations
    for t in range(steps):
        d[:, t] = schedule.joins(t, torch.arange(m), torch.Generator()).numpy() * schedule.signs.numpy()
    A, D = prefix_matrix(T, honaker), np.eye(T) - np.eye(T, k=-1)
    blocks = [D[:n, :n] @ A[:n] @ A[:n].T @ D[:n, :n].T for n in (4, 4, 2)]
    sigma = std**2 * scipy.linalg.block_diag(*blocks)
    included = rng.random(m) < 0.5
    released = included[:, None] * d * C + rng.multivariate_normal(np.zeros(steps), sigma, m)
    tape = schedule.tape(m)
    for t in range(steps):
        tape.record(t, torch.arange(m), torch.as_tensor(released[:, t]), torch.as_tensor(d[:, t]), torch.zeros(0),
                    C, 0.25, std)
    u = d * C
    expected = (released @ np.linalg.solve(sigma, u.T)).diagonal() - (u @ np.linalg.solve(sigma, u.T)).diagonal() / 2
    scores = tape.scores()[0]
    assert torch.allclose(scores, torch.as_tensor(expected), rtol=1e-5, atol=1e-4)  # the tape keeps float32
    assert tape.threshold() == 0.0 and tape.families == ("whitened by the tree",)
    assert ((scores.numpy() > 0) == included).mean() > 0.6  # it tells the included apart


@pytest.mark.parametrize("honaker", [False, True])
def test_the_ledger_covers_every_leafs_power_and_is_tight_at_leaf_1(honaker):
    """A canary at leaf t of an epoch has power uᵀK⁻¹u (μ² in units of 1/σ²); the ledger charges L = levels(T)
    Gaussians per epoch and bit_length(t) for a partial one, never less, exactly that at leaf 1 without Honaker."""
    for T in range(1, 21):
        A = prefix_matrix(T, honaker)
        for n in range(1, T + 1):
            K = A[:n] @ A[:n].T
            power = [float(u @ np.linalg.solve(K, u)) for u in (np.arange(n) >= t for t in range(n))]
            assert max(power) <= charged_nodes(n, T) + 1e-9, (T, n, power)
            if not honaker and n == T:
                assert power[0] == pytest.approx(levels(T))


class ShrunkTree(TreeAggregation):
    """Tree aggregation drawing a fifth of the noise it is asked for."""

    def add(self, clipped_sum, *, std):
        return super().add(clipped_sum, std=0.2 * std)


class Shrunk:
    @staticmethod
    @hookimpl
    def dpkit_noise_mechanisms():
        return {"shrunk-tree": ShrunkTree}


@pytest.fixture
def shrunk(fresh_registry):
    registry.register_plugin(Shrunk, name="shrunk_tree")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dpkit.PluginOverrideWarning)
        yield


RUN = {"steps": 40, "canaries": 3000}  # 10 epochs of 4 steps: claimed epsilon 2.21


@pytest.mark.parametrize(("noise", "seed"), [("tree", 0), ("tree-honaker", 1)])
def test_correct_tree_noise_passes(noise, seed):
    report = audit.bundled_audit(noise=noise, seed=seed, **RUN)
    assert not report.violated and not report.suspect, str(report)
    assert report.bounds.fdp.epsilon > 0.1  # the whitened scores carry evidence: not a vacuous pass
    assert report.bounds.one_run.family == "whitened by the tree"


def test_a_fifth_of_the_tree_noise_is_a_proven_violation_from_the_command_line(shrunk, capsys):
    assert cli.main(["audit", "--noise", "shrunk-tree", "--steps", "40", "--canaries", "3000"]) == EXIT_NO
    assert "VIOLATION" in capsys.readouterr().out
    assert cli.main(["audit", "--noise", "tree", "--steps", "8", "--canaries", "100"]) == EXIT_OK


def test_a_tree_run_without_its_shuffled_loader_is_refused():
    """The canaries follow the loader's epochs: an audit of a run whose loader it cannot see is refused."""
    model = torch.nn.Linear(4, 2)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=ShuffledBatchLoader(data, 8, generator=torch.Generator().manual_seed(0)),
                                 noise_multiplier=1.0, max_grad_norm=1.0, noise="tree",
                                 criterion=torch.nn.CrossEntropyLoss())
    private.data_loader = None
    with pytest.raises(dpkit.PrivacyUsageError, match="ShuffledBatchLoader"):
        audit.CanaryAudit.attach(private, canaries=5)
    private.detach()


def test_a_tape_whose_noise_std_changed_or_that_missed_steps_is_refused():
    """The whitening assumes one std and clip norm, and every step of every epoch from the first."""
    schedule = TreeSchedule(4, False, torch.ones(3, dtype=torch.float64), seed=0)
    tape = schedule.tape(3)
    for t, std in enumerate((1.0, 2.0)):
        tape.record(t, torch.arange(3), torch.zeros(3), torch.ones(3), torch.zeros(0), 1.0, 0.25, std)
    with pytest.raises(dpkit.PrivacyUsageError, match="one of each"):
        tape.scores()
    late = schedule.tape(3)
    late.record(1, torch.arange(3), torch.zeros(3), torch.ones(3), torch.zeros(0), 1.0, 0.25, 1.0)
    with pytest.raises(dpkit.PrivacyUsageError, match="before the first step"):
        late.scores()
    with pytest.raises(TypeError, match="tree aggregation"):
        tree_schedule(object(), None, 3, torch.Generator())
