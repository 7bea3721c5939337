#!/usr/bin/env python
"""Where the time of dpkit's norm modes goes: cProfile, torch.profiler and a few targeted measurements.

Sections (``--sections``, comma-separated; all by default):

* ``phases``   – per mode, CPU ms per step split into forward, backward (for ghost: both passes) and step,
                 next to non-private training (median of ``--steps`` steps, one thread).
* ``python``   – cProfile over the steps: cumulative CPU ms per step of the dpkit functions that matter
                 (norms, clipped sums, samplers, hooks, the ghost passes, noise), by function name.
* ``ops``      – torch.profiler: the top aten ops by self CPU time per step, and how much of the step is
                 outside any op (Python, hooks, autograd bookkeeping).
* ``copies``   – the largest tensor copies of one step, by the op that made them and the copied shape.
* ``opcount``  – aten op calls of one step, attributed to the innermost dpkit function on the stack.
* ``overhead`` – the same model at a tiny shape (batch 2, seq 4): what a step costs when the tensor work is
                 negligible, i.e. the fixed per-step price of hooks and bookkeeping.
* ``overhead`` also measures how that fixed cost grows with depth (thin GPTs of 2 and 12 blocks).
* ``threads``  – (not in the default list) the kernels of a GPT step at 1 and 2 threads: the model's products,
                 dpkit's norm products and elementwise work, and the noise draw (which does not parallelise).
* ``kernels``  – single computations at the model's shapes, written here: one elementwise pass over every
                 captured output gradient; ``opt_einsum.contract`` against ``torch.bmm``; for GPTs the two ways
                 to a Linear weight's per-example norm (ghost: two T×T Gram matrices; instantiated: the
                 [out, in] gradient) next to the rule ``T·(p+d) < p·d`` that picks one, and a tied LM head's
                 cross term against materialising; for convnets a Conv2d's clipped sum by unfolded patches
                 against the convolution's own weight-gradient kernel.

Usage::

    python contrib/benchmarks/profile_modes.py                    # gpt2-cpu, modes bk,auto,ghost
    python contrib/benchmarks/profile_modes.py --model convnet-cpu --sections phases,python,ops

Public dpkit API only: the dpkit functions are observed by name through cProfile, never called.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
os.environ.setdefault("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # built-in layer plugins only, as bench.py
sys.path.insert(0, str(HERE))  # the models live next to this script
from bench_models import GPT, SPECS, GPTConfig, build, loss_input, make_batches

# dpkit functions reported by the ``python`` section, by (file suffix, function name)
WATCH = [
    ("engine/controller.py", "backward", "PrivateTraining.backward (DPLoss.backward: ghost runs both passes here)"),
    ("ghost.py", "backward", "  ghost.backward (norm pass + reweighted second pass)"),
    ("engine/passes.py", "end", "end-of-backward callback (all of the clipping work below)"),
    ("engine/passes.py", "clip_records", "  clip_records (norm modes)"),
    ("bk.py", "record_norms", "    bk.record_norms"),
    ("plan.py", "call", "      LayerPlan.call (every sampler call, norms and sums)"),
    ("linear.py", "norm_sampler", "      linear.norm_sampler"),
    ("__init__.py", "weight_sq_norms", "        layers.weight_sq_norms"),
    ("embedding.py", "norm_sampler", "      embedding.norm_sampler"),
    ("normalization.py", "norm_sampler", "      normalization.norm_sampler"),
    ("conv.py", "norm_sampler", "      conv.norm_sampler"),
    ("bk.py", "_inner", "      bk._inner (tied-weight cross terms)"),
    ("_capture.py", "compute", "      Capturer.compute (materialised per-example grads)"),
    ("bk.py", "record_sums", "    bk.record_sums"),
    ("bk.py", "_weighted_sum", "      bk._weighted_sum"),
    ("linear.py", "grad_sampler", "        linear.grad_sampler"),
    ("embedding.py", "grad_sampler", "        embedding.grad_sampler"),
    ("normalization.py", "grad_sampler", "        normalization.grad_sampler"),
    ("conv.py", "grad_sampler", "        conv.grad_sampler"),
    ("optimizer.py", "clip_factors", "    StepAccumulator.clip_factors"),
    ("optimizer.py", "add_backward", "  StepAccumulator.add_backward (hooks mode)"),
    ("_capture.py", "_on_forward", "forward hooks (_on_forward)"),
    ("_capture.py", "_detach_params", "forward pre-hooks (_detach_params)"),
    ("_capture.py", "_on_output_grad", "output-gradient hooks (_on_output_grad)"),
    ("_capture.py", "_backward_end", "Capturer._backward_end"),
    ("engine/controller.py", "_pre_step", "optimizer pre-step hook (_pre_step: noise, scale)"),
    ("optimizer.py", "privatize", "  privatize (noise)"),
    ("criterion.py", "forward", "DPCriterion.forward (per-example loss)"),
]


def setup(name: str, mode: str, batch: int, seq: int, cfg: GPTConfig | None = None):
    """A ready training step of model ``name`` (or a GPT of ``cfg``) in ``mode``; times it into a list if given."""
    torch.manual_seed(0)
    if cfg is not None:
        model, kind = GPT(cfg), "gpt"
        gen = torch.Generator().manual_seed(0)
        batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous())
                   for t in (torch.randint(0, cfg.vocab, (batch, seq + 1), generator=gen) for _ in range(4))]
    else:
        model, kind = build(name, seq)
        batches = make_batches(name, batch, seq, n=4, device=torch.device("cpu"))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    if mode != "nonprivate":
        import dpkit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=None, sample_rate=1 / 64,
                                         expected_batch_size=batch,
                                         noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                         criterion=nn.CrossEntropyLoss(), noise_seed=0)
        criterion = private.criterion

    state = {"i": 0}

    def step(times: list | None = None):
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        c0 = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(loss_input(kind, model(x)), y)
        c1 = time.process_time()
        loss.backward()
        c2 = time.process_time()
        optimizer.step()
        c3 = time.process_time()
        if times is not None:
            times.append((c1 - c0, c2 - c1, c3 - c2))

    return step


def section_phases(name, modes, batch, seq, steps):
    print(f"\n## phases: CPU ms per step (median of {steps}), {name} batch {batch}" + (f" seq {seq}" if seq else ""))
    print("| mode | forward | backward | step | total | × non-private |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for mode in ["nonprivate", *modes]:
        step = setup(name, mode, batch, seq)
        for _ in range(3):
            step()
        times: list = []
        for _ in range(steps):
            step(times)
        f, b, o = (1e3 * statistics.median(t[i] for t in times) for i in range(3))
        total = 1e3 * statistics.median(sum(t) for t in times)
        base = base or total
        print(f"| {mode} | {f:.1f} | {b:.1f} | {o:.1f} | {total:.1f} | {total / base:.2f}× |")


def section_python(name, modes, batch, seq, steps):
    for mode in modes:
        step = setup(name, mode, batch, seq)
        for _ in range(3):
            step()
        prof = cProfile.Profile(timer=time.process_time)
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        stats = pstats.Stats(prof)
        total = sum(v[3] for k, v in stats.stats.items() if k[2] == "step" and k[0].endswith("profile_modes.py"))
        print(f"\n## python ({mode}): cProfile cumulative CPU ms per step, {name}; whole step {1e3 * total / steps:.1f} "
              "ms under cProfile (its own overhead inflates Python-heavy code)")
        print("| function | calls/step | cum ms/step |\n| --- | ---: | ---: |")
        for suffix, func, label in WATCH:
            hits = [(v[1], v[3]) for k, v in stats.stats.items()
                    if k[2] == func and k[0].endswith(suffix) and "dpkit" in k[0]]
            if not hits:
                continue
            calls, cum = sum(h[0] for h in hits), sum(h[1] for h in hits)
            print(f"| {label} | {calls / steps:.0f} | {1e3 * cum / steps:.1f} |")
        # the torch.autograd entry points (first and second backward passes)
        for func in ("grad", "backward"):
            hits = [(v[1], v[3]) for k, v in stats.stats.items()
                    if k[2] == func and k[0].endswith("autograd/__init__.py")]
            if hits:
                label = "norm pass" if func == "grad" else "backward pass(es)"
                print(f"| torch.autograd.{func}() – {label}, including the hooks and callbacks it runs | "
                      f"{sum(h[0] for h in hits) / steps:.0f} | {1e3 * sum(h[1] for h in hits) / steps:.1f} |")


def section_ops(name, modes, batch, seq, steps, top):
    from torch.profiler import ProfilerActivity, profile

    for mode in ["nonprivate", *modes]:
        step = setup(name, mode, batch, seq)
        for _ in range(3):
            step()
        c0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        wall = (time.perf_counter() - c0) / steps  # wall clock, as the profiler's op times are
        events = prof.key_averages()
        ops = [e for e in events if e.key.startswith("aten::")]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        in_ops = sum(e.self_cpu_time_total for e in ops) / 1e3 / steps
        print(f"\n## ops ({mode}): torch.profiler, {name}; {1e3 * wall:.1f} wall ms/step under the profiler, of which "
              f"{in_ops:.1f} ms self time in aten ops and {1e3 * wall - in_ops:.1f} ms outside them "
              f"(Python, hooks, dispatch); {sum(e.count for e in ops) / steps:.0f} aten op calls/step")
        print("| op | calls/step | self CPU ms/step |\n| --- | ---: | ---: |")
        for e in ops[:top]:
            print(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / 1e3 / steps:.2f} |")


def section_copies(name, modes, batch, seq, top):
    """The largest tensor copies of one step, by the op that made them and the copied shape."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    for mode in ["nonprivate", *modes]:
        step = setup(name, mode, batch, seq)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        count, took = collections.Counter(), collections.Counter()
        for e in prof.events():
            if e.name != "aten::copy_":
                continue
            chain, parent = [], e.cpu_parent
            while parent is not None and len(chain) < 2:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = (" < ".join(chain) or "(direct)", tuple(e.input_shapes[0]) if e.input_shapes else ())
            count[key] += 1
            took[key] += e.cpu_time_total
        print(f"\n## copies ({mode}): aten::copy_ in one step of {name}, largest first "
              f"({sum(count.values())} copies, {sum(took.values()) / 1e3:.1f} ms wall in all)")
        print("| made by | shape | copies | ms |\n| --- | --- | ---: | ---: |")
        for key, t in took.most_common(top):
            print(f"| {key[0]} | {list(key[1])} | {count[key]} | {t / 1e3:.2f} |")


