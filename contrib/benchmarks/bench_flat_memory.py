#!/usr/bin/env python
"""Flat clipping with less memory in book-keeping: the options of issue 11 (requirement 2), measured.

Flat clipping needs every layer's per-example norm before any layer's clipped sum, so book-keeping (``bk``)
keeps each layer's input ``a`` [B, T, d] and output gradient ``g`` [B, T, p] until the backward pass ends.
This script measures, on GPTs of ``bench_models.py``, peak allocated tensor bytes (``tensor_memory.TensorMemory``,
one steady-state step, each configuration in a fresh forked process) and CPU time per step (``time.process_time``,
median of ``--steps`` steps after ``--warmup``, one thread) of:

* ``nonprivate``: plain SGD; ``nonprivate-frozen``: the same with the prototypes' frozen parameters (below);
* dpkit's own ``bk``, ``auto`` and ``ghost`` modes, flat clipping, through ``dpkit.make_private``, and
  ``bk-frozen``: dpkit's bk on the prototypes' frozen set (Linear layers only);
* prototypes written here, with every ``nn.Linear`` (weights and biases) clipped under one flat bound C:

  - ``proto-bk``: book-keeping, fp32 records (a, g) kept to the end, norms formed on arrival (ghost norm via
    T×T Gram matrices or the instantiated [p, d] gradient, whichever needs fewer multiply-adds), then
    Σ_i f_i Σ_t g_{i,t} a_{i,t}ᵀ per layer, freeing each record after its sum (records in arrival order);
    norms and sums go over the examples in chunks whose fp32 temporaries stay under 2 MiB (``CHUNK_BYTES``);
  - ``proto-bk-bf16g`` (option a): the same, but g is kept in bfloat16 and a in fp32; norms *and* sums are
    computed from the kept bf16 values (upcast to fp32 for the arithmetic), so each example's released
    contribution has norm ≤ C exactly (to fp32 rounding): the sensitivity bound holds for what is released;
  - ``proto-bk-bf16ag`` (option a): a and g both kept in bfloat16 (the fp32 input is freed once the layer's
    own backward has used it);
  - ``proto-inst`` (option a, fp32): where B·p·d < B·T·(p+d), keep the per-example gradient [B, p, d]
    formed on arrival instead of the record (the rule of dpkit's ``auto``), else the record; exact;
  - ``proto-ghost`` (option b): ghost clipping: a first backward (graph retained) forms each layer's norms on
    arrival and drops g; a second backward of Σ_i f_i·loss_i gives the clipped sums directly;
  - ``proto-hybrid`` (option b, restricted second pass): the backward is cut at the output of block
    ``--split`` (counted from the bottom): the blocks above it run ghost-style (their part of the graph is
    retained, norms on arrival, a second pass restricted to them with ``inputs=``), the blocks below run
    book-keeping (their part of the graph is freed as in plain backward, records kept);
  - ``proto-bk-largest`` (option c): proto-bk with the end-of-pass sums taken largest record first, scaling
    g in place (no [B, T, p] temporary).

Prototype rows freeze the token and position embeddings' lookups and the LayerNorms (no gradient, not clipped,
not released; the LM head's weight, tied to the token embedding, is clipped for its use by the head only). The
``nonprivate-frozen`` row is the non-private step with the same frozen set; ratios are against full
``nonprivate``, and the frozen parameters' gradients are < 0.5 % of the peak at the GPT shapes.

``--check`` compares every prototype's clipped sum (noise off) against a loop over examples (a micro-batch of
one each, per-example gradients of the Linear weights and biases clipped to C and summed) on a tiny GPT;
exits 1 if an fp32 option differs by more than 1e-5 (max abs), or if a bf16 option releases an example whose
clipped contribution (computed from its kept values) exceeds C.

Usage::

    python contrib/benchmarks/bench_flat_memory.py                       # tiny GPT, every option (< 1 min)
    python contrib/benchmarks/bench_flat_memory.py --shapes gpt8x256,gpt6x1024
    python contrib/benchmarks/bench_flat_memory.py --check
    python contrib/benchmarks/bench_flat_memory.py --shapes L=4,d=128,h=4,V=256,B=4,T=128 --options nonprivate,bk

Public dpkit API only; dpkit is not modified.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
os.environ.setdefault("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # built-in layer plugins only, as bench.py
sys.path.insert(0, str(HERE))
from bench_models import GPT, GPTConfig  # noqa: E402

SHAPES = {  # name -> n_layer, d, heads, vocab, batch, seq
    "tiny": dict(L=2, d=64, h=2, V=64, B=4, T=32),
    "gpt8x256": dict(L=8, d=256, h=4, V=256, B=8, T=256),
    "gpt6x1024": dict(L=6, d=256, h=4, V=256, B=4, T=1024),
}
DPKIT_MODES = ("bk", "auto", "ghost")
PROTOS = ("proto-bk", "proto-bk-bf16g", "proto-bk-bf16ag", "proto-inst", "proto-ghost", "proto-hybrid",
          "proto-bk-largest")
OPTIONS = ("nonprivate", "nonprivate-frozen", *DPKIT_MODES, "bk-frozen", *PROTOS)
LABELS = {
    "nonprivate": "non-private (SGD)",
    "nonprivate-frozen": "non-private, prototypes' frozen set",
    "bk": "dpkit bk (flat)",
    "auto": "dpkit auto (flat)",
    "ghost": "dpkit ghost (flat)",
    "bk-frozen": "dpkit bk (flat), prototypes' frozen set",
    "proto-bk": "prototype bk, fp32 records",
    "proto-bk-bf16g": "(a) prototype bk, bf16 g",
    "proto-bk-bf16ag": "(a) prototype bk, bf16 a and g",
    "proto-inst": "(a) prototype, fp32 per-example grads where smaller",
    "proto-ghost": "(b) prototype ghost (2nd pass over all)",
    "proto-hybrid": "(b) prototype hybrid (2nd pass over top blocks)",
    "proto-bk-largest": "(c) prototype bk, largest record first, in place",
}
EPS = 1e-6


def parse_shape(text: str) -> dict:
    if text in SHAPES:
        return dict(SHAPES[text], name=text)
    shape = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    missing = set(SHAPES["tiny"]) - set(shape)
    if missing:
        raise SystemExit(f"shape {text!r} lacks {sorted(missing)} (give L,d,h,V,B,T)")
    return dict(shape, name=text)


def build(shape: dict, seed: int = 0) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=shape["L"], d=shape["d"], heads=shape["h"], vocab=shape["V"], ctx=shape["T"]))
    model.train()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, shape["V"], (shape["B"], shape["T"] + 1), generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return model, batches


def freeze(model: nn.Module) -> list[nn.Parameter]:
    """Freeze embeddings' lookups and LayerNorms; return the Linear parameters (what the prototypes clip)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(False)
    model.wpe.weight.requires_grad_(False)
    # the token embedding's weight is the LM head's (tied): keep it trainable for the head, cut the lookup's path
    model.wte.register_forward_hook(lambda mod, inp, out: out.detach())
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for p in (m.weight, m.bias):
                if p is not None and all(p is not q for q in params):
                    params.append(p)
    return params


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B]: each example's mean token loss (what dpkit's criterion clips per example)."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


