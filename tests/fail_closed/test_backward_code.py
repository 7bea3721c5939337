"""Code that runs in the backward pass: gradient hooks may observe but not change, custom autograd Functions must
be declared, saved-tensor hooks must be torch's own (``dpkit/modes/_backward_code.py``). Each leak below was
measured before the guard: every mode released a step with sensitivity 2.3-3.3 C."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import dpkit
from dpkit.errors import PrivacyUsageError, RowMixingError

from ._setup import assert_sensitivity, batch, make, net, train_step

NORM_AND_HOOK_MODES = ("hooks", "ghost", "bk", "auto")


def _mix(g: torch.Tensor) -> torch.Tensor:
    """Every row replaced by the batch's mean row (times the batch size): each example gets all the others'."""
    return g.mean(0, keepdim=True).expand_as(g) * g.shape[0]


class MixingBackward(torch.autograd.Function):
    """The identity forward, a backward that mixes rows."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return _mix(g)


@dpkit.rowwise
class DeclaredDouble(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class Through(nn.Module):
    """Two Linear layers with ``middle`` between them."""

    def __init__(self, middle):
        super().__init__()
        self.a, self.b, self.middle = nn.Linear(4, 6), nn.Linear(6, 3), middle

    def forward(self, x):
        return self.b(self.middle(torch.tanh(self.a(x))))


@torch.library.custom_op("dpkit_tests::mixing_identity", mutates_args=())
def mixing_identity(x: torch.Tensor) -> torch.Tensor:
    """A torch.library custom op: the identity, whose registered backward mixes rows."""
    return x.clone()


mixing_identity.register_autograd(lambda ctx, g: _mix(g))


@torch.library.custom_op("dpkit_tests::declared_square", mutates_args=())
def declared_square(x: torch.Tensor) -> torch.Tensor:
    return x * x


declared_square.register_autograd(lambda ctx, g: 2 * g * ctx.saved_tensors[0],
                                  setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))
dpkit.rowwise(declared_square)


def _unpack_mixing(h):
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: _mix(t) if t.shape[:1] == (8,) else t):
        return h * h


def _tensor_hook(hook):
    model = net()
    model[1].register_forward_hook(lambda m, i, o: (o.register_hook(hook), o)[1])
    return model


def _module_hook(hook, pre=False):
    model = net()
    (model[2].register_full_backward_pre_hook if pre else model[2].register_full_backward_hook)(hook)
    return model


def _inplace(g):
    g.copy_(_mix(g))


LEAKS = {
    "tensor hook returning a mixed gradient": (lambda: _tensor_hook(_mix), "tensor hook"),
    "tensor hook mixing in place": (lambda: _tensor_hook(_inplace), "tensor hook"),
    "full backward hook": (lambda: _module_hook(lambda m, gi, go: tuple(_mix(g) for g in gi)), "full backward hook"),
    "backward pre-hook": (lambda: _module_hook(lambda m, go: tuple(_mix(g) for g in go), pre=True),
                          "backward pre-hook"),
    "custom Function": (lambda: Through(MixingBackward.apply), "MixingBackward"),
    "saved-tensor hooks": (lambda: Through(_unpack_mixing), "saved-tensor hooks"),
    "torch.library custom op": (lambda: Through(mixing_identity), "custom op"),
}


@pytest.mark.parametrize("mode", NORM_AND_HOOK_MODES)
@pytest.mark.parametrize("leak", list(LEAKS))
def test_backward_code_that_can_mix_rows_is_refused_before_any_release(mode, leak):
    build, named = LEAKS[leak]
    private = make(build(), mode, noise_multiplier=0.0)
    before = [p.detach().clone() for p in private.module.parameters()]
    x, y = batch()
    with pytest.raises(PrivacyUsageError, match=named):
        train_step(private, x, y)
    for p, b in zip(private.module.parameters(), before):
        assert torch.equal(p, b), "a refused step moved a parameter"
    assert private.steps == 0


def test_refusals_say_what_to_do():
    private = make(Through(MixingBackward.apply), "auto")
    with pytest.raises(RowMixingError, match=r"dpkit.rowwise\(MixingBackward\)"):
        train_step(private, *batch())


def _counting_hooks(seen):
    model = net()
    model[1].register_forward_hook(lambda m, i, o: (o.register_hook(lambda g: seen.append("tensor")), o)[1])
    model[2].register_full_backward_hook(lambda m, gi, go: seen.append("module"))
    return model