def section_opcount(name, modes, batch, seq, top):
    """Aten op calls of one step attributed to the innermost dpkit function on the Python stack."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    for mode in ["nonprivate", *modes]:
        step = setup(name, mode, batch, seq)
        for _ in range(3):
            step()
        count: collections.Counter = collections.Counter()
        kinds: dict = collections.defaultdict(collections.Counter)

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None, count=count, kinds=kinds):
                frame, where = sys._getframe(1), "(autograd engine / model / loss / optimizer)"
                while frame is not None:
                    path = frame.f_code.co_filename.replace("\\", "/")
                    if "/dpkit/" in path:
                        where = f"{path.rsplit('/dpkit/', 1)[1]}:{frame.f_code.co_name}"
                        break
                    frame = frame.f_back
                count[where] += 1
                kinds[where][func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        with Count():
            step()
        print(f"\n## opcount ({mode}): {sum(count.values())} aten op calls in one step of {name}, by dpkit function")
        print("| function | ops | most frequent |\n| --- | ---: | --- |")
        for where, n in count.most_common(top):
            common = ", ".join(f"{k} {v}" for k, v in kinds[where].most_common(4))
            print(f"| {where} | {n} | {common} |")


def _step_ms(step, steps: int, warmup: int = 5) -> float:
    return _interleaved_ms([step], steps, warmup)[0]


def _interleaved_ms(steps_of: list, steps: int, warmup: int = 5, phases: bool = False) -> list:
    """Median CPU ms per step of each ready step function (or, with ``phases``, its forward, backward and step),
    run round-robin so that a change in the machine's load falls on all of them alike."""
    for _ in range(warmup):
        for step in steps_of:
            step()
    times: list[list] = [[] for _ in steps_of]
    for _ in range(steps):
        for step, t in zip(steps_of, times):
            step(t)
    if phases:
        return [[1e3 * statistics.median(x[i] for x in t) for i in range(3)] for t in times]
    return [1e3 * statistics.median(sum(x) for x in t) for t in times]


