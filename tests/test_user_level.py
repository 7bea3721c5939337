"""User-level DP with dpkit.ByUser: users are Poisson-sampled, and each user's contribution is clipped as a whole."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import dpkit

SIZES = [1, 2, 5, 3, 4, 1, 6, 2]  # examples per user; k = 3 keeps at most three of each
K, C, Q = 3, 0.05, 0.6


def setup(contribution: str, mode: str):
    g = torch.Generator().manual_seed(0)
    users = torch.repeat_interleave(torch.arange(len(SIZES)) * 7 + 3, torch.tensor(SIZES))  # any user ids
    n = len(users)
    data = TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))
    by_user = dpkit.ByUser(data, users, max_per_user=K, contribution=contribution, seed=1)
    torch.manual_seed(2)
    model = _net()
    loader = dpkit.DPDataLoader(by_user, sample_rate=Q, generator=torch.Generator().manual_seed(3))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 data_loader=loader, noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
                                 augmentation_multiplicity=K)
    return data, by_user, model, private


def reference(data, by_user, model, batch_users: list[int], contribution: str) -> list[torch.Tensor]:
    """Σ over the sampled users of clip(sum or mean of the user's examples' gradients), over the expected users."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for u in batch_users:
        rows = by_user.rows[u]
        loss = F.cross_entropy(model(data.tensors[0][rows]), data.tensors[1][rows], reduction="sum")
        if contribution == "mean":
            loss = loss / len(rows)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, C / (norm.item() + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return [t / (Q * len(SIZES)) for t in total]


@pytest.mark.parametrize("contribution", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["hooks", "bk", "auto", "functorch"])
def test_a_step_clips_each_users_sum_or_mean_as_one_example(mode, contribution):
    data, by_user, model, private = setup(contribution, mode)
    model, optimizer, loader = private
    before = [p.detach().clone() for p in model.parameters()]
    x, y, index, weight = next(iter(loader))
    first = {int(r[0]): u for u, r in enumerate(by_user.rows)}  # a user's rows start with its first example
    users = [first[int(i)] for i in index[::K]]
    assert len(users) >= 2 and any(len(by_user.rows[u]) < K for u in users)  # sampled users, padded ones too
    optimizer.zero_grad()
    (weight * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
    optimizer.step()
    twin = _net()
    twin.load_state_dict(dict(zip(twin.state_dict(), before)))
    want = reference(data, by_user, twin, users, contribution)
    for p, b, w in zip(model.parameters(), before, want):
        torch.testing.assert_close(b - p.detach(), w, atol=1e-7, rtol=1e-5)  # lr = 1: the update is the gradient
    private.detach()


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_users_are_what_is_sampled_and_counted():
    _, by_user, _, private = setup("mean", "bk")
    assert len(by_user) == len(SIZES) and private.sample_rate == Q
    assert private.expected_batch_size == pytest.approx(Q * len(SIZES))  # users, not examples
    assert all(len(r) == min(s, K) for r, s in zip(by_user.rows, SIZES))
    x, y, index, weight = by_user[2]  # five examples, three kept, none padded
    assert x.shape == (K, 5) and weight.tolist() == [1.0, 1.0, 1.0]
    x, y, index, weight = by_user[0]  # one example, padded with two copies of weight 0
    assert weight.tolist() == [3.0, 0.0, 0.0] and index.tolist() == [index[0].item()] * 3
    private.detach()


@pytest.mark.parametrize("bad, words", [({"max_per_user": 0}, "max_per_user"), ({"contribution": "max"}, "contribution"),
                                        ({"users": [0, 1]}, "one user id per example")])
def test_bad_arguments_name_themselves(bad, words):
    data = TensorDataset(torch.randn(4, 2), torch.zeros(4))
    kwargs = {"users": [0, 0, 1, 1], "max_per_user": 2, **bad}
    with pytest.raises(ValueError, match=words):
        dpkit.ByUser(data, **kwargs)


@pytest.mark.parametrize("weighted", [True, False])
def test_a_loss_without_the_weight_column_warns(weighted):
    # Was silent: the padding rows (copies of a user's first example, weight 0) trained at full weight.
    import warnings

    x, y, users = torch.randn(30, 3), torch.randint(0, 2, (30,)), torch.arange(30) % 12  # 2 or 3 per user
    model = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
            data_loader=dpkit.DPDataLoader(dpkit.ByUser(TensorDataset(x, y), users, max_per_user=3), 0.9),
            max_grad_norm=1.0, augmentation_multiplicity=3)
    xb, yb, wb = next(iter(private.data_loader))
    assert bool((wb == 0).any())  # the batch has padding rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = F.cross_entropy(model(xb), yb, reduction="none")
        (loss * wb.double().float() if weighted else loss).mean().backward()  # a moved copy counts too
    private.optimizer.step()
    assert any("did not weight the loss" in str(w.message) for w in caught) != weighted
