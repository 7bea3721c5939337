#!/usr/bin/env python
"""An LSTM classifier (padded or packed) and a self-attention classifier, non-private and private, timed in one process.

Every configuration of a model trains its own copy on the same fixed-size batches; the configurations take
turns one step at a time (round-robin), so that a slow spell on a shared machine hits them alike, and the table
gives the median step time (wall clock, and the process's CPU time, which a busy shared machine disturbs less),
their ratios to non-private training, and the peak of live tensor bytes over one further
step above those alive before it (``tensor_memory.py``: what ``torch.cuda.max_memory_allocated`` would count;
that step runs under the counter, so it is not timed).

Private configurations: dpkit in ``--modes`` with the recurrent and attention samplers registered
(``dpkit.layers.recurrent``, ``dpkit.layers.attention``), dpkit ``auto`` without them (the ``torch.func``
fallback, as these layers ran before), and, if ``opacus`` is importable, Opacus with its ``DPLSTM`` and
``DPMultiheadAttention``. All use σ = 1, C = 1, flat clipping, plain SGD. A configuration that refuses the model
is listed with its error. This is a benchmark, not a test: it asserts nothing.

    python contrib/benchmarks/bench_recurrent.py --batch 64 --seq 64 --rounds 10 --threads 1

``lstm-packed`` is the LSTM classifier on variable-length sequences (lengths drawn from 1 to ``--seq``, id 0 pads):
it packs them (``pack_padded_sequence``, unsorted) and reads the final state. It has no ``floor`` line: its training
skips the padding, which the samplers replay.

``gru`` is the same classifier with an ``nn.GRU``. ``dpkit auto, replay`` is auto with the recurrent layer replayed by
its sampler, as before its forward ran as F.linear calls (``dpkit/layers/_recurrent_forms.py``); ``ratio spread``
gives the quartiles of the per-round ratios to the non-private step of the same round.

``--modes`` picks dpkit's modes (default hooks, ghost, bk, auto). Under each table, ``floor`` gives each mode's
multiply-adds as a ratio to non-private training's: the ratio no CPU time can beat with the samplers as built, and
what bk would need with the norm pass's gradients kept for the clipped sum, or with no replay at all.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import dpkit
from dpkit import registry
from dpkit.layers import attention, recurrent

sys.path.insert(0, os.path.dirname(__file__))
from tensor_memory import TensorMemory  # noqa: E402

VOCAB, CLASSES = 5000, 10


class LSTMClassifier(nn.Module):
    def __init__(self, d: int, lstm: type[nn.Module] = nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.rnn = lstm(d, d, batch_first=True)
        self.fc = nn.Linear(d, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.fc(out[:, -1])


class PackedLSTMClassifier(LSTMClassifier):
    """Variable-length text: the ids packed by their lengths (id 0 pads), the last state at each one's own end."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(1).cpu()
        _, state = self.rnn(pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False))
        return self.fc(state[0][-1])


class AttentionClassifier(nn.Module):
    def __init__(self, d: int, heads: int = 4, mha: type[nn.Module] = nn.MultiheadAttention):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.attn = mha(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(self.norm(h + out).mean(1))


def _dpkit(model: nn.Module, mode: str, batch: int, samplers: bool):
    registry.reset()
    for module in (recurrent, attention):  # built-in plugins: registered unless the fallback is measured
        if not samplers:
            registry.unregister_plugin(module.__name__)
        elif module.__name__ not in registry.BUILTIN_PLUGINS:
            registry.register_plugin(module, name=module.__name__)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.01,
                                 expected_batch_size=batch, noise_multiplier=1.0, max_grad_norm=1.0,
                                 grad_sample_mode=mode, poisson_sampling="unproven", criterion=nn.CrossEntropyLoss())
    criterion = private.criterion

    def step(x, y):
        with private.micro_batches():
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
    return step


def _replaying(step):
    """``step`` with the recurrent sampler's F.linear forms taken away for its duration: the layer is replayed."""
    def run(x, y):
        forms = recurrent.grad_sampler.linear_forms
        del recurrent.grad_sampler.linear_forms  # no calls recorded: the record falls back to the sampler
        try:
            step(x, y)
        finally:
            recurrent.grad_sampler.linear_forms = forms
    return run