def section_overhead(name, modes, steps):
    """Fixed per-step cost: tiny tensors, so what is left is hooks, Python and op dispatch."""
    modes = ["nonprivate", *dict.fromkeys(["hooks", *modes])]
    kind = SPECS[name][0]
    batch, seq = 2, (4 if kind == "gpt" else 0)
    print(f"\n## overhead: {name} at batch {batch}" + (f" seq {seq}" if seq else "")
          + f" (tensor work negligible), CPU ms per step (median of {steps})")
    print("| mode | ms/step | extra over non-private |\n| --- | ---: | ---: |")
    totals = _interleaved_ms([setup(name, mode, batch, seq) for mode in modes], steps)
    for mode, total in zip(modes, totals):
        print(f"| {mode} | {total:.2f} | +{total - totals[0]:.2f} |")
    if kind != "gpt":
        return
    # How the fixed cost grows with depth: thin GPTs (d=64, vocab 256) of 2 and 12 blocks, batch 2 x 4 tokens.
    print(f"\nFixed cost against depth: GPT d=64, 2 heads, vocab 256, batch 2 x 4 tokens; CPU ms per step "
          f"(median of {steps}); captured layers = 6 per block + 4")
    print("| mode | 2 blocks | 12 blocks | per block | per captured layer |\n| --- | ---: | ---: | ---: | ---: |")
    ready = [setup(name, mode, 2, 4, GPTConfig(n, 64, 2, 256, 16)) for mode in modes for n in (2, 12)]
    ms = iter(_interleaved_ms(ready, steps, phases=True))
    split = {mode: [next(ms), next(ms)] for mode in modes}
    rows = {mode: [sum(two), sum(twelve)] for mode, (two, twelve) in split.items()}
    base2, base12 = rows["nonprivate"]
    for mode, (t2, t12) in rows.items():
        extra = (t12 - base12) - (t2 - base2)
        note = "" if mode == "nonprivate" else f" (+{extra / 10:.2f} over non-private)"
        print(f"| {mode} | {t2:.1f} | {t12:.1f} | {(t12 - t2) / 10:.2f}{note} | "
              f"{'' if mode == 'nonprivate' else f'{extra / 60:.2f}'} |")
    print("\nThe 12-block step by phase: CPU ms above non-private, and per captured layer (76)")
    print("| mode | forward | backward | step | per layer |\n| --- | ---: | ---: | ---: | ---: |")
    base = split["nonprivate"][1]
    for mode in modes[1:]:
        extra = [t - b for t, b in zip(split[mode][1], base)]
        print(f"| {mode} | +{extra[0]:.2f} | +{extra[1]:.2f} | +{extra[2]:.2f} | {sum(extra) / 76:.2f} |")
    # what that fixed cost is made of: cProfile of the 12-block bk step, by own (not cumulative) time
    if "bk" in modes:
        step = setup(name, "bk", 2, 4, GPTConfig(12, 64, 2, 256, 16))
        _step_ms(step, 1)
        prof = cProfile.Profile(timer=time.process_time)
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        stats = pstats.Stats(prof).stats
        total = sum(v[2] for v in stats.values())
        print(f"\ncProfile of the 12-block bk step: {1e3 * total / steps:.1f} ms/step under cProfile; top functions "
              "by own time, and opt_einsum.contract's cumulative share")
        print("| function | calls/step | own ms/step | cumulative ms/step |\n| --- | ---: | ---: | ---: |")
        for (path, line, func), v in sorted(stats.items(), key=lambda kv: -kv[1][2])[:10]:
            where = f"{Path(path).parent.name}/{Path(path).name}:{func}" if path != "~" else func
            print(f"| {where} | {v[1] / steps:.0f} | {1e3 * v[2] / steps:.2f} | {1e3 * v[3] / steps:.2f} |")
        contract = [v for (path, _, func), v in stats.items() if func == "contract" and "opt_einsum" in path]
        if contract:
            cum = sum(v[3] for v in contract)
            print(f"\nopt_einsum.contract: {sum(v[1] for v in contract) / steps:.0f} calls/step, "
                  f"{1e3 * cum / steps:.1f} ms/step cumulative = {100 * cum / total:.0f}% of the step under cProfile")


