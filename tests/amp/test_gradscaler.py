"""fp16 with torch.amp.GradScaler: the private step is the one without a scaler, in every mode."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.errors import PrivacyUsageError

B, D, CLASSES = 8, 6, 3
ALL_MODES = ["hooks", "ghost", "bk", "functorch", "ew", "auto"]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def data(K: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * K, D, generator=g) * 3
    y = torch.randint(0, CLASSES, (B,), generator=g).repeat_interleave(K)
    return x, y


def private_of(mode, reduction="mean", K=1, scaler=None, wrapped=True, C=1.0):
    net = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpkit.make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), data_loader=None, sample_rate=0.1,
            expected_batch_size=B, noise_multiplier=0.5, max_grad_norm=C, grad_sample_mode=mode,
            loss_reduction=reduction, augmentation_multiplicity=K, noise_seed=3,
            criterion=nn.CrossEntropyLoss(reduction=reduction) if wrapped else None, grad_scaler=scaler)


def one_step(p, x, y, scaler=None, wrapped=True, dtype=None) -> torch.Tensor:
    """The update of one step (new minus old parameters, flat)."""
    before = torch.cat([q.detach().flatten().clone() for q in p.module.parameters()])
    p.optimizer.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = p.module(x)
    loss = p.criterion(out.float(), y) if wrapped else nn.functional.cross_entropy(
        out.float(), y, reduction=p.loss_reduction)
    return release(p, loss, scaler, before)


def release(p, loss, scaler, before) -> torch.Tensor:
    """Backward and step, through the scaler if there is one; the update (new minus ``before``, flat)."""
    if scaler is None:
        loss.backward()
        p.optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(p.optimizer)
        scaler.update()
    return torch.cat([q.detach().flatten() for q in p.module.parameters()]) - before


CASES = [(m, r, K, w) for m in ALL_MODES for r in ("sum", "mean") for K in (1, 3) for w in (True, False)
         if not (m == "ghost" and not w)]


@pytest.mark.parametrize("mode,reduction,K,wrapped", CASES)
def test_fp32_step_with_a_scaler_is_the_step_without(mode, reduction, K, wrapped):
    x, y = data(K)
    C = 1.0 if reduction == "mean" else 2.0  # some examples clipped, some not
    plain = one_step(private_of(mode, reduction, K, wrapped=wrapped, C=C), x, y, wrapped=wrapped)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = private_of(mode, reduction, K, scaler, wrapped, C=C)
    scaled = one_step(p, x, y, scaler, wrapped)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)
    assert p.steps == 1 and p.ledger.steps == 1 and p.overflowed_examples == 0


def test_the_issues_loop_no_longer_clips_the_scaled_gradients():
    """The issue: C=10 clips nothing unscaled; before the fix the scaled step had norm 6.29 against 1.12."""
    x, y = data()
    plain = one_step(private_of("bk", C=10.0, wrapped=False), x, y, wrapped=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = one_step(private_of("bk", scaler=scaler, C=10.0, wrapped=False), x, y, scaler, wrapped=False)
    torch.testing.assert_close(scaled.norm(), plain.norm(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch", "auto"])
def test_fp16_autocast_step_with_a_scaler_is_the_step_without(mode):
    x, y = data()
    plain = one_step(private_of(mode), x, y, dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = one_step(private_of(mode, scaler=scaler), x, y, scaler, dtype=torch.float16)
    torch.testing.assert_close(scaled, plain, rtol=2e-2, atol=2e-3)


def regression(mode, scaler=None, wrapped=True):
    """A model with a squared loss, whose output gradient grows with the target: one example can overflow alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpkit.make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), data_loader=None, sample_rate=0.1,
            expected_batch_size=B, noise_multiplier=0.5, max_grad_norm=1.0, grad_sample_mode=mode, noise_seed=3,
            criterion=nn.MSELoss() if wrapped else None, grad_scaler=scaler)


