"""Data: loaders dpkit cannot Poisson-sample, sample rates, the "mean" denominator, secure sampling, K copies."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import (
    BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, SubsetRandomSampler, TensorDataset,
    WeightedRandomSampler,
)

import dpkit
from dpkit.errors import PrivacyUsageError
from dpkit.testing import check_sensitivity

from ._setup import Capture, assert_counted, batch, dataset, loss_backward, make, net, train_step


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(*batch(8))


class EvenBatches(BatchSampler):
    """A custom batch sampler (a subclass): Poisson sampling would replace it."""


# -- 11. loaders ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_loader,error,match", [
    (lambda: DataLoader(dataset(), batch_size=8, sampler=SubsetRandomSampler(range(16))), ValueError,
     "SubsetRandomSampler"),
    (lambda: DataLoader(dataset(), batch_size=8, sampler=WeightedRandomSampler([1.0] * 32, 32)), ValueError,
     "WeightedRandomSampler"),
    (lambda: DataLoader(dataset(), batch_sampler=EvenBatches(SequentialSampler(range(32)), 8, False)), ValueError,
     r"own batch sampler \(EvenBatches\)"),
    (lambda: DataLoader(dataset(), batch_size=None), ValueError, "batch_size=None"),
    (lambda: DataLoader(Stream(), batch_size=4), TypeError, "IterableDataset"),
    (lambda: DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=4),
     ValueError, "dataset is empty"),
    (lambda: list(DataLoader(dataset(), batch_size=8)), TypeError, "must be a torch.utils.data.DataLoader, got list"),
    (lambda: dataset(), TypeError, "got TensorDataset"),
    (lambda: DataLoader(dataset(), batch_size=8, sampler=RandomSampler(range(32), replacement=True)), ValueError,
     "RandomSampler"),
    (lambda: DataLoader(dataset(), batch_size=8, sampler=RandomSampler(range(32), num_samples=8)), ValueError,
     "RandomSampler"),
], ids=["subset", "weighted", "batch_sampler", "batch_size_none", "iterable", "empty", "list", "dataset",
        "with_replacement", "fewer_samples"])
def test_loaders_dpkit_cannot_poisson_sample_are_refused(make_loader, error, match):
    with pytest.raises(error, match=match):
        make(data_loader=make_loader())


def test_drop_last_warns():
    with pytest.warns(UserWarning, match="drop_last=True has no meaning under Poisson sampling"):
        make(data_loader=DataLoader(dataset(), batch_size=8, drop_last=True), quiet=False)


def test_shuffled_fixed_batches_are_refused_unless_the_documented_opt_out():
    """Shuffled batches under Poisson accounting over-state privacy (arXiv 2411.10614): False is refused, with the
    reference and the alternatives; "unproven" keeps them and warns."""
    shuffled = DataLoader(dataset(), batch_size=8, shuffle=True)
    for value in (False, 0):
        with pytest.raises(PrivacyUsageError, match="2411.10614.*TruncatedPoissonLoader.*'unproven'"):
            make(data_loader=shuffled, poisson_sampling=value)
    with pytest.warns(UserWarning, match="poisson_sampling='unproven'.*not a proven bound"):
        make(data_loader=shuffled, poisson_sampling="unproven", quiet=False)
    with pytest.raises(TypeError, match="True or False \\(or 'unproven'"):
        make(data_loader=shuffled, poisson_sampling="False")


def test_a_shuffled_loader_is_replaced_by_poisson_sampling_of_the_whole_dataset():
    p = make(data_loader=DataLoader(dataset(), batch_size=8, shuffle=True))
    assert isinstance(p.data_loader, dpkit.DPDataLoader) and p.sample_rate == 0.25
    assert p.expected_batch_size == 8 and len(p.data_loader) == 4


def test_secure_mode_with_a_seeded_dp_loader_is_refused():
    seeded = dpkit.DPDataLoader(dataset(), 0.25, generator=torch.Generator().manual_seed(0))
    with pytest.raises(PrivacyUsageError, match="secure_mode=True with a DPDataLoader that samples from a seeded"):
        make(data_loader=seeded, secure_mode=True, noise_seed=None)


# -- 12. sample rates without a loader ------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [0, 0.0, -0.1, 1.5, "0.1", float("nan"), float("inf"), None])
def test_unusable_sample_rate_without_a_loader_is_refused(q):
    with pytest.raises(ValueError, match="sample_rate"):
        make(sample_rate=q)


def test_sample_rate_with_a_loader_is_refused():
    with pytest.raises(ValueError, match="sample_rate= and expected_batch_size= go with data_loader=None"):
        make(data_loader=DataLoader(dataset(), batch_size=8), sample_rate=0.5)


# -- 7. the "mean" denominator --------------------------------------------------------------------------------------
def test_mean_without_a_loader_needs_the_expected_batch_size():
    with pytest.raises(ValueError, match="expected_batch_size="):
        make(data_loader=None, sample_rate=0.25, expected_batch_size=None)


def test_sum_without_a_loader_needs_no_expected_batch_size():
    p = make(data_loader=None, sample_rate=0.25, expected_batch_size=None, loss_reduction="sum")
    train_step(p, *batch())
    assert_counted(p, 1)


@pytest.mark.parametrize("size", [0, -8, float("nan"), "8"])
def test_unusable_expected_batch_size_is_refused(size):
    with pytest.raises(ValueError, match="expected_batch_size"):
        make(expected_batch_size=size)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_the_mean_divides_by_the_expected_batch_size_whatever_the_actual_one(mode):
    """Same noise seed: the empty batch releases noise/E, the full batch (clipped sum + the same noise)/E. Their
    difference times E is exactly the clipped sum, and the empty batch's release has std sigma*C/E."""
    x, y = batch(8)
    releases = {}
    for rows in (0, 3, 8):
        p = make(mode=mode, noise_multiplier=2.0, noise_seed=11, expected_batch_size=4)
        cap = Capture(p)
        train_step(p, x[:rows], y[:rows])
        releases[rows] = torch.cat([g.flatten() for g in cap.first.values()])  # already times E
    # the empty batch: pure noise of std sigma*C (after multiplying back by E=4)
    noise = releases[0]
    assert 1.0 < noise.std().item() < 3.5 and bool((noise != 0).all())
    # clipped sums: each example moves the sum by at most C, so |release(8)-release(0)| <= 8 C, etc.
    assert (releases[8] - releases[0]).norm().item() <= 8 + 1e-4
    assert (releases[3] - releases[0]).norm().item() <= 3 + 1e-4
    assert (releases[8] - releases[0]).norm().item() > 1.0  # the noise cancelled: the sum is visible


