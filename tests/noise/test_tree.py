"""Tree aggregation: z_t against an explicit tree, the variances of z_t and of the prefix sums, the loader's one pass
per epoch, the ledger against the closed-form Gaussian ε, calibration, exact resumes, and the refusals."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import optimize, stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accounting import epsilon_of_ledger
from dpkit.data import CyclicPoissonLoader, DPDataLoader, ShuffledBatchLoader, ShuffledBatchSampler
from dpkit.errors import PrivacyUsageError
from dpkit.events import Ledger
from dpkit.noise import tree
from dpkit.noise.tree import TreeAggregation, check_loader, levels, step_nodes
from _mechanism_runs import assert_next_batch_only, resume, train_until

N = 100


def _dataset(n: int = N) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen))


def _loader(batch_size: int = 16, n: int = N, **kwargs) -> ShuffledBatchLoader:
    if not kwargs.get("secure_mode"):
        kwargs.setdefault("generator", torch.Generator().manual_seed(3))
    return ShuffledBatchLoader(_dataset(n), batch_size, **kwargs)


def _bound(epoch_length: int, seed: int = 7, secure_mode: bool = False) -> tuple[TreeAggregation, ShuffledBatchLoader]:
    """A mechanism bound to a loader of ``epoch_length`` batches of 1 (N = epoch_length)."""
    mechanism = TreeAggregation(seed=seed, secure_mode=secure_mode)
    loader = _loader(1, n=epoch_length, secure_mode=secure_mode)
    check_loader(loader, mechanism)
    return mechanism, loader


def _noise_of_steps(mechanism: TreeAggregation, loader: ShuffledBatchLoader, steps: int, size: int, std: float,
                    dtype=torch.float64) -> torch.Tensor:
    """Each step's noise on a zero buffer, the loader advanced as a training loop would."""
    out = []
    for _ in range(steps):
        loader.batch_sampler.position += 1  # the batch handed out for this step
        out.append(mechanism.add(torch.zeros(size, dtype=dtype), std=std))
        mechanism.dp_event(1.0, loader.sample_rate)
    return torch.stack(out)