def regression_step(p, x, y, scaler=None, wrapped=True):
    before = torch.cat([q.detach().flatten().clone() for q in p.module.parameters()])
    p.optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        out = p.module(x).float()
    loss = p.criterion(out, y) if wrapped else nn.functional.mse_loss(out, y)
    return release(p, loss, scaler, before)


@pytest.mark.parametrize("mode", [m for m in ALL_MODES if m != "ew"])  # ew refuses autocast
@pytest.mark.parametrize("wrapped", [True, False])
def test_an_overflowed_example_contributes_zero_and_moves_nothing_else(mode, wrapped):
    """Issue 22.5: one example whose gradient the scale overflows may change nothing but its own (zero) term.

    Before: its whole batch was dropped, the scaler skipped the step and backed off, so one example decided
    whether the model moved and what the next steps' scale was, an event epsilon did not cover.
    """
    if mode == "ghost" and not wrapped:
        pytest.skip("ghost needs the wrapped criterion")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(B, D, generator=g), torch.randn(B, 2, generator=g)
    y[3] = 3e4  # its output gradient, 2 (out - y) / (2 B) times 2**6, is past fp16's 65504; the others' are not
    keep = torch.arange(B) != 3
    scales = []
    for outlier in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=1)
        p = regression(mode, scaler, wrapped)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = regression_step(p, x if outlier else x[keep], y if outlier else y[keep], scaler, wrapped)
        scales.append(scaler.get_scale())
        assert p.steps == 1 and p.ledger.steps == 1 and p.overflowed_examples == int(outlier)
        assert any("overflowed fp16" in str(w.message) for w in caught) == outlier
        if outlier:
            with_outlier = got
    # The step with the outlier is the step without it (noise included: the same draw), and the scale grew on
    # its schedule in both runs, the overflow unseen by the scaler.
    torch.testing.assert_close(with_outlier, got, rtol=2e-2, atol=2e-3)
    assert scales == [2.0 ** 7, 2.0 ** 7]


def test_a_non_finite_loss_is_refused_as_without_a_scaler():
    x, y = data()
    x[2] = float("nan")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = private_of("bk", scaler=scaler)
    with pytest.raises(PrivacyUsageError, match="non-finite gradient"):
        scaler.scale(p.criterion(p.module(x), y)).backward()
    with pytest.raises(PrivacyUsageError, match="refused"):
        scaler.step(p.optimizer)
    assert p.ledger.steps == 0 and p.overflowed_examples == 0


def test_a_scaler_make_private_does_not_know_is_refused():
    x, y = data()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = private_of("bk")
    with pytest.raises(PrivacyUsageError, match="grad_scaler=scaler"):
        scaler.scale(p.criterion(p.module(x), y))
    p.criterion(p.module(x), y).backward()
    p.optimizer.step()  # leaves p.grad set: the scaler would find gradients and step
    with pytest.raises(PrivacyUsageError, match="does not know"):  # refused at backward, before any clipping
        scaler.scale(p.criterion(p.module(x), y).value).backward()
    with pytest.raises(PrivacyUsageError, match="does not know"):
        scaler.step(p.optimizer)
    assert p.ledger.steps == 1


def test_fused_optimizers_are_refused():
    net = model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
        except (RuntimeError, ValueError):
            pytest.skip("no fused Adam on this CPU build")
        with pytest.raises(PrivacyUsageError, match="fused"):  # at make_private, before the first step
            dpkit.make_private(module=net, optimizer=opt, data_loader=None, sample_rate=0.1, expected_batch_size=B,
                               noise_multiplier=0.5, max_grad_norm=1.0, grad_scaler=scaler,
                               criterion=nn.CrossEntropyLoss())


def test_grad_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match="GradScaler"):
        private_of("bk", scaler=object())


def test_detach_restores_the_scaler():
    scaler = torch.amp.GradScaler("cpu")
    p = private_of("bk", scaler=scaler)
    assert "scale" in scaler.__dict__
    p.detach()
    assert "scale" not in scaler.__dict__


