#!/usr/bin/env python
"""The floor under the norm modes' overhead: multiply-adds of exact per-example norms against training's own.

For a Linear over T positions an example's weight-gradient norm costs min(T²·(d+p), T·d·p) multiply-adds
(two T×T Gram matrices, or the d×p gradient itself): the two ways to associate the chain. The Gram matrices
are symmetric, so a symmetric rank-k product (which PyTorch does not expose) could halve the first. So
``norms / training`` bounds from below what bk and auto can add to a step when matrix products dominate it
(as on a GPU): the plain bound is what dpkit's kernels can reach, the symmetric one what any exact method
can. The LM head's tied embedding adds a cross term of B·T²·d.

Usage::

    python contrib/benchmarks/flops.py                         # GPT-2 small at 16x256 and 8x1024
    python contrib/benchmarks/flops.py --model gpt2-cpu --shape 16x64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import SPECS  # noqa: E402


def linear_layers(cfg: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) of every Linear of the GPT of ``bench_models``, head last."""
    d = cfg["d"]
    block = [("qkv", d, 3 * d), ("proj", d, d), ("fc", d, 4 * d), ("out", 4 * d, d)]
    return [(f"blocks.{i}.{n}", a, b) for i in range(cfg["n_layer"]) for n, a, b in block] + [("head", d, cfg["vocab"])]


def budget(model: str, B: int, T: int) -> dict[str, float]:
    """Multiply-adds of a non-private step's matrix products (forward + backward) and of the norms bk adds.

    Elementwise work (softmax, GELU, LayerNorm, the loss) is left out of both: on a GPU it is memory-bound
    and small next to the products; on a CPU it makes the true ratio a little lower.
    """
    cfg = SPECS[model][1]
    layers = linear_layers(cfg)
    training = sum(3 * B * T * a * b for _, a, b in layers)  # forward, input gradient, weight gradient
    training += cfg["n_layer"] * 3 * 2 * B * T * T * cfg["d"] // 2  # causal attention: QKᵀ and AV, fwd + bwd
    norms = sum(B * min(T * T * (a + b), T * a * b) for _, a, b in layers)
    symmetric = sum(B * min(T * T * (a + b) // 2, T * a * b) for _, a, b in layers)
    cross = B * T * T * cfg["d"]  # the tied embedding × head cross term
    return {"training": training, "norms": norms + cross, "symmetric": symmetric + cross}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", choices=[n for n, s in SPECS.items() if s[0] == "gpt"])
    parser.add_argument("--shape", action="append", help="BxT, e.g. 16x256 (repeatable)")
    args = parser.parse_args(argv)
    shapes = args.shape or ["16x256", "8x1024"]
    print(f"| {args.model} | training GMAC | exact norms GMAC | floor on bk/auto time | floor with symmetric Grams |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape in shapes:
        B, T = (int(v) for v in shape.split("x"))
        got = budget(args.model, B, T)
        print(f"| {B}x{T} | {got['training'] / 1e9:,.4g} | {got['norms'] / 1e9:,.4g} | "
              f"{1 + got['norms'] / got['training']:.3f}x | {1 + got['symmetric'] / got['training']:.3f}x |")


if __name__ == "__main__":
    main()
