"""Loop shape: accumulation, micro-batches, zero_grad, steps without backward, extra forwards and backwards."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError
from dpkit.testing import check_sensitivity

from ._setup import (
    MODES, Frozen, assert_counted, assert_sensitivity, batch, dataset, flat, loss_backward, make, release, train_step,
)


def poisson(q=0.5, n=32, seed=1):
    return dpkit.DPDataLoader(dataset(n), sample_rate=q, generator=torch.Generator().manual_seed(seed))


# -- 3. accumulation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_backward_on_two_loader_batches_before_one_step_is_refused(mode):
    p = make(mode=mode, data_loader=poisson())
    it = iter(p.data_loader)
    x1, y1 = next(it)
    loss_backward(p, x1, y1)
    x2, y2 = next(it)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match="two batches of the data loader"):
        loss_backward(p, x2, y2)
    frozen.check()
    with pytest.raises(PrivacyUsageError):  # the refused pass poisons the step until zero_grad
        p.optimizer.step()
    frozen.check()


@pytest.mark.parametrize("mode", MODES)
def test_backward_on_two_batches_drawn_ahead_is_refused(mode):
    p = make(mode=mode, data_loader=poisson())
    (x1, y1), (x2, y2) = list(p.data_loader)[:2]  # the batches of an epoch, drawn ahead
    loss_backward(p, x1, y1)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match="two batches of the data loader"):
        loss_backward(p, x2, y2)
    frozen.check()


def test_micro_batches_cannot_declare_two_loader_batches_one():
    p = make(data_loader=poisson())
    (x1, y1), (x2, y2) = list(p.data_loader)[:2]
    with p.micro_batches():
        loss_backward(p, x1, y1)
        frozen = Frozen(p)
        with pytest.raises(PrivacyUsageError, match="two batches of the data loader"):
            loss_backward(p, x2, y2)
    frozen.check()


@pytest.mark.parametrize("mode", MODES)
def test_batch_memory_manager_gives_the_whole_batch_step_and_is_private(mode):
    def run(max_physical):
        def loop(p, x, y):
            with dpkit.BatchMemoryManager(p, max_physical_batch_size=max_physical) as pieces:
                for xb, yb in pieces:
                    train_step(p, xb, yb)  # zero_grad between micro-batches keeps the sum
                    if not p.gate.virtual:
                        break  # one logical batch
        return release(lambda: make(mode=mode, noise_multiplier=0.0, data_loader=poisson(1.0, n=12)), loop,
                       None, None)

    (p1, whole), (p2, split) = run(12), run(5)
    assert_counted(p1, 1)
    assert_counted(p2, 1)
    torch.testing.assert_close(flat(whole), flat(split), rtol=1e-5, atol=1e-5)
    # sensitivity of the split loop, through dpkit.testing
    def setup():
        return make(mode=mode, noise_multiplier=0.0, data_loader=dpkit.DPDataLoader(
            torch.utils.data.TensorDataset(*batch(8)), 1.0))

    def step(p, b):
        p.optimizer.zero_grad()
        with p.micro_batches():
            for xb, yb in ((b[0][:3], b[1][:3]), (b[0][3:], b[1][3:])):
                loss_backward(p, xb, yb)
        p.optimizer.step()

    report = check_sensitivity(setup, step, batch(8))
    assert report.ok and report.sensitivity > 0.5


@pytest.mark.parametrize("mode", MODES)
def test_second_backward_without_a_loader_is_refused_outside_micro_batches(mode):
    p = make(mode=mode)
    x, y = batch()
    loss_backward(p, x[:4], y[:4])
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"second backward pass before optimizer.step\(\).*micro_batches"):
        loss_backward(p, x[4:], y[4:])
    frozen.check()


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_give_the_whole_batch_step(mode):
    x, y = batch()

    def split(p, x, y):
        p.optimizer.zero_grad()
        with p.micro_batches():
            loss_backward(p, x[:3], y[:3])
            loss_backward(p, x[3:], y[3:])
        p.optimizer.step()

    build = lambda: make(mode=mode, noise_multiplier=0.0)  # noqa: E731
    _, whole = release(build, train_step, x, y)
    p, parts = release(build, split, x, y)
    torch.testing.assert_close(flat(whole), flat(parts), rtol=1e-5, atol=1e-5)
    assert_counted(p, 1)
    assert_sensitivity(build, x, y, split, examples=[0, 5])


# -- 4. zero_grad discards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("owner", ["optimizer", "model"])
@pytest.mark.parametrize("mode", MODES)
def test_zero_grad_discards_a_skipped_batch(mode, owner):
    x, y = batch()
    skipped = batch(8, seed=5)

    def skip_then_step(p, x, y):
        loss_backward(p, *skipped)  # a batch the loop decided to skip
        (p.optimizer if owner == "optimizer" else p.module).zero_grad()
        loss_backward(p, x, y)
        p.optimizer.step()

    build = lambda: make(mode=mode, noise_multiplier=0.0)  # noqa: E731
    _, plain = release(build, train_step, x, y)
    p, after_skip = release(build, skip_then_step, x, y)
    assert torch.equal(flat(plain), flat(after_skip)), "the skipped batch leaked into the step"
    assert_counted(p, 1)


def test_zero_grad_then_step_is_refused():
    p = make()
    x, y = batch()
    loss_backward(p, x, y)
    p.optimizer.zero_grad()
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match="without a backward"):
        p.optimizer.step()
    frozen.check()


# -- misuse of the loop ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_step_without_backward_is_refused(mode):
    p = make(mode=mode)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match="without a backward"):
        p.optimizer.step()
    frozen.check()


@pytest.mark.parametrize("mode", ["hooks", "bk", "functorch", "ew", "auto"])
def test_second_backward_through_one_graph_is_refused(mode):
    p = make(mode=mode)
    x, y = batch()
    loss = p.criterion(p.module(x), y)
    loss.value.backward(retain_graph=True)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError):
        loss.value.backward()
    frozen.check()


def test_loss_summed_from_two_forwards_of_different_sizes_is_refused():
    p = make()
    x, y = batch()
    with pytest.raises(ValueError, match="cannot combine losses over 8 and 4 rows"):
        (p.criterion(p.module(x), y) + p.criterion(p.module(x[:4]), y[:4])).backward()


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto", "ghost"])
def test_scaled_loss_like_a_grad_scaler_stays_within_the_bound(mode):
    """A loss multiplied by 2**16 (what GradScaler does) has huge gradients: clipping must still bound them."""
    def scaled(p, x, y):
        p.optimizer.zero_grad()
        (p.criterion(p.module(x), y) * 65536.0).backward()
        p.optimizer.step()

    x, y = batch()
    assert_sensitivity(lambda: make(mode=mode, noise_multiplier=0.0), x, y, scaled, examples=[0, 3, 7])


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_backward_with_a_gradient_argument_stays_within_the_bound(mode):
    def with_gradient(p, x, y):
        p.optimizer.zero_grad()
        p.criterion(p.module(x), y).value.backward(gradient=torch.tensor(1e4))
        p.optimizer.step()

    x, y = batch()
    assert_sensitivity(lambda: make(mode=mode, noise_multiplier=0.0), x, y, with_gradient, examples=[1, 6])


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("mode", MODES)
def test_evaluation_forward_between_backward_and_step_changes_nothing(mode, ctx):
    x, y = batch()
    other = batch(5, seed=9)[0]

    def with_eval(p, x, y):
        p.optimizer.zero_grad()
        loss_backward(p, x, y)
        p.module.eval()
        with ctx():
            p.module(other)
        p.module.train()
        p.optimizer.step()

    build = lambda: make(mode=mode, noise_multiplier=0.0)  # noqa: E731
    _, plain = release(build, train_step, x, y)
    _, evaluated = release(build, with_eval, x, y)
    assert torch.equal(flat(plain), flat(evaluated))


@pytest.mark.parametrize("mode", MODES)
def test_a_forward_never_back_propagated_does_not_enter_the_step(mode):
    x, y = batch()
    logged = batch(5, seed=9)[0]

    def with_stray_forward(p, x, y):
        p.optimizer.zero_grad()
        p.module(logged)  # e.g. outputs computed for logging, with grad enabled, never back-propagated
        loss_backward(p, x, y)
        p.optimizer.step()

    build = lambda: make(mode=mode, noise_multiplier=0.0)  # noqa: E731
    _, plain = release(build, train_step, x, y)
    _, stray = release(build, with_stray_forward, x, y)
    assert torch.equal(flat(plain), flat(stray))


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_batch_is_a_counted_step_of_noise_only(mode):
    p = make(mode=mode, noise_multiplier=2.0)
    x, y = batch()
    before = [q.detach().clone() for q in p.module.parameters()]
    train_step(p, x[:0], y[:0])
    assert p.steps == p.ledger.steps == 1
    assert all(bool((q != b).all()) for q, b in zip(p.module.parameters(), before))


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_backward_leaves_nothing_and_zero_grad_recovers(mode):
    p = make(mode=mode)
    x, y = batch()
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match="the loss has 6 rows but the model's layers saw 8|selects examples"):
        p.criterion(p.module(x)[:6], y[:6]).backward()
    with pytest.raises(PrivacyUsageError):
        p.optimizer.step()
    frozen.check()
    train_step(p, x, y)
    assert p.steps == p.ledger.steps == 1


def test_many_steps_keep_the_ledger_equal_to_the_steps_taken():
    p = make(data_loader=poisson(0.25))
    taken = 0
    for _ in range(2):
        for xb, yb in p.data_loader:
            train_step(p, xb, yb)
            taken += 1
    assert p.steps == p.ledger.steps == taken == 8


def test_disable_then_step_is_not_counted_and_enable_resumes():
    p = make()
    x, y = batch()
    p.disable()
    p.optimizer.zero_grad()
    nn.functional.cross_entropy(p.module(x), y).backward()
    p.optimizer.step()
    assert p.steps == p.ledger.steps == 0
    p.enable()
    train_step(p, x, y)
    assert p.steps == p.ledger.steps == 1


@pytest.mark.parametrize("how", ["detach", "disable"])
def test_batch_memory_manager_over_a_detached_or_disabled_controller_is_refused(how):
    model = nn.Linear(4, 2)
    loader = dpkit.DPDataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))),
                                sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    getattr(private, how)()
    with pytest.raises(PrivacyUsageError, match="neither private nor counted"):
        for _ in dpkit.BatchMemoryManager(private, max_physical_batch_size=4):
            pass
