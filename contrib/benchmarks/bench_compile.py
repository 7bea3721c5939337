"""torch.compile under dpkit: the step's exactness, graph breaks, compiled frames and time, compiled vs not.

A benchmark, not a test: nothing here asserts. Two parts.

* ``models``: a small MLP and a small GPT (``bench_models.GPT``, tied head) trained by dpkit in bk and auto,
  flat and per-layer clipping, uncompiled and compiled (``torch.compile(model)`` passed to ``make_private``),
  with non-private eager and compiled rows for scale. ``noise_multiplier=0``, so the compiled step's parameter
  update is compared with the uncompiled one (max |Δ|, float32). Graph breaks and frames are Dynamo's counters
  over the whole run; ``later frames`` are the frames compiled after the first step, as batches of other sizes
  (a Poisson sample's) arrive: the recompiles.
* ``pipeline``: dpkit's own arithmetic on one GPT-shaped Linear record (norms → clip factors → clipped sum →
  noise), eager against ``torch.compile`` of the same functions, with the largest difference of the results.

    python contrib/benchmarks/bench_compile.py --threads 1                  # both parts, inductor
    python contrib/benchmarks/bench_compile.py --threads 1 --part pipeline
    python contrib/benchmarks/bench_compile.py --threads 1 --backend aot_eager --part models
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import dpkit
from bench_models import GPT, GPTConfig
from dpkit.layers import linear

MLP_SHAPE = (64, 256, 10)  # in, hidden, classes
GPT_CFG = GPTConfig(n_layer=2, d=128, heads=4, vocab=256, ctx=64)
BATCH = 16
OTHER_BATCHES = (11, 16, 13)  # after the timed steps: Poisson batches vary in size


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        i, h, o = MLP_SHAPE
        return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))
    return GPT(GPT_CFG)


def batch(name: str, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(rows, MLP_SHAPE[0], generator=gen), torch.randint(0, MLP_SHAPE[2], (rows,), generator=gen)
    ids = torch.randint(0, GPT_CFG.vocab, (rows, GPT_CFG.ctx + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def loss_of(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.transpose(1, 2) if name == "gpt" else out, y)


def train(name: str, mode: str | None, clipping: str, backend: str | None, steps: int, warmup: int) -> dict:
    """Time ``steps`` steps after ``warmup``; ``mode=None`` trains without dpkit, ``backend=None`` uncompiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run = torch.compile(model, backend=backend) if backend else model
    private = None
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # noise_multiplier=0
            private = dpkit.make_private(module=run, optimizer=opt, data_loader=None, sample_rate=0.01,
                                         expected_batch_size=BATCH, noise_multiplier=0.0, max_grad_norm=0.1,
                                         grad_sample_mode=mode, clipping=clipping, loss_reduction="mean")

    def step(x, y) -> None:
        opt.zero_grad()
        loss_of(name, run(x), y).backward()
        opt.step()

    start = time.perf_counter()
    step(*batch(name, BATCH, 0))
    first = time.perf_counter() - start
    frames_first = torch._dynamo.utils.counters["frames"]["total"]
    times, updates = [], []
    for i in range(warmup + steps):
        x, y = batch(name, BATCH, i + 1)
        before = [p.detach().clone() for p in model.parameters()]
        start = time.perf_counter()
        step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if i == 0:
            updates = [b - p.detach() for b, p in zip(before, model.parameters())]
    for i, rows in enumerate(OTHER_BATCHES):
        step(*batch(name, rows, 1000 + i))
    counters = torch._dynamo.utils.counters
    if private is not None:
        private.detach()
    return {"ms": 1e3 * statistics.median(times), "first_s": first, "update": updates,
            "breaks": sum(counters["graph_break"].values()), "reasons": len(counters["graph_break"]),
            "frames": counters["frames"]["total"], "later": counters["frames"]["total"] - frames_first}


def models(args) -> None:
    print(f"| model | dpkit | compiled ({args.backend}) | ms/step | first step s | graph breaks (distinct) "
          "| frames | later frames | max abs update diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        configs = [(None, "flat")] + [(m, c) for m in ("bk", "auto") for c in ("flat", "per_layer")]
        for mode, clipping in configs:
            label = "non-private" if mode is None else f"{mode}+{clipping}"
            eager = train(name, mode, clipping, None, args.steps, args.warmup)
            compiled = train(name, mode, clipping, args.backend, args.steps, args.warmup)
            diff = max((a - b).abs().max().item() for a, b in zip(eager["update"], compiled["update"]))
            for tag, r in (("no", eager), ("yes", compiled)):
                print(f"| {name} | {label} | {tag} | {r['ms']:.1f} | {r['first_s']:.2f} | {r['breaks']} "
                      f"({r['reasons']}) | {r['frames']} | {r['later']} | {diff if tag == 'yes' else 0:.1e} |",
                      flush=True)


def pipeline_step(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, C: float, sigma: float,
                  noise: torch.Tensor) -> dict:
    """One Linear record through dpkit's arithmetic: norms, flat clip factors, the clipped sum, the noise."""
    norms = linear.norm_sampler(layer, [a], g)
    total = torch.stack([n.square() for n in norms.values()]).sum(0).sqrt()
    factors = (C / (total + 1e-6)).clamp(max=1.0)
    sums = linear.weighted_sum(layer, [a], g, factors)
    return {p: s + sigma * C * n for (p, s), n in zip(sums.items(), (noise, noise[:, 0]))}


def pipeline(args) -> None:
    torch.manual_seed(0)
    d, B, T = GPT_CFG.d, BATCH, GPT_CFG.ctx
    print("| layer (in→out) | rows×T | eager ms | compiled ms | compile s | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fan_in, fan_out in ((d, 3 * d), (d, 4 * d), (4 * d, d), (d, GPT_CFG.vocab)):
        layer = nn.Linear(fan_in, fan_out)
        a, g = torch.randn(B, T, fan_in), torch.randn(B, T, fan_out) / B
        noise = torch.randn(fan_out, fan_in)
        torch._dynamo.reset()
        compiled = torch.compile(pipeline_step, backend=args.backend, dynamic=False)
        start = time.perf_counter()
        got = compiled(layer, a, g, 1.0, 1.0, noise)
        compile_s = time.perf_counter() - start
        want = pipeline_step(layer, a, g, 1.0, 1.0, noise)
        diff = max((got[p] - want[p]).abs().max().item() for p in want)
        timing = {}
        for tag, fn in (("eager", pipeline_step), ("compiled", compiled)):
            runs = []
            for _ in range(args.warmup + args.steps * 5):
                start = time.perf_counter()
                fn(layer, a, g, 1.0, 1.0, noise)
                runs.append(time.perf_counter() - start)
            timing[tag] = 1e3 * statistics.median(runs[args.warmup:])
        print(f"| {fan_in}→{fan_out} | {B}×{T} | {timing['eager']:.3f} | {timing['compiled']:.3f} | "
              f"{compile_s:.1f} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("models", "pipeline", "both"), default="both")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--models", default="mlp,gpt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH}, MLP {MLP_SHAPE}, GPT {GPT_CFG}\n")
    if args.part in ("models", "both"):
        models(args)
        print()
    if args.part in ("pipeline", "both"):
        pipeline(args)


if __name__ == "__main__":
    main()
