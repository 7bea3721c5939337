"""Rows stay independent (issue 21, invariant 2): the batch trace refuses, naming it, an operation that mixes
examples while it needs a gradient, in the model, in the training loop between the loader and the model, and in
the loss; and it lets row-wise models and losses through. Each case drives a trace directly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpkit.criterion import DPCriterion, DPLoss
from dpkit.errors import PrivacyUsageError, RowMixingError
from dpkit.modes._rows import Mixed, Summed
from dpkit.modes._trace import rowwise
from dpkit.modes._trace import BatchTrace

B, T, D, V = 4, 3, 8, 11


def traced(fn, *inputs, batch_dim=0, group=1):
    """Run ``fn(*inputs)`` under a trace started on ``inputs``; the trace, to ask about states."""
    trace = BatchTrace(list(inputs), batch_dim=batch_dim, group=group)
    with trace:
        out = fn(*inputs)
    return out, trace


def refused(fn, *inputs, match="", **kw):
    with pytest.raises(RowMixingError, match=match):
        traced(fn, *inputs, **kw)


def loss_of(model, x, y, loss_fn):
    """A trace from the model's input to the loss's backward, as the engine keeps one."""
    trace = BatchTrace([x, y], batch_dim=0)
    with trace:
        loss_fn(model(x), y).backward()
    return trace


# float64, as this folder's tests run (conftest.py)
lin = nn.Linear(D, D).double()
x2 = torch.randn(B, D, dtype=torch.float64)  # [B, D]
x3 = torch.randn(B, T, D, dtype=torch.float64)  # [B, T, D]
idx = torch.randint(0, V, (B, T))


class Forward(nn.Module):
    """A model whose forward is ``fn`` (over the shared layer ``lin``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.lin = fn, lin

    def forward(self, x):
        return self.fn(x)


# -- mixing families in the model: refused, naming the operation ---------------------------------------------
@pytest.mark.parametrize("name, fn, match", [
    ("flip", lambda x: lin(x).flip(0), r"torch.Tensor.flip over dim 0, the batch dimension"),
    ("roll", lambda x: torch.roll(lin(x), 1, 0), r"torch.roll over dim 0"),
    ("roll-flat", lambda x: torch.roll(lin(x), 1), r"torch.roll over dim None"),
    ("centre", lambda x: (lambda h: h - h.mean(0))(lin(x)), r"reduced over the whole batch"),
    ("max-over-batch", lambda x: lin(x).max(0).values, r"reduces over dim 0"),
    ("norm-over-batch", lambda x: lin(x) / lin(x).norm(dim=0), r"torch.Tensor.norm reduces over dim 0"),
    ("softmax-over-batch", lambda x: F.softmax(lin(x), dim=0), r"softmax over dim 0"),
    ("cumsum", lambda x: lin(x).cumsum(0), r"cumsum over dim 0"),
    ("sort", lambda x: lin(x).sort(0).values, r"sort over dim 0"),
    ("topk", lambda x: lin(x).topk(2, dim=0).values, r"topk over dim 0"),
    ("batch_norm", lambda x: F.batch_norm(lin(x), None, None, training=True), r"batch_norm with training=True"),
    ("normalize-dim0", lambda x: F.normalize(lin(x), dim=0), r"normalize over dim 0"),
    ("layer_norm-over-batch", lambda x: F.layer_norm(lin(x).T, (B,)), r"layer_norm normalises over dim 1"),
    ("permute-rows", lambda x: lin(x)[torch.tensor([1, 0, 3, 2])], r"indexes dim 0.*with a tensor"),
    ("mask-rows", lambda x: lin(x)[x[:, 0] > 0], r"indexes dim 0"),
    ("first-rows", lambda x: lin(x)[:2], r"takes part of dim 0"),
    ("index_select", lambda x: lin(x).index_select(0, torch.tensor([1, 0, 2, 3])), r"index_select works along dim 0"),
    ("gather", lambda x: lin(x).gather(0, torch.zeros(B, D, dtype=torch.long)), r"gather works along dim 0"),
    ("gram", lambda x: lin(x) @ lin(x).T, r"pairs rows of the batch"),
    ("mm-contract", lambda x: torch.mm(lin(x).T, x), r"pairs rows|sums over the batch dimension"),
    ("einsum", lambda x: torch.einsum("bd,cd->bc", lin(x), x), r"einsum pairs rows"),
    ("cdist", lambda x: torch.cdist(lin(x), lin(x)), r"cdist pairs rows"),
    ("linear-batched-weight", lambda x: F.linear(x, lin(x)), r"linear pairs rows"),
    ("attention-across-batch", lambda x: F.scaled_dot_product_attention(lin(x), lin(x), lin(x)),
     r"scaled_dot_product_attention pairs rows"),
    ("cat-batch", lambda x: torch.cat([lin(x), lin(x)], 0), r"torch.cat turns the batch's 4 rows"),
    ("interleave-reshape", lambda x: lin(x).T.reshape(B, D), r"reshape.*interleaves examples"),
    ("broadcast-pairs", lambda x: (lin(x)[:, None, :] - lin(x)[None, :, :]).sum(-1), r"combines examples"),
    ("cosine-pairs", lambda x: F.cosine_similarity(lin(x)[:, None], lin(x)[None], dim=-1), r"combines examples"),
    ("logsumexp", lambda x: lin(x).logsumexp(0), r"logsumexp reduces over dim 0"),
    ("repeat-tiles", lambda x: lin(x).repeat(2, 1).view(B, 2, D), r"tiles dim 0"),
    ("one-example", lambda x: lin(x) + lin(x)[0], r"combines one example's data"),
    ("loop-pairs", lambda x: torch.stack([r * lin(x)[1] for r in lin(x)]), r"combines one example's data"),
    ("loop-out-of-order", lambda x: torch.stack([r for r in lin(x)][::-1]), r"out of order"),
])
def test_a_model_that_mixes_rows_is_refused(name, fn, match):
    refused(Forward(fn), x2, match=match)


def test_the_message_says_where_and_what_to_do():
    with pytest.raises(RowMixingError) as info:
        traced(lambda x: lin(x).flip(0), x2)
    text = str(info.value)
    assert "test_rows.py:" in text and "dpkit.rowwise" in text and "per-example" in text
    assert isinstance(info.value, PrivacyUsageError)


def test_mixing_in_a_module_forward_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, 2)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0, keepdim=True)

    refused(Mixer(), x2, match=r"torch.Tensor.sub combines the batch's rows")


