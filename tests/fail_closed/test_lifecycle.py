"""Lifecycle: the trainable set changing after make_private, re-attaching, other optimizers, argument errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError

from ._setup import (
    MODES, Capture, Frozen, assert_noise_everywhere, assert_sensitivity, batch, dataset, loss_backward, make, net,
    noise_difference, train_step,
)


# -- 1. the trainable set -------------------------------------------------------------------------------------------
def unfrozen(mode, noise_multiplier=0.0, seed=0):
    model = net()
    model[0].requires_grad_(False)
    p = make(model, mode, noise_multiplier=noise_multiplier, noise_seed=seed)
    model[0].requires_grad_(True)  # gradual unfreezing after make_private
    return p


def appended(mode, noise_multiplier=0.0, seed=0):
    model = net()
    p = make(model, mode, noise_multiplier=noise_multiplier, noise_seed=seed)
    model.append(nn.Linear(3, 3))
    p.optimizer.add_param_group({"params": list(model[3].parameters())})
    return p


@pytest.mark.parametrize("mode", MODES)
def test_unfreezing_replans_with_a_warning_at_the_next_forward(mode):
    p = unfrozen(mode, 1.0)
    x, y = batch()
    with pytest.warns(UserWarning, match=r"planned the model again.*now trainable: \['0.bias', '0.weight'\]"):
        train_step(p, x, y)
    assert p.steps == p.ledger.steps == 1


@pytest.mark.parametrize("mode", MODES)
def test_unfrozen_parameters_get_a_private_step(mode):
    x, y = batch()
    assert_sensitivity(lambda: unfrozen(mode), x, y, train_step)
    diff = noise_difference(lambda s: unfrozen(mode, 1.0, s), x, y, train_step)
    assert_noise_everywhere(diff, ["0.weight", "0.bias", "2.weight", "2.bias"])


@pytest.mark.parametrize("mode", MODES)
def test_appended_module_gets_a_private_step(mode):
    x, y = batch()
    assert_sensitivity(lambda: appended(mode), x, y, train_step)
    diff = noise_difference(lambda s: appended(mode, 1.0, s), x, y, train_step)
    assert_noise_everywhere(diff, ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"])


@pytest.mark.parametrize("mode", ["hooks", "ghost", "auto"])
def test_parameter_frozen_after_make_private_does_not_move_even_by_noise(mode):
    p = make(mode=mode, noise_multiplier=5.0)
    x, y = batch()
    train_step(p, x, y)  # a first step: every parameter got a gradient
    p.module[0].requires_grad_(False)
    frozen = {n: t.detach().clone() for n, t in p.module[0].named_parameters()}
    other = p.module[2].weight.detach().clone()
    for _ in range(2):
        train_step(p, x, y)
    for n, t in p.module[0].named_parameters():
        assert torch.equal(t, frozen[n]), f"frozen 0.{n} moved"
    assert not torch.equal(p.module[2].weight, other)
    assert p.steps == p.ledger.steps == 3


def test_freezing_between_backward_and_step_is_refused():
    p = make()
    x, y = batch()
    loss_backward(p, x, y)
    p.module[2].requires_grad_(False)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"changed after the forward pass.*no longer trainable: \['2.bias', "
                                                r"'2.weight'\]"):
        p.optimizer.step()
    frozen.check()


def test_unfreezing_between_micro_batches_is_refused():
    model = net()
    model[0].requires_grad_(False)
    p = make(model)
    x, y = batch()
    with p.micro_batches():
        loss_backward(p, x[:4], y[:4])
        model[0].requires_grad_(True)
        frozen = Frozen(p)
        with pytest.raises(PrivacyUsageError, match=r"changed in the middle of a step.*now trainable: \['0.bias'"):
            loss_backward(p, x[4:], y[4:])
    frozen.check()


def test_frozen_parameter_with_a_stale_zero_grad_is_refused():
    """zero_grad(set_to_none=False) leaves zeros; with momentum a zero gradient still moves the parameter."""
    model = net()
    p = make(model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
    x, y = batch()
    train_step(p, x, y)
    model[0].requires_grad_(False)
    p.optimizer.zero_grad(set_to_none=False)
    loss_backward(p, x, y)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"would update \['0.bias', '0.weight'\] with gradients dpkit did "
                                                r"not clip or noise"):
        p.optimizer.step()
    frozen.check()


def test_add_param_group_of_a_foreign_parameter_is_refused():
    p = make()
    stranger = nn.Parameter(torch.ones(3))
    p.optimizer.add_param_group({"params": [stranger]})
    x, y = batch()
    loss_backward(p, x, y)
    stranger.grad = torch.ones(3)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"would update \[.<not the model's>.\]"):
        p.optimizer.step()
    frozen.check()
    assert torch.equal(stranger, torch.ones(3))


def test_add_param_group_of_a_frozen_model_parameter_with_a_gradient_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    p = make(model, optimizer=torch.optim.SGD(model[2].parameters(), lr=1.0))
    p.optimizer.add_param_group({"params": [model[0].weight]})
    x, y = batch()
    loss_backward(p, x, y)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # e.g. from a non-private pass
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"would update \['0.weight'\]"):
        p.optimizer.step()
    frozen.check()


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_replaced_or_deleted_module_whose_parameters_the_optimizer_still_holds_is_refused(change):
    p = make()
    if change == "replace":
        p.module[2] = nn.Linear(6, 3)
    else:
        del p.module[2]  # the model now ends in a ReLU over 6 classes
    x, y = batch()
    loss_backward(p, x, y)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=r"<not the model's>"):
        p.optimizer.step()
    frozen.check()


# -- 2. attaching twice ---------------------------------------------------------------------------------------------
def test_make_private_twice_on_one_model_is_refused_until_detach():
    model = net()
    first = make(model)
    with pytest.raises(PrivacyUsageError, match=r"already has dpkit attached.*detach\(\)"):
        make(model)
    first.detach()
    second = make(model)
    x, y = batch()
    train_step(second, x, y)
    assert second.steps == second.ledger.steps == 1 and first.steps == 0


def test_make_private_twice_on_one_optimizer_is_refused():
    model = net()
    first = make(model)
    other = net()
    with pytest.raises(PrivacyUsageError, match=r"already has dpkit attached.*detach"):
        make(other, optimizer=first.optimizer)


def test_dpkit_detach_of_the_model_allows_make_private_again():
    model = net()
    make(model)
    assert dpkit.detach(model) == 1
    p = make(model)
    x, y = batch()
    train_step(p, x, y)
    assert p.steps == p.ledger.steps == 1


def test_make_private_on_a_submodule_of_an_attached_model_is_refused():
    model = net()
    make(model)
    with pytest.raises(PrivacyUsageError, match="already has dpkit attached"):
        make(model[2])


def test_re_attach_after_detach_does_not_double_count():
    p = make()
    x, y = batch()
    p.detach()
    p.attach()
    train_step(p, x, y)
    assert p.steps == p.ledger.steps == 1


# -- other optimizers and optimizer calls ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_second_unprivatized_optimizer_finds_no_raw_gradient(mode):
    p = make(mode=mode)
    plain = torch.optim.SGD(p.module.parameters(), lr=1.0)
    x, y = batch()
    loss_backward(p, x, y)
    frozen = Frozen(p)
    plain.step()  # would apply the raw gradient if backward had left one in p.grad
    frozen.check()


def test_step_with_a_closure_and_no_backward_before_is_refused():
    p = make()
    x, y = batch()
    frozen = Frozen(p)

    def closure():
        p.optimizer.zero_grad()
        loss = p.criterion(p.module(x), y)
        loss.backward()
        return loss

    with pytest.raises(PrivacyUsageError, match="closure"):
        p.optimizer.step(closure)
    frozen.check()


def test_lbfgs_closure_cannot_steer_the_update_with_raw_losses():
    def run(scale):
        torch.manual_seed(0)
        model = net()
        data = dpkit.DPDataLoader(dataset(), 0.5, generator=torch.Generator().manual_seed(0))
        p = make(model, optimizer=torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=5), data_loader=data)
        xb, yb = next(iter(p.data_loader))
        loss_backward(p, xb, yb)

        def closure():
            loss = p.criterion(p.module(xb * scale), yb)
            loss.backward()
            return loss.value

        p.optimizer.step(closure)
        return torch.cat([q.detach().flatten() for q in model.parameters()])

    try:
        a, b = run(1.0), run(3.0)
    except PrivacyUsageError:
        return  # refused: fail closed
    assert torch.equal(a, b), "the closure's data changed the released update"


def test_scheduler_and_several_steps_keep_the_ledger():
    p = make(data_loader=dpkit.DPDataLoader(dataset(), 0.25, generator=torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.StepLR(p.optimizer, step_size=1, gamma=0.5)
    for xb, yb in p.data_loader:
        train_step(p, xb, yb)
        sched.step()
    assert p.steps == p.ledger.steps == len(p.data_loader) == 4


def test_second_step_after_one_backward_is_refused():
    p = make()
    x, y = batch()
    train_step(p, x, y)
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match="without a backward"):
        p.optimizer.step()
    frozen.check()


# -- 17. clear errors at make_private -------------------------------------------------------------------------------
def test_module_that_is_a_function_is_refused():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got function"):
        dpkit.make_private(module=lambda x: x, optimizer=torch.optim.SGD(net().parameters(), lr=1.0),
                           data_loader=None, sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
                           loss_reduction="sum")


def test_optimizer_none_is_refused():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer.*got NoneType"):
        dpkit.make_private(module=net(), optimizer=None, data_loader=None, sample_rate=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, loss_reduction="sum")


@pytest.mark.parametrize("seed", ["42", 1.5, True])
def test_non_int_noise_seed_is_refused(seed):
    with pytest.raises(TypeError, match="noise_seed must be an int"):
        make(noise_seed=seed)


@pytest.mark.parametrize("sigma", [np.float64(1.5), np.float32(1.5), torch.tensor(1.5), np.int64(2)])
def test_noise_multiplier_as_numpy_or_0d_tensor_is_accepted_as_a_number(sigma):
    p = make(noise_multiplier=sigma)
    assert type(p.noise_multiplier) is float and p.noise_multiplier == float(sigma)
    x, y = batch()
    train_step(p, x, y)
    assert p.steps == p.ledger.steps == 1 and p.epsilon(1e-5) > 0


@pytest.mark.parametrize("sigma", [1e300, float("inf"), float("nan"), -1.0, "1.0", torch.tensor([1.0, 2.0])])
def test_unusable_noise_multiplier_is_refused(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        make(noise_multiplier=sigma)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("inf"), float("nan")])
def test_unusable_max_grad_norm_is_refused(clip):
    with pytest.raises(ValueError, match="max_grad_norm"):
        make(max_grad_norm=clip)


def test_model_with_no_trainable_parameters_is_refused():
    model = net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make(model)


def test_optimizer_over_another_model_is_refused():
    with pytest.raises(ValueError, match="not the model's"):
        make(net(), optimizer=torch.optim.SGD(net().parameters(), lr=1.0))


def test_an_unknown_accountant_is_refused():
    with pytest.raises(dpkit.DPKitError, match="nope"):
        make(accountant="nope")


def test_target_epsilon_without_delta_is_refused():
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="target_delta"):
            dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                               data_loader=None, sample_rate=0.1, expected_batch_size=4,
                               max_grad_norm=1.0, target_epsilon=1.0, epochs=1)


def test_capture_sees_dpkit_release_not_raw_gradient():
    """Self-check of the measurement: the captured release is the noised, clipped sum (not zero, not raw)."""
    p = make(noise_multiplier=0.0)
    cap = Capture(p)
    x, y = batch()
    train_step(p, x, y)
    total = torch.cat([g.flatten() for g in cap.first.values()]).norm().item()
    assert 0 < total <= 8 * 1.0 + 1e-5  # eight examples, each clipped to C = 1