def section_threads(name: str, batch: int, seq: int) -> None:
    """How one and two threads split the kernels of a step: the model's products, dpkit's norm products and
    elementwise work, and the noise draw. Wall time, each kernel alternating between 1 and 2 threads."""
    if SPECS[name][0] != "gpt":
        return
    d = SPECS[name][1]["d"]
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(batch, seq, d), torch.randn(batch, seq, 4 * d)
    w, noise = torch.randn(4 * d, d), torch.empty(sum(p.numel() for p in build(name, seq)[0].parameters()))
    kernels = {
        f"model: x·Wᵀ [{batch * seq}×{d}]·[{d}×{4 * d}]": lambda: a.reshape(-1, d) @ w.T,
        "model: weight gradient gᵀ·x": lambda: g.reshape(-1, 4 * d).T @ a.reshape(-1, d),
        f"dpkit: Gram a·aᵀ per example [{batch}, {seq}, {seq}]": lambda: torch.bmm(a, a.transpose(1, 2)),
        "dpkit: Gram g·gᵀ per example": lambda: torch.bmm(g, g.transpose(1, 2)),
        "dpkit: ghost norm (Gram ∘ Gram).sum": lambda: (torch.bmm(a, a.transpose(1, 2)) * 2).sum((1, 2)),
        f"dpkit: a row-weighted copy [{batch}, {seq}, {d}]": lambda: a * 2.0,
        f"dpkit: the noise draw, {noise.numel():,} normals": lambda: noise.normal_(0, 1, generator=gen),
    }
    print(f"\n## threads: {name} kernels at batch {batch} × {seq}, wall ms (best of 3 alternations of 20 calls)")
    print("| kernel | 1 thread | 2 threads | speed-up |\n| --- | ---: | ---: | ---: |")
    saved = torch.get_num_threads()
    for label, fn in kernels.items():
        best = {1: float("inf"), 2: float("inf")}
        for _ in range(3):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                best[threads] = min(best[threads], 1e3 * _wall(fn, 20))
        print(f"| {label} | {best[1]:.3f} | {best[2]:.3f} | {best[1] / best[2]:.2f}× |")
    torch.set_num_threads(saved)