# -- between the loader and the model: mixup ---------------------------------------------------------------------
def test_mixup_in_the_loop_is_refused_at_the_model_and_at_the_loss():
    x, y = torch.randn(B, D), torch.randint(0, 2, (B,))
    loader = BatchTrace([x, y], batch_dim=0)
    with loader:  # no gradient yet: only marked
        lam = 0.7
        xm = lam * x + (1 - lam) * x.flip(0)
        ym = F.one_hot(y, 2).float()
        ym = lam * ym + (1 - lam) * ym.flip(0)
    assert type(loader.state(xm)) is Mixed and type(loader.state(ym)) is Mixed
    with pytest.raises(RowMixingError, match=r"the model's input mixes examples: torch.Tensor.flip over dim 0"):
        loader.refuse_mixed([xm], where="the model's input")
    model = BatchTrace([xm, ym], batch_dim=0, source=loader)  # the model's trace inherits the loader's marks
    with pytest.raises(RowMixingError, match=r"flip over dim 0.*refused at torch.nn.functional.linear"):
        with model:
            lin(xm)
    with pytest.raises(RowMixingError, match=r"flip"):  # labels mixed alone reach the loss
        with BatchTrace([x, ym], batch_dim=0, source=loader):
            F.cross_entropy(lin(x)[:, :2], ym)


def test_a_clean_batch_from_the_loader_passes():
    x, y = torch.randn(B, D), torch.randint(0, 2, (B,))
    loader = BatchTrace([x, y], batch_dim=0)
    with loader:
        xa = x + 0.1 * torch.randn_like(x)  # per-example augmentation
    loader.refuse_mixed([xa, y], where="the model's input")
    trace = BatchTrace([xa, y], batch_dim=0, source=loader)
    with trace:
        F.cross_entropy(lin(xa)[:, :2], y).backward()
    assert trace.state(xa) == (0, 1)


