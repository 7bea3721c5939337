"""Every mode gives the loop reference's clipped step: models × modes × K × reductions."""
from __future__ import annotations

import pytest
import torch
from _reference import clipped_sum, dpkit_step, per_example_grads, per_row_loss
from torch import nn


class TokenModel(nn.Module):
    """Embedding → LayerNorm → per-token Linear → per-token logits (a loss per token)."""

    def __init__(self, vocab=11, d=6, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)

    def forward(self, ids):
        return self.fc(torch.tanh(self.norm(self.emb(ids)))).transpose(1, 2)  # [N, C, T] for CrossEntropy


class TiedLM(nn.Module):
    """Embedding tied to the output projection, plus a position embedding looked up as [1, T] and broadcast."""

    def __init__(self, vocab=9, d=5, T=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(self.norm(self.emb(ids) + self.pos(positions))).transpose(1, 2)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu_(self.gn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(out.mean(1))


class SharedTwice(nn.Module):
    """One Linear applied twice per example (a weight-shared block), then a head."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))


def data(kind: str, rows: int):
    if kind == "vector":
        return torch.randn(rows, 5), torch.randint(0, 3, (rows,))
    if kind == "tokens":
        ids = torch.randint(0, 11, (4, rows)).t()  # non-contiguous token ids
        return ids, torch.randint(0, 4, (rows, 4))
    if kind == "lm":
        return torch.randint(0, 9, (rows, 4)), torch.randint(0, 9, (rows, 4))
    if kind == "image":
        return torch.randn(rows, 2, 5, 5), torch.randint(0, 3, (rows,))
    return torch.randn(rows, 3, 4), torch.randint(0, 3, (rows,))  # sequence of vectors


MODELS = {
    "mlp": (mlp, "vector", ("hooks", "functorch", "ew", "ghost", "bk", "auto")),
    "tokens": (TokenModel, "tokens", ("hooks", "functorch", "ew", "ghost", "bk", "auto")),
    "tied": (TiedLM, "lm", ("hooks", "functorch", "ghost", "bk", "auto")),
    "shared": (SharedTwice, "seq", ("hooks", "functorch", "ghost", "bk", "auto")),
    "conv": (ConvNet, "image", ("hooks", "functorch", "ew", "ghost", "bk", "auto")),
    "lstm": (lambda: Recurrent(nn.LSTM), "seq", ("functorch", "auto")),
    "gru": (lambda: Recurrent(nn.GRU), "seq", ("auto",)),
    "rnn": (lambda: Recurrent(nn.RNN), "seq", ("auto",)),
    "mha": (Attention, "seq", ("functorch", "auto")),
}
CASES = [(name, mode) for name, (_, _, modes) in MODELS.items() for mode in modes]


def reference(model, x, y, K, C, reduction):
    grads = per_example_grads(model, per_row_loss(nn.CrossEntropyLoss()), x, y, K)
    step = clipped_sum(grads, C)
    if reduction == "mean":
        step = [t / len(grads) for t in step]
    return step, grads


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name,mode", CASES)
def test_mode_matches_loop_reference(name, mode, K, reduction):
    torch.manual_seed(0)
    make, kind, _ = MODELS[name]
    model = make()
    x, y = data(kind, 4 * K)
    _, grads = reference(model, x, y, K, 1.0, "sum")
    norms = sorted(torch.sqrt(sum((t ** 2).sum() for t in g)).item() for g in grads)
    C = (norms[1] + norms[2]) / 2  # half the examples are clipped
    expected, _ = reference(model, x, y, K, C, reduction)
    got = dpkit_step(model, x, y, mode=mode, C=C, K=K, reduction=reduction)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost", "bk", "auto"])
def test_virtual_steps_match_one_big_step(mode):
    """Three backward passes over parts of a batch, then one step, equal one pass over the whole batch."""
    torch.manual_seed(1)
    model = TokenModel()
    x, y = data("tokens", 9)
    one = dpkit_step(model, x, y, mode=mode, C=0.05)
    three = dpkit_step(model, x, y, mode=mode, C=0.05, calls=3)
    for a, b in zip(one, three):
        torch.testing.assert_close(a, b)
    assert any(t.abs().sum() > 0 for t in one)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost", "bk", "auto"])
def test_empty_batch_gives_zero_update(mode):
    model = TokenModel()
    x, y = data("tokens", 0)
    update = dpkit_step(model, x, y, mode=mode, C=1.0, reduction="mean")
    assert all(torch.count_nonzero(t) == 0 for t in update)
