"""Author-level DP: the byte-level GPT of ``language_model.py``, where the unit of privacy is an author.

Each standard-library module with Python source stands for one author; its source is cut into sequences of
``--context`` + 1 bytes. ``dpkit.ByUser`` makes an author what an example is: Poisson sampling draws authors,
each sampled author brings at most ``--per-author`` of their sequences (a fixed subset), and the mean of
their gradients is clipped to C as one contribution (``augmentation_multiplicity`` = ``--per-author``). The
epsilon printed protects everything one author wrote, not one sequence. Validation: a held-out 10% of the
authors, so the model is judged on authors it never saw.

    python contrib/examples/author_level_lm.py            # 160 stdlib modules as authors, epsilon 8, 60 steps
    python contrib/examples/author_level_lm.py --quick    # a few seconds: a smoke test, not a result

Measured on the 2-core CPU this was written on (one thread, defaults: 144 training authors, 16 held out, 60
steps of about 48 authors, noise multiplier 1.412): held-out loss 5.553 -> 3.014 nats per byte (perplexity
20.4) at epsilon 8.00 per author, delta 1e-3, in 77 s. With ~150 authors the privacy-utility trade-off is
hard: every author's whole work is protected, and there are few of them.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import dpkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from language_model import VOCAB, TinyGPT, mean_loss  # noqa: E402


NOT_AUTHORS = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}  # side effects on import


def authors(context: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, context + 1]`` byte sequences and the author (module) of each, from up to ``limit`` modules."""
    sequences, owners = [], []
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in NOT_AUTHORS)
    for name in names:
        if len(set(owners)) >= limit:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                text = inspect.getsource(importlib.import_module(name))
        except Exception:  # C modules, modules that need a display or a network: not authors here
            continue
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        n = len(data) // (context + 1)
        if n == 0:
            continue
        sequences.append(data[: n * (context + 1)].view(n, context + 1))
        owners += [len(set(owners))] * n
    return torch.cat(sequences), torch.tensor(owners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=int, default=160, help="at most this many stdlib modules")
    parser.add_argument("--per-author", type=int, default=8, help="sequences an author contributes at most")
    parser.add_argument("--authors-per-batch", type=float, default=48, help="expected authors per batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-3, help="below 1/authors")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.authors, args.steps, args.authors_per_batch = 40, 4, 12
    torch.set_num_threads(1)
    torch.manual_seed(0)

    sequences, owner = authors(args.context, args.authors)
    n_authors = int(owner.max()) + 1
    held_out = torch.randperm(n_authors)[: max(1, n_authors // 10)]
    val_mask = torch.isin(owner, held_out)
    train, train_owner, val = sequences[~val_mask], owner[~val_mask], sequences[val_mask]
    by_author = dpkit.ByUser(TensorDataset(train[:, :-1], train[:, 1:]), train_owner,
                             max_per_user=args.per_author, contribution="mean")
    print(f"{len(by_author)} training authors ({len(train)} sequences), {len(held_out)} held-out authors "
          f"({len(val)} sequences); at most {args.per_author} sequences per author")

    model = TinyGPT(VOCAB, args.context, width=64, layers=2, heads=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = dpkit.DPDataLoader(by_author, sample_rate=min(1.0, args.authors_per_batch / len(by_author)),
                                generator=torch.Generator().manual_seed(0))
    private = dpkit.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=1.0, target_epsilon=args.epsilon,
        target_delta=args.delta, steps=args.steps, grad_sample_mode="bk",
        augmentation_multiplicity=args.per_author)  # an author is an example of per-author rows
    model, optimizer, loader = private
    print(f"noise multiplier {private.noise_multiplier:.3f}, author sample rate {private.sample_rate:.3f}")
    untrained = mean_loss(model, val)
    start = time.perf_counter()
    while private.steps < args.steps:
        for x, y, weight in loader:
            optimizer.zero_grad()
            per_row = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)  # one per sequence
            (weight * per_row).mean().backward()  # padding rows weigh 0; an author's rows average
            optimizer.step()
            if private.steps == args.steps:
                break
    val_loss = mean_loss(model, val)
    epsilon = private.epsilon(args.delta)
    private.detach()
    print(f"held-out authors: loss {untrained:.3f} -> {val_loss:.3f} nats per byte "
          f"(perplexity {math.exp(val_loss):.1f}), {time.perf_counter() - start:.0f} s")
    print(f"summary: epsilon={epsilon:.2f} delta={args.delta:g} unit=author val_loss={val_loss:.3f} "
          f"untrained_loss={untrained:.3f}")


if __name__ == "__main__":
    main()