def test_empty_and_full_batches_get_noise_of_the_same_std():
    """A wide model with zero gradients (zero inputs to a bias-free layer): the release is the noise alone."""
    def std_of(rows):
        model = torch.nn.Linear(400, 50, bias=False)
        torch.nn.init.zeros_(model.weight)
        p = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                               data_loader=None, sample_rate=0.1, expected_batch_size=10, noise_multiplier=1.0,
                               max_grad_norm=2.0, noise_seed=rows, loss_reduction="sum")
        model(torch.zeros(rows, 400)).sum().backward()
        p.optimizer.step()
        return model.weight.grad.std().item()
    for rows in (0, 1, 40):
        assert std_of(rows) == pytest.approx(2.0, rel=0.03), rows  # sigma C: a summed loss's step is not divided


# -- 8. secure sampling ---------------------------------------------------------------------------------------------
def test_secure_sampler_is_not_replayed_by_the_torch_seed():
    def draws():
        torch.manual_seed(0)
        p = make(data_loader=DataLoader(dataset(256), batch_size=64), secure_mode=True, noise_seed=None)
        return [x.sum().item() for x, _ in p.data_loader]
    assert draws() != draws()


def test_seeded_sampler_is_replayed_by_the_torch_seed():
    """The control of the test above: without secure mode the same torch seed draws the same batches."""
    def draws():
        torch.manual_seed(0)
        p = make(data_loader=DataLoader(dataset(256), batch_size=64))
        return [x.sum().item() for x, _ in p.data_loader]
    assert draws() == draws()


# -- batches of every size, K copies --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_datasets_train_privately(n):
    p = make(data_loader=DataLoader(dataset(n), batch_size=1))
    for xb, yb in p.data_loader:
        train_step(p, xb, yb)
    assert_counted(p, len(p.data_loader))


def test_a_batch_of_one_is_within_the_bound():
    report = check_sensitivity(lambda: make(noise_multiplier=0.0),
                               lambda p, b: train_step(p, *b), batch(1))
    assert report.ok and 0.5 < report.sensitivity <= 1.0 + 1e-6


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_k_augmented_copies_are_one_example(mode):
    """Removing an example removes its K=3 adjacent copies; together they move the sum by at most C."""
    x, y = batch(4)
    xk = x.repeat_interleave(3, 0) + 0.1 * torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    yk = y.repeat_interleave(3, 0)
    report = check_sensitivity(lambda: make(mode=mode, noise_multiplier=0.0, augmentation_multiplicity=3),
                               lambda p, b: train_step(p, *b), (xk, yk))
    assert report.ok and report.sensitivity > 0.5


def test_rows_not_divisible_by_k_are_refused():
    p = make(augmentation_multiplicity=3)
    with pytest.raises(PrivacyUsageError, match="not a multiple of augmentation_multiplicity K=3"):
        loss_backward(p, *batch(8))
    assert p.steps == 0


def test_dict_batches_with_non_tensor_fields_train():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, batch):
            return self.body(batch["x"])

    p = make(DictModel())
    x, y = batch()
    p.optimizer.zero_grad()
    p.criterion(p.module({"x": x, "name": "train"}), y).backward()
    p.optimizer.step()
    assert_counted(p, 1)