def _dyadic_tiling(t: int) -> list[tuple[int, int]]:
    """[1, t] as disjoint dyadic intervals (level, index), greedily from the left: the independent reference."""
    nodes, start = [], 0
    while start < t:
        level = max(j for j in range(t.bit_length()) if start % 2**j == 0 and start + 2**j <= t)
        nodes.append((level, start // 2**level + 1))
        start += 2**level
    return nodes


# -- the tree ------------------------------------------------------------------------------------
def test_step_nodes_keep_the_dyadic_tiling_of_every_prefix():
    live: set[tuple[int, int]] = set()
    for t in range(1, 130):
        added, subtracted = step_nodes(t)
        assert set(subtracted) <= live
        live = (live - set(subtracted)) | {added}
        assert live == set(_dyadic_tiling(t)), t


def test_levels_is_the_most_nodes_inside_the_epoch_that_hold_one_leaf():
    for T in range(1, 70):
        nodes = [(j, i) for j in range(8) for i in range(1, T + 1) if i * 2**j <= T]
        most = max(sum((i - 1) * 2**j < leaf <= i * 2**j for j, i in nodes) for leaf in range(1, T + 1))
        assert levels(T) == most <= math.ceil(math.log2(T)) + 1, T
    with pytest.raises(ValueError, match="epoch length"):
        levels(0)


def test_noise_is_the_difference_of_explicit_tree_prefix_sums():
    """Two epochs of T = 11 against prefix sums built from the explicit nodes of each epoch's tree."""
    T, size, std = 11, 5, 1.3
    mechanism, loader = _bound(T)
    got = _noise_of_steps(mechanism, loader, 2 * T, size, std)
    key = f"cpu|{torch.float64}|{size}|0"

    def node(epoch, level, index):
        value = torch.zeros(size, dtype=torch.float64)
        mechanism._apply(value, key, epoch, (level, index), std, sign=1, keep=False)
        return value

    for epoch in range(2):
        prefix = [torch.zeros(size, dtype=torch.float64)]
        for t in range(1, T + 1):
            prefix.append(sum(node(epoch, j, i) for j, i in _dyadic_tiling(t)))
        expected = torch.stack([prefix[t] - prefix[t - 1] for t in range(1, T + 1)])
        torch.testing.assert_close(got[epoch * T:(epoch + 1) * T], expected, rtol=0, atol=1e-12)
    assert not torch.equal(got[:T], got[T:])  # each epoch its own tree


def _exact_covariance(T: int, epochs: int) -> torch.Tensor:
    """Cov(z) / σ² from z = A·nodes, A built from the dyadic tilings: an independent reference."""
    columns = {}
    rows = []
    for t in range(1, T + 1):
        now, before = set(_dyadic_tiling(t)), set(_dyadic_tiling(t - 1))
        for n in now | before:
            columns.setdefault(n, len(columns))
        rows.append({n: (n in now) - (n in before) for n in now | before})
    A = torch.zeros(T, len(columns), dtype=torch.float64)
    for t, row in enumerate(rows):
        for n, sign in row.items():
            A[t, columns[n]] = sign
    return torch.block_diag(*[A @ A.T] * epochs)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_variances_of_the_steps_and_of_the_prefix_sums(secure_mode):
    """Var z_t = (1 + trailing zeros of t)·σ², Var N_t = popcount(t)·σ², the whole covariance as the tree's, and
    epochs independent: sample moments over many coordinates (5 standard errors)."""
    T, std = 8, 2.0
    size = 80_000 if secure_mode else 200_000
    mechanism, loader = _bound(T, secure_mode=secure_mode)
    z = _noise_of_steps(mechanism, loader, 2 * T, size, std)
    empirical = z @ z.T / size / std**2
    exact = _exact_covariance(T, 2)
    assert torch.diagonal(exact)[:T].tolist() == [1 + (t & -t).bit_length() - 1 for t in range(1, T + 1)]
    assert (empirical - exact).abs().max() < 5 * 4 / math.sqrt(size)
    prefix_variance = z[:T].cumsum(0).var(dim=1) / std**2
    expected = torch.tensor([bin(t).count("1") for t in range(1, T + 1)], dtype=torch.float64)
    assert (prefix_variance - expected).abs().max() < 5 * 4 / math.sqrt(size)


# -- Honaker's estimator -------------------------------------------------------------------------
def test_honaker_prefix_sums_are_the_least_squares_estimate_from_every_released_node():
    """Two epochs of T = 11: after each step, the prefix sum of the noise equals the best linear unbiased estimate
    of a zero stream from the explicit noisy nodes that end by then (ordinary least squares over the leaves)."""
    T, size, std = 11, 4, 1.3
    mechanism = TreeAggregation(seed=7, honaker=True)
    loader = _loader(1, n=T)
    check_loader(loader, mechanism)
    got = _noise_of_steps(mechanism, loader, 2 * T, size, std)
    key = f"cpu|{torch.float64}|{size}|0"
    for epoch in range(2):
        prefix = got[epoch * T:(epoch + 1) * T].cumsum(0)
        for t in range(1, T + 1):
            nodes = [(j, i) for j in range(4) for i in range(1, t + 1) if i * 2**j <= t]
            design = torch.tensor([[float((i - 1) * 2**j < s <= i * 2**j) for s in range(1, t + 1)]
                                   for j, i in nodes], dtype=torch.float64)
            values = torch.zeros(len(nodes), size, dtype=torch.float64)
            for row, node in zip(values, nodes):
                mechanism._draw(row, key, epoch, node, std, 1.0)
            leaves = torch.linalg.lstsq(design, values).solution
            torch.testing.assert_close(prefix[t - 1], leaves.sum(0), rtol=0, atol=1e-10)


def test_honaker_variance_is_the_refined_nodes_and_lower_than_the_trees():
    """Var N_t = Σ v_j over the set bits j of t, v_j = 2^j/(2^{j+1}−1): sample moments over many coordinates."""
    T, std, size = 16, 1.5, 100_000
    mechanism = TreeAggregation(seed=3, honaker=True)
    loader = _loader(1, n=T)
    check_loader(loader, mechanism)
    prefix = _noise_of_steps(mechanism, loader, T, size, std).cumsum(0)
    expected = torch.tensor([sum(2**j / (2 ** (j + 1) - 1) for j in range(5) if t >> j & 1) for t in range(1, T + 1)],
                            dtype=torch.float64)
    assert (prefix.var(dim=1) / std**2 - expected).abs().max() < 5 * 2 * expected.max() / math.sqrt(size)
    assert (expected <= torch.tensor([bin(t).count("1") for t in range(1, T + 1)])).all()
    assert tree.honaker_weights(0) == (1.0, 0.0) and tree.honaker_weights(1) == pytest.approx((2 / 3, 1 / 3))


def test_honaker_keeps_at_most_the_live_nodes():
    T, size = 13, 100
    for secure_mode in (False, True):
        mechanism = TreeAggregation(seed=None if secure_mode else 1, secure_mode=secure_mode, honaker=True)
        loader = _loader(1, n=T, secure_mode=secure_mode)
        check_loader(loader, mechanism)
        for t in range(1, T + 3):
            _noise_of_steps(mechanism, loader, 1, size, 1.0, dtype=torch.float32)
            leaf = (t - 1) % T + 1
            assert mechanism.memory_bytes() == (0 if leaf == T else bin(leaf).count("1")) * size * 4, t


def test_memory_regenerated_outside_secure_mode_and_live_nodes_in_it():
    T, size = 13, 1000
    mechanism, loader = _bound(T)
    _noise_of_steps(mechanism, loader, T + 3, size, 1.0, dtype=torch.float32)
    assert mechanism.memory_bytes() == 0
    secure, loader = _bound(T, secure_mode=True)
    for t in range(1, 2 * T + 1):
        _noise_of_steps(secure, loader, 1, size, 1.0, dtype=torch.float32)
        leaf = (t - 1) % T + 1
        live = 0 if leaf == T else bin(leaf).count("1")
        assert secure.memory_bytes() == live * size * 4 <= levels(T) * size * 4, t


def test_two_alike_buffers_in_one_step_get_independent_noise():
    mechanism, loader = _bound(4)
    loader.batch_sampler.position += 1
    first, second = (mechanism.add(torch.zeros(1000), std=1.0) for _ in range(2))
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.2


# -- the loader ----------------------------------------------------------------------------------
def test_each_epoch_is_one_pass_in_fixed_size_batches_and_resumes_mid_epoch():
    sampler = ShuffledBatchSampler(N, 16, generator=torch.Generator().manual_seed(2))
    assert len(sampler) == 6 and sampler.sample_rate == 16 / N
    epochs = []
    for _ in range(3):
        batches = list(sampler)
        sampler.position += len(batches)
        members = [i for b in batches for i in b]
        assert len(batches) == 6 and {len(b) for b in batches} == {16} and len(set(members)) == 96
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    twin = ShuffledBatchSampler(N, 16, generator=torch.Generator().manual_seed(99))
    twin.load_state_dict({**sampler.state_dict(), "position": 8})  # mid-epoch 1: its last 4 batches
    assert list(twin) == epochs[1][2:]


def test_a_loop_that_breaks_off_continues_the_same_epoch():
    mechanism, loader = TreeAggregation(seed=1), _loader(16)
    check_loader(loader, mechanism)
    first = [y for _, (_, y) in zip(range(2), loader)]
    rest = [y for _, y in loader]
    assert len(first) + len(rest) == 6 and loader.batch_sampler.position == 6
    order = loader.batch_sampler.order(0)
    assert torch.equal(torch.cat(first + rest), loader.dataset.tensors[1][order[:96]])


def test_sampler_arguments_are_checked():
    for size in (0, N + 1, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            ShuffledBatchSampler(N, size)
    with pytest.raises(ValueError, match="no generator"):
        ShuffledBatchSampler(N, 4, generator=torch.Generator(), secure_mode=True)
    with pytest.raises(ValueError, match="num_samples, batch_size"):
        ShuffledBatchSampler(N, 4).load_state_dict(ShuffledBatchSampler(N, 5).state_dict())


# -- accounting ----------------------------------------------------------------------------------
def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism at δ, exactly (Balle & Wang 2018; Dong et al. 2019): no accountant involved."""
    def gap(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0, 200)


def _ledger_of(epoch_length: int, sigma: float, steps: int) -> Ledger:
    mechanism, loader = _bound(epoch_length)
    ledger = Ledger()
    for _ in range(steps):
        ledger.record(mechanism.dp_event(sigma, loader.sample_rate))
    return ledger


def _gaussians(ledger: Ledger) -> int:
    return sum(count for event, count in ledger.entries if type(event).__name__ != "NoOpEvent")


def _most_nodes(t: int) -> int:
    """The most dyadic nodes ending at or before ``t`` that hold one leaf of ``[1, t]``, by enumeration."""
    return max((sum(math.ceil(s / 2**j) * 2**j <= t for j in range(8)) for s in range(1, t + 1)), default=0)


def test_the_ledger_holds_the_most_nodes_any_leaf_has_touched_after_every_step():
    """After each step, the Gaussians charged equal the most nodes (drawn so far, i.e. ending at or before the
    epoch's current leaf) that hold one leaf, summed over epochs: counted by enumeration, never fewer."""
    for T in (1, 5, 8, 13, 37):
        mechanism, loader = _bound(T)
        ledger = Ledger()
        for step in range(1, 2 * T + 2):
            ledger.record(mechanism.dp_event(1.0, loader.sample_rate))
            epochs, t = divmod(step, T)
            touched = epochs * _most_nodes(T) + _most_nodes(t)
            assert _gaussians(ledger) == touched == tree.charged_nodes(step, T), (T, step)


@pytest.mark.parametrize("T, steps, sigma", [
    (8, 40, 4.0),  # 5 epochs of L = 4: μ = √20 / 4
    (100, 250, 6.0),  # 2 epochs of L = 7 and 50 steps, which touch at most bit_length(50) = 6 nodes: μ = √20 / 6
    (1, 50, 10.0),  # full batch: DP-SGD without amplification, μ = √50 / 10
])
def test_ledger_matches_the_closed_form_gaussian(T, steps, sigma):
    ledger = _ledger_of(T, sigma, steps)
    gaussians = (steps // T) * T.bit_length() + (steps % T).bit_length()
    assert _gaussians(ledger) == gaussians
    exact = _exact_gaussian_epsilon(math.sqrt(gaussians) / sigma, 1e-5)
    assert exact * (1 - 1e-3) <= epsilon_of_ledger(ledger, 1e-5, "prv") <= exact * 1.01
    assert epsilon_of_ledger(ledger, 1e-5, "rdp") >= exact


def test_calibrate_meets_the_target_in_closed_form():
    mechanism, _ = _bound(12)
    sigma = mechanism.calibrate(target_epsilon=2.0, target_delta=1e-5, steps=100)
    exact = _exact_gaussian_epsilon(math.sqrt(8 * 4 + 3) / sigma, 1e-5)  # 8 epochs of L = 4, then 4 steps: 3
    assert 1.95 <= exact <= epsilon_of_ledger(_ledger_of(12, sigma, 100), 1e-5) <= 2.0
    with pytest.raises(PrivacyUsageError, match="epoch length"):
        TreeAggregation(seed=0).calibrate(target_epsilon=2.0, target_delta=1e-5, steps=10)


# -- through the engine --------------------------------------------------------------------------
def _train(steps: int, state=None, secure_mode: bool = False, order_seed: int = 5, noise: str = "tree", **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = _loader(16, secure_mode=secure_mode,
                     **({} if secure_mode else {"generator": torch.Generator().manual_seed(order_seed)}))
    private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                 max_grad_norm=1.0, noise=noise, noise_seed=11, secure_mode=secure_mode, **kwargs)
    resume(model, private, state)
    train_until(model, private, steps)
    return model, private


def test_checkpoint_resumes_exactly():
    """7 steps (one epoch of 6 and one step), a checkpoint, 6 more with a loader of another seed: the same
    weights as 13 uninterrupted steps, bit for bit (the checkpoint restores the order too)."""
    whole, private = _train(13)
    first_model, first = _train(7)
    state = {"model": first_model.state_dict(), "optimizer": first.optimizer.state_dict(),
             "private": first.state_dict()}
    resumed, again = _train(13, state=state, order_seed=123)
    torch.testing.assert_close(resumed.weight, whole.weight, rtol=0, atol=0)
    assert again.steps == 13 and again.epsilon(1e-5) == private.epsilon(1e-5)
    assert again.noise.memory_bytes() == 0


def test_honaker_checkpoint_resumes_exactly_without_saving_noise():
    """The refined nodes a resumed run needs are recomputed from their seeds, the same bits as the streamed ones."""
    whole, private = _train(13, noise="tree-honaker")
    first_model, first = _train(9, noise="tree-honaker")
    state = {"model": first_model.state_dict(), "optimizer": first.optimizer.state_dict(),
             "private": first.state_dict()}
    assert first.noise.memory_bytes() > 0 and "nodes" not in str(state["private"]["noise"])
    resumed, again = _train(13, state=state, order_seed=123, noise="tree-honaker")
    torch.testing.assert_close(resumed.weight, whole.weight, rtol=0, atol=0)
    plain, _ = _train(13)
    assert not torch.equal(plain.weight, whole.weight)
    assert again.epsilon(1e-5) == private.epsilon(1e-5)
    _, secure = _train(4, secure_mode=True, noise="tree-honaker")
    _, resumed = _train(9, state={"model": secure.module.state_dict(), "optimizer": secure.optimizer.state_dict(),
                                  "private": secure.state_dict()}, secure_mode=True, noise="tree-honaker")
    assert resumed.steps == 9
    with pytest.raises(PrivacyUsageError, match="another configuration"):
        _train(13, state=state)
    honaker, plain = TreeAggregation(seed=1, honaker=True), TreeAggregation(seed=1)
    check_loader(_loader(16), honaker)
    check_loader(_loader(16), plain)
    with pytest.raises(PrivacyUsageError, match="honaker=True"):
        plain.load_state_dict(honaker.state_dict())


def test_secure_mode_saves_no_noise_and_resumes():
    model, private = _train(4, secure_mode=True)
    assert private.noise.memory_bytes() > 0  # live nodes, kept in memory only
    state = private.state_dict()
    assert state["noise"]["seed"] is None and "nodes" not in str(state["noise"])
    _, resumed = _train(9, state={"model": model.state_dict(), "optimizer": private.optimizer.state_dict(),
                                  "private": state}, secure_mode=True)
    assert resumed.steps == 9 and _gaussians(resumed.ledger) == 3 + 2  # an epoch of 6 (L = 3), then 3 steps


def test_make_private_epsilon_is_the_closed_form():
    _, private = _train(12)  # 2 epochs of 6 steps, L = 3
    exact = _exact_gaussian_epsilon(math.sqrt(2 * 3) / 1.0, 1e-5)
    assert exact <= private.epsilon(1e-5) <= exact * 1.01


def test_make_private_with_epsilon_calibrates_for_the_tree():
    model = nn.Linear(4, 2)
    private = dpkit.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=_loader(16),
        max_grad_norm=1.0, target_epsilon=2.0, target_delta=1e-5, epochs=3, noise="tree")
    sigma = private.noise_multiplier
    assert 1.95 <= _exact_gaussian_epsilon(math.sqrt(3 * 3) / sigma, 1e-5) <= 2.0
    for _ in range(3):
        for x, y in private.data_loader:
            nn.functional.cross_entropy(model(x), y).backward()
            private.optimizer.step()
            private.optimizer.zero_grad()
    assert private.steps == 18 and 1.95 <= private.epsilon(1e-5) <= 2.0
    dp_sgd = dpkit.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.16, steps=18)
    assert sigma > dp_sgd * 1.2  # no amplification: more noise than DP-SGD at the same ε


# -- refusals ------------------------------------------------------------------------------------
def test_an_unchecked_mechanism_or_loader_refuses():
    with pytest.raises(PrivacyUsageError, match="ShuffledBatchLoader"):
        TreeAggregation(seed=1).add(torch.zeros(3), std=1.0)
    with pytest.raises(PrivacyUsageError, match="Poisson accounting"):
        next(iter(_loader(16)))
    with pytest.raises(PrivacyUsageError, match="unbound"):
        TreeAggregation(seed=1).state_dict()


@pytest.mark.parametrize("loader", [DataLoader(_dataset(), batch_size=8), DPDataLoader(_dataset(), 0.1),
                                    CyclicPoissonLoader(_dataset(), 0.3, 2), None],
                         ids=["DataLoader", "DPDataLoader", "CyclicPoissonLoader", "None"])
def test_other_loaders_are_refused(loader):
    with pytest.raises(PrivacyUsageError, match="shuffled fixed-size batches"):
        check_loader(loader, TreeAggregation(seed=1))


def test_make_private_refuses_other_sampling_and_the_gaussian_refuses_the_shuffled_loader():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for loader in (DataLoader(_dataset(), batch_size=8), DPDataLoader(_dataset(), 0.1)):
        with pytest.raises(PrivacyUsageError, match="shuffled fixed-size batches"):
            dpkit.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                               max_grad_norm=1.0, noise="tree")
    with pytest.raises(PrivacyUsageError, match="spends privacy too"):
        dpkit.make_private(module=model, optimizer=optimizer, data_loader=_loader(16), noise_multiplier=1.0,
                           max_grad_norm=1.0, noise="tree", clipping="adaptive",
                           clipping_kwargs={"count_noise_multiplier": 5.0})
    with pytest.raises(PrivacyUsageError, match="ShuffledBatchLoader, whose sampling noise='gaussian' does not"):
        dpkit.make_private(module=model, optimizer=optimizer, data_loader=_loader(16), noise_multiplier=1.0,
                           max_grad_norm=1.0)


def test_a_step_must_use_the_loaders_next_batch():
    assert_next_batch_only(_train(2)[1])


def test_noise_std_must_stay_and_be_positive():
    mechanism, loader = _bound(4)
    _noise_of_steps(mechanism, loader, 1, 3, 1.0)
    loader.batch_sampler.position += 1
    with pytest.raises(PrivacyUsageError, match="std changed"):
        mechanism.add(torch.zeros(3), std=2.0)
    with pytest.raises(PrivacyUsageError, match="noise_multiplier > 0"):
        mechanism.add(torch.zeros(3), std=0.0)
    with pytest.raises(PrivacyUsageError, match="sample rate"):
        mechanism.dp_event(1.0, 0.5)


def test_binding_refusals(monkeypatch):
    mechanism, _ = _bound(4)
    with pytest.raises(PrivacyUsageError, match="epochs of 4 steps"):
        check_loader(_loader(1, n=5), mechanism)
    used = _loader(16)
    check_loader(used, TreeAggregation(seed=0))
    next(iter(used))
    with pytest.raises(PrivacyUsageError, match="out of step"):
        check_loader(used, TreeAggregation(seed=0))
    with pytest.raises(PrivacyUsageError, match="secure_mode=True"):
        check_loader(_loader(16), TreeAggregation(secure_mode=True))
    with pytest.raises(TypeError, match="TreeAggregation"):
        check_loader(_loader(16), object())
    monkeypatch.setattr(tree.distributed, "world_size", lambda: 2)
    with pytest.raises(PrivacyUsageError, match="distributed"):
        TreeAggregation()


def test_checkpoints_of_another_configuration_are_refused():
    mechanism, _ = _bound(6)
    state = mechanism.state_dict()
    other, _ = _bound(7)
    with pytest.raises(PrivacyUsageError, match="epochs of 6 steps"):
        other.load_state_dict(state)
    secure, _ = _bound(6, secure_mode=True)
    with pytest.raises(PrivacyUsageError, match="secure_mode"):
        secure.load_state_dict(state)
    for bad, match in [({"coefficients": [1.0]}, "not a state_dict"), ({**state, "released": -1}, "released"),
                       ({**state, "seed": "x"}, "seed"), ({**state, "std": 0.0}, "std")]:
        with pytest.raises(ValueError, match=match):
            mechanism.load_state_dict(bad)
    _, private = _train(3)
    theirs = private.state_dict()
    _, mine = _train(0)
    mine.noise.load_state_dict(theirs["noise"])  # the same configuration loads
    model = nn.Linear(4, 2)
    other_batch = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=_loader(10), noise_multiplier=1.0, max_grad_norm=1.0, noise="tree")
    with pytest.raises(PrivacyUsageError, match="batch size the checkpoint|sample_rate=0.16 there, 0.1 here"):
        other_batch.load_state_dict(theirs)
    assert other_batch.noise._released == 0 and other_batch.data_loader.batch_sampler.position == 0


def test_nodes_whose_seeds_share_their_low_32_bits_draw_independent_noise(monkeypatch):
    """torch's CPU generator keeps only a seed's low 32 bits; over a long run's ~10⁵ nodes two hashed seeds would
    agree there, and those nodes would carry the same noise. The nodes' draws must use every bit of the seed."""
    mechanism, _ = _bound(4)
    seeds = iter([5, 5 + 2**32])
    monkeypatch.setattr(tree.distributed, "digest", lambda material: next(seeds))
    first, second = (torch.zeros(20_000, dtype=torch.float64) for _ in range(2))
    mechanism._apply(first, "k", 0, (0, 1), 1.0, sign=1, keep=False)
    mechanism._apply(second, "k", 0, (0, 2), 1.0, sign=1, keep=False)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.05
    assert abs(first.std().item() - 1.0) < 0.05
