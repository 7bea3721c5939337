"""Invariant 2 through whole training loops: a model whose loss row i depends on other examples is refused in
every mode before anything is released; a row-wise model passes with sensitivity measured at most C.

The trace's rule table is tested op by op in ``tests/modes/test_rows.py``; here the loops are the ones users
write, in the families the review found (mixup, rolls, batch statistics, attention or products across the
batch) and beyond.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError, RowMixingError

from ._setup import assert_sensitivity, batch, make, train_step

MODES = ("hooks", "ghost", "bk", "auto", "functorch")


class Body(nn.Module):
    """Linear -> tanh -> ``mix`` -> Linear: the mixing step sits between two trainable layers."""

    def __init__(self, mix):
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(4, 6), nn.Linear(6, 3), mix

    def forward(self, x):
        return self.b(self.mix(torch.tanh(self.a(x))))


MIXING = {  # each combines different examples' rows
    "mixup with a flip": lambda h: 0.7 * h + 0.3 * h.flip(0),
    "roll over the batch": lambda h: torch.roll(h, 1, 0),
    "centering by the batch mean": lambda h: h - h.mean(0),
    "functional batch norm": lambda h: F.batch_norm(h, None, None, training=True),
    "a norm over the batch": lambda h: h / h.norm(dim=0),
    "softmax over the batch": lambda h: h * torch.softmax(h, 0),
    "a permutation": lambda h: h[torch.randperm(h.shape[0])],
    "attention across the batch": lambda h: torch.softmax(h @ h.T, -1) @ h,
    "a cumulative sum over the batch": lambda h: h.cumsum(0),
    "sorting the batch": lambda h: h.sort(0).values,
    "the batch's max": lambda h: h - h.max(0).values,
    "normalize over dim 0": lambda h: F.normalize(h, dim=0),
    "a batch statistic without grad": lambda h: h - _no_grad_mean(h),
}

ROW_WISE = {  # each row depends on its own example only
    "plain": lambda h: h,
    "layer norm (per example)": lambda h: F.layer_norm(h, h.shape[1:]),
    "normalize over features": lambda h: F.normalize(h, dim=1),
    "softmax over features": lambda h: h * torch.softmax(h, -1),
    "dropout off (eval functional)": lambda h: F.dropout(h, 0.5, training=False),
    "a feature permutation": lambda h: h[:, torch.tensor([5, 4, 3, 2, 1, 0])],
    "an outer product per example": lambda h: torch.einsum("bi,bj->bij", h, h).sum(-1),
    "a view and back": lambda h: h.view(h.shape[0], 2, 3).transpose(1, 2).reshape(h.shape[0], -1),
    "a per-example loop, stacked": lambda h: torch.stack([row * row.sum() for row in h]),
    "where with a batched mask": lambda h: torch.where(h > 0, h, 0.1 * h),
    "a constant broadcast": lambda h: h + torch.linspace(0, 1, 6),
}


def _no_grad_mean(h):
    with torch.no_grad():
        return h.mean(0)


@pytest.mark.parametrize("name", sorted(MIXING))
@pytest.mark.parametrize("mode", MODES)
def test_a_model_that_mixes_rows_is_refused(mode, name):
    p = make(Body(MIXING[name]), mode=mode)
    before = {n: t.detach().clone() for n, t in p.module.named_parameters()}
    with pytest.raises(RowMixingError):
        train_step(p, *batch())
    for n, t in p.module.named_parameters():
        assert torch.equal(t, before[n]), f"{n} moved"
    assert p.ledger.steps == 0


@pytest.mark.parametrize("name", sorted(ROW_WISE))
def test_a_row_wise_model_is_private(name):
    assert_sensitivity(lambda: make(Body(ROW_WISE[name]), mode="hooks", noise_multiplier=0.0), *batch())


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_row_wise_models_pass_in_the_norm_modes(mode):
    for name in ("layer norm (per example)", "a view and back", "a per-example loop, stacked"):
        train_step(make(Body(ROW_WISE[name]), mode=mode), *batch())


def test_a_custom_op_declared_row_wise_passes():
    @dpkit.rowwise
    def per_example_scale(h):
        return h / h.abs().amax(dim=1, keepdim=True).clamp_min(1e-3)  # row-wise, though the trace cannot tell why

    p = make(Body(per_example_scale), mode="bk")
    train_step(p, *batch())
    assert p.ledger.steps == 1


def test_the_refusal_names_the_operation_and_the_line():
    p = make(Body(MIXING["roll over the batch"]))
    with pytest.raises(RowMixingError, match=r"roll.*batch dimension.*test_rows_in_loops\.py"):
        train_step(p, *batch())


def test_k_copies_of_one_example_may_be_combined():
    """Averaging the K augmented copies of an example mixes rows of one example only."""
    class CopyMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h = h.view(-1, 2, 6).mean(1, keepdim=True).expand(-1, 2, 6).reshape(-1, 6)  # within each pair
            return self.b(h)

    p = make(CopyMean(), mode="hooks", augmentation_multiplicity=2)
    x, y = batch(8)
    train_step(p, x, y)
    assert p.ledger.steps == 1


# -- the training loop around the model: from the loader's batch to the loss's backward() ------------------------
def loader_private(mode="hooks", **kw):
    from ._setup import dataset

    return make(mode=mode, data_loader=torch.utils.data.DataLoader(dataset(32), batch_size=8), **kw)


def stack_depth() -> int:
    return torch._C._len_torch_function_stack()


@pytest.mark.parametrize("mode", MODES)
def test_mixup_in_the_loop_is_refused_at_the_forward(mode):
    p = loader_private(mode)
    for x, y in p.data_loader:
        lam = 0.7
        mixed = lam * x + (1 - lam) * x.flip(0)  # timm-style mixup on the batch dpkit sampled
        with pytest.raises(RowMixingError, match="the model's input"):
            p.criterion(p.module(mixed), y).backward()
        break
    assert p.ledger.steps == 0 and stack_depth() == 0


@pytest.mark.parametrize("loss", ["labels mixed", "in-batch negatives", "a normaliser from the batch",
                                  "a loss over the batch's pairs"])
@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
def test_a_loss_that_compares_or_counts_examples_is_refused_at_backward(mode, loss):
    p = loader_private(mode, criterion=None)
    x, y = next(iter(p.data_loader))
    out = p.module(x)
    with pytest.raises(RowMixingError):  # where the loss mixes rows, or at its backward()
        if loss == "labels mixed":
            value = F.cross_entropy(out, y.flip(0), reduction="sum")
        elif loss == "in-batch negatives":
            value = F.cross_entropy(out @ out.T, torch.arange(len(x)), reduction="sum")
        elif loss == "a normaliser from the batch":
            per_example = F.cross_entropy(out, y, reduction="none")
            value = per_example.sum() / (y > 0).sum().clamp_min(1)  # counts other examples
        else:
            value = torch.cdist(out, out).sum()
        value.backward()
    with pytest.raises(PrivacyUsageError):
        p.optimizer.step()
    assert p.ledger.steps == 0


@pytest.mark.parametrize("mode", MODES)
def test_ordinary_loops_pass_and_leave_no_trace_behind(mode):
    p = loader_private(mode)
    for x, y in p.data_loader:  # the loader's loop, with the usual preprocessing
        x = (x.float() / 2).contiguous()
        p.optimizer.zero_grad()
        p.criterion(p.module(x), y).backward()
        p.optimizer.step()
    with dpkit.BatchMemoryManager(p, max_physical_batch_size=3) as pieces:
        for x, y in pieces:
            p.optimizer.zero_grad()
            p.criterion(p.module(x), y).backward()
            p.optimizer.step()
    assert p.steps == p.ledger.steps == 2 * len(p.data_loader)
    assert stack_depth() == 0


def test_a_plain_loss_with_a_mean_passes_and_zero_grad_between_forward_and_backward():
    p = loader_private("bk", criterion=None)
    x, y = next(iter(p.data_loader))
    out = p.module(x)
    p.optimizer.zero_grad()  # out = model(x); zero_grad(); backward(): supported
    F.cross_entropy(out, y).backward()  # a mean over the batch's rows: a fixed count
    p.optimizer.step()
    assert p.ledger.steps == 1 and stack_depth() == 0


def test_a_refused_loss_leaves_a_trace_that_only_passes_calls_through():
    """A loop stopped by the refusal (a notebook cell) must not keep checking every later torch call."""
    p = loader_private("bk", criterion=None)
    x, y = next(iter(p.data_loader))
    out = p.module(x)
    with pytest.raises(RowMixingError):
        F.cross_entropy(out + out.flip(0), y)
    traces = [torch._C._get_function_stack_at(i) for i in range(stack_depth())]
    assert all(t.finished for t in traces)
    torch.randn(4, 3).flip(0).sum()  # not the batch's, not checked
    p.detach()
    assert stack_depth() == 0