def bmm_run(mode, reduction, scaler, overflow_at=None, dtype=None):
    """Two logical batches of 8 in micro-batches of 3, a scaler step and update after each micro-batch."""
    net = model()
    g = torch.Generator().manual_seed(2)
    ds = TensorDataset(torch.randn(16, D, generator=g) * 3, torch.randint(0, CLASSES, (16,), generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = dpkit.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                               data_loader=DataLoader(ds, batch_size=8), poisson_sampling="unproven",
                               noise_multiplier=0.5, max_grad_norm=1.0, grad_sample_mode=mode, noise_seed=3,
                               loss_reduction=reduction, criterion=nn.CrossEntropyLoss(), grad_scaler=scaler)
    scales = []
    with dpkit.BatchMemoryManager(p, max_physical_batch_size=3) as bmm:
        for i, (x, y) in enumerate(bmm):
            p.optimizer.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = p.module(x)
            loss = p.criterion(out.float(), y)
            if scaler is None:
                loss.backward()
                p.optimizer.step()
                continue
            if i == overflow_at:
                scaler.update(2.0 ** 40)
            elif overflow_at is not None and i == overflow_at + 1:
                scaler.update(64.0)
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(p.optimizer)
            scaler.update()
    return p, torch.cat([q.detach().flatten() for q in p.module.parameters()]), scales


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_virtual_steps_under_a_scale_that_changes_between_micro_batches(mode, reduction):
    _, plain, _ = bmm_run(mode, reduction, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=1)  # doubles after every micro-batch
    p, got, scales = bmm_run(mode, reduction, scaler)
    assert len(set(scales)) == len(scales) == 6
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    assert p.steps == 2 and p.ledger.steps == 2


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost", "functorch"])
def test_an_overflow_in_one_micro_batch_zeroes_its_examples_alone(mode):
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    # 2**40 at the second micro-batch of the first batch overflows its 3 examples in fp16; the scale is then set
    # back for the next one. Nothing else of the run changes: both steps are released, each without those three.
    p, got, scales = bmm_run(mode, "mean", scaler, overflow_at=1, dtype=torch.float16)
    assert scales == [2.0 ** 6, 2.0 ** 40] + [2.0 ** 6] * 4
    assert p.steps == 2 and p.ledger.steps == 2 and p.overflowed_examples == 3
    torch.testing.assert_close(got, bmm_without(mode, range(3, 6)), rtol=2e-2, atol=2e-3)


def bmm_without(mode, dropped):
    """bmm_run's two steps without the examples ``dropped``, in a run without a scaler."""
    net = model()
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(16, D, generator=g) * 3, torch.randint(0, CLASSES, (16,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = dpkit.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), data_loader=None,
                               sample_rate=0.5, expected_batch_size=8, noise_multiplier=0.5, max_grad_norm=1.0,
                               grad_sample_mode=mode, noise_seed=3, criterion=nn.CrossEntropyLoss())
    for pieces in (((0, 3), (3, 6), (6, 8)), ((8, 11), (11, 14), (14, 16))):
        p.optimizer.zero_grad()
        with p.micro_batches():
            for lo, hi in pieces:
                rows = [i for i in range(lo, hi) if i not in dropped]
                if rows:
                    with torch.autocast("cpu", dtype=torch.float16):
                        out = p.module(xs[rows])
                    p.criterion(out.float(), ys[rows]).backward()
        p.optimizer.step()
    return torch.cat([q.detach().flatten() for q in p.module.parameters()])


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto", "functorch"])
def test_a_scaler_make_private_does_not_know_is_refused_with_a_plain_loss(mode):
    # Was: torch's own "AssertionError: No inf checks were recorded for this optimizer" inside scaler.step.
    x, y = data()
    p = private_of(mode, wrapped=False)
    scaler = torch.amp.GradScaler("cpu")
    loss = nn.functional.cross_entropy(p.module(x), y)
    with pytest.raises(PrivacyUsageError, match=r"scaled by a torch.amp.GradScaler that make_private does not know.*"
                                                r"make_private\(grad_scaler=scaler\)"):
        scaler.scale(loss).backward()
    assert p.ledger.steps == 0
