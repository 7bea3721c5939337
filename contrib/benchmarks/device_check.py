#!/usr/bin/env python
"""Before timing on an accelerator: does every mode give the same clipped step there as a float64 CPU loop?

Builds small versions of the benchmark models (a 2-block GPT with a tied head; the GroupNorm convnet), takes
one step with noise 0 and SGD(lr=1) in each mode on ``--device``, and compares the update with a reference
computed on the CPU in float64 by a loop over examples. It exercises what only runs off the CPU: the expanded
stand-in weight of the convolution kernel, the unchunked noise draw, cuDNN/cuBLAS paths. Exits 1 on a
mismatch. A check, not a test: it needs the device, so the test suite does not run it.

Usage::

    python contrib/benchmarks/device_check.py --device cuda
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import GPT, ConvNet, GPTConfig, loss_input  # noqa: E402

import dpkit  # noqa: E402

MODES = ("hooks", "ghost", "bk", "auto", "functorch")


def models() -> dict[str, tuple[nn.Module, str, tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (6, 17), generator=gen)
    images = torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, d=32, heads=2, vocab=64, ctx=16))
    return {"gpt": (gpt, "gpt", (tokens[:, :-1], tokens[:, 1:])),
            "convnet": (ConvNet(widths=(8, 16, 16, 16), groups=4), "conv", images)}


def update(model: nn.Module, kind: str, x, y, mode: str | None, device: torch.device, C: float) -> list[torch.Tensor]:
    """The parameter change of one step: dpkit in ``mode``, or the float64 loop reference when ``mode`` is None."""
    model = copy.deepcopy(model).to(device, torch.float64 if mode is None else torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    x = x.to(device, next(model.parameters()).dtype) if x.is_floating_point() else x.to(device)
    y = y.to(device)
    loss = nn.CrossEntropyLoss(reduction="none")
    if mode is None:  # per example: gradient, clip, sum
        total = [torch.zeros_like(p) for p in model.parameters()]
        for i in range(x.shape[0]):
            per_token = loss(loss_input(kind, model(x[i:i + 1])), y[i:i + 1])
            grads = torch.autograd.grad(per_token.mean(), list(model.parameters()))
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            factor = torch.clamp(C / (norm + 1e-6), max=1.0)
            total = [t + g * factor for t, g in zip(total, grads)]
        return [-t for t in total]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=None, sample_rate=0.1,
                                     noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
                                     criterion=nn.CrossEntropyLoss(), loss_reduction="sum")
    private.criterion(loss_input(kind, model(x)), y).backward()
    optimizer.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rtol", type=float, default=2e-3, help="float32 on the device against float64")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # vmap's fallbacks, oneDNN's notices
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    failed = False
    print(f"| model | mode | max relative difference from the float64 CPU loop on {device} |")
    print("| --- | --- | ---: |")
    for name, (model, kind, (x, y)) in models().items():
        reference = update(model, kind, x, y, None, torch.device("cpu"), C=0.05)
        for mode in MODES:
            got = update(model, kind, x, y, mode, device, C=0.05)
            scale = max(r.abs().max().item() for r in reference)
            worst = max((g.double().cpu() - r).abs().max().item() for g, r in zip(got, reference)) / scale
            failed |= worst > args.rtol
            print(f"| {name} | {mode} | {worst:.2e}{'  MISMATCH' if worst > args.rtol else ''} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
