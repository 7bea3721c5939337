"""Model structure: parameters used outside their module, layers that mix examples, reuse, checkpointing, hooks."""
from __future__ import annotations

import copy

import pytest
import torch

import dpkit
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpkit.errors import PrivacyUsageError, UnsupportedLayerError, UnsupportedModuleError

from ._setup import (
    MODES, Frozen, assert_counted, assert_sensitivity, batch, flat, loss_backward, make, net, release, train_step,
)

SAMPLER_MODES = ("hooks", "ghost", "bk", "ew", "auto")


# -- 6. a planned parameter used outside its module -----------------------------------------------------------------
class TiedHead(nn.Module):
    """An LM head that reuses the (first-layer) embedding's weight through F.linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, ids):
        h = torch.tanh(self.mid(self.emb(ids).mean(1)))
        return F.linear(h, self.emb.weight)


class MatmulMiddle(nn.Module):
    """``x @ self.fc.weight.t()`` on a layer that is not the first."""

    def __init__(self):
        super().__init__()
        self.first, self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.out(h @ self.fc.weight.t() + self.fc(h))


class MatmulFirst(nn.Module):
    """``x @ self.fc.weight.t()`` on the first layer."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.fc.weight.t() + self.fc(x)))


def ids_batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 10, (n, 5), generator=g), torch.randint(0, 10, (n,), generator=g)


