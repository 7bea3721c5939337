"""TruncatedPoissonLoader: fixed-shape batches that are a Poisson sample cut or padded, a step equal to a loop over
the real examples, the truncated event in the ledger, resume, refusals, and a compiled model that never recompiles."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import dpkit
from dpkit.accountants.prv import PRVAccountant
from dpkit.data import PoissonBatchSampler, TruncatedPoissonBatchSampler, TruncatedPoissonLoader
from dpkit.errors import PrivacyUsageError
from dpkit.events import GaussianEvent, TruncatedPoissonSampledEvent

N, Q, B, C = 40, 0.15, 6, 0.05  # expected 6 examples: about half the batches are cut, half padded


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g), torch.arange(N))


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def make(model, loader, **kwargs):
    if kwargs.get("noise_multiplier", 0.0) == 0.0:
        warnings.filterwarnings("ignore", "noise_multiplier=0", UserWarning)
    kwargs = {"noise_multiplier": 0.0, "max_grad_norm": C, **kwargs}
    return dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                              data_loader=loader, **kwargs)


def test_batches_are_the_poisson_sample_cut_at_random_or_padded_with_zero_rows():
    poisson = PoissonBatchSampler(N, Q, steps=200, generator=torch.Generator().manual_seed(5))
    cut = TruncatedPoissonBatchSampler(N, Q, B, steps=200, generator=torch.Generator().manual_seed(5))
    for sample, kept in zip(poisson, cut):  # the same draws until a cut takes from the generator
        assert len(kept) == min(len(sample), B) and set(kept) <= set(sample)
        if len(sample) > B:
            break
        assert kept == sample
    else:
        pytest.fail("no batch was cut")
    reals = []
    loader = TruncatedPoissonLoader(data(), Q, B, steps=8, generator=torch.Generator().manual_seed(5))
    for x, y, index, weight in loader:
        real = int(weight.sum())
        reals.append(real)
        assert x.shape == (B, 5) and weight.tolist() == [1.0] * real + [0.0] * (B - real)
        assert not x[real:].any() and not y[real:].any() and not index[real:].any()  # zeros, not examples
        torch.testing.assert_close(x[:real], data().tensors[0][index[:real]])
    assert min(reals) < B == max(reals)


def test_the_cut_keeps_each_sampled_example_alike():
    """q = 1, N = 10, B = 3: each example is kept with probability 0.3 (4 standard deviations allowed)."""
    sampler = TruncatedPoissonBatchSampler(10, 1.0, 3, steps=3000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([i for batch in sampler for i in batch]), minlength=10).double() / 3000
    assert (counts - 0.3).abs().max() < 4 * (0.3 * 0.7 / 3000) ** 0.5


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto", "functorch"])
def test_a_step_is_the_clipped_sum_over_the_real_examples(mode):
    model = net()
    loader = TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(1))
    private = make(model, loader, grad_sample_mode=mode)
    before = [p.detach().clone() for p in model.parameters()]
    x, y, index, weight = next(iter(private.data_loader))
    assert 0 < weight.sum() < B  # padding rows in this batch
    private.optimizer.zero_grad()
    (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
    private.optimizer.step()
    twin = net()
    want = [torch.zeros_like(p) for p in twin.parameters()]
    for i in index[weight > 0].tolist():
        grads = torch.autograd.grad(F.cross_entropy(twin(data().tensors[0][i:i + 1]), data().tensors[1][i:i + 1]),
                                    list(twin.parameters()))
        factor = min(1.0, C / (torch.sqrt(sum(g.square().sum() for g in grads)).item() + 1e-6))
        want = [w + factor * g / loader.expected_batch_size for w, g in zip(want, grads)]
    for p, b, w in zip(model.parameters(), before, want):
        torch.testing.assert_close(b - p.detach(), w, atol=1e-7, rtol=1e-5)
    private.detach()


def test_copies_and_users_get_one_weight_per_row():
    base = data()
    copies = TruncatedPoissonLoader(dpkit.Multiplicity(base, lambda x: x + 1, K=2), 1.0, 3, steps=1)
    x, y, index, weight = next(iter(copies))
    assert x.shape == (2 * 3, 5) and weight.tolist() == [1.0] * 6  # q = 1 fills every row
    users = TruncatedPoissonLoader(dpkit.ByUser(base, torch.arange(N) % 5, max_per_user=3), 0.2, 4,
                                   generator=torch.Generator().manual_seed(0), steps=20)
    for x, y, index, weight in users:  # ByUser's own weight: padded users weigh 0 in every row
        assert x.shape == (12, 5) and weight.shape == (12,)
        real = int((weight.view(4, 3).sum(1) > 0).sum())
        assert not weight[3 * real:].any() and not x[3 * real:].any()


def test_the_ledger_holds_the_truncated_step_and_calibration_meets_the_target():
    loader = TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(3))
    model = net()
    private = make(model, loader, noise_multiplier=None, target_epsilon=2.0, target_delta=1e-5, steps=30)
    steps = 0
    for x, y, index, weight in private.data_loader:
        private.optimizer.zero_grad()
        (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
        private.optimizer.step()
        steps += 1
    event = TruncatedPoissonSampledEvent(N, Q, B, GaussianEvent(private.noise_multiplier))
    assert private.ledger.entries == [(event, steps)]
    assert private.expected_batch_size == loader.expected_batch_size < Q * N
    assert 1.98 <= PRVAccountant().compose(event, 30).epsilon(1e-5) <= 2.0
    private.detach()


def test_checkpoint_resumes_the_same_batches():
    model = net()
    private = make(model, TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(3)),
                   noise_multiplier=1.0)
    batches = iter(private.data_loader)

    def step():
        x, y, index, weight = next(batches)
        private.optimizer.zero_grad()
        (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
        private.optimizer.step()
        return index.tolist()

    step()
    state = private.state_dict()
    want = [step(), step()]
    private.detach()
    model = net()
    private = make(model, TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(99)),
                   noise_multiplier=1.0)
    private.load_state_dict(state)
    batches = iter(private.data_loader)
    assert [step(), step()] == want
    private.detach()


def test_secure_mode_and_physical_micro_batches():
    """Secure mode cuts with the OS's CSPRNG; BatchMemoryManager splits each fixed batch, one release per batch."""
    model = net()
    private = make(model, TruncatedPoissonLoader(data(), Q, B, secure_mode=True, steps=6), noise_multiplier=1.0,
                   secure_mode=True)
    rows = []
    with dpkit.BatchMemoryManager(private, max_physical_batch_size=4) as pieces:
        for x, y, index, weight in pieces:
            rows.append(len(x))
            private.optimizer.zero_grad()
            (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
            private.optimizer.step()
    assert rows == [4, 2] * 6 and private.steps == 6 and private.ledger.steps == 6
    private.detach()


@pytest.mark.parametrize("noise", ["bandmf", "tree", "blt"])
def test_mechanisms_with_their_own_loaders_refuse_it(noise):
    with pytest.raises(PrivacyUsageError, match=f"noise={noise!r} needs .* the data loader is a TruncatedPoissonLoader"):
        make(net(), TruncatedPoissonLoader(data(), Q, B), noise=noise, noise_multiplier=1.0)


def test_other_accountants_and_spending_clippers_are_refused():
    with pytest.raises(PrivacyUsageError, match="accountant='rdp' cannot count the truncated.*'prv'"):
        make(net(), TruncatedPoissonLoader(data(), Q, B), accountant="rdp", noise_multiplier=1.0)
    with pytest.raises(PrivacyUsageError, match="padding rows would be counted"):
        make(net(), TruncatedPoissonLoader(data(), Q, B), clipping="adaptive", noise_multiplier=1.0,
             clipping_kwargs={"count_noise_multiplier": 5.0})


def test_a_skipped_or_repeated_batch_is_refused():
    model = net()
    private = make(model, TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(3)),
                   noise_multiplier=1.0)
    batches = iter(private.data_loader)

    def backward(batch):
        x, y, index, weight = batch
        private.optimizer.zero_grad()
        (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()

    batch = next(batches)
    backward(batch)
    private.optimizer.step()
    backward(batch)
    with pytest.raises(PrivacyUsageError, match="already released"):
        private.optimizer.step()
    next(batches)  # skipped, say because it was cut
    backward(next(batches))
    with pytest.raises(PrivacyUsageError, match="TruncatedPoissonLoader's accounting.*loader is at batch 3"):
        private.optimizer.step()
    assert private.ledger.steps == 1
    private.detach()


def compiled_frames(loader) -> list[int]:
    """Dynamo's count of frames compiled after each step of a model compiled for static shapes, as CUDA graphs
    need (``dynamic=False``; the aot_eager backend, as tests/modes/test_compile.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = net()
    private = make(model, loader, noise_multiplier=1.0)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    frames = []
    for x, y, *weight in private.data_loader:
        private.optimizer.zero_grad()
        loss = F.cross_entropy(compiled(x), y, reduction="none")
        (loss * weight[0] if weight else loss).mean().backward()
        private.optimizer.step()
        frames.append(counters["frames"]["total"])
    private.detach()
    return frames


def test_a_compiled_model_does_not_recompile_after_warm_up():
    """200 steps: nothing compiled after the first two (the second compiles a few frames of dpkit's own, batch
    size or not). With a Poisson loader every new batch size recompiles (the control)."""
    big = TensorDataset(torch.randn(2000, 5), torch.randint(0, 3, (2000,)))
    loader = TruncatedPoissonLoader(big, 0.004, 16, steps=200, generator=torch.Generator().manual_seed(0))
    frames = compiled_frames(loader)
    assert len(frames) == 200 and frames[1] > 0 and frames[-1] == frames[1]
    poisson = compiled_frames(dpkit.DPDataLoader(big, 0.004, steps=4, generator=torch.Generator().manual_seed(0)))
    assert poisson[-1] > poisson[1]


def test_a_mechanism_whose_step_is_not_a_poisson_step_is_refused_before_the_update(monkeypatch):
    """Only a Poisson step at the loader's rate can be counted as truncated; anything else stops the step."""
    model = net()
    private = make(model, TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(3)),
                   noise_multiplier=1.0)
    monkeypatch.setattr(private.noise, "dp_event", lambda sigma, rate: GaussianEvent(sigma))
    before = [p.detach().clone() for p in model.parameters()]
    x, y, index, weight = next(iter(private.data_loader))
    (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
    with pytest.raises(PrivacyUsageError, match="not a Poisson step at the loader's rate"):
        private.optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())) and private.ledger.steps == 0
    private.detach()


@pytest.mark.parametrize("weighted", [True, False])
def test_a_loss_without_the_weight_column_warns(weighted):
    # A loop that forgets the weights trains the padding rows (zeros, a public term, but not the step it means).
    model = net()
    private = make(model, TruncatedPoissonLoader(data(), Q, B, generator=torch.Generator().manual_seed(1)))
    x, y, _, weight = next(iter(private.data_loader))
    assert 0 < weight.sum() < B
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = F.cross_entropy(model(x), y, reduction="none")
        (weight * loss if weighted else loss).mean().backward()
    private.optimizer.step()
    assert any("did not weight the loss" in str(w.message) for w in caught) != weighted
    private.detach()