@pytest.mark.parametrize("mode", NORM_AND_HOOK_MODES)
def test_hooks_that_only_observe_still_run_and_train(mode):
    seen = []
    x, y = batch()
    assert_sensitivity(lambda: make(_counting_hooks(seen), mode, noise_multiplier=0.0), x, y, examples=[1, 6])
    assert "tensor" in seen and "module" in seen


@pytest.mark.parametrize("mode", NORM_AND_HOOK_MODES)
def test_declared_functions_and_torchs_own_backward_code_train(mode):
    def save_on_cpu(h):
        with torch.autograd.graph.save_on_cpu():
            return h * h

    x, y = batch()
    middles = [DeclaredDouble.apply, declared_square, save_on_cpu,
               lambda h: checkpoint(torch.sin, h, use_reentrant=False)]
    if mode != "ghost":  # ghost refuses reentrant checkpointing on its own (test_structure.py)
        middles.append(lambda h: checkpoint(torch.sin, h, use_reentrant=True))
    for middle in middles:
        assert_sensitivity(lambda m=middle: make(Through(m), mode, noise_multiplier=0.0), x, y, examples=[2, 5])


def test_rowwise_returns_a_declared_function_class_unchanged():
    assert dpkit.rowwise(DeclaredDouble) is DeclaredDouble
    x = torch.randn(3, 2, requires_grad=True)
    DeclaredDouble.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_detach_gives_the_backward_hooks_back_as_registered():
    def double(m, gi, go):
        return tuple(2 * g for g in gi)

    model = net()
    model[2].register_full_backward_hook(double)
    private = make(model, "auto")
    with pytest.raises(PrivacyUsageError):
        train_step(private, *batch())
    private.detach()
    assert list(model[2]._backward_hooks.values()) == [double]
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()  # the user's hook works again, outside dpkit


@pytest.mark.parametrize("mode", NORM_AND_HOOK_MODES)
def test_a_hook_on_the_models_output_in_the_loop_is_guarded_too(mode):
    private = make(net(), mode, noise_multiplier=0.0)
    x, y = batch()
    out = private.module(x)
    out.register_hook(_mix)
    with pytest.raises(PrivacyUsageError, match="tensor hook"):
        private.criterion(out, y).backward()
    with pytest.raises(PrivacyUsageError):
        private.optimizer.step()
    assert private.steps == 0


@pytest.mark.parametrize("mode", NORM_AND_HOOK_MODES)
def test_a_custom_function_that_makes_the_loss_itself_is_refused(mode):
    private = make(net(), mode, noise_multiplier=0.0)
    x, y = batch()
    loss = nn.functional.cross_entropy(private.module(x), y, reduction="sum")
    with pytest.raises(RowMixingError, match="MixingBackward"):
        MixingBackward.apply(loss).backward()
    assert private.steps == 0


@pytest.mark.parametrize("when", ["before make_private", "after make_private"])
def test_a_backward_pre_hook_on_the_model_itself_is_guarded(when):
    """The model collects its own (and global) backward hooks before its forward pre-hooks run, so dpkit wraps
    them at make_private, and refuses a forward that finds one registered since (it could not wrap it in time)."""
    def mixing(m, grad_output):
        return tuple(_mix(g) for g in grad_output)

    model = net()
    if when == "before make_private":
        model.register_full_backward_pre_hook(mixing)
    private = make(model, "bk", noise_multiplier=0.0)
    x, y = batch()
    if when == "after make_private":
        model.register_full_backward_pre_hook(mixing)
        with pytest.raises(PrivacyUsageError, match="run the forward again"):
            private.module(x)
    with pytest.raises(PrivacyUsageError, match="backward pre-hook"):
        train_step(private, x, y)
    assert private.steps == 0


def test_an_observing_hook_on_the_model_registered_late_trains_from_the_next_forward():
    seen = []
    model = net()
    private = make(model, "auto", noise_multiplier=0.0)
    model.register_full_backward_hook(lambda m, gi, go: seen.append(len(go)))
    x, y = batch()
    with pytest.raises(PrivacyUsageError, match="run the forward again"):
        private.module(x)
    private.optimizer.zero_grad()
    train_step(private, x, y)
    assert private.steps == 1 and seen