def test_metrics_without_grad_are_marked_not_refused():
    with torch.no_grad():
        out, trace = traced(lambda x: lin(x) - lin(x).mean(0), x2)
    assert type(trace.state(out)) is Mixed
    with pytest.raises(RowMixingError, match="combines the batch's rows"):
        with trace:
            lin(out)  # a mixed tensor fed to a grad-requiring op is refused there


# -- losses ------------------------------------------------------------------------------------------------------
class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)

    def forward(self, idx):
        return self.head(self.emb(idx))  # [B, T, V]


@pytest.mark.parametrize("name, loss_fn, match", [
    ("in-batch-negatives", lambda z, y: F.cross_entropy(z.flatten(1) @ z.flatten(1).T, torch.arange(B)),
     r"pairs rows"),
    ("labelled-tokens", lambda z, y: (F.cross_entropy(z.transpose(1, 2), y, reduction="none") * (y > 0)).sum()
     / (y > 0).sum(), r"divides by a quantity computed from the batch"),
    ("hf-num-items", lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1), reduction="sum")
     / (y != -100).sum(), r"divides by a quantity computed from the batch"),
    ("ignore-index-mean", lambda z, y: F.cross_entropy(z.reshape(-1, V), torch.where(y > 5, y, -100).reshape(-1)),
     r"labelled targets in the whole batch"),
    ("weighted-mean", lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1), weight=torch.rand(V)),
     r"labelled targets in the whole batch"),
    ("contrastive-logsumexp", lambda z, y: (z.sum((1, 2)) - z.sum((1, 2)).logsumexp(0)).mean(),
     r"logsumexp reduces over dim 0"),
    ("normalised-by-the-batch", lambda z, y: z.pow(2).sum() / z.detach().abs().sum(),
     r"divides by a quantity computed from the batch"),
    ("squared-sum", lambda z, y: z.sum() ** 2, r"is applied to a quantity reduced over the whole batch"),
])
def test_a_loss_that_mixes_rows_is_refused(name, loss_fn, match):
    torch.manual_seed(0)
    with pytest.raises(RowMixingError, match=match):
        loss_of(LM(), idx, torch.randint(1, V, (B, T)), loss_fn)


@pytest.mark.parametrize("name, loss_fn", [
    ("per-token-then-mean-sum", lambda z, y: F.cross_entropy(z.transpose(1, 2), y, reduction="none").mean(1).sum()),
    ("flat-sum", lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1), reduction="sum")),
    ("flat-mean-no-ignored", lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1), ignore_index=-1)),
    ("mean-over-fixed-count", lambda z, y: F.cross_entropy(z.transpose(1, 2), y, reduction="sum") / B),
    ("per-example-own-count", lambda z, y: ((F.cross_entropy(z.transpose(1, 2), y, reduction="none") * (y > 2)).sum(1)
                                            / (y > 2).sum(1).clamp(min=1)).sum()),
    ("two-losses-added", lambda z, y: F.cross_entropy(z.transpose(1, 2), y) + 0.1 * z.pow(2).mean()),
    ("label-gather", lambda z, y: -z.log_softmax(-1).gather(2, y.unsqueeze(-1)).squeeze(-1).sum()),
    ("arange-index", lambda z, y: -z[:, 0].log_softmax(-1)[torch.arange(B), y[:, 0]].sum()),
    ("mse", lambda z, y: F.mse_loss(z[..., 0], y.float())),
])
def test_a_row_wise_loss_passes(name, loss_fn):
    torch.manual_seed(0)
    loss_of(LM(), idx, torch.randint(1, V, (B, T)), loss_fn)


def test_the_dpkit_criterion_is_row_wise():
    y = torch.randint(0, V, (B, T))
    y[0, 1] = -100
    crit = DPCriterion(nn.CrossEntropyLoss())
    model = LM()
    trace = BatchTrace([idx, y], batch_dim=0)
    with trace:
        per_row = crit.per_example(model(idx).transpose(1, 2), y)
        trace.refuse_mixed([per_row], where="the per-example losses")
        DPLoss(per_row, "mean").backward()
    assert trace.state(per_row) == (0, 1)


# -- row-wise models pass ----------------------------------------------------------------------------------------
def backward_through(model, x, batch_dim=0, group=1):
    out, trace = traced(model, x, batch_dim=batch_dim, group=group)
    out = out[0] if isinstance(out, tuple) else out
    with trace:
        out.sum().backward()
    return trace.state(out)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.gn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.gn(self.c(F.pad(x, (1, 1, 1, 1))))), 2)
        return self.fc(F.dropout(h, 0.1).mean((2, 3)))