CASES = {
    "lm_head": (TiedHead, ids_batch, r"\['emb.weight'\]"),
    "matmul_middle": (MatmulMiddle, batch, r"\['fc.weight'\]"),
    "matmul_first": (MatmulFirst, batch, r"\['fc.weight'\]"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", SAMPLER_MODES)
def test_parameter_used_outside_its_module_is_refused_by_name(mode, case):
    model_cls, data, name = CASES[case]
    p = make(model_cls(), mode)
    x, y = data()
    frozen = Frozen(p)
    with pytest.raises(PrivacyUsageError, match=name + ".*outside"):
        loss_backward(p, x, y)
    frozen.check()
    with pytest.raises(PrivacyUsageError):
        p.optimizer.step()
    frozen.check()


def reference_clipped_sum(model, x, y, C=1.0):
    """A loop over examples: each example's full gradient (every use of every parameter), clipped, summed."""
    model = copy.deepcopy(model).double()
    params = [q for q in model.parameters() if q.requires_grad]
    total = [torch.zeros_like(q) for q in params]
    for i in range(len(x)):
        xi = x[i:i + 1].double() if x.is_floating_point() else x[i:i + 1]
        grads = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
        f = min(1.0, C / (norm + 1e-6))
        total = [t + f * g for t, g in zip(total, grads)]
    return torch.cat([t.flatten() for t in total])


@pytest.mark.parametrize("case", list(CASES))
def test_functorch_is_exact_for_a_parameter_used_outside_its_module(case):
    model_cls, data, _ = CASES[case]
    torch.manual_seed(0)
    model = model_cls().double()
    x, y = data()
    x = x.double() if x.is_floating_point() else x
    expected = reference_clipped_sum(model, x, y)
    _, got = release(lambda: make(copy.deepcopy(model), "functorch", noise_multiplier=0.0, loss_reduction="sum"),
                     train_step, x, y)
    torch.testing.assert_close(flat(got), expected, rtol=1e-9, atol=1e-9)


# -- 10. layers that mix examples -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_in_eval_at_make_private_then_train_is_refused_at_the_next_forward(mode):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 3)).eval()
    p = make(model, mode)
    x, y = batch()
    model.eval()
    train_step(p, x, y)  # in eval mode it is a fixed affine map: fine
    model.train()
    frozen = Frozen(p)
    with pytest.raises(UnsupportedModuleError, match=r"\['1'\] \(BatchNorm1d\) are in training mode"):
        loss_backward(p, x, y)
    frozen.check()
    assert_counted(p, 1)


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_with_parameters_in_eval_is_refused_or_trained_privately(mode):
    """BN's affine parameters need a sampler no mode has: refused at make_private (or at the forward in train)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()
    try:
        p = make(model, mode)
    except UnsupportedLayerError as err:
        assert "BatchNorm1d" in str(err)
        return
    model.train()
    with pytest.raises(UnsupportedModuleError, match="BatchNorm1d"):
        loss_backward(p, *batch())


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "ew", "auto"])
def test_batchnorm_without_parameters_inserted_after_make_private_is_refused(mode):
    p = make(mode=mode)
    p.module.insert(1, nn.BatchNorm1d(6, affine=False))
    frozen = Frozen(p)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm1d"):
        loss_backward(p, *batch())
    frozen.check()


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_with_parameters_appended_after_make_private_is_refused(mode):
    p = make(mode=mode)
    p.module.append(nn.BatchNorm1d(3))
    x, y = batch()
    frozen = Frozen(p)
    with pytest.raises((UnsupportedModuleError, UnsupportedLayerError), match="BatchNorm1d"):
        loss_backward(p, x, y)
    frozen.check()


# -- reuse, checkpointing, hooks, broadcast lookups ------------------------------------------------------------------
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("mode", MODES)
def test_module_called_twice_is_within_the_bound(mode):
    x, y = batch()
    assert_sensitivity(lambda: make(Twice(), mode, noise_multiplier=0.0), x, y, examples=[0, 4])


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(4, 6), nn.Linear(6, 3), reentrant

    def forward(self, x):
        return self.b(checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_activation_checkpointing_is_private_or_refused(mode, reentrant):
    x, y = batch()
    try:
        assert_sensitivity(lambda: make(Checkpointed(reentrant), mode, noise_multiplier=0.0), x, y, examples=[0, 4])
    except UnsupportedLayerError as err:
        assert mode == "functorch" and "Checkpointed" in str(err)


def _hooked(where):
    def build(mode):
        model = net()
        if where == "forward_first":
            model[0].register_forward_hook(lambda m, i, o: o * 10)
        else:
            model[2].register_forward_hook(lambda m, i, o: o * 10)
        return make(model, mode, noise_multiplier=0.0)
    return build


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
@pytest.mark.parametrize("where", ["forward_first", "forward_last"])
def test_user_forward_hooks_that_scale_outputs_stay_within_the_bound(mode, where):
    """(Hooks that change gradients in the backward pass are refused: tests/fail_closed/test_backward_code.py.)"""
    x, y = batch()
    assert_sensitivity(lambda: _hooked(where)(mode), x, y, examples=[1, 6])


@dpkit.rowwise  # row-wise in its forward and its backward: declared (undeclared ones are refused)
class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 1000 * g * x  # a custom backward that inflates gradients


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "ew", "auto"])
def test_custom_autograd_function_between_layers_stays_within_the_bound(mode):
    class WithFunction(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(Square.apply(self.a(x)))

    x, y = batch()
    assert_sensitivity(lambda: make(WithFunction(), mode, noise_multiplier=0.0), x, y, examples=[2, 5])


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_inplace_relu_after_a_layer_stays_within_the_bound(mode):
    def build():
        return make(nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)), mode,
                    noise_multiplier=0.0)

    x, y = batch()
    assert_sensitivity(build, x, y, examples=[0, 7])


class Positions(nn.Module):
    """A positional embedding looked up with arange(T): [T] rows, broadcast over the batch."""

    def __init__(self, T=8):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(10, 4), nn.Embedding(T, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head((self.tok(ids) + self.pos(torch.arange(ids.shape[1]))).mean(1))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch", "auto"])
def test_broadcast_lookup_with_batch_equal_to_sequence_length_is_within_the_bound(mode):
    """B == T == 8: the [T] lookup must not be taken for 8 examples."""
    ids = torch.randint(0, 10, (8, 8), generator=torch.Generator().manual_seed(0))
    y = batch()[1]
    assert_sensitivity(lambda: make(Positions(), mode, noise_multiplier=0.0), ids, y, examples=[0, 4])


def test_broadcast_lookup_in_ew_mode_is_refused():
    p = make(Positions(), "ew")
    ids = torch.randint(0, 10, (8, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PrivacyUsageError, match=r"'pos'.*does not come from the batch"):
        loss_backward(p, ids, batch()[1])
    assert p.steps == 0


class TiedModules(nn.Module):
    """The embedding and the head share one Parameter through module attributes (HF-style tying)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids).mean(1))))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch", "ew", "auto"])
def test_weights_tied_through_modules_are_within_the_bound(mode):
    ids, y = ids_batch()
    assert_sensitivity(lambda: make(TiedModules(), mode, noise_multiplier=0.0), ids, y, examples=[0, 4])


def test_embedding_on_one_dimensional_ids_in_ew_mode_trains_or_is_refused_clearly():
    p = make(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)), "ew")
    ids = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    try:
        train_step(p, ids, batch()[1])
    except PrivacyUsageError:
        return
    except UnsupportedLayerError:
        return
    assert_counted(p, 1)


@pytest.mark.parametrize("mode", MODES)
def test_unused_module_gets_noise_only(mode):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    p = make(model, mode, noise_multiplier=1.0)
    before = model.unused.weight.detach().clone()
    train_step(p, *batch())
    assert bool((model.unused.weight != before).all()), "a coordinate of the unused layer got no noise"
    assert_counted(p, 1)
