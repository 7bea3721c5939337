"""check_sensitivity and check_noise: correct loops pass in every mode; loops that leak are caught, with numbers."""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.errors import RowMixingError
from dpkit import registry
from dpkit.clipping import ClipperBase
from dpkit.data import split_batch
from dpkit.testing import NoiseReport, SensitivityReport, check_noise, check_sensitivity

C = 0.5  # small enough that every example below is clipped: a leak then shows as a distance above C
EXPECTED_BATCH = 8


def setup_for(mode="hooks", K=1, reduction="mean", loader=True, **kw):
    def setup():
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 3))
        data = TensorDataset(torch.zeros(64, 6), torch.zeros(64, dtype=torch.long))
        where = ({"data_loader": DataLoader(data, batch_size=EXPECTED_BATCH)} if loader
                 else {"sample_rate": EXPECTED_BATCH / 64, "expected_batch_size": EXPECTED_BATCH})
        kw.setdefault("noise_multiplier", 1.0)
        return dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  max_grad_norm=C, grad_sample_mode=mode, augmentation_multiplicity=K,
                                  loss_reduction=reduction, criterion=nn.CrossEntropyLoss(), **where, **kw)
    return setup


def batch_of(examples=6, K=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(examples * K, 6, generator=g), torch.randint(0, 3, (examples * K,), generator=g)


def step(private, batch):
    x, y = batch
    private.optimizer.zero_grad()
    private.criterion(private.module(x), y).backward()
    private.optimizer.step()


def step_in_two_passes(private, batch):
    """Gradient accumulation: two backward passes, one step."""
    private.optimizer.zero_grad()
    for x, y in split_batch(batch, max(batch[0].shape[0] // (2 * private.K), 1) * private.K):
        private.criterion(private.module(x), y).backward()
    private.optimizer.step()


def step_with_virtual_steps(private, batch):
    """What BatchMemoryManager does with one Poisson batch: a virtual step after every micro-batch but the last."""
    pieces = split_batch(batch, 2 * private.K)
    for i, (x, y) in enumerate(pieces):
        private.gate.enter_micro_batch("one batch", last=i == len(pieces) - 1)
        private.optimizer.zero_grad()
        private.criterion(private.module(x), y).backward()
        private.optimizer.step()
    private.gate.leave_micro_batches()


# --- correct loops pass, and the bound is what they reach ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost", "functorch", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("K", [1, 2])
def test_correct_loop_passes_at_the_bound(mode, reduction, K):
    report = check_sensitivity(setup_for(mode, K, reduction), step, batch_of(K=K))
    assert isinstance(report, SensitivityReport) and report.ok and report.steps == 1
    assert report.bound == C and report.examples == tuple(range(6)) and len(report.distances) == 6
    # every example is clipped, so removing any of them moves the clipped sum by C (within rounding): the check
    # measures the quantity the bound is about, not something smaller
    assert all(abs(d - C) < 1e-4 * C for d in report.distances), report.distances
    assert report.sensitivity == max(report.distances)
    assert report.distances[report.examples.index(report.worst_example)] == report.sensitivity


@pytest.mark.parametrize("loop", [step_in_two_passes, step_with_virtual_steps], ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["hooks", "ghost", "auto"])
def test_micro_batches_pass(loop, mode):
    report = check_sensitivity(setup_for(mode, K=2), loop, batch_of(K=2))
    assert report.ok and report.steps == 1 and report.uncounted_steps == 0


def in_micro_batches(private, batch):
    """A loop without a data loader declares its micro-batches."""
    with private.micro_batches():
        step_in_two_passes(private, batch)


@pytest.mark.parametrize("loop", [step, in_micro_batches], ids=lambda f: f.__name__)
def test_loop_without_a_data_loader(loop):
    report = check_sensitivity(setup_for(loader=False), loop, batch_of())
    assert report.ok and all(abs(d - C) < 1e-4 * C for d in report.distances)


def test_small_gradients_stay_below_the_bound():
    x, y = batch_of()
    report = check_sensitivity(setup_for(), step, (x / 400, y))
    assert report.ok and report.sensitivity < C


def test_examples_chosen_and_default_cap():
    report = check_sensitivity(setup_for(), step, batch_of(), examples=[4, 1])
    assert report.examples == (4, 1) and len(report.distances) == 2
    report = check_sensitivity(setup_for(), step, batch_of(examples=40))
    assert len(report.examples) == 16 and report.examples[0] == 0 and report.examples[-1] == 39


def test_one_example_against_the_empty_batch():
    report = check_sensitivity(setup_for("bk"), step, batch_of(examples=1))
    assert report.ok and abs(report.sensitivity - C) < 1e-4 * C


def test_leaves_no_hooks_and_the_rng_alone():
    made = []

    def setup():
        made.append(setup_for("hooks")())
        return made[-1]

    rng = torch.get_rng_state()
    check_sensitivity(setup, step, batch_of(), examples=[0, 1])
    assert torch.equal(rng, torch.get_rng_state())
    assert len(made) == 3
    for private in made:
        assert not private.attached
        assert not private.optimizer._optimizer_step_pre_hooks and not private.optimizer._optimizer_step_post_hooks
        for m in private.module.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_usage_errors():
    with pytest.raises(ValueError, match="applied no gradient"):
        check_sensitivity(setup_for(), lambda private, batch: None, batch_of())
    with pytest.raises(ValueError, match="not a multiple"):
        check_sensitivity(setup_for(K=2), step, (torch.randn(5, 6), torch.randint(0, 3, (5,))))
    with pytest.raises(ValueError, match="indices"):
        check_sensitivity(setup_for(), step, batch_of(), examples=[6])
    with pytest.raises(TypeError, match="controller"):
        check_sensitivity(lambda: None, step, batch_of())


# --- loops that leak are caught --------------------------------------------------------------------------------------


def each_grad(private, change):
    """An optimizer pre-hook of the user's that applies ``change`` to every model parameter."""
    def hook(optimizer, args, kwargs):
        for p in private.module.parameters():
            change(p)
    return hook


def scaled_after_noise(setup):
    """A hook of the user's, after make_private, that multiplies the noised gradient by 10 (noise and all)."""
    def wrapped():
        private = setup()
        private.optimizer.register_step_pre_hook(each_grad(private, lambda p: p.grad.mul_(10)))
        return private
    return wrapped


def plus_unclipped_gradient(private, batch):
    """The step also adds a plain (unclipped) gradient of the batch loss, computed with dpkit paused."""
    x, y = batch
    private.disable()
    plain = torch.autograd.grad(nn.functional.cross_entropy(private.module(x), y, reduction="sum"),
                                list(private.module.parameters()))
    private.enable()
    unclipped = dict(zip(private.module.parameters(), plain))
    handle = private.optimizer.register_step_pre_hook(each_grad(private, lambda p: p.grad.add_(unclipped[p])))
    step(private, batch)
    handle.remove()


def uncounted_step(private, batch):
    """A second optimizer step on a plain loss with dpkit paused: applied, unclipped and not accounted."""
    step(private, batch)
    x, y = batch
    private.disable()
    private.optimizer.zero_grad()
    nn.functional.cross_entropy(private.module(x), y).backward()
    private.optimizer.step()
    private.enable()


def test_scaling_after_the_noise_is_caught():
    report = check_sensitivity(scaled_after_noise(setup_for("bk")), step, batch_of(), raise_on_failure=False)
    assert not report.ok and report.sensitivity == pytest.approx(10 * C, rel=1e-4)
    exceeds = r"measured sensitivity [45](\.\d*)? \(example \d\) EXCEEDS the bound 0\.5"
    with pytest.raises(AssertionError, match=exceeds):
        check_sensitivity(scaled_after_noise(setup_for("bk")), step, batch_of())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_unclipped_term_is_caught(mode):
    report = check_sensitivity(setup_for(mode), plus_unclipped_gradient, batch_of(), raise_on_failure=False)
    assert not report.ok and report.sensitivity > 1.5 * C and report.uncounted_steps == 0


def test_an_uncounted_step_is_caught():
    report = check_sensitivity(setup_for(), uncounted_step, batch_of(), examples=[0, 1], raise_on_failure=False)
    assert not report.ok and report.steps == 2 and report.uncounted_steps == 3  # one per run
    with pytest.raises(AssertionError, match="did not count"):
        check_sensitivity(setup_for(), uncounted_step, batch_of(), examples=[0])


def in_batch_negatives(private, batch):
    """A contrastive loss: each example's loss involves every other example's output, so removing one example
    changes the others' gradients as well. The batch trace refuses it at the product."""
    x, _ = batch
    private.optimizer.zero_grad()
    out = private.module(x)
    nn.functional.cross_entropy(out @ out.T, torch.arange(len(out))).backward()
    private.optimizer.step()


@dpkit.rowwise  # a false declaration: the product pairs examples, which only the measurement can now see
def _pairs(out):
    return out @ out.T


def in_batch_negatives_declared_row_wise(private, batch):
    x, _ = batch
    private.optimizer.zero_grad()
    out = private.module(x)
    nn.functional.cross_entropy(_pairs(out), torch.arange(len(out))).backward()
    private.optimizer.step()


@pytest.mark.parametrize("mode", ["hooks", "bk", "functorch", "auto"])
def test_a_loss_that_mixes_examples_is_caught(mode):
    """Refused by the batch trace, and measured above C by check_sensitivity where the trace is told otherwise:
    the two agree."""
    with pytest.raises(RowMixingError, match="pairs rows of the batch"):
        check_sensitivity(setup_for(mode), in_batch_negatives, batch_of(), raise_on_failure=False)
    report = check_sensitivity(setup_for(mode), in_batch_negatives_declared_row_wise, batch_of(),
                               raise_on_failure=False)
    assert not report.ok and report.sensitivity > 1.2 * C


def test_a_data_independent_change_passes():
    """Weight decay added by hand to the released gradient depends on no example: not a leak."""
    def setup():
        private = setup_for("auto")()
        private.optimizer.register_step_pre_hook(each_grad(private, lambda p: p.grad.add_(p.detach(), alpha=0.1)))
        return private

    assert check_sensitivity(setup, step, batch_of()).ok


class NoClip(ClipperBase):
    """Forgets to clip."""

    def __init__(self, max_grad_norm):
        self.max_grad_norm = max_grad_norm

    def factors(self, norms):
        return torch.ones_like(norms)


class PerLayerWithoutRoot(ClipperBase):
    """Clips each parameter to C, so an example's whole contribution reaches C·√P while it reports C."""

    per_layer = True

    def __init__(self, max_grad_norm):
        self.max_grad_norm = max_grad_norm

    def factors(self, norms):
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


@pytest.fixture
def broken_clippers(fresh_registry):
    plugin = types.ModuleType("broken_clippers")
    plugin.dpkit_clippers = dpkit.hookimpl(lambda: {"no_clip": NoClip, "per_layer_without_root": PerLayerWithoutRoot})
    registry.register_plugin(plugin, name="broken_clippers")


@pytest.mark.usefixtures("broken_clippers")
@pytest.mark.parametrize("mode", ["hooks", "bk", "functorch"])
def test_broken_clippers_are_caught(mode):
    report = check_sensitivity(setup_for(mode, clipping="no_clip"), step, batch_of(), raise_on_failure=False)
    assert not report.ok and report.sensitivity > 2 * C
    report = check_sensitivity(setup_for(mode, clipping="per_layer_without_root"), step, batch_of(),
                               raise_on_failure=False)
    assert not report.ok and 2 * C < report.sensitivity <= math.sqrt(6) * C * (1 + 1e-5)  # 6 parameters


def test_per_layer_clipping_passes():
    report = check_sensitivity(setup_for("bk", clipping="per_layer"), step, batch_of())
    assert report.ok and report.sensitivity > 0.9 * C


# --- noise ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "ghost", "auto"])
def test_noise_is_on_every_coordinate(mode):
    report = check_noise(setup_for(mode, noise_multiplier=2.0), step, batch_of())
    assert isinstance(report, NoiseReport) and report.ok and report.unnoised == 0
    assert report.expected_std == 2.0 * C and report.coordinates == 6 * 12 + 12 + 24 + 12 * 3 + 3


def test_noise_check_draws_different_noise_even_with_a_fixed_seed():
    assert check_noise(setup_for(noise_seed=7), step, batch_of()).ok


def test_noise_missing_or_off_scale_is_caught():
    def setup():
        private = setup_for()()
        bias = private.module[-1].bias
        private.optimizer.register_step_pre_hook(each_grad(private, lambda p: p.grad.zero_() if p is bias else None))
        return private

    report = check_noise(setup, step, batch_of(), raise_on_failure=False)
    assert not report.ok and report.unnoised == 3
    with pytest.raises(AssertionError, match="3 coordinate"):
        check_noise(setup, step, batch_of())
    report = check_noise(scaled_after_noise(setup_for()), step, batch_of(), raise_on_failure=False)
    assert not report.ok and report.unnoised == 0 and report.measured_std > 5 * report.expected_std
    report = check_noise(setup_for(noise_multiplier=0.0), step, batch_of(), raise_on_failure=False)
    assert not report.ok and report.unnoised == report.coordinates