# --------------------------------------------------------------------------- prototypes
class _RecLinear(torch.autograd.Function):
    """A Linear whose backward hands (input, output gradient) to the prototype and computes no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, proto, module):
        ctx.save_for_backward(x, weight)
        ctx.proto, ctx.module = proto, module
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        ctx.proto.on_grad(ctx.module, x, g)
        return grad_x, None, None, None, None


CHUNK_BYTES = 2 << 20  # the prototypes' norms and sums go over examples in chunks whose fp32 temporaries fit this


def chunks(batch: int, per_example_bytes: int) -> list[slice]:
    size = max(1, CHUNK_BYTES // max(1, per_example_bytes))
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def sq_norms(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """[B] squared norms of Σ_t g_t a_tᵀ (and Σ_t g_t for the bias), in fp32 from the values given (bf16 ones
    upcast), by the two T×T Gram matrices or the instantiated [p, d] gradient, whichever needs fewer
    multiply-adds; in chunks of examples so that the temporaries stay below CHUNK_BYTES."""
    B, T, d = a.shape
    p = g.shape[2]
    ghost = T * (p + d) < p * d
    temp = 4 * ((2 * T * T) if ghost else (p * d)) + 4 * T * (p * (g.dtype != torch.float32) + d * (a.dtype != torch.float32))
    out = []
    for c in chunks(B, temp):
        ac, gc_ = a[c].float(), g[c].float()  # no copy when already fp32
        if ghost:
            sq = torch.einsum("bst,bst->b", torch.bmm(ac, ac.mT), torch.bmm(gc_, gc_.mT))
        else:
            G = torch.bmm(gc_.mT, ac)
            sq = torch.einsum("bpd,bpd->b", G, G)
            del G
        if bias:
            gb = gc_.sum(1)
            sq = sq + torch.einsum("bp,bp->b", gb, gb)
        out.append(sq)
    return torch.cat(out)


class Proto:
    """One of the prototype options on a GPT; ``step(x, y)`` is one DP-SGD step (clip, noise, SGD)."""

    def __init__(self, model: nn.Module, optimizer, option: str, C: float, sigma: float, split: int = 0,
                 noise: bool = True, debug: bool = False):
        self.model, self.optimizer, self.option = model, optimizer, option
        self.C, self.sigma, self.noise, self.debug = C, sigma, noise, debug
        self.params = freeze(model)
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        for m in self.linears:
            m.forward = partial(self._forward, m)
        self.records: dict[nn.Module, tuple] = {}  # module -> kept values (arrival order)
        self.sq: torch.Tensor | None = None  # running [B] sum of squared norms
        self.phase = "bk"  # how on_grad treats an arriving gradient: bk | norms | sums
        self.split = split
        self.debug_norms: list[torch.Tensor] = []  # --check: per-example norms of what is released
        self.on_backward_end = lambda: None  # the benchmark's mark: the backward pass(es) are over

    def _forward(self, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return _RecLinear.apply(x, m.weight, m.bias, self, m)

    def _add_sq(self, value: torch.Tensor) -> None:
        self.sq = value if self.sq is None else self.sq + value

    def on_grad(self, m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> None:
        bias = m.bias is not None
        if self.phase == "sums":  # second pass: g is already f_i g_i
            self._accumulate(m, g.flatten(0, 1).mT @ a.flatten(0, 1), g.sum((0, 1)) if bias else None)
            return
        if self.phase == "norms":  # ghost first pass: norms on arrival, g dropped
            self._add_sq(sq_norms(a, g, bias))
            return
        opt = self.option
        if opt == "proto-inst":
            B, T, d = a.shape
            p = g.shape[2]
            if p * d <= T * (p + d):  # the per-example gradient is no larger than the record
                G = torch.bmm(g.mT, a)  # [B, p, d]
                gb = g.sum(1) if bias else None
                sq = torch.einsum("bpd,bpd->b", G, G)
                if bias:
                    sq = sq + torch.einsum("bp,bp->b", gb, gb)
                self._add_sq(sq)
                self.records[m] = ("inst", G, gb)
                return
        if opt == "proto-bk-bf16g":
            g = g.to(torch.bfloat16)
        elif opt == "proto-bk-bf16ag":
            a, g = a.to(torch.bfloat16), g.to(torch.bfloat16)
        self._add_sq(sq_norms(a, g, bias))  # from exactly what is kept
        self.records[m] = ("rec", a, g)

    def _accumulate(self, m: nn.Linear, gw: torch.Tensor, gb: torch.Tensor | None) -> None:
        for p, s in ((m.weight, gw), (m.bias, gb)):
            if s is None:
                continue
            p.grad = s if p.grad is None else p.grad.add_(s)

    def _factors(self) -> torch.Tensor:
        norms = self.sq.sqrt()
        return (self.C / (norms + EPS)).clamp(max=1.0)

    @torch.no_grad()
    def _sums(self, f: torch.Tensor) -> None:
        """The clipped sum of each kept layer, freeing its record after use."""
        order = list(self.records)
        inplace = self.option == "proto-bk-largest"
        if inplace:
            order.sort(key=lambda m: -sum(t.nbytes for t in self.records[m][1:] if t is not None))
        for m in order:
            kind, u, v = self.records.pop(m)
            if kind == "inst":  # u = G [B, p, d], v = bias [B, p]
                gw = torch.mv(u.flatten(1).mT, f).view(u.shape[1:])
                gb = torch.mv(v.mT, f) if v is not None else None
                if self.debug:
                    self.debug_norms.append(u.flatten(1).square().sum(1) + (v.square().sum(1) if v is not None else 0))
            else:  # u = a [B, T, d], v = g [B, T, p], fp32 or bf16
                if self.debug:  # squared norms of each example's gradient from exactly the kept values
                    self.debug_norms.append(sq_norms(u, v, m.bias is not None))
                B, T, d = u.shape
                p = v.shape[2]
                gw = torch.zeros(p, d)
                gb = torch.zeros(p) if m.bias is not None else None
                temp = 4 * T * (p * (v.dtype != torch.float32 or not inplace) + d * (u.dtype != torch.float32))
                for c in chunks(B, temp):
                    fb = f[c].view(-1, 1, 1)
                    gs = v[c].mul_(fb) if inplace and v.dtype == torch.float32 else v[c].float() * fb
                    gw.addmm_(gs.flatten(0, 1).mT, u[c].float().flatten(0, 1))
                    if gb is not None:
                        gb.add_(gs.sum((0, 1)))
                    del gs
                del v
            self._accumulate(m, gw, gb)
            del u

    @torch.no_grad()
    def _privatize(self, batch: int) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.noise:
                p.grad.add_(torch.randn_like(p), alpha=self.sigma * self.C)
            p.grad.div_(batch)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.sq = None
        self.debug_norms = []
        B = x.shape[0]
        if self.option == "proto-ghost":
            losses = per_example_loss(self.model(x), y)
            self.phase = "norms"
            losses.sum().backward(retain_graph=True)
            f = self._factors()
            self.phase = "sums"
            (losses * f).sum().backward()
            self.phase = "bk"
            self.on_backward_end()
        elif self.option == "proto-hybrid":
            losses = self._hybrid_forward(x, y)
            h = self._cut
            self.phase = "norms"  # top blocks: norms on arrival, graph retained
            (grad_h,) = torch.autograd.grad(losses.sum(), [h], retain_graph=True)
            self.phase = "bk"  # bottom blocks: records, graph freed as it goes
            h.backward(grad_h)
            del grad_h
            self.on_backward_end()
            f = self._factors()
            self._sums(f)
            self.phase = "sums"  # second pass restricted to the top blocks
            torch.autograd.backward((losses * f).sum(), inputs=[h])
            self.phase = "bk"
            h.grad = None
            self._cut = None
        else:
            loss = per_example_loss(self.model(x), y).sum()
            loss.backward()
            del loss
            self.on_backward_end()
            f = self._factors()
            self._sums(f)
        self.clip_factors = f
        self._privatize(B)
        self.optimizer.step()
        return f

    def _hybrid_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The GPT's forward, with the output of block ``split`` kept as the cut between the two halves."""
        model = self.model
        B, T = x.shape
        pos = torch.arange(T).repeat(B, 1)
        h = model.wte(x) + model.wpe(pos)
        for i, block in enumerate(model.blocks):
            h = block(h)
            if i + 1 == self.split:
                self._cut = h
        if self.split == 0:
            self._cut = h  # nothing below: every Linear is in the top part (except none)
        return per_example_loss(model.head(model.ln_f(h)), y)


