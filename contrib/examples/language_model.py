"""A small GPT-2-style language model trained with DP-SGD on Python's own source code, byte by byte.

Demonstrates the norm modes on a transformer: ``grad_sample_mode="bk"`` (book-keeping, one backward pass; the
default) or ``"ghost"`` (``--mode ghost``: two backward passes), neither of which ever holds a per-example
gradient. The model is built from plain ``torch.nn`` layers: token and position ``nn.Embedding``s, pre-LayerNorm
blocks with causal self-attention (``nn.Linear`` around ``F.scaled_dot_product_attention``) and a GELU MLP, and
an LM head whose weight *is* the token embedding (tied, as in GPT-2; dpkit sums both uses per example before
clipping). The loss is ``private.criterion`` around ``nn.CrossEntropyLoss``: one loss per sequence, the mean
over its tokens. Batches are Poisson-sampled and split into physical batches by ``dpkit.BatchMemoryManager``.

Data: the source of a few standard-library modules (``inspect.getsource``), so nothing is downloaded, cut into
non-overlapping sequences of ``--context`` + 1 bytes; a random 10% of them is held out. One sequence is one
example: the privacy guarantee protects each sequence, not each module or author.

Measured with Python 3.11's modules on the 2-core CPU this was written on (one torch thread), with the defaults
(bk, epsilon=3, delta=1e-5, 2 layers of width 64, 120,576 parameters, 8 epochs = 224 steps of expected batch 256
in physical batches of 64; ``python contrib/examples/language_model.py``): validation loss 2.451 nats per byte,
perplexity 11.60 (untrained 234; the training bytes' frequencies alone give 22.5), train loss 2.451, epsilon
2.995, in 118 s. ``--mode ghost`` takes the same steps to the same numbers in 142 s.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dpkit

MODULES = ("argparse", "calendar", "csv", "dataclasses", "difflib", "fractions", "functools", "heapq", "pprint",
           "random", "shlex", "statistics", "string", "textwrap")
VOCAB = 256  # bytes


def load_sequences(context: int, max_bytes: int | None) -> Tensor:
    """The modules' source as UTF-8 bytes, cut into ``[N, context + 1]`` sequences (inputs plus the next byte)."""
    text = "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in MODULES)
    data = torch.frombuffer(bytearray(text.encode("utf-8")[:max_bytes]), dtype=torch.uint8).long()
    n = len(data) // (context + 1)
    return data[: n * (context + 1)].view(n, context + 1)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, D/heads]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied: one parameter, used twice
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """``[B, T]`` byte ids → ``[B, T, vocab]`` logits of the next byte."""
        positions = torch.arange(idx.shape[1], device=idx.device)[None]  # [1, T]: dpkit expands it to the batch
        x = self.tokens(idx) + self.positions(positions)
        return self.head(self.ln(self.blocks(x)))


@torch.no_grad()
def mean_loss(model: nn.Module, sequences: Tensor, batch_size: int = 512) -> float:
    """Cross-entropy per byte (nats) over ``sequences``, without dpkit."""
    model.eval()
    total = sum(F.cross_entropy(model(s[:, :-1]).transpose(1, 2), s[:, 1:], reduction="sum").item()
                for s in sequences.split(batch_size))
    model.train()
    return total / sequences[:, 1:].numel()


def unigram_loss(train: Tensor, val: Tensor) -> float:
    """Cross-entropy per byte on ``val`` of the training bytes' frequencies: what a model without context gets."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=VOCAB).double() + 1
    return -(counts / counts.sum()).log()[val[:, 1:].flatten()].mean().item()


@torch.no_grad()
def sample(model: nn.Module, prompt: str, length: int, context: int, temperature: float = 0.8) -> str:
    idx = torch.tensor([list(prompt.encode())])
    for _ in range(length):
        probs = F.softmax(model(idx[:, -context:])[0, -1] / temperature, dim=0)
        idx = torch.cat([idx, torch.multinomial(probs, 1)[None]], dim=1)
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("bk", "ghost"), default="bk", help="grad_sample_mode")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="examples per forward/backward pass")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--context", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-bytes", type=int, help="use only this much text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: a smoke test, not a result")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.max_bytes, args.batch_size, args.threads = 2, 40_000, 128, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    sequences = load_sequences(args.context, args.max_bytes)
    sequences = sequences[torch.randperm(len(sequences))]
    n_val = len(sequences) // 10
    train, val = sequences[n_val:], sequences[:n_val]
    print(f"{len(train)} training and {len(val)} validation sequences of {args.context} bytes "
          f"from {len(MODULES)} stdlib modules")

    model = TinyGPT(VOCAB, args.context, args.width, args.layers, args.heads)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = dpkit.DPDataLoader(TensorDataset(train[:, :-1], train[:, 1:]), sample_rate=args.batch_size / len(train),
                                generator=torch.Generator().manual_seed(args.seed))
    private = dpkit.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=args.max_grad_norm,
        target_epsilon=args.epsilon, target_delta=args.delta, steps=args.epochs * len(loader),
        grad_sample_mode=args.mode, criterion=nn.CrossEntropyLoss(), noise_seed=args.seed)
    model, optimizer, loader, criterion = private
    print(f"{sum(p.numel() for p in model.parameters())} parameters; mode {args.mode}, noise multiplier "
          f"{private.noise_multiplier:.3f}, sample rate {private.sample_rate:.4f}, {args.epochs * len(loader)} steps")
    untrained = mean_loss(model, val)
    print(f"untrained: validation loss {untrained:.3f} (perplexity {math.exp(untrained):.1f}); byte frequencies "
          f"alone (a unigram model, for reference) give perplexity {math.exp(unigram_loss(train, val)):.1f}")

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss_sum, rows = 0.0, 0
        with dpkit.BatchMemoryManager(private, max_physical_batch_size=args.physical_batch_size) as batches:
            for x, y in batches:  # pieces of one Poisson batch; step() is virtual until its last piece
                optimizer.zero_grad()
                loss = criterion(model(x).transpose(1, 2), y)  # [B, vocab, T] logits: one loss per sequence
                loss.backward()
                optimizer.step()
                loss_sum, rows = loss_sum + loss.item() * len(x), rows + len(x)
        train_loss, val_loss = loss_sum / max(rows, 1), mean_loss(model, val)
        print(f"epoch {epoch:2d}  train loss {train_loss:.3f}  validation loss {val_loss:.3f} "
              f"(perplexity {math.exp(val_loss):.2f})  epsilon {private.epsilon(args.delta):.2f}  "
              f"{time.perf_counter() - start:.0f} s")
    epsilon = private.epsilon(args.delta)
    private.detach()
    print(f"sample: {sample(model, 'def ', 120, args.context)!r}")
    print(f"summary: epsilon={epsilon:.2f} delta={args.delta:g} mode={args.mode} train_loss={train_loss:.3f} "
          f"val_loss={val_loss:.3f} val_perplexity={math.exp(val_loss):.2f}")


if __name__ == "__main__":
    main()
