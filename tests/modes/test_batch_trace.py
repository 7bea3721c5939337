"""Inputs that do not come from the batch (nanoGPT's ``wpe(torch.arange(T))``, a ``[T, T]`` attention mask) are
exact in every mode, also when T equals the batch size, where shapes alone cannot tell them from the batch."""
from __future__ import annotations

import pytest
import torch
from _reference import clipped_sum, dpkit_step, per_example_grads, per_row_loss
from torch import nn
from torch.overrides import TorchFunctionMode

import dpkit
from dpkit.errors import PrivacyUsageError


class PositionLookup(nn.Module):
    """nanoGPT's embedding: positions looked up by ``arange(T)`` and broadcast over the batch."""

    def __init__(self, vocab=11, ctx=5, d=4, style="arange"):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(vocab, d), nn.Embedding(ctx, d), nn.Linear(d, vocab)
        self.register_buffer("types", torch.zeros(1, ctx, dtype=torch.long))
        self.wtt = nn.Embedding(2, d)
        self.style = style

    def forward(self, idx):
        B, T = idx.shape
        if self.style == "arange":
            pos = self.wpe(torch.arange(T))  # [T, d]
        elif self.style == "repeat":  # built for the batch from its size, as Opacus-era models do
            pos = self.wpe(torch.arange(T).repeat(B, 1)) + self.wtt(torch.zeros(B, T, dtype=torch.long))
        else:  # HF style: a [1, T] buffer slice, and token types expanded over the batch (stride 0)
            pos = self.wpe(torch.arange(T).unsqueeze(0)) + self.wtt(self.types[:, :T].expand(B, T))
        return self.head(self.wte(idx) + pos).transpose(1, 2)


class MaskedAttention(nn.Module):
    def __init__(self, vocab=11, d=4):
        super().__init__()
        self.wte, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        return self.head(self.att(x, x, x, attn_mask=mask, need_weights=False)[0]).transpose(1, 2)


def check(model, B, mode, T=5):
    torch.manual_seed(1)
    idx, y = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    ref = clipped_sum(per_example_grads(model, per_row_loss(nn.CrossEntropyLoss()), idx, y, 1), 0.5)
    got = dpkit_step(model, idx, y, mode=mode, C=0.5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("B", [5, 3])  # 5: T == B, the case shapes cannot decide
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch", "auto"])
@pytest.mark.parametrize("style", ["arange", "buffers", "repeat"])
def test_position_lookup_matches_the_loop(mode, B, style):
    torch.manual_seed(0)
    check(PositionLookup(style=style), B, mode)


@pytest.mark.parametrize("B", [5, 3])
@pytest.mark.parametrize("mode", ["functorch", "auto"])
def test_square_attention_mask_is_shared_by_every_example(mode, B):
    torch.manual_seed(0)
    check(MaskedAttention(), B, mode)


def test_expanded_weights_refuse_an_input_without_the_batch():
    torch.manual_seed(0)
    with pytest.raises(PrivacyUsageError, match="'wpe'.*does not come from the batch"):
        check(PositionLookup(), 5, "ew")


class Passthrough(TorchFunctionMode):
    """A user's torch-function mode that changes nothing; counts the calls it sees."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class ModeInside(PositionLookup):
    """The position lookup run under the user's mode, entered inside the forward: above dpkit's batch trace on the
    stack while the layers' hooks run, so the trace cannot step aside for them."""

    seen: list[int] = []  # the calls the user's mode saw, per forward

    def forward(self, idx):
        with Passthrough() as mode:
            out = super().forward(idx)
        ModeInside.seen.append(mode.calls)
        return out


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_a_user_mode_inside_the_forward_keeps_the_trace_exact(mode):
    torch.manual_seed(0)
    check(ModeInside(), 5, mode)  # T == B: only the trace tells wpe(arange(T)) from the batch


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_a_user_mode_inside_the_forward_stays_on_top(mode):
    """dpkit's hooks never take the user's mode off the stack: it sees every call of the forward, and dpkit's."""
    model, idx = ModeInside(), torch.randint(0, 11, (5, 5))
    ModeInside.seen.clear()
    model(idx)
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 data_loader=None, sample_rate=0.5, noise_multiplier=0.0, max_grad_norm=1.0,
                                 grad_sample_mode=mode, criterion=nn.CrossEntropyLoss(), expected_batch_size=5)
    model(idx)
    private.detach()
    plain, private_calls = ModeInside.seen
    assert private_calls >= plain
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_a_user_mode_around_the_step_keeps_the_trace_exact_and_sees_the_model(mode):
    torch.manual_seed(0)
    with Passthrough() as outer:
        check(PositionLookup(), 5, mode)
    assert outer.calls > 0
    assert torch._C._len_torch_function_stack() == 0


class FailsMidway(PositionLookup):
    def forward(self, idx):
        super().forward(idx)  # every layer's hooks ran, each leaving the trace and putting it back
        raise RuntimeError("the user's forward fails")


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_a_forward_that_raises_leaves_no_mode_behind(mode):
    """The trace is closed by the model's always-called forward hook, also when the forward raises."""
    model = FailsMidway()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                 noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                 criterion=nn.CrossEntropyLoss(), expected_batch_size=5)
    with pytest.raises(RuntimeError, match="fails"):
        model(torch.randint(0, 11, (5, 5)))
    assert torch._C._len_torch_function_stack() == 0
    private.detach()