# --------------------------------------------------------------------------- one configuration (a worker)
def run_config(cfg: dict) -> dict:
    from tensor_memory import TensorMemory

    torch.set_num_threads(1)
    shape, option = cfg["shape"], cfg["option"]
    model, batches = build(shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    marks: list = []  # (peak so far, live) at the end of the backward pass of the counted step
    mark = lambda: None  # noqa: E731 - replaced inside the counted step

    if option in PROTOS:
        proto = Proto(model, optimizer, option, C=1.0, sigma=1.0, split=cfg.get("split", shape["L"] // 2))
        proto.on_backward_end = lambda: mark()

        def step(x, y):
            proto.step(x, y)
    else:
        criterion = nn.CrossEntropyLoss()
        if option in ("nonprivate-frozen", "bk-frozen"):
            freeze(model)
        if option in (*DPKIT_MODES, "bk-frozen"):
            import dpkit

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=None, sample_rate=1 / 64,
                                             expected_batch_size=shape["B"], noise_multiplier=1.0, max_grad_norm=1.0,
                                             grad_sample_mode=option.split("-")[0], criterion=nn.CrossEntropyLoss(), noise_seed=0)
            criterion = private.criterion

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x).transpose(1, 2), y)
            loss.backward()
            del loss
            mark()
            optimizer.step()

    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        c0 = time.process_time()
        step(*batches[i % len(batches)])
        if i >= cfg["warmup"]:
            times.append(time.process_time() - c0)
    gc.collect()
    with TensorMemory() as mem:
        mark = lambda: marks.append((mem.peak, mem.live))  # noqa: E731
        step(*batches[(cfg["warmup"] + cfg["steps"]) % len(batches)])
    # dpkit clips at the end of the backward pass (autograd's final callback), so its "live at the end of
    # backward" already has its records freed and its sums formed; the prototypes' mark is before their sums
    bwd_peak, bwd_live = marks[-1] if marks else (None, None)
    return {"option": option, "cpu_ms": 1e3 * statistics.median(times), "peak": mem.peak, "entry": mem.entry,
            "peak_op": mem.peak_op, "bwd_peak": bwd_peak, "bwd_live": bwd_live}