def _wall(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def _time(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        samples.append(time.process_time() - c0)
    return 1e3 * statistics.median(samples)


def _output_shapes(name: str, batch: int, seq: int) -> list[tuple[str, nn.Module, torch.Size, torch.Size]]:
    """(name, module, input shape, output shape) of every module that owns parameters, in call order."""
    torch.manual_seed(0)
    model, _ = build(name, seq)
    x, _ = make_batches(name, batch, seq, n=1, device=torch.device("cpu"))[0]
    seen = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((names[m], m, i[0].shape, o.shape)))
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


# -- single computations timed by ``kernels``: written here, at the shapes of the model's layers
def _scale_all(grads, c):
    return [g * c for g in grads]


def _weight_all(grads, w):
    return [g * w.reshape(-1, *[1] * (g.dim() - 1)) for g in grads]


def _ghost_sq_norms(a, g):
    """Σ_{t,s} (a_t·a_s)(g_t·g_s) per example: two T×T Gram matrices."""
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def _instantiated_sq_norms(a, g):
    """‖Σ_t g_t a_tᵀ‖² per example: the [out, in] gradient itself."""
    return torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))


def _tied_cross(idx, g_emb, a_head, g_head):
    """⟨G_embedding, G_head⟩ per example without forming either: Σ_{t,s} g_head[s, idx_t] (g_emb_t·a_head_s)."""
    T = idx.shape[1]
    right = torch.bmm(g_emb, a_head.transpose(1, 2))
    left = g_head.gather(2, idx.unsqueeze(1).expand(-1, T, -1)).transpose(1, 2)
    return (left * right).sum((1, 2))


def _tied_materialised(idx, g_emb, a_head, g_head):
    B, _, d = g_emb.shape
    emb = torch.zeros(B, g_head.shape[2], d)
    emb.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), g_emb)
    return (emb + torch.bmm(g_head.transpose(1, 2), a_head)).square().sum((1, 2))


def _unfold(m, x):
    return torch.nn.functional.unfold(x, m.kernel_size, padding=m.padding, stride=m.stride)  # [N, C·k², L]


def _conv_sum_unfold(m, x, g):
    """Σ_i ∇W_i by patches: one Linear over every receptive field ([O, C·k²])."""
    return torch.bmm(g.flatten(2), _unfold(m, x).transpose(1, 2)).sum(0)


