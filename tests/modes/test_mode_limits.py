"""What each mode cannot do is refused with a message that names the way out; what it can do is exact."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as cp
from _reference import clipped_sum, dpkit_step, per_example_grads, per_row_loss
from torch import nn

import dpkit
from dpkit.errors import DPKitError, PrivacyUsageError, UnsupportedLayerError


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.reentrant = reentrant

    def forward(self, x):
        return self.b(cp.checkpoint(self.mid, torch.tanh(self.a(x)), use_reentrant=self.reentrant))


class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(input=torch.tanh(self.a(input=x)))


@dpkit.rowwise  # a custom Function must be declared row-wise (forward and backward) to train
class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(Square.apply(self.a(x)))


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.fc = nn.EmbeddingBag(10, 4, mode="sum"), nn.Linear(4, 3)

    def forward(self, bags):
        ids, offsets = bags
        return self.fc(self.bag(ids, offsets))


def reference(model, x, y, C=0.5):
    return clipped_sum(per_example_grads(model, per_row_loss(nn.CrossEntropyLoss()), x, y, 1), C)


def assert_exact(model, mode, ref_model=None):
    torch.manual_seed(1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for got, want in zip(dpkit_step(model, x, y, mode=mode, C=0.5), reference(ref_model or model, x, y)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto", "ew"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_is_exact(mode, reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    plain = Checkpointed(False)  # the reference differentiates with autograd.grad, which reentrant refuses
    plain.load_state_dict(model.state_dict())
    assert_exact(model, mode, plain)


def test_ghost_is_exact_with_non_reentrant_checkpointing_and_refuses_reentrant():
    torch.manual_seed(0)
    assert_exact(Checkpointed(False), "ghost")
    with pytest.raises(PrivacyUsageError, match="reentrant.*use_reentrant=False"):
        assert_exact(Checkpointed(True), "ghost", Checkpointed(False))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto", "ew", "functorch"])
def test_layers_called_with_keyword_inputs_are_exact(mode):
    torch.manual_seed(0)
    assert_exact(KeywordCalls(), mode)


@pytest.mark.parametrize("model", [CustomFunction, lambda: Checkpointed(False)], ids=["autograd.Function", "ckpt"])
def test_functorch_names_what_it_cannot_recompute_and_auto_trains_it(model):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match="torch.func cannot recompute.*'auto'"):
        assert_exact(model(), "functorch")
    assert_exact(model(), "auto")


def test_functorch_refuses_inputs_whose_rows_are_not_the_examples():
    ids, offsets, y = torch.randint(0, 10, (9,)), torch.tensor([0, 2, 5, 7]), torch.randint(0, 3, (4,))
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    import dpkit

    private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                 noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="functorch",
                                 criterion=nn.CrossEntropyLoss(), loss_reduction="sum")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(DPKitError, match="EmbeddingBag with offsets"):
        private.criterion(model((ids, offsets)), y).backward()
    with pytest.raises(PrivacyUsageError, match="refused"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and private.ledger.steps == 0


def test_expanded_weights_refuse_autocast():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).float()
    x, y = torch.randn(4, 4, dtype=torch.float32), torch.randint(0, 3, (4,))
    with pytest.raises(PrivacyUsageError, match="'ew'.*autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dpkit_step(model, x, y, mode="ew", C=1.0)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto", "functorch", "ew"])
def test_a_user_hook_that_changes_a_layer_output_is_exact(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model[0].register_forward_hook(lambda m, i, o: o * 10)  # registered before make_private: dpkit's runs first
    assert_exact(model, mode)


def test_a_forward_hook_prepended_after_make_private_is_refused():
    import dpkit

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 data_loader=None, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                                 grad_sample_mode="bk", loss_reduction="sum")
    model[2].register_forward_hook(lambda m, i, o: o * 10, prepend=True)
    with pytest.raises(PrivacyUsageError, match="'2'.*prepend=True"):
        model(torch.randn(4, 4))
    private.detach()


@pytest.mark.parametrize("where", ["layer", "end"])
def test_out_of_memory_keeps_its_type_and_names_the_way_out(monkeypatch, where):
    # Was: torch's raw allocator error (66 GB requested in hooks mode), with no word of auto or BatchMemoryManager.
    from dpkit.modes import _arrivals

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 66.00 GiB")

    monkeypatch.setattr(_arrivals.Arrivals, "compute" if where == "layer" else "_end_pass", oom)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(torch.OutOfMemoryError) as exc:
        dpkit_step(model, x, y, mode="hooks", C=1.0)
    note = " ".join(getattr(exc.value, "__notes__", []))
    assert "grad_sample_mode='hooks'" in note and "'auto'" in note and "BatchMemoryManager(private" in note


def test_functorch_leaves_the_backend_flags_as_it_found_them():
    """The recomputation turns oneDNN and cuDNN off for itself alone: the user's other flags (deterministic,
    fp32 precision) are neither changed during it nor after (issue 22.8)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    seen = []
    original = torch.backends.mkldnn.deterministic
    torch.backends.mkldnn.deterministic = True
    try:
        handle = model[0].register_forward_hook(
            lambda *_: seen.append((torch.backends.mkldnn.enabled, torch.backends.mkldnn.deterministic)))
        dpkit_step(model, x, y, mode="functorch", C=1.0)
        handle.remove()
        assert torch.backends.mkldnn.enabled and torch.backends.mkldnn.deterministic
        assert (False, True) in seen  # the recomputation: oneDNN off, the user's deterministic kept
    finally:
        torch.backends.mkldnn.deterministic = original