def _child(cfg: dict, conn) -> None:
    try:
        conn.send(run_config(cfg))
    except BaseException as exc:  # noqa: BLE001 - reported as the row's error
        conn.send({"option": cfg["option"], "error": f"{type(exc).__name__}: {exc}"[:300]})
    finally:
        conn.close()


def spawn(cfg: dict, timeout: float) -> dict:
    """Run one configuration in a fresh process: forked from this driver, which holds no tensors and has not
    imported dpkit (so nothing of an earlier configuration is alive in it), to spare re-importing torch."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cfg, send))
    proc.start()
    send.close()
    if not recv.poll(timeout):
        proc.terminate()
        proc.join()
        return {"option": cfg["option"], "error": f"timed out after {timeout:.0f} s"}
    try:
        result = recv.recv()
    except EOFError:
        result = {"option": cfg["option"], "error": "the worker died without a result"}
    proc.join()
    return result


# --------------------------------------------------------------------------- --check
def reference_sum(shape: dict, batch, C: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients of the Linear parameters (micro-batches of one), clipped to C and summed."""
    model, _ = build(shape)
    params = freeze(model)
    x, y = batch
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        loss = per_example_loss(model(x[i:i + 1]), y[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).float()
        norms.append(norm)
        f = (C / (norm + EPS)).clamp(max=1.0)
        for t, g in zip(total, grads):
            t.add_(g * f)
    return total, torch.stack(norms)


def check(shape: dict, options: list[str], show: bool = True) -> tuple[bool, dict[str, str]]:
    torch.set_num_threads(1)
    _, batches = build(shape)
    batch = batches[0]
    _, norms = reference_sum(shape, batch, C=1e9)
    C = float(norms.median())  # about half the examples clipped
    ref, _ = reference_sum(shape, batch, C)
    scale = max(float(t.abs().max()) for t in ref)
    say = print if show else (lambda *a, **k: None)
    say(f"check on {shape['name']} (L={shape['L']} d={shape['d']} V={shape['V']} B={shape['B']} T={shape['T']}), "
          f"C = {C:.4g} (median per-example norm), max |reference| = {scale:.3g}")
    say("| option | max abs Δ | relative Δ (‖Δ‖/‖ref‖) | max released norm / C | verdict |")
    say("| --- | ---: | ---: | ---: | --- |")
    ok, summary = True, {}
    for option in options:
        model, _ = build(shape)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights as they are
        proto = Proto(model, optimizer, option, C=C, sigma=0.0, noise=False, debug=True, split=max(1, shape["L"] // 2))
        f = proto.step(*batch)
        got = [p.grad.detach() * batch[0].shape[0] for p in proto.params]  # undo the division by B
        diff = max(float((g - r).abs().max()) for g, r in zip(got, ref))
        rel = float(torch.sqrt(sum((g - r).double().square().sum() for g, r in zip(got, ref))
                               / sum(r.double().square().sum() for r in ref)))
        released, ratio = "", float("inf")
        if proto.debug_norms and option not in ("proto-ghost", "proto-hybrid"):  # norms of each example's released contribution, from the kept values
            per_example = torch.stack(proto.debug_norms).sum(0).sqrt() * f
            ratio = float(per_example.max()) / C
            released = f"{ratio:.7f}"
        bf16 = "bf16" in option
        good = (ratio <= 1 + 1e-5) if bf16 else diff <= 1e-5
        ok &= good
        verdict = ("exact for its kept values" if bf16 else "exact") if good else "MISMATCH"
        say(f"| {option} | {diff:.2e} | {rel:.2e} | {released or '-'} | {verdict} |")
        summary[option] = (f"yes ({diff:.0e})" if not bf16 else f"bound exact; {diff:.0e} (rel. {rel:.0e}) from fp32") \
            if good else f"NO ({diff:.0e})"
    return ok, summary


# --------------------------------------------------------------------------- driver
def mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny", help=f"comma-separated: {', '.join(SHAPES)}, or one "
                        "L=..,d=..,h=..,V=..,B=..,T=.. (default tiny)")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated subset of: " + ", ".join(OPTIONS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--split", type=int, help="proto-hybrid: blocks below the cut (default L // 2)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--check", action="store_true", help="check the prototypes' clipped sums on a tiny GPT")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.check:
        shape = dict(SHAPES["tiny"], name="tiny")
        ok, _ = check(shape, list(PROTOS))
        print("check", "passed" if ok else "FAILED")
        sys.exit(0 if ok else 1)

    if "L=" in args.shapes:
        shapes = [parse_shape(args.shapes)]
    else:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    options = args.options.split(",")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown options {sorted(unknown)}")
    if "nonprivate" not in options:
        options.insert(0, "nonprivate")
    print(f"torch {torch.__version__}, one thread, CPU time (process_time) median of {args.steps} steps after "
          f"{args.warmup} warm-up; peak = TensorMemory over one further step, each row a fresh process")
    runs = []
    for shape in shapes:
        wall0 = time.perf_counter()
        results = []
        for option in options:
            cfg = {"shape": shape, "option": option, "steps": args.steps, "warmup": args.warmup}
            if args.split is not None:
                cfg["split"] = args.split
            results.append(spawn(cfg, args.timeout))
            r = results[-1]
            print(f"  {shape['name']} {option}: " + (r.get("error") or f"{r['peak'] / 2**20:.1f} MiB, "
                  f"{r['cpu_ms']:.0f} ms, peak at {r['peak_op']}; through backward {mib(r['bwd_peak'])} MiB, "
              f"live after it {mib(r['bwd_live'])} MiB, entry {mib(r['entry'])} MiB"), file=sys.stderr, flush=True)
        runs.append((shape, results, time.perf_counter() - wall0))
    # the exactness column: the --check comparison, run here after the workers (this process then holds tensors)
    protos = [o for o in options if o in PROTOS]
    _, exact = check(dict(SHAPES["tiny"], name="tiny"), protos, show=False) if protos else (True, {})
    exact.update({o: "dpkit's own tests" for o in (*DPKIT_MODES, "bk-frozen")})
    exact.update({"nonprivate": "(unclipped)", "nonprivate-frozen": "(unclipped)"})
    for shape, results, wall in runs:
        base = next(r for r in results if r["option"] == "nonprivate")
        print(f"\n### {shape['name']}: {shape['L']} blocks, d = {shape['d']}, heads {shape['h']}, vocab {shape['V']}, "
              f"batch {shape['B']} × {shape['T']} ({wall:.0f} s wall)\n")
        print("| option | peak tensor MiB | × non-private memory | CPU ms/step | × non-private time | exact? (max |Δ| "
              "vs reference, tiny GPT) | peak op |")
        print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
        for r in results:
            label = LABELS[r["option"]]
            if "error" in r:
                print(f"| {label} | error: {r['error']} | | | | | |")
                continue
            print(f"| {label} | {r['peak'] / 2**20:.1f} | {r['peak'] / base['peak']:.3f}× | {r['cpu_ms']:.0f} | "
                  f"{r['cpu_ms'] / base['cpu_ms']:.2f}× | {exact.get(r['option'], '-')} | `{r['peak_op']}` |")


if __name__ == "__main__":
    main()