class Attention(nn.Module):
    """Per-example attention with a padding mask and a causal mask, unbatched [T, d] position embeddings."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.qkv = nn.Embedding(V, D), nn.Parameter(torch.randn(T, D)), nn.Linear(D, 3 * D)

    def forward(self, idx):
        x = self.emb(idx) + self.pos  # broadcast [T, D] over the batch
        q, k, v = (t.view(B, T, 2, D // 2).transpose(1, 2) for t in self.qkv(x).split(D, dim=2))
        scores = q @ k.transpose(-1, -2) / 2.0  # [B, h, T, T]: per example
        pad = (idx == 0)[:, None, None, :]
        scores = scores.masked_fill(pad | torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -1e9)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        y = torch.where((idx > 3)[..., None], y, torch.zeros_like(y))
        out = y.new_zeros(B, T, D) + y
        keep = pad.expand(B, 1, T, T) == 0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, D) + out


@pytest.mark.parametrize("name, model, x, batch_dim", [
    ("mlp-layernorm", lambda: nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.GELU(), nn.Linear(D, 2)), x2, 0),
    ("conv-groupnorm", Conv, torch.randn(B, 3, 6, 6, dtype=torch.float64), 0),
    ("embedding", lambda: nn.Embedding(V, D), idx, 0),
    ("attention", Attention, idx, 0),
    ("mha-batch-first", lambda: lambda x: nn.MultiheadAttention(D, 2, batch_first=True)(x, x, x)[0], x3, 0),
    ("mha-seq-first", lambda: lambda x: nn.MultiheadAttention(D, 2)(x, x, x)[0], x3.transpose(0, 1).contiguous(), 1),
    ("lstm", lambda: nn.LSTM(D, 5, batch_first=True, num_layers=2), x3, 0),
    ("gru-seq-first", lambda: nn.GRU(D, 5), x3.transpose(0, 1).contiguous(), 1),
    ("view-flatten", lambda: lambda x: lin(x.view(B, -1).view(B, T, D).flatten(0, 1)).view(B, T, D), x3, 0),
])
def test_a_row_wise_model_passes(name, model, x, batch_dim):
    torch.manual_seed(0)
    state = backward_through(model(), x, batch_dim)
    assert type(state) is not Mixed


def test_mha_with_a_key_padding_mask_passes():
    mha = nn.MultiheadAttention(D, 2, batch_first=True)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[:, -1] = True
    out, trace = traced(lambda x, m: mha(x, x, x, key_padding_mask=m)[0], x3, pad)
    assert trace.state(out) == (0, 1)


def test_a_seq_first_lstm_fed_batch_first_is_refused():
    refused(nn.LSTM(D, 5), x3, match=r"recurrence along the batch dimension")


def test_k_copies_may_mix_within_an_example():
    K = 3
    xk = x2.repeat_interleave(K, 0)  # [B*K, D]: K adjacent copies of each example
    state = backward_through(lambda x: lin(x).view(B, K, D).mean(1), xk, group=K)
    assert state == (0, 1)
    refused(lambda x: lin(x).view(K, B, D).mean(0), xk, group=K, match="reshapes")


def test_k_copies_made_in_the_model_keep_each_example_together():
    out, trace = traced(lambda x: lin(x).unsqueeze(1).expand(B, 2, D).reshape(2 * B, D), x2)
    assert trace.state(out) == (0, 2)
    out, trace = traced(lambda x: lin(x).repeat_interleave(2, 0).view(B, 2, D).sum(1), x2)
    assert trace.state(out) == (0, 1)


def test_a_function_declared_row_wise_is_not_checked_inside():
    @rowwise
    def per_example_centre(h):
        return h - h.mean(1, keepdim=True).flip(0).flip(0)  # flips that cancel: row-wise, but dpkit cannot tell

    out, trace = traced(lambda x: per_example_centre(lin(x)), x2)
    assert trace.state(out) == (0, 1)
    refused(lambda x: lin(x).flip(0).flip(0), x2, match="flip")


def test_a_trace_without_batch_dim_only_marks():
    out, trace = traced(lambda x: lin(x).flip(0), x2, batch_dim=None)
    assert trace.batched(out)


def test_one_example_cannot_mix():
    out, trace = traced(lambda x: lin(x) - lin(x).mean(0), x2[:1])
    assert trace.batched(out)


# -- where the batch dim goes: exact states ----------------------------------------------------------------------
q4 = torch.randn(B, 2, T, D, dtype=torch.float64)  # [B, heads, T, d]


@pytest.mark.parametrize("name, fn, x, state", [
    ("transpose", lambda x: x.transpose(0, 2), x3, (2, 1)),
    ("T", lambda x: x.T, x2, (1, 1)),
    ("mT", lambda x: x.mT, x3, (0, 1)),
    ("permute", lambda x: x.permute(1, 2, 0), x3, (2, 1)),
    ("movedim", lambda x: x.movedim(0, -1), x3, (2, 1)),
    ("unsqueeze-squeeze", lambda x: x.unsqueeze(0).unsqueeze(2).squeeze(0), x3, (0, 1)),
    ("flatten-merges-tokens", lambda x: x.flatten(0, 1), x3, (0, T)),
    ("unflatten-back", lambda x: x.flatten(0, 1).unflatten(0, (B, T)), x3, (0, 1)),
    ("reshape-later-dims", lambda x: x.reshape(B, T * D), x3, (0, 1)),
    ("leading-broadcast-matmul", lambda x: x @ x.transpose(-1, -2), q4, (0, 1)),
    ("matmul-with-weight", lambda x: x @ torch.randn(D, 5, dtype=torch.float64), x3, (0, 1)),
    ("weight-times-inputT", lambda x: torch.randn(5, D, dtype=torch.float64) @ x.T, x2, (1, 1)),
    ("einsum-per-example", lambda x: torch.einsum("bhtd,bhsd->bhts", x, x), q4, (0, 1)),
    ("einsum-ellipsis", lambda x: torch.einsum("...td,...sd->...ts", x, x), q4, (0, 1)),
    ("bmm", lambda x: torch.bmm(x, x.transpose(1, 2)), x3, (0, 1)),
    ("stack", lambda x: torch.stack([x, x], 1), x2, (0, 1)),
    ("stack-front", lambda x: torch.stack([x, x]), x2, (1, 1)),
    ("cat-features", lambda x: torch.cat([x, torch.zeros(B, 2, dtype=torch.float64)], 1), x2, (0, 1)),
    ("index-none-ellipsis", lambda x: x[None, ..., 0], x3, (1, 1)),
    ("advanced-later-dims", lambda x: x[:, torch.tensor([0, 2])], x3, (0, 1)),
    ("advanced-split", lambda x: x[torch.arange(B), :, torch.tensor([1, 2, 3, 4])], x3, (0, 1)),
    ("table-lookup-by-batch", lambda i: torch.randn(V, D, dtype=torch.float64)[i], idx, (0, 1)),
    ("split-features", lambda x: x.split(3, dim=-1)[1], x3, (0, 1)),
    ("select-token", lambda x: x.select(1, 0), x3, (0, 1)),
    ("sum-tokens", lambda x: x.sum(1), x3, (0, 1)),
    ("max-tokens", lambda x: x.max(dim=1).values, x3, (0, 1)),
    ("mean-keepdim", lambda x: x.mean((1, 2), keepdim=True), x3, (0, 1)),
    ("one-hot", lambda i: F.one_hot(i, V), idx, (0, 1)),
    ("pad", lambda x: F.pad(x, (1, 1, 2, 0)), x3, (0, 1)),
    ("pad-batch", lambda x: F.pad(x, (0, 0, 0, 0, 1, 0)), x3, None),
    ("sum-all", lambda x: x.sum(), x3, "summed"),
    ("sum-batch-then-features", lambda x: x.sum(0).sum(), x3, "summed"),
    ("unknown-op-keeps-rows", lambda x: torch.nn.functional.hardtanh(x).clamp(0), x3, (0, 1)),
    ("new-zeros-not-from-batch", lambda x: x.new_zeros(B, T), x3, "unmarked"),
])
def test_where_the_batch_dim_goes(name, fn, x, state):
    out, trace = traced(fn, x)
    got = trace.state(out)
    if state is None:
        assert type(got) is Mixed
    elif state == "summed":
        assert type(got) is Summed
    elif state == "unmarked":
        assert got is None
    else:
        assert got == state


def test_backward_with_a_gradient_per_row():
    per_row, trace = traced(lambda x: lin(x).sum(1), x2)
    with trace:
        per_row.backward(torch.ones(B, dtype=torch.float64))
    with pytest.raises(RowMixingError, match="gradient passed to backward"):
        with trace:
            per_row = lin(x2).sum(1)
            per_row.backward(per_row.detach().flip(0))


def test_autograd_grad_of_a_loss_is_checked():
    y = torch.randint(0, 2, (B,))
    trace = BatchTrace([x2, y], batch_dim=0)
    with trace:
        z = lin(x2)[:, :2]
        torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), lin.weight)  # a sum: fine
        with pytest.raises(RowMixingError, match="divides by a quantity computed from the batch"):
            torch.autograd.grad(F.cross_entropy(z, y, reduction="sum") / (y + 1).sum(), lin.weight)


def test_check_loss_refuses_a_loss_handed_over_mixed():
    with torch.no_grad():
        mixed, source = traced(lambda x: lin(x).flip(0).sum(1), x2)
    trace = BatchTrace([], batch_dim=0)
    trace.adopt([mixed], source=source)
    with pytest.raises(RowMixingError, match="not a plain sum of per-example losses.*flip over dim 0"):
        trace.check_loss(mixed)
    summed, source = traced(lambda x: lin(x).sum(), x2)
    trace.adopt([summed], source=source)
    trace.check_loss(summed)


def test_timm_style_in_place_mixup_and_cutmix_are_refused_at_the_model():
    x = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    loader = BatchTrace([x], batch_dim=0)
    with loader:
        x.mul_(0.7).add_(x.flip(0).mul_(0.3))  # timm's Mixup, in place
    with pytest.raises(RowMixingError, match="flip over dim 0"):
        loader.refuse_mixed([x], where="the model's input")
    x = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    loader = BatchTrace([x], batch_dim=0)
    with loader:
        x[:, :, 1:3, 1:3] = x.flip(0)[:, :, 1:3, 1:3]  # CutMix
    with pytest.raises(RowMixingError, match="flip over dim 0"):
        loader.refuse_mixed([x], where="the model's input")


def test_a_seq_first_attention_fed_batch_first_is_refused():
    mha = nn.MultiheadAttention(D, 2)  # expects [T, B, E]
    refused(lambda x: mha(x, x, x)[0], x3, match="attends across the batch dimension")


def test_autograd_backward_checks_the_loss():
    with torch.no_grad():
        mixed, source = traced(lambda x: lin(x).flip(0), x2)
    trace = BatchTrace([x2], batch_dim=0)
    with trace:
        per_row = lin(x2)
        torch.autograd.backward([per_row], [torch.ones_like(per_row)])
        with pytest.raises(RowMixingError, match="gradient passed to backward"):
            torch.autograd.backward([lin(x2)], [x2.flip(0)])


@pytest.mark.parametrize("fn, ok", [
    (lambda x: torch.linalg.vector_norm(lin(x), dim=-1), True),
    (lambda x: torch.linalg.vector_norm(lin(x), dim=0), False),
    (lambda x: torch.linalg.matrix_norm(lin(x).view(B, 2, D // 2)), True),
    (lambda x: lin(x).norm(2, -1), True),
    (lambda x: lin(x).norm(), False),
])
def test_norms_along_features_pass_and_over_the_batch_are_refused(fn, ok):
    if ok:
        traced(fn, x2)
    else:
        refused(fn, x2, match="norm reduces over dim 0")


@pytest.mark.parametrize("name, fn, x, state", [
    ("mask-constant", lambda x: x.masked_fill(x > 0, 0.0), x3, (0, 1)),
    ("setitem-mask-constant", lambda y: (lambda t: (t.__setitem__(t == 3, -100), t)[1])(y.clone()), idx, (0, 1)),
    ("setitem-some-rows-constant", lambda x: (lambda t: (t.__setitem__(slice(0, 2), 0.0), t)[1])(x.clone()), x2,
     (0, 1)),
    ("setitem-into-new-buffer", lambda x: (lambda t: (t.__setitem__((slice(None), 0), x[:, 1]), t)[1])(
        x.new_zeros(T, B, D).transpose(0, 1)), x3, (0, 1)),
    ("setitem-rows-from-others", lambda x: (lambda t: (t.__setitem__(slice(None), x.flip(0)), t)[1])(x.clone()), x2,
     None),
    ("setitem-at-batch-chosen-rows", lambda y: (lambda t: (t.__setitem__(y[:, 0], 1.0), t)[1])(
        torch.zeros(V, dtype=torch.float64)), idx, None),
    ("split-positional-dim", lambda x: x.split(2, 2)[0], x3, (0, 1)),
    ("chunk-batch", lambda x: x.chunk(2, 0)[0], x3, None),
    ("take-along-flat", lambda x: torch.take_along_dim(x, torch.zeros(1, dtype=torch.long)), x2, None),
    ("take-along-features", lambda x: torch.take_along_dim(x, x.argmax(-1, keepdim=True), dim=-1), x2, (0, 1)),
    ("diagonal-tokens", lambda x: x.view(B, T, T, 1).diagonal(0, 1, 2), x3[..., :T].contiguous(), (0, 1)),
    ("diagonal-batch", lambda x: x.diagonal(), x2, None),
    ("softmax-implicit", lambda x: F.softmax(x, None, _stacklevel=5), x2, (0, 1)),
])
@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_where_the_batch_dim_goes_when_written_and_split(name, fn, x, state):
    out, trace = traced(fn, x)
    got = trace.state(out)
    assert (type(got) is Mixed) if state is None else got == state


@pytest.mark.parametrize("name, loss_fn", [
    ("soft-targets-none", lambda z, y: F.cross_entropy(z.transpose(1, 2), F.one_hot(y, V).double().transpose(1, 2),
                                                       reduction="none").sum()),
    ("soft-targets-mean", lambda z, y: F.cross_entropy(z[:, 0], F.one_hot(y[:, 0], V).double())),
    ("triplet-mean", lambda z, y: F.triplet_margin_loss(z[:, 0], z[:, 1], z[:, 2])),
    ("kl-batchmean", lambda z, y: F.kl_div(z.log_softmax(-1), F.one_hot(y, V).double(), reduction="batchmean")),
    ("stacked-losses", lambda z, y: torch.stack([z.pow(2).sum(), z.abs().sum()]).sum()),
])
def test_more_row_wise_losses_pass(name, loss_fn):
    torch.manual_seed(0)
    loss_of(LM(), idx, torch.randint(1, V, (B, T)), loss_fn)


def test_soft_targets_from_other_examples_are_refused():
    with pytest.raises(RowMixingError, match="flip"):
        loss_of(LM(), idx, torch.randint(1, V, (B, T)),
                lambda z, y: F.cross_entropy(z[:, 0], F.one_hot(y[:, 0], V).double().flip(0)))


def test_a_function_declared_row_wise_must_keep_the_rows():
    @rowwise
    def pooled(h):
        return h.sum(0, keepdim=True)  # one row for the whole batch: not row-wise, whatever it declares

    refused(lambda x: pooled(lin(x)), x2, match="pooled turns the batch's 4 rows")


def test_rowwise_finds_the_trace_under_a_user_mode_and_runs_plainly_without_one():
    from torch.overrides import TorchFunctionMode

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    centre = rowwise(lambda h: h - h.mean(1, keepdim=True))
    trace = BatchTrace([x2], batch_dim=0)
    with trace, Passthrough():
        out = centre(lin(x2))
    assert trace.state(out) == (0, 1)
    torch.testing.assert_close(centre(x2), x2 - x2.mean(1, keepdim=True))


def test_a_per_example_loop_passes():
    def per_example(x):
        rows = [lin(r).tanh() for r in x]  # iterating the batch: one example at a time
        return torch.stack(rows), torch.cat([lin(x[i : i + 1][0])[None] for i in range(B)])

    (stacked, cat), trace = traced(per_example, x2)
    assert trace.state(stacked) == (0, 1) and trace.state(cat) == (0, 1)
    y = torch.randint(0, 2, (B,))
    trace = BatchTrace([x2, y], batch_dim=0)
    with trace:
        losses = [F.cross_entropy(lin(r)[:2], t) for r, t in zip(x2, y)]
        total = sum(losses)
        total.backward()
    assert type(trace.state(total)) is Summed


@pytest.mark.parametrize("name, fn, x, state", [
    ("where-one-arg", lambda x: torch.where(x > 0)[0], x2, None),
    ("fft-features", lambda x: torch.fft.rfft(x, dim=-1), x2, (0, 1)),
    ("fft-batch", lambda x: torch.fft.fft(x, dim=0), x2, None),
    ("in-place-scatter-batch", lambda x: x.clone().scatter_(0, torch.zeros(1, D, dtype=torch.long), 1.0), x2, None),
    ("in-place-transpose", lambda x: x.clone().transpose_(0, 1), x2, (1, 1)),
])
def test_more_families(name, fn, x, state):
    out, trace = traced(fn, x)
    got = trace.state(out)
    assert (type(got) is Mixed) if state is None else got == state


def test_a_hugging_face_models_own_labels_loss_is_refused_and_a_per_example_loss_passes():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()
    ids, mask = torch.randint(0, V, (B, 6)), torch.ones(B, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with pytest.raises(RowMixingError, match="labelled targets in the whole batch"):
        with BatchTrace([ids, mask], batch_dim=0):
            model(ids, attention_mask=mask, labels=ids)  # sum of token losses / labelled tokens in the batch
    trace = BatchTrace([ids, mask], batch_dim=0)
    with trace:
        logits = model(ids, attention_mask=mask).logits
        F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1).sum().backward()
    assert trace.state(logits) == (0, 1)


# -- a sum where loss_reduction says mean (issue 23.4) --------------------------------------------------------------
def _step_with(loss_fn, reduction="mean", mode="auto", K=1):
    import warnings

    import dpkit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=None, sample_rate=0.1, expected_batch_size=6, noise_multiplier=1.0,
                                     max_grad_norm=1.0, loss_reduction=reduction, grad_sample_mode=mode,
                                     augmentation_multiplicity=K)
    x, y = torch.randn(6 * K, D, dtype=torch.float64), torch.randint(0, 3, (6 * K,))
    try:
        loss_fn(model(x), y).backward()
        private.optimizer.step()
    finally:
        private.detach()


SUMS = {"reduction='sum'": lambda o, y: F.cross_entropy(o, y, reduction="sum"),
        "none then sum": lambda o, y: F.cross_entropy(o, y, reduction="none").sum(),
        "output sum": lambda o, y: o.pow(2).sum(),
        "module sum": lambda o, y: nn.MSELoss(reduction="sum")(o, torch.zeros_like(o))}
MEANS = {"reduction='mean'": lambda o, y: F.cross_entropy(o, y),
         "sum over the batch size": lambda o, y: F.cross_entropy(o, y, reduction="sum") / len(y),
         "none then mean": lambda o, y: F.cross_entropy(o, y, reduction="none").mean(),
         "output mean": lambda o, y: o.pow(2).mean()}


@pytest.mark.parametrize("mode", ["auto", "hooks", "bk"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", SUMS)
def test_a_sum_where_a_mean_is_expected_is_refused(name, K, mode):
    # Was: trained silently, every per-example gradient B times its value before clipping.
    with pytest.raises(PrivacyUsageError, match=r"the loss is the sum over the batch's \d+ rows .*"
                                                r"loss_reduction='mean'\) expects their mean"):
        _step_with(SUMS[name], "mean", mode, K)
    _step_with(SUMS[name], "sum", mode, K)  # what the message says to do


@pytest.mark.parametrize("name", MEANS)
def test_a_mean_where_a_sum_is_expected_is_refused(name):
    with pytest.raises(PrivacyUsageError, match=r"the loss is the mean over .*loss_reduction='sum'\) expects"):
        _step_with(MEANS[name], "sum")
    _step_with(MEANS[name], "mean")


@pytest.mark.parametrize("loss_fn", [lambda o, y: 0.5 * F.cross_entropy(o, y) + 1e-3 * o.pow(2).mean(),
                                     lambda o, y: F.cross_entropy(o, y) + o.pow(2).sum(),
                                     lambda o, y: F.cross_entropy(o, y, reduction="sum") * 0.25])
def test_other_weights_are_the_users_choice(loss_fn):
    _step_with(loss_fn, "mean")