def _conv_sum_kernel(m, x, g):
    """Σ_i ∇W_i by the convolution's weight-gradient kernel (what autograd runs)."""
    return torch.nn.grad.conv2d_weight(x, m.weight.shape, g, stride=m.stride, padding=m.padding)


def _conv_norms_unfold(m, x, g):
    return torch.bmm(g.flatten(2), _unfold(m, x).transpose(1, 2)).square().sum((1, 2))


def _conv_norms_grouped(m, x, g):
    """Per-example ∇W_i by the weight-gradient kernel with one group per example, then their norms."""
    N, C = x.shape[:2]
    per = torch.nn.grad.conv2d_weight(x.reshape(1, N * C, *x.shape[2:]), (N * m.out_channels, C, *m.kernel_size),
                                      g.reshape(1, -1, *g.shape[2:]), stride=m.stride, padding=m.padding, groups=N)
    return per.reshape(N, -1).square().sum(1)


def _same(x, y, what: str) -> None:
    """A self-check that two ways compute the same thing (never a check on time), to float32 rounding of sums
    over many terms: relative to the largest entry."""
    if not torch.allclose(x, y, rtol=1e-3, atol=1e-4 * float(y.abs().max())):
        raise RuntimeError(f"kernels: the two ways to {what} disagree; the timings would compare different things")