def _opacus(model: nn.Module, batch: int):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(module.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=batch)
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad()
        loss_fn(module(x), y).backward()
        opt.step()
    return step


def _plain(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def configurations(name: str, d: int, batch: int, modes: list[str]) -> dict[str, object]:
    """Label → step function (or the error that refused it), each on its own copy of one initial model."""
    make = {"lstm": LSTMClassifier, "lstm-packed": PackedLSTMClassifier, "mha": AttentionClassifier,
            "gru": lambda d, lstm=nn.GRU: LSTMClassifier(d, lstm)}[name]
    torch.manual_seed(0)
    state = make(d).state_dict()

    def fresh(**kwargs) -> nn.Module:
        model = make(d, **kwargs)
        model.load_state_dict(state, strict=False)
        return model
    out: dict[str, object] = {"non-private": _plain(fresh())}
    builders = {f"dpkit {m}": (lambda m=m: _dpkit(fresh(), m, batch, True)) for m in modes}
    if name != "mha":
        builders["dpkit auto, replay"] = lambda: _replaying(_dpkit(fresh(), "auto", batch, True))
    builders["dpkit auto, torch.func fallback"] = lambda: _dpkit(fresh(), "auto", batch, False)
    try:
        from opacus.layers import DPGRU, DPLSTM, DPMultiheadAttention

        layer = {"lstm": {"lstm": DPLSTM}, "gru": {"lstm": DPGRU}, "mha": {"mha": DPMultiheadAttention}}[
            name.split("-")[0]]
        builders[f"opacus hooks ({next(iter(layer.values())).__name__})"] = \
            lambda: _opacus(fresh(**layer), batch)
    except ImportError:
        pass
    for label, build in builders.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[label] = build()
        except Exception as err:  # reported in the table
            out[label] = err
    registry.reset()
    return out


def measure(configs: dict[str, object], x: torch.Tensor, y: torch.Tensor, warmup: int, rounds: int
            ) -> dict[str, tuple[float, float, int, tuple[float, float]] | str]:
    """Median wall and CPU ms per step, the configurations taking turns, then each one's peak tensor bytes over one
    more step, and the quartiles of its per-round wall-time ratio to the first configuration (non-private)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k, v in configs.items() if callable(v)}
    failed: dict[str, str] = {k: f"refused: {type(v).__name__}: {' '.join(str(v).split())[:160]}"
                              for k, v in configs.items() if not callable(v)}
    for r in range(warmup + rounds):
        for label in list(times):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                configs[label](x, y)
            except Exception as err:
                failed[label] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
                del times[label]
                continue
            if r >= warmup:
                times[label].append(((time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3))
    peaks = {}
    for label in times:
        gc.collect()
        with TensorMemory() as mem:
            configs[label](x, y)
        peaks[label] = mem.peak - mem.entry
    first = next(iter(times))

    def spread(v):
        ratios = [t / b for (t, _), (b, _) in zip(v, times[first])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return q[0], q[2]
    return {**{k: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v), peaks[k], spread(v))
               for k, v in times.items()}, **failed}


def _norm_macs(T: int, p: int, widths: list[int]) -> int:
    """One example's norm multiply-adds for weights of one output gradient ``[T, p]`` reading inputs ``[T, d]``: each
    weight ghost (Gram matrices, the gradient's formed once) or instantiated, by the samplers' rule."""
    ghost = [d for d in widths if T * (p + d) < p * d]
    return (T * T * (p + sum(ghost)) if ghost else 0) + sum(T * p * d for d in widths if d not in ghost)


def floor(name: str, B: int, T: int, d: int, heads: int = 4) -> dict[str, float]:
    """Multiply-adds of a step, as ratios to non-private training: what each mode cannot do without (matrix products
    only; elementwise work, the embedding and the classifier head left out of both sides).

    ``replay``: what one sampler call recomputes from the record (the inputs and the output's gradient) to reach
    the gates' or projections' gradients. For the LSTM, ``bk``/``auto`` now keep the gates of the real forward
    (its levels run unfused, plus one product for the hidden share's call, and the backward is the sampler's
    recursion, with no weight gradients); ``bk/auto replaying`` is the replaying path of the ``replay`` column,
    which calls the norm sampler and then the grad sampler, so it replays twice; ``no replay`` what any exact method
    adds to the fused training step if its own backward handed over dz. MultiheadAttention's ``bk``/``auto`` take the projections' inputs and output gradients from the training's
    own forward and backward (linear parts, dpkit/modes/_parts.py): no replay.
    """
    if name == "lstm":
        G = 4 * d
        training = 24 * B * T * d * d  # forward 8; backward 16: the fused kernel forms weight gradients in every mode
        replay = 12 * B * T * d * d  # the gates (input and hidden shares) and the recursion's dz W_hh
        norms, per_example, skipped = B * _norm_macs(T, G, [d, d]), 8 * B * T * d * d, 0
        second = 16 * B * T * d * d
    else:
        E, L = d, T
        training = 12 * B * L * E * E + 6 * B * L * L * E
        replay = 4 * B * L * E * E + 6 * B * L * L * E  # q, k, v and g W_out; attention forward and backward
        norms = B * (_norm_macs(L, 3 * E, [E]) + _norm_macs(L, E, [E]))
        per_example = skipped = 4 * B * L * E * E  # the weight gradients: stand-ins skip training's own
        second = 8 * B * L * E * E + 4 * B * L * L * E
    sums = per_example
    base = training - skipped
    if name == "lstm":
        # gates kept (dpkit/layers/_recurrent_forms.py): forward 12 (the input share, the unfused loop's hidden
        # products, the hidden share's call), backward 8 (dz W_hh through time, dz W_ih): no weight gradients
        kept = 20 * B * T * d * d
        modes = {"bk/auto": kept + norms + sums, "bk/auto replaying": base + 2 * replay + norms + sums,
                 "no replay": base + norms + sums}
    else:  # linear parts: the real backward hands over the projections' output gradients
        modes = {"bk/auto": base + norms + sums}
    modes |= {"ghost": base + replay + norms + second, "hooks": base + replay + per_example}
    return {"training GMAC": training / 1e9, **{k: v / training for k, v in modes.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lstm", "mha"], choices=["lstm", "lstm-packed", "gru", "mha"])
    parser.add_argument("--modes", nargs="+", default=["hooks", "ghost", "bk", "auto"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), batch {args.batch}, seq {args.seq}, "
          f"dim {args.dim}, median of {args.rounds} steps after {args.warmup}")
    for name in args.models:
        torch.manual_seed(1)
        x = torch.randint(1 if name == "lstm-packed" else 0, VOCAB, (args.batch, args.seq))
        if name == "lstm-packed":  # id 0 pads each sequence past its length
            x[torch.arange(args.seq) >= torch.randint(1, args.seq + 1, (args.batch, 1))] = 0
        y = torch.randint(0, CLASSES, (args.batch,))
        results = measure(configurations(name, args.dim, args.batch, args.modes), x, y, args.warmup, args.rounds)
        base, base_cpu = results["non-private"][:2]
        print(f"\n{name}\n{'configuration':<40} {'ms/step':>9} {'ratio':>7} {'ratio spread':>13} {'CPU ms':>9} "
              f"{'ratio':>7} {'peak MiB':>9}")
        for label, res in results.items():
            if isinstance(res, str):
                print(f"{label:<40} {res}")
            else:
                print(f"{label:<40} {res[0]:9.1f} {res[0] / base:7.2f} {res[3][0]:6.2f}–{res[3][1]:<6.2f} "
                      f"{res[1]:9.1f} {res[1] / base_cpu:7.2f} {res[2] / 2**20:9.1f}")
        if name in ("lstm-packed", "gru"):
            continue
        print("floor, multiply-adds as a ratio to training's: " + ", ".join(
            f"{k} {v:.3g}" for k, v in floor(name, args.batch, args.seq, args.dim).items()))


if __name__ == "__main__":
    main()
