"""The noise draw's share of a private step: the serial draw (one seeded torch stream, as before the parallel
streams) against the parallel CPU streams (``dpkit/noise/_streams.py``), alternating in one process.

Three configurations take turns step by step on copies of one model: non-private, dpkit with the serial draw,
dpkit with the parallel streams. For each it prints the median wall time per step, the quartiles of its per-round
ratio to the non-private step of the same round, and the median time inside ``GaussianNoise.add`` with its share
of the step. A shared machine's load moves all three alike; compare ratios within one run::

    python contrib/benchmarks/bench_noise.py --model gpt2-cpu --threads 2 --rounds 20

``--draw-only`` times the draw alone on a buffer of the model's size, serial and parallel, alternating.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import SPECS, build, loss_input, make_batches  # noqa: E402

import dpkit  # noqa: E402
from dpkit.noise import gaussian  # noqa: E402

_CHUNK = 1 << 16


def serial_add(self, clipped_sum: torch.Tensor, *, std: float) -> torch.Tensor:
    """The draw as it was: one seeded ``torch.Generator`` per device, through a 64K-coordinate buffer."""
    out = clipped_sum.contiguous().view(-1)
    gen = self.generator(out.device)
    buffer = torch.empty(min(_CHUNK, out.numel()), dtype=torch.promote_types(out.dtype, torch.float32))
    for part in out.split(_CHUNK):
        part.add_(buffer[: part.numel()].normal_(0, std, generator=gen))
    return out.view(clipped_sum.shape)


PARALLEL_ADD = gaussian.GaussianNoise.add
SPENT: list[float] = []


def timed(add):
    def run(self, clipped_sum, *, std):
        start = time.perf_counter()
        out = add(self, clipped_sum, std=std)
        SPENT.append(time.perf_counter() - start)
        return out
    return run


def stepper(model: nn.Module, kind: str, batch: int, add=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion: nn.Module = nn.CrossEntropyLoss()
    if add is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            criterion = dpkit.make_private(module=model, optimizer=optimizer, data_loader=None, sample_rate=0.01,
                                           expected_batch_size=batch, noise_multiplier=1.0, max_grad_norm=1.0,
                                           criterion=criterion, grad_sample_mode="auto").criterion

    def step(x, y):
        if add is not None:
            gaussian.GaussianNoise.add = timed(add)
        try:
            optimizer.zero_grad()
            criterion(loss_input(kind, model(x)), y).backward()
            optimizer.step()
        finally:
            gaussian.GaussianNoise.add = PARALLEL_ADD
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-cpu", choices=["gpt2-cpu", "convnet-cpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--draw-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, _, batch, seq = SPECS[args.model]
    torch.manual_seed(0)
    model, kind = build(args.model, seq)
    n = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.model} ({n / 1e6:.2f}M parameters), "
          f"batch {batch}, seq {seq}; medians of {args.rounds} rounds after {args.warmup}")
    if args.draw_only:
        noise, buf = gaussian.GaussianNoise(seed=0), torch.zeros(n)
        times: dict[str, list[float]] = {"serial": [], "parallel": []}
        for r in range(args.warmup + args.rounds):
            for label, add in (("serial", serial_add), ("parallel", PARALLEL_ADD)):
                start = time.perf_counter()
                add(noise, buf, std=1.0)
                if r >= args.warmup:
                    times[label].append((time.perf_counter() - start) * 1e3)
        for label, t in times.items():
            print(f"{label:<9} draw {statistics.median(t):.2f} ms (min {min(t):.2f})")
        return
    batches = make_batches(args.model, batch, seq, 4, torch.device("cpu"))
    configs = {"non-private": stepper(copy.deepcopy(model), kind, batch),
               "dpkit auto, serial draw": stepper(copy.deepcopy(model), kind, batch, serial_add),
               "dpkit auto, parallel streams": stepper(copy.deepcopy(model), kind, batch, PARALLEL_ADD)}
    walls: dict[str, list[float]] = {k: [] for k in configs}
    draws: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.warmup + args.rounds):
        for label, step in configs.items():
            SPENT.clear()
            start = time.perf_counter()
            step(*batches[r % 4])
            if r >= args.warmup:
                walls[label].append((time.perf_counter() - start) * 1e3)
                draws[label].append(sum(SPENT) * 1e3)
    base = walls["non-private"]
    print(f"{'configuration':<30} {'ms/step':>8} {'ratio':>6} {'ratio q25–q75':>14} {'draw ms':>8} {'share':>6}")
    for label in configs:
        ratios = statistics.quantiles([w / b for w, b in zip(walls[label], base)], n=4)
        wall, draw = statistics.median(walls[label]), statistics.median(draws[label])
        print(f"{label:<30} {wall:8.1f} {wall / statistics.median(base):6.2f} {ratios[0]:6.2f}–{ratios[2]:<7.2f} "
              f"{draw:8.2f} {draw / wall:6.1%}")


if __name__ == "__main__":
    main()
