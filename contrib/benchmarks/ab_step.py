"""One configuration's CPU time per step, for A/B runs of two dpkit versions (or of the row checks on and off).

The shared machines' load swings more than the differences worth measuring, so run the two sides alternately,
several times, and compare the minima::

    for i in 1 2 3; do
      PYTHONPATH=/path/to/old/checkout python contrib/benchmarks/ab_step.py --model gpt2-cpu
      python contrib/benchmarks/ab_step.py --model gpt2-cpu
      python contrib/benchmarks/ab_step.py --model gpt2-cpu --nonprivate
    done

``--untracked`` runs the batch trace without row provenance (``batch_dim=None``): the row checks' own cost.
``--model hf-gpt2`` is Hugging Face's GPT-2 small built from its config (no download; needs ``transformers`` and
the dpkit-transformers plugin) at batch 4 x 128 tokens, the shape of issue 24's regression.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import SPECS, build, loss_input, make_batches  # noqa: E402


def _hf_gpt2(batch: int = 4, seq: int = 128):
    """GPT-2 small from its default config (no hub download), as an LM returning ``[B, T, vocab]`` logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPT2LMHeadModel(GPT2Config(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0))

        def forward(self, x):
            return self.gpt(input_ids=x).logits

    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 50257, (batch, seq + 1), generator=gen) for _ in range(4)]
    return LM().train(), "gpt", batch, [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-cpu", choices=["gpt2-cpu", "convnet-cpu", "hf-gpt2"])
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--nonprivate", action="store_true", help="the same loop without dpkit")
    parser.add_argument("--untracked", action="store_true", help="the batch trace marks, but follows no rows")
    parser.add_argument("--steps", type=int, default=6, help="steps per repetition (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; the minimum is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import dpkit

    if args.untracked:
        from dpkit.modes import _capture

        traced = _capture.BatchTrace.__init__

        def untracked(self, inputs, batch_dim=None, **kwargs):
            traced(self, inputs, None, **kwargs)

        _capture.BatchTrace.__init__ = untracked
    torch.manual_seed(0)
    if args.model == "hf-gpt2":
        model, kind, batch, batches = _hf_gpt2()
    else:
        _, _, batch, seq = SPECS[args.model]
        model, kind = build(args.model, seq)
        batches = make_batches(args.model, batch, seq, 4, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion: nn.Module = nn.CrossEntropyLoss()
    if not args.nonprivate:
        settings = dict(module=model, optimizer=optimizer, data_loader=None, sample_rate=0.01, noise_multiplier=1.0,
                        max_grad_norm=1.0, criterion=criterion, grad_sample_mode=args.mode)
        try:
            criterion = dpkit.make_private(**settings, expected_batch_size=batch).criterion
        except TypeError as err:  # a checkout from before expected_batch_size= (b7c61c9): it divided by q * N
            if "expected_batch_size" not in str(err):
                raise
            criterion = dpkit.make_private(**settings).criterion

    def step(x, y):
        optimizer.zero_grad()
        criterion(loss_input(kind, model(x)), y).backward()
        optimizer.step()

    for i in range(3):
        step(*batches[i % 4])
    times = []
    for _ in range(args.repeat):
        start = time.process_time()
        for i in range(args.steps):
            step(*batches[i % 4])
        times.append((time.process_time() - start) / args.steps * 1000)
    label = "nonprivate" if args.nonprivate else args.mode + (" untracked" if args.untracked else "")
    print(f"{args.model} {label} (dpkit {os.path.dirname(dpkit.__file__)}): min {min(times):.1f} ms, "
          f"median {sorted(times)[len(times) // 2]:.1f} ms CPU per step")


if __name__ == "__main__":
    main()
