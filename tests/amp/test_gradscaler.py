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
    assert p.steps == 1 and p.ledger.steps == 1 and p.overflow_skips == 0


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


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_overflow_skips_the_step_and_leaks_nothing_into_the_next(mode, wrapped):
    if mode == "ghost" and not wrapped:
        pytest.skip("ghost needs the wrapped criterion")
    x, y = data()
    x2, y2 = data(seed=5)
    reference = private_of(mode, wrapped=wrapped)
    one_step(reference, x2, y2, wrapped=wrapped, dtype=torch.float16)  # only the second batch is released
    expected = torch.cat([q.detach().flatten() for q in reference.module.parameters()])
    # 2**40 overflows fp16 (and the fp32 records' squares); one back-off brings it to 2**10
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)
    p = private_of(mode, wrapped=wrapped, scaler=scaler)
    skipped = one_step(p, x, y, scaler, wrapped, dtype=torch.float16)
    assert skipped.abs().max() == 0 and p.steps == 0 and p.ledger.steps == 0 and p.overflow_skips == 1
    assert scaler.get_scale() == 2.0 ** 10
    one_step(p, x2, y2, scaler, wrapped, dtype=torch.float16)
    got = torch.cat([q.detach().flatten() for q in p.module.parameters()])
    assert p.steps == 1 and p.ledger.steps == 1
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_a_non_finite_loss_is_refused_as_without_a_scaler():
    x, y = data()
    x[2] = float("nan")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = private_of("bk", scaler=scaler)
    with pytest.raises(PrivacyUsageError, match="non-finite gradient"):
        scaler.scale(p.criterion(p.module(x), y)).backward()
    with pytest.raises(PrivacyUsageError, match="refused"):
        scaler.step(p.optimizer)
    assert p.ledger.steps == 0 and p.overflow_skips == 0


def test_a_scaler_make_private_does_not_know_is_refused():
    x, y = data()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = private_of("bk")
    with pytest.raises(PrivacyUsageError, match="grad_scaler=scaler"):
        scaler.scale(p.criterion(p.module(x), y))
    p.criterion(p.module(x), y).backward()
    p.optimizer.step()  # leaves p.grad set: the scaler finds gradients and steps
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


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost"])
def test_an_overflow_in_one_micro_batch_drops_its_whole_batch(mode):
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, backoff_factor=2.0 ** -17)
    # 2**40 at the second micro-batch of the first batch overflows fp16; the rest of that batch is dropped too
    p, got, scales = bmm_run(mode, "mean", scaler, overflow_at=1, dtype=torch.float16)
    assert scales == [2.0 ** 6, 2.0 ** 40, 2.0 ** 23] + [2.0 ** 6] * 3  # a back-off per dropped pass
    assert p.steps == 1 and p.ledger.steps == 1 and p.overflow_skips == 1
    # The second batch alone, released as in a run that had only it.
    torch.testing.assert_close(got, bmm_second_only(mode), rtol=2e-2, atol=2e-3)


def bmm_second_only(mode):
    net = model()
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(16, D, generator=g) * 3, torch.randint(0, CLASSES, (16,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = dpkit.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), data_loader=None,
                               sample_rate=0.5, expected_batch_size=8, noise_multiplier=0.5, max_grad_norm=1.0,
                               grad_sample_mode=mode, noise_seed=3, criterion=nn.CrossEntropyLoss())
    with p.micro_batches():
        for lo, hi in ((8, 11), (11, 14), (14, 16)):
            with torch.autocast("cpu", dtype=torch.float16):
                out = p.module(xs[lo:hi])
            p.criterion(out.float(), ys[lo:hi]).backward()
    p.optimizer.step()
    return torch.cat([q.detach().flatten() for q in p.module.parameters()])
