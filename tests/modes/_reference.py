"""Reference DP steps: a loop over examples (micro-batches of one), no dpkit in the loop."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

import dpkit


def per_example_grads(model: nn.Module, loss_fn, x, y, K: int) -> list[list[torch.Tensor]]:
    """For each example (its K adjacent rows), the gradient of the mean of its rows' losses."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0] // K):
        rows = slice(i * K, (i + 1) * K)
        loss = loss_fn(model(x[rows]), y[rows]).mean()
        out.append([g if g is not None else torch.zeros_like(p)
                    for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)])
    return out


def clipped_sum(grads: list[list[torch.Tensor]], C: float) -> list[torch.Tensor]:
    total = None
    for g in grads:
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
        f = min(1.0, C / (norm.item() + 1e-6))
        total = [t * f for t in g] if total is None else [a + t * f for a, t in zip(total, g)]
    return total


def per_row_loss(base: nn.Module):
    """The per-row loss DPCriterion computes: the loss per position, averaged over positions."""
    def fn(out, y):
        saved = base.reduction
        base.reduction = "none"
        try:
            losses = base(out, y)
        finally:
            base.reduction = saved
        return losses.reshape(losses.shape[0], -1).mean(1)
    return fn


def dpkit_step(model: nn.Module, x, y, *, mode: str, C: float, K: int = 1, reduction: str = "sum",
               criterion: nn.Module | None = None, clipping: str = "flat", calls: int = 1) -> list[torch.Tensor]:
    """The parameter update of one dpkit step (SGD lr=1, no noise) on ``x, y``, split into ``calls`` backwards."""
    model = copy.deepcopy(model)
    criterion = criterion or nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                     noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
                                     augmentation_multiplicity=K, loss_reduction=reduction, criterion=criterion,
                                     clipping=clipping, expected_batch_size=max(x.shape[0] // K, 1))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    rows = x.shape[0]
    step = max(K, (rows // calls) // K * K) if rows else 1
    with private.micro_batches():
        for start in range(0, max(rows, 1), step):
            xb, yb = x[start:start + step], y[start:start + step]
            loss = private.criterion(model(xb), yb)
            loss.backward()
    opt.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    private.detach()
    return [b - a for b, a in zip(before, after)]
