"""The privacy invariants, each enforced at one place in the engine (docs/design.md, "Fail closed"):

1. one release per sampled batch (``engine/gate.py``);
3. the model's state changes only through the release (``engine/guards.py``, ``StateWatch``);
4. settings that belong together are enforced (``engine/make.py``, ``engine/checkpoint.py``, ``data.ByUser``).

Invariant 2 (rows stay independent) is the batch trace's: ``tests/modes/test_rows.py``. Each loop here either
ends in a clear refusal before anything is released, or is measured to be a correct step.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dpkit
from dpkit.data import CyclicPoissonLoader
from dpkit.errors import PrivacyUsageError

from ._setup import assert_sensitivity, batch, dataset, make, net, train_step

STEP_MODES = ("hooks", "ghost", "bk", "auto")


def drawn(private):
    """The next batch of the controller's own loader, as a training loop sees it."""
    return next(iter(private.data_loader))


def frozen_params(p):
    return {n: t.detach().clone() for n, t in p.module.named_parameters()}


def assert_unmoved(p, before):
    for n, t in p.module.named_parameters():
        assert torch.equal(t, before[n]), f"{n} moved"


# -- 1. one release per sampled batch ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", STEP_MODES)
def test_several_steps_on_one_sampled_batch_are_refused(mode):
    """PPO-style inner steps: the ledger would record one sampled step per release (eps 2.25x under-counted)."""
    p = make(mode=mode, data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8))
    x, y = drawn(p)
    train_step(p, x, y)
    before = frozen_params(p)
    with pytest.raises(PrivacyUsageError, match="already released"):
        train_step(p, x, y)
    assert_unmoved(p, before)
    assert p.steps == p.ledger.steps == 1


def test_a_batch_released_earlier_is_refused_again():
    p = make(data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8))
    batches = iter(p.data_loader)
    first, second = next(batches), next(batches)
    train_step(p, *second)
    with pytest.raises(PrivacyUsageError, match="already released"):
        train_step(p, *first)  # an older batch, kept and replayed
    assert p.ledger.steps == 1


def test_one_step_per_batch_and_micro_batches_still_pass():
    p = make(data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8))
    for x, y in p.data_loader:
        train_step(p, x, y)
    with dpkit.BatchMemoryManager(p, max_physical_batch_size=3) as pieces:
        for x, y in pieces:
            train_step(p, x, y)
    assert p.steps == p.ledger.steps == 2 * len(p.data_loader)


def bandmf(**kw):
    model = net()
    loader = CyclicPoissonLoader(dataset(32), group_sample_rate=0.5, cycle_length=4, generator=torch.Generator()
                                 .manual_seed(0))
    return make(model, data_loader=loader, noise="bandmf-4", **kw)


def test_bandmf_refuses_a_skipped_batch():
    p = bandmf()
    batches = iter(p.data_loader)
    train_step(p, *next(batches))
    next(batches)  # drawn and skipped
    with pytest.raises(PrivacyUsageError, match="fixed positions"):
        train_step(p, *next(batches))
    assert p.ledger.steps == 1


def test_bandmf_refuses_two_steps_on_one_batch_and_a_dropped_batch():
    p = bandmf()
    batches = iter(p.data_loader)
    x, y = next(batches)
    train_step(p, x, y)
    with pytest.raises(PrivacyUsageError):
        train_step(p, x, y)
    x, y = next(batches)
    p.optimizer.zero_grad()
    p.criterion(p.module(x), y).backward()
    p.optimizer.zero_grad()  # a NaN recovery that drops the batch: its position is lost
    with pytest.raises(PrivacyUsageError, match="fixed positions"):
        train_step(p, *next(batches))
    assert p.ledger.steps == 1


def test_bandmf_refuses_a_new_loader_per_epoch():
    p = bandmf()
    for x, y in p.data_loader:
        train_step(p, x, y)
        break
    fresh = CyclicPoissonLoader(dataset(32), group_sample_rate=0.5, cycle_length=4)
    with pytest.raises(PrivacyUsageError, match="fixed positions|already released"):
        train_step(p, *next(iter(fresh)))  # the cycle restarts: one example could join twice within 4 steps
    assert p.ledger.steps == 1