def section_kernels(name, batch, seq, reps):
    """Targeted measurements of single computations, written here (not dpkit's code) at the model's shapes."""
    from opt_einsum import contract

    kind, kw, _, _ = SPECS[name]
    gen = torch.Generator().manual_seed(0)
    shapes = _output_shapes(name, batch, seq)

    # 1. the elementwise passes over every captured output gradient
    grads = [torch.randn(o, generator=gen) for _, _, _, o in shapes]
    w = torch.rand(batch, generator=gen)
    one_pass = _time(partial(_scale_all, grads, float(batch)), reps)
    weighted = _time(partial(_weight_all, grads, w), reps)
    numel = sum(g.numel() for g in grads)
    print(f"\n## kernels: {name}, batch {batch}" + (f", seq {seq}" if kind == "gpt" else "")
          + f" (CPU ms, median of {reps})")
    print(f"\nOne elementwise pass over all {len(grads)} captured output gradients ({numel / 1e6:.1f}M floats): "
          f"scalar multiply {one_pass:.2f} ms, per-row weight multiply {weighted:.2f} ms.")

    # 2. opt_einsum.contract against the torch calls that do the same, at a tiny and at the model's shape
    for B_, T_, d_ in ((2, 4, 64), *([(batch, seq, kw["d"])] if kind == "gpt" else [])):
        a = torch.randn(B_, T_, d_, generator=gen)
        g = torch.randn(B_, T_, 3 * d_, generator=gen)
        tc = _time(partial(contract, "nto,nti->noi", g, a), reps * 10)
        tb = _time(partial(torch.bmm, g.transpose(1, 2), a), reps * 10)
        te = _time(partial(torch.einsum, "nto,nti->noi", g, a), reps * 10)
        print(f"\nPer-example [out, in] gradient at B={B_}, T={T_}, in={d_}, out={3 * d_}: "
              f"opt_einsum.contract {1e3 * tc:.0f} µs, torch.einsum {1e3 * te:.0f} µs, torch.bmm {1e3 * tb:.0f} µs.")

    if kind == "gpt":
        d, V, T, B = kw["d"], kw["vocab"], seq, batch
        # 3. ghost against instantiated norms, per Linear shape; the rule is T·(p+d) < p·d
        print(f"\nOne Linear weight's per-example squared norms, B={B}, T={T}:")
        print("| layer (in→out) | rule picks | ghost (2 Gram T×T) | instantiated ([out,in]) | faster |\n"
              "| --- | --- | ---: | ---: | --- |")
        done = set()
        for lname, m, _, _ in shapes:
            if not isinstance(m, nn.Linear) or (m.in_features, m.out_features) in done:
                continue
            din, dout = m.in_features, m.out_features
            done.add((din, dout))
            a = torch.randn(B, T, din, generator=gen)
            g = torch.randn(B, T, dout, generator=gen)
            _same(_ghost_sq_norms(a, g), _instantiated_sq_norms(a, g), "a Linear's norms")
            rule = "ghost" if T * (dout + din) < dout * din else "instantiated"
            tg, ti = _time(partial(_ghost_sq_norms, a, g), reps), _time(partial(_instantiated_sq_norms, a, g), reps)
            print(f"| {lname.split('.')[-1]} ({din}→{dout}) | {rule} | {tg:.2f} | {ti:.2f} | "
                  f"{'ghost' if tg < ti else 'instantiated'} |")
        # 4. tied LM head: the cross term <G_emb, G_head> per example, against materialising [B, V, d]
        tied = (torch.randint(0, V, (B, T), generator=gen), torch.randn(B, T, d, generator=gen),
                torch.randn(B, T, d, generator=gen), torch.randn(B, T, V, generator=gen))
        tc, tm = _time(partial(_tied_cross, *tied), reps), _time(partial(_tied_materialised, *tied), reps)
        print(f"\nTied embedding/LM head (V={V}, d={d}): the cross term {tc:.2f} ms against materialising the summed "
              f"[B, V, d] per-example gradient {tm:.2f} ms ({B * V * d * 4 / 2**20:.0f} MiB).")
        return

    # conv: the clipped sum Σ_i f_i ∇W_i by unfolded patches (one Linear over every receptive field, as a
    # grad sampler called with all rows as one example does) against the convolution's own weight-gradient
    # kernel on the reweighted output gradient (torch.nn.grad.conv2d_weight, what autograd runs)
    print("\nA Conv2d's clipped sum Σ_i f_i ∇W_i (the bk sum) two ways; its per-example squared norms two ways "
          "(unfolded patches as the built-in sampler does, or the weight-grad kernel with one group per example); "
          "and the unfold alone with its size:")
    print("| layer | in → out, H×W | sum: unfold + matmul | sum: weight-grad kernel | norms: unfold + bmm "
          "| norms: grouped weight-grad | unfold alone (MiB) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for lname, m, ishape, oshape in shapes:
        if not isinstance(m, nn.Conv2d):
            continue
        x = torch.randn(ishape, generator=gen)
        g = torch.randn(oshape, generator=gen) * w.reshape(-1, 1, 1, 1)
        _same(_conv_sum_kernel(m, x, g).flatten(1), _conv_sum_unfold(m, x, g), "a conv's clipped sum")
        _same(_conv_norms_unfold(m, x, g), _conv_norms_grouped(m, x, g), "a conv's per-example norms")
        size = _unfold(m, x).numel() * 4 / 2**20
        times = [_time(partial(fn, m, x, g), reps) for fn in
                 (_conv_sum_unfold, _conv_sum_kernel, _conv_norms_unfold, _conv_norms_grouped)]
        print(f"| {lname} | {m.in_channels} → {m.out_channels}, {ishape[-2]}×{ishape[-1]} | "
              + " | ".join(f"{t:.2f}" for t in times) + f" | {_time(partial(_unfold, m, x), reps):.2f} ({size:.0f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-cpu", choices=sorted(SPECS))
    parser.add_argument("--modes", default="bk,auto,ghost")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--sections", default="phases,python,ops,copies,opcount,overhead,kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, _, batch, seq = SPECS[args.model]
    batch, seq = args.batch or batch, args.seq or seq
    modes = [m for m in args.modes.split(",") if m]
    sections = args.sections.split(",")
    import dpkit

    print(f"# profile of {args.model}, modes {modes}, torch {torch.__version__}, {args.threads} thread(s), "
          f"dpkit from {Path(dpkit.__file__).parent}")
    if "phases" in sections:
        section_phases(args.model, modes, batch, seq, args.steps)
    if "python" in sections:
        section_python(args.model, modes, batch, seq, args.steps)
    if "ops" in sections:
        section_ops(args.model, modes, batch, seq, args.steps, args.top)
    if "copies" in sections:
        section_copies(args.model, modes, batch, seq, args.top)
    if "opcount" in sections:
        section_opcount(args.model, modes, batch, seq, args.top)
    if "overhead" in sections:
        section_overhead(args.model, modes, 3 * args.steps)
    if "kernels" in sections:
        section_kernels(args.model, batch, seq, 3 * args.steps)
    if "threads" in sections:
        section_threads(args.model, batch, seq)


if __name__ == "__main__":
    main()
