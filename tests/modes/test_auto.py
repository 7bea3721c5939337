"""``auto`` frees a record as soon as it can: small layers' per-example gradients are formed on arrival."""
from __future__ import annotations

import torch
from test_equivalence import TiedLM
from torch import nn

import dpkit


class Wide(nn.Module):
    """A long-sequence Linear (its record is smaller than its per-example gradient) around a LayerNorm."""

    def __init__(self, d=16, T=2):
        super().__init__()
        self.T = T
        self.up = nn.Linear(d, 4 * d)
        self.norm = nn.LayerNorm(4 * d)
        self.head = nn.Linear(4 * d, 3)

    def forward(self, x):
        return self.head(self.norm(self.up(x))).mean(1)


def records_at_backward_end(model, x, y):
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=None, sample_rate=0.1, expected_batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                                 grad_sample_mode="auto", criterion=nn.CrossEntropyLoss())
    seen = {}
    clip = private.passes.clip_records

    def spy(records, rows):
        seen.update({cap.row.name: (cap.formed is not None, len(cap.args), len(cap.grads)) for cap in records})
        clip(records, rows)

    private.passes.clip_records = spy
    private.criterion(model(x), y).backward()
    return seen


def test_small_layers_are_formed_and_freed_on_arrival():
    torch.manual_seed(0)
    seen = records_at_backward_end(Wide(), torch.randn(4, 2, 16), torch.randint(0, 3, (4,)))
    # LayerNorm: [B, 2·64] gradients against a [B, 2, 64] input and output gradient
    assert seen["norm"] == (True, 0, 0)
    # up: 16·64 + 64 per example against 2·(16 + 64) recorded; kept for the norms and the clipped sum
    assert seen["up"] == (False, 1, 1)


def test_tied_weights_are_never_formed_on_arrival():
    """The embedding's and the head's uses must be summed before a norm: both records stay to the end."""
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 9, (3, 4))
    seen = records_at_backward_end(model, ids, torch.randint(0, 9, (3, 4)))
    assert not seen["emb"][0] and not seen["head"][0]
