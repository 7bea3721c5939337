"""The batch trace and the fail-closed checks on their own: CPU ms per step each costs on a given model.

Issue 24 suspected them of a regression on GPT-2 small. This script measures each in isolation, in one process,
alternating with its baseline so that a change in the machine's load falls on both:

* ``trace``: the model's forward (with grad) inside a batch trace that follows rows (``batch_dim=0``) and one
  that only marks (``batch_dim=None``), against the same forward without a trace;
* ``checks``: the per-forward checks (layers that mix examples, the trainable set, the state snapshot and its
  comparison) and the checks at release, called directly on an attached model.

Usage::

    python contrib/benchmarks/host_costs.py --model gpt-12x64     # the 12-block thin GPT of profile_modes
    python contrib/benchmarks/host_costs.py --model hf-gpt2       # HF GPT-2 small at 4 x 128, built from config

It reaches into dpkit's internals (``dpkit.modes._trace``, ``dpkit.engine.guards``) on purpose: these are the
pieces measured.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import GPT, GPTConfig  # noqa: E402


def _model(name: str):
    if name == "hf-gpt2":
        from ab_step import _hf_gpt2

        model, _, batch, batches = _hf_gpt2()
        return model, batches[0][0]
    model = GPT(GPTConfig(12, 64, 2, 256, 16))
    return model, torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))


def _ms(fns: list, reps: int) -> list[tuple[float, float]]:
    """Median and spread (max - min over the middle half) of each function's CPU ms, run round-robin."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.process_time()
            fn()
            t.append(1e3 * (time.process_time() - start))
    out = []
    for t in times:
        t = sorted(t)
        mid = t[len(t) // 4: len(t) - len(t) // 4] or t
        out.append((statistics.median(t), mid[-1] - mid[0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-12x64", choices=["gpt-12x64", "hf-gpt2"])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import dpkit
    from dpkit.engine import guards
    from dpkit.modes._trace import BatchTrace
    from torch.overrides import TorchFunctionMode

    torch.manual_seed(0)
    model, x = _model(args.model)
    model.train()

    def plain():
        model(x)

    def traced(batch_dim):
        def run():
            with BatchTrace([x], batch_dim=batch_dim):
                model(x)
        return run

    class Empty(TorchFunctionMode):
        """A torch-function mode that only calls through: the floor of any per-op trace written in Python."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def empty():
        with Empty():
            model(x)

    print(f"# host costs on {args.model}, input {tuple(x.shape)}, 1 thread, CPU ms (median, spread of the middle half "
          f"of {args.reps}); dpkit from {os.path.dirname(dpkit.__file__)}")
    (base, sb), (rows, sr), (marks, sm), (floor, sf) = _ms([plain, traced(0), traced(None), empty], args.reps)
    print("| forward | ms | over no trace |\n| --- | ---: | ---: |")
    print(f"| no trace | {base:.2f} ± {sb:.2f} | |")
    print(f"| an empty torch-function mode (the floor of a trace in Python) | {floor:.2f} ± {sf:.2f} | +{floor - base:.2f} |")
    print(f"| trace, rows followed | {rows:.2f} ± {sr:.2f} | +{rows - base:.2f} |")
    print(f"| trace, marks only | {marks:.2f} ± {sm:.2f} | +{marks - base:.2f} |")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=None, sample_rate=0.01,
                                 expected_batch_size=x.shape[0], noise_multiplier=1.0, max_grad_norm=1.0)
    watch = private._state_watch

    def forward_checks():
        before = watch.snapshot()
        guards.check_modules(model)
        guards.trainable_change(model, private.planned, private.params, private.topology.parameters(model))
        watch.refuse_moved(before)

    def release_checks():
        params = private.topology.parameters(model)
        guards.trainable_change(model, private.planned, private.params, params)
        guards.refuse_stray_gradients(model, optimizer, private.planned, params)

    reps = 10 * args.reps
    (fwd, sf), (rel, sr) = _ms([forward_checks, release_checks], reps)
    print(f"\n| checks ({len(private.plan)} planned units, {sum(1 for _ in model.modules())} modules) | ms |"
          "\n| --- | ---: |")
    print(f"| per forward | {fwd:.3f} ± {sf:.3f} |\n| at release | {rel:.3f} ± {sr:.3f} |")
    private.detach()


if __name__ == "__main__":
    main()