# -- 3. state changes only through the release --------------------------------------------------------------------
class RunningMean(nn.Module):
    """A buffer updated from the inputs in forward: one example's value is readable from it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x)


class Reassigned(RunningMean):
    def forward(self, x):
        self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)  # a new tensor in the slot, not an in-place edit
        return self.lin(x)


class EditsItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-x.abs().max(), x.abs().max())
        return self.lin(x)


class Renorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 3)

    def forward(self, i):
        return self.head(self.emb(i))


@pytest.mark.parametrize("model", [RunningMean, Reassigned, EditsItself])
@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_state_moved_by_the_forward_is_refused(model, mode):
    p = make(model(), mode=mode)
    x, y = batch()
    before = frozen_params(p)
    with pytest.raises(PrivacyUsageError, match="changed during the model's forward"):
        train_step(p, x, y)
    assert_unmoved(p, before) if model is not EditsItself else None
    assert p.ledger.steps == 0


def test_embedding_max_norm_renorm_is_refused_naming_the_weight():
    p = make(Renorm())
    with pytest.raises(PrivacyUsageError, match=r"emb\.weight.*max_norm"):
        train_step(p, torch.randint(0, 10, (8,)), torch.randint(0, 3, (8,)))
    assert p.ledger.steps == 0


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1  # does not depend on the data
        return self.lin(x)


def test_a_declared_public_buffer_may_change():
    with pytest.raises(PrivacyUsageError, match="public_buffers"):
        train_step(make(Counter()), *batch())
    p = make(Counter(), public_buffers=["calls"])
    train_step(p, *batch())
    assert p.ledger.steps == 1 and int(p.module.calls) == 1
    with pytest.raises(ValueError, match="not buffers of the model"):
        make(Counter(), public_buffers=["cals"])


def test_an_eval_forward_without_grad_is_not_a_training_forward():
    p = make(RunningMean())
    with torch.no_grad():
        p.module(batch()[0])  # evaluation: nothing dpkit releases depends on it
    assert p.ledger.steps == 0


# -- 4. settings that belong together ----------------------------------------------------------------------------
def test_a_multiplicity_dataset_fixes_augmentation_multiplicity():
    base = dataset(16)
    copies = dpkit.Multiplicity(base, lambda x: x + 0.1 * torch.randn_like(x), K=3)
    with pytest.raises(PrivacyUsageError, match="augmentation_multiplicity=3"):
        make(data_loader=dpkit.DPDataLoader(copies, 0.5), augmentation_multiplicity=1)
    make(data_loader=dpkit.DPDataLoader(copies, 0.5), augmentation_multiplicity=3)


def test_by_user_subsets_depend_on_the_users_own_id_alone():
    users = [u for u in range(6) for _ in range(5)]  # every user over the limit of 2
    data = TensorDataset(torch.arange(30.0).unsqueeze(1), torch.zeros(30, dtype=torch.long))
    full = dpkit.ByUser(data, users, max_per_user=2, seed=3)
    keep = [i for i, u in enumerate(users) if u != 0]  # remove user 0
    fewer = dpkit.ByUser(TensorDataset(*data[keep]), [users[i] for i in keep], max_per_user=2, seed=3)
    for u in range(1, 6):
        mine = [float(v) for v in full[u][0].flatten()]
        theirs = [float(v) for v in fewer[u - 1][0].flatten()]
        assert mine == theirs, f"user {u}'s rows changed when user 0 was removed"


def test_by_user_refuses_nan_ids_and_takes_string_ids():
    data = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        dpkit.ByUser(data, torch.tensor([0.0, float("nan"), float("nan"), 1.0]), max_per_user=2)
    by_user = dpkit.ByUser(data, ["ann", "bob", "ann", "cy"], max_per_user=2)
    assert len(by_user) == 3 and by_user.user_ids == ["ann", "bob", "cy"]


def test_opacus_names_are_answered_and_ignored_arguments_refused():
    with pytest.raises(TypeError, match="did you mean target_delta"):
        make(delta=1e-5)
    with pytest.raises(ValueError, match="epochs only serve to calibrate"):
        make(epochs=10)
    with pytest.raises(TypeError, match="calibrates noise_multiplier"):
        dpkit.make_private_with_epsilon(module=net(), optimizer=torch.optim.SGD(net().parameters(), lr=1),
                                        noise_multiplier=1, target_epsilon=1, target_delta=1e-5,
                                        max_grad_norm=1.0)


def test_calibrated_sigma_is_the_one_every_check_sees():
    """Calibrate first, then build: the sigma=0 warning and the noise-range check see the final sigma."""
    p = make(noise_multiplier=None, target_epsilon=2.0, target_delta=1e-5, steps=20)
    sigma = dpkit.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.25, steps=20)
    assert p.noise_multiplier == sigma
    with pytest.raises(ValueError, match="overflows the torch.float16"):
        make(nn.Linear(4, 3).half(), noise_multiplier=None, target_epsilon=1e-9, target_delta=1e-5, steps=10**4,
             max_grad_norm=1e4, criterion=None)


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="secure_mode must be True or False"):
        make(secure_mode="no")
    with pytest.raises(TypeError, match="poisson_sampling must be True or False"):
        make(poisson_sampling="no")


@pytest.mark.parametrize("mode", ["hooks", "auto"])
def test_a_correct_loop_still_has_sensitivity_at_most_c(mode):
    assert_sensitivity(lambda: make(mode=mode, noise_multiplier=0.0), *batch())


# -- crashes that are now verdicts -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", STEP_MODES)
def test_a_gradient_penalty_with_create_graph_is_refused(mode):
    p = make(mode=mode)
    x, y = batch()
    x.requires_grad_(True)
    out = p.module(x)
    with pytest.raises(PrivacyUsageError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(PrivacyUsageError):
        p.optimizer.step()
    assert p.ledger.steps == 0


@pytest.mark.parametrize("mode", STEP_MODES)
def test_autograd_grad_to_the_parameters_is_refused(mode):
    """It would hand back unclipped, un-noised gradients (torch itself failed obscurely on the stand-ins)."""
    p = make(mode=mode)
    x, y = batch()
    loss = p.criterion(p.module(x), y)
    with pytest.raises(PrivacyUsageError, match="unclipped and without noise"):
        torch.autograd.grad(loss.value, list(p.module.parameters()))
    p.optimizer.zero_grad()
    train_step(p, x, y)  # the loop goes on
    assert p.ledger.steps == 1


def test_training_past_the_calibrated_steps_warns_once():
    p = make(noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5, steps=2)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(p, x, y)
        train_step(p, x, y)  # the calibrated two: no word
    with pytest.warns(UserWarning, match="calibrated for epsilon 3 .* over 2 steps"):
        train_step(p, x, y)
    assert p.epsilon(1e-5) > 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(p, x, y)  # once
