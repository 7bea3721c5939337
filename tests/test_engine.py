"""The controller's contract: no wrapper, clean detach, refusals that name the culprit, the step's bookkeeping."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.errors import PrivacyUsageError, UnsupportedLayerError, UnsupportedModuleError


def net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch)


def private(model=None, mode="hooks", **kw):
    model = model or net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("data_loader", loader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpkit.make_private(module=model, optimizer=opt, max_grad_norm=1.0, grad_sample_mode=mode,
                                  criterion=nn.CrossEntropyLoss(), **kw)


def train_step(p, x, y):
    p.optimizer.zero_grad()
    p.criterion(p.module(x), y).backward()
    p.optimizer.step()


def test_model_is_not_wrapped_and_unpacks():
    model = net()
    keys = list(model.state_dict())
    p = private(model)
    m, opt, data, crit = p
    assert m is model and type(m) is nn.Sequential and list(m.state_dict()) == keys
    assert opt is p.optimizer and type(opt) is torch.optim.SGD
    assert isinstance(data, dpkit.DPDataLoader) and crit is p.criterion


def test_unpacks_to_three_without_criterion():
    model = net()
    p = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           data_loader=loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    assert len(list(p)) == 3
    with pytest.raises(ValueError, match=r"unpacks to 3 values, not 4: \(module, optimizer, data_loader\), since no "
                                         r"criterion= was given\. It gives 4 values with make_private\(criterion"):
        m, opt, data, crit = p
    with pytest.raises(ValueError, match=r"unpacks to 4 values, not 3: .*since a criterion= was given"):
        m, opt, data = private(net())
    first, *rest = p  # starred unpacking and iteration stay plain
    assert first is model and len(rest) == 2


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost", "bk", "auto"])
def test_detach_leaves_no_hook(mode):
    model = net()
    p = private(model, mode)
    x, y = next(iter(loader()))
    train_step(p, x, y)
    p.detach()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for param in model.parameters():
        assert not param._backward_hooks and not hasattr(param, "grad_sample")
    assert not p.optimizer._optimizer_step_pre_hooks and not p.optimizer._optimizer_step_post_hooks
    before = [q.detach().clone() for q in model.parameters()]
    p.optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # a plain step works again, nothing intercepts it
    p.optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_sample_lives_between_backward_and_step():
    p = private()
    x, y = next(iter(loader()))
    p.criterion(p.module(x), y).backward()
    for q in p.module.parameters():
        assert q.grad_sample.shape == (8, *q.shape)
    p.optimizer.step()
    assert not any(hasattr(q, "grad_sample") for q in p.module.parameters())


def test_batchnorm_is_refused_with_its_name_and_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UnsupportedModuleError, match=r"(?s)1 \(BatchNorm2d\).*dpkit\.fix"):
        private(model)
    dpkit.fix(model)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 4


def test_uncovered_layers_are_listed_together():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(Scale(), nn.Linear(4, 4), nn.Sequential(Scale()), nn.PReLU(4))
    with pytest.raises(UnsupportedLayerError) as err:
        private(model, "hooks")
    text = str(err.value)
    for name in ("  0 (", "  2.0 (", "  3 (torch.nn.modules.activation.PReLU)"):
        assert name in text
    assert "register_grad_sampler(Scale)" in text and "'auto'" in text


def test_explicit_modes_refuse_what_they_cannot_cover():
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(torch.nn.modules.normalization.RMSNorm\).*ExpandedWeights"):
        private(model, "ew")


def test_user_sampler_makes_a_custom_layer_trainable(fresh_registry):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    @dpkit.register_grad_sampler(Scale)
    def scale_grads(layer, activations, backprops, K=1):
        per_row = activations[0] * backprops
        return {layer.s: per_row.reshape(-1, K, 4).sum(1)}

    model = nn.Sequential(Scale(), nn.Linear(4, 3))
    p = private(model, "hooks")
    assert p.plan[0].provider.startswith("user:")
    x, y = next(iter(loader()))
    p.disable()
    expected = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                                model[0].s)[0] for i in range(8)])
    p.enable()
    p.criterion(p.module(x), y).backward()
    torch.testing.assert_close(model[0].s.grad_sample, expected)


def test_step_without_backward_is_refused():
    p = private()
    with pytest.raises(PrivacyUsageError, match="without a backward"):
        p.optimizer.step()


def test_rows_not_divisible_by_K_are_refused():
    p = private(augmentation_multiplicity=3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(PrivacyUsageError, match="not a multiple of augmentation_multiplicity K=3"):
        p.criterion(p.module(x), y).backward()


def test_loss_of_another_batch_is_refused():
    p = private()
    x, y = next(iter(loader()))
    with pytest.raises(PrivacyUsageError, match="the loss has 6 rows but the model's layers saw 8|selects examples"):
        p.criterion(p.module(x)[:6], y[:6]).backward()


def test_second_backward_through_one_forward_is_refused():
    p = private()
    x, y = next(iter(loader()))
    loss = p.criterion(p.module(x), y)
    loss.value.backward(retain_graph=True)
    with pytest.raises(PrivacyUsageError, match="second time"):
        loss.value.backward()


def test_parameter_used_outside_its_module_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.other = nn.Linear(4, 3)

        def forward(self, x):
            return x @ self.fc.weight.t() + self.other(x)

    p = private(Sneaky(), "hooks")
    x, y = next(iter(loader()))
    with pytest.raises(PrivacyUsageError, match=r"\['fc.weight'\].*outside their module"):
        p.criterion(p.module(x), y).backward()


class InPlaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.block, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = torch.tanh(self.first(x))
        x += self.block(x)  # changes the block's input after the block read it
        return self.out(x)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_input_changed_in_place_after_a_layer_read_it_is_refused(mode):
    """With detached parameters autograd saves no layer input, so it cannot notice; dpkit must."""
    p = private(InPlaceResidual(), mode, data_loader=None, sample_rate=0.25, expected_batch_size=8)
    with pytest.raises(PrivacyUsageError, match=r"'block'.*modified in place.*x = x \+ layer\(x\)"):
        p.criterion(p.module(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()


def test_dropout_inside_a_recomputed_unit_is_refused():
    class Wrap(nn.Module):  # no sampler covers it: auto recomputes it with torch.func
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return nn.functional.dropout(x @ self.w, 0.5, self.training).mean(1)

    p = private(Wrap(), "auto")
    with pytest.raises(PrivacyUsageError, match="dropout"):
        p.criterion(p.module(torch.randn(8, 2, 4)), torch.randint(0, 3, (8,))).backward()


def test_ghost_needs_the_wrapped_criterion():
    p = private(mode="ghost")
    x, y = next(iter(loader()))
    with pytest.raises(PrivacyUsageError, match="private.criterion"):
        nn.functional.cross_entropy(p.module(x), y).backward()


def test_zero_noise_warns():
    model = net()
    with pytest.warns(UserWarning, match="NOT differentially private"):
        dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           data_loader=loader(), noise_multiplier=0.0, max_grad_norm=1.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be a finite number > 0"),
    ({"augmentation_multiplicity": 0}, "augmentation_multiplicity must be an int >= 1"),
    ({"loss_reduction": "avg"}, "loss_reduction must be 'mean' or 'sum'"),
    ({"grad_sample_mode": "fast"}, "grad_sample_mode must be one of"),
    ({"clipping": "nope"}, "clipping='nope' is not provided by any plugin"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    model = net()
    args = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader(),
                noise_multiplier=1.0, max_grad_norm=1.0) | kwargs
    with pytest.raises((ValueError, dpkit.DPKitError), match=match):
        dpkit.make_private(**args)


def test_optimizer_with_foreign_parameters_is_refused():
    model = net()
    opt = torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        dpkit.make_private(module=model, optimizer=opt, data_loader=loader(), noise_multiplier=1.0,
                           max_grad_norm=1.0)


def test_poisson_loader_varies_batches_counts_empty_ones_and_steps_them():
    data = dpkit.DPDataLoader(loader(n=40).dataset, sample_rate=0.05, generator=torch.Generator().manual_seed(0))
    p = private(data_loader=data)  # q = 0.05: empty batches happen
    assert len(p.data_loader) == 20 and p.sample_rate == pytest.approx(0.05)
    sizes = []
    for x, y in p.data_loader:
        sizes.append(len(x))
        assert x.shape[1:] == (4,) and y.dtype == torch.long
        train_step(p, x, y)
    assert 0 in sizes and len(set(sizes)) > 1
    assert p.steps == 20 and p.ledger.steps == 20


def test_noise_has_the_calibrated_std():
    model = nn.Linear(200, 50, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.1, noise_multiplier=1.5,
                       max_grad_norm=2.0, loss_reduction="sum", noise_seed=3)
    model(torch.zeros(1, 200)).sum().backward()  # zero gradient: the step is the noise alone
    opt.step()
    assert model.weight.std().item() == pytest.approx(1.5 * 2.0, rel=0.03)


class MixedPrecision(nn.Module):
    """A float64 layer feeding a float32 one: the clipped sums live in one flat buffer per dtype."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 6).double(), nn.Linear(6, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x.double())).float())


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_gradients_keep_each_parameters_dtype_and_noise_is_independent(mode):
    torch.manual_seed(0)
    model = MixedPrecision()
    p = private(model, mode, data_loader=None, sample_rate=0.25, expected_batch_size=8, noise_seed=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    p.criterion(p.module(x), y).backward()
    p.optimizer.step()
    for param in model.parameters():
        assert param.grad.dtype == param.dtype and param.grad.shape == param.shape
    flat = torch.cat([param.grad.double().flatten() for param in model.parameters()])
    assert len(set(flat.tolist())) == flat.numel()  # no coordinate's noise repeats another's


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto", "ghost"])
def test_a_parameter_without_examples_gets_exactly_the_noise(mode):
    """Its slot in the sums buffer is never written by a sum; the step must see zeros there, not old memory."""
    torch.manual_seed(0)
    model = WithUnused()
    p = private(model, mode, data_loader=None, sample_rate=0.25, expected_batch_size=8, noise_multiplier=0.0)
    for _ in range(3):  # later steps get buffers that may hold the earlier steps' gradients
        p.optimizer.zero_grad()
        p.criterion(p.module(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        p.optimizer.step()
        assert model.unused.weight.grad.abs().max().item() == 0.0
        assert model.used.weight.grad.abs().max().item() > 0.0


def test_observers_see_norms_factors_and_gradients_before_and_after(fresh_registry):
    seen = []

    class Observer:
        @dpkit.hookimpl
        def dpkit_on_clip(self, event):
            seen.append(event)

    fresh_registry.register_plugin(Observer(), name="observer")
    p = private()
    x, y = next(iter(loader()))
    train_step(p, x, y)
    (event,) = seen
    assert event.norms.shape == (8,) and event.factors.shape == (8,)
    assert torch.all(event.factors <= 1)
    w = event.grad_samples["0.weight"]
    torch.testing.assert_close(event.clipped_grad_samples["0.weight"], w * event.factors[:, None, None])
    torch.testing.assert_close(event.clipped_sum["0.weight"], event.clipped_grad_samples["0.weight"].sum(0))


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost", "bk", "auto"])
def test_batch_memory_manager_matches_whole_poisson_batches(mode):
    """Physical micro-batches of ≤5 give the same steps as the whole Poisson batches, one step each."""
    def run(max_physical):
        torch.manual_seed(0)
        model = net()
        data = dpkit.DPDataLoader(loader(n=64).dataset, sample_rate=0.5, generator=torch.Generator().manual_seed(1))
        p = private(model, mode, data_loader=data, noise_multiplier=0.0)
        physical = 0
        with dpkit.BatchMemoryManager(p, max_physical_batch_size=max_physical) as batches:
            for x, y in batches:
                assert len(x) <= max_physical
                train_step(p, x, y)
                physical += 1
        assert p.steps == len(p.data_loader) == 2
        return model, physical

    whole, one_each = run(64)
    split, many = run(5)
    assert one_each == 2 and many > 2
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b)


def test_disable_pauses_privacy_and_enable_resumes():
    p = private()
    x, y = next(iter(loader()))
    p.disable()
    p.optimizer.zero_grad()
    nn.functional.cross_entropy(p.module(x), y).backward()
    assert not hasattr(p.module[0].weight, "grad_sample")
    p.optimizer.step()
    assert p.steps == 0
    p.enable()
    train_step(p, x, y)
    assert p.steps == 1


def test_multiplicity_data_gives_adjacent_copies():
    base = TensorDataset(torch.arange(6.0).reshape(6, 1).expand(6, 4).clone(), torch.arange(6))
    data = dpkit.Multiplicity(base, lambda x: x + 0.1 * torch.randn_like(x), K=3)
    dl = dpkit.DPDataLoader(data, sample_rate=1.0)
    x, y = next(iter(dl))
    assert x.shape == (18, 4) and y.tolist() == [i for i in range(6) for _ in range(3)]
    assert torch.allclose(x[:3].round(), torch.zeros(3, 4))


def test_epsilon_and_report_follow_the_ledger():
    p = private(data_loader=loader(n=40, batch=4))
    for x, y in p.data_loader:
        train_step(p, x, y)
    q, steps = p.sample_rate, p.steps
    assert p.ledger.steps == steps == 10
    expected = dpkit.get_epsilon(accountant="prv", noise_multiplier=1.0, sample_rate=q, steps=steps, delta=1e-5)
    assert p.epsilon(1e-5) == pytest.approx(expected, rel=1e-9)
    assert p.epsilon(1e-5, accountant="rdp") >= p.epsilon(1e-5) * 0.999
    report = p.privacy_report(1e-5)
    assert "* prv" in report and "rdp" in report and "gdp" in report and "approximation" in report


def test_zero_noise_reports_infinite_epsilon():
    p = private(noise_multiplier=0.0)
    x, y = next(iter(loader()))
    train_step(p, x, y)
    assert p.epsilon(1e-5) == float("inf")


def test_target_epsilon_holds_with_a_clipper_that_spends_privacy():
    """Adaptive clipping's noisy count shares the budget: after the calibrated epochs ε is the target."""
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = dpkit.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader(n=40, batch=8),
            max_grad_norm=1.0, target_epsilon=3.0, target_delta=1e-5, epochs=2, clipping="adaptive",
            clipping_kwargs={"count_noise_multiplier": 5.0}, criterion=nn.CrossEntropyLoss())
    for _ in range(2):
        for x, y in p.data_loader:
            train_step(p, x, y)
    assert p.steps == 10
    assert 2.9 < p.epsilon(1e-5) <= 3.0 + 1e-9


def test_target_epsilon_holds_for_epochs_of_the_returned_loader():
    """Calibrated for the steps the loader yields per epoch (round(1/q)), not 1/q: ε ends at the target."""
    model = nn.Linear(4, 3)
    data = DataLoader(TensorDataset(torch.randn(1437, 4), torch.randint(0, 3, (1437,))), batch_size=256)
    p = dpkit.make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=data, max_grad_norm=1.0, target_epsilon=3.0, target_delta=1e-5,
                                        epochs=30, criterion=nn.CrossEntropyLoss())
    eps = dpkit.get_epsilon(accountant="prv", noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate,
                            steps=30 * len(p.data_loader), delta=1e-5)
    assert len(p.data_loader) == 6 and 2.95 < eps <= 3.0 + 1e-9


def test_make_private_shows_and_documents_every_argument():
    import inspect

    shown = inspect.signature(dpkit.make_private).parameters
    assert {"module", "optimizer", "grad_sample_mode", "noise", "secure_mode", "public_buffers"} <= set(shown)
    for name in shown:
        assert name in dpkit.make_private.__doc__, name
    assert "kwargs" not in shown and "unknown" not in shown and "target_epsilon" in inspect.signature(dpkit.make_private_with_epsilon).parameters


def test_a_flattened_token_loss_is_told_to_keep_one_row_per_example():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=None, sample_rate=0.5, expected_batch_size=4, noise_multiplier=1.0,
                                 max_grad_norm=1.0, criterion=nn.CrossEntropyLoss(), grad_sample_mode="hooks")
    x = torch.randint(0, 10, (4, 6))
    with pytest.raises(dpkit.PrivacyUsageError, match=r"looks flattened \(6 rows per example.*transpose\(1, 2\)"):
        private.criterion(model(x).reshape(-1, 10), x.reshape(-1)).backward()
    private.detach()
