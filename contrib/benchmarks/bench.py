#!/usr/bin/env python
"""Speed and memory of dpkit's modes against non-private training (and, optionally, Opacus).

One run trains the same model on the same synthetic batches once per configuration: non-private, then dpkit
in each ``--modes`` mode (and Opacus's hooks and ghost modes with ``--opacus``). Every configuration runs in a
fresh subprocess, so that one configuration's allocator state, caches and peak memory do not leak into the
next. With ``--repeat N`` the configurations are run round-robin N times, so that a slow spell on a shared
machine hits every configuration alike, and the table gives the median over repetitions.

Per configuration it reports

* ms/step: the median, over the timed steps after ``--warmup`` untimed ones, of one full training step
  (``zero_grad``, forward, loss, ``backward``, ``optimizer.step``), and the same split into forward
  (model + loss), backward and step;
* peak memory in allocated tensor bytes, so that the CPU figure predicts the GPU's: on CUDA
  ``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the peak of live tensor bytes counted by
  ``tensor_memory.TensorMemory`` over ``MEMORY_STEPS`` further steps (the count slows ops, so those steps are
  not timed). Both include parameters, gradients, optimizer state and the batches. The process's resident
  set is not reported: the torch libraries and glibc's caches dominate it and no GPU has them;
* the ratios of both to non-private training (memory: of the total peak).

Every DP configuration uses ``noise_multiplier=1.0``, ``max_grad_norm=1.0``, plain SGD and the loss of
``nn.CrossEntropyLoss`` through ``private.criterion`` (so ghost mode works), with flat clipping unless
``--clipping`` asks for more (each dpkit mode then runs once per clipping; Opacus runs flat). dpkit is driven
through its public API only. Batches have a fixed size (no Poisson sampling) so that every step does the same
work. ``--save DIR`` writes the printed table to ``DIR/<workload>.md``, one file per workload, so a new run
replaces the last one of the same workload (git keeps the history).

Examples::

    python contrib/benchmarks/bench.py --model cpu-small --repeat 3
    python contrib/benchmarks/bench.py --model cpu-small --modes auto,bk --clipping flat,per_layer
    python contrib/benchmarks/bench.py --model gpt2-small --device cuda --batch 16 --seq 256 --opacus
    python contrib/benchmarks/bench.py --model gpt2-small --device cuda --batch 8 --seq 1024 --opacus
    python contrib/benchmarks/bench.py --model convnet --device cuda --batch 256 --opacus

This is a benchmark, not a test: it asserts nothing about time or memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DPKIT_MODES = ("hooks", "functorch", "ew", "ghost", "bk", "auto")
OPACUS_MODES = ("opacus-hooks", "opacus-ghost")
DEFAULT_MODES = ",".join(DPKIT_MODES)
CLIPPINGS = ("flat", "per_layer")
MEMORY_STEPS = 1  # CPU: steady-state steps counted by TensorMemory after the timed ones


# --------------------------------------------------------------------------- one configuration (worker)
def run_config(cfg: dict) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from bench_models import build, loss_input, make_batches
    from tensor_memory import TensorMemory

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    name, mode, batch, seq = cfg["model"], cfg["mode"], cfg["batch"], cfg["seq"]
    clipping = cfg.get("clipping", "flat")
    torch.manual_seed(0)
    model, kind = build(name, seq, untie=cfg.get("untie", False))
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(name, batch, seq, n=4, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    base_loss = nn.CrossEntropyLoss()
    criterion = base_loss
    runner = model
    sample_rate = 1.0 / 64  # only feeds the accountant; batches are fixed-size
    opacus_version = None

    if mode in DPKIT_MODES:
        import warnings

        import dpkit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = dpkit.make_private(
                module=model, optimizer=optimizer, data_loader=None, sample_rate=sample_rate, expected_batch_size=batch,
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, clipping=clipping,
                criterion=nn.CrossEntropyLoss(), noise_seed=0)
        criterion = private.criterion
    elif mode in OPACUS_MODES and clipping == "flat":
        import warnings

        import opacus
        from torch.utils.data import DataLoader, TensorDataset

        opacus_version = opacus.__version__
        xs = torch.cat([x for x, _ in batches]).cpu()
        ys = torch.cat([y for _, y in batches]).cpu()
        loader = DataLoader(TensorDataset(xs, ys), batch_size=batch)
        engine = opacus.PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "opacus-ghost":
                runner, optimizer, criterion, _ = engine.make_private(
                    module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost")
            else:
                runner, optimizer, _ = engine.make_private(
                    module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                    max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
    elif mode != "nonprivate" or clipping != "flat":
        raise SystemExit(f"unknown configuration {mode!r} with {clipping!r} clipping")

    def loss_of(logits, y):
        if mode == "opacus-ghost" and kind == "gpt":
            B, T, V = logits.shape  # Opacus's ghost criterion takes flat tokens and the [B, T] shape
            return criterion(logits.reshape(B * T, V), y.reshape(B * T), shape=(B, T))
        return criterion(loss_input(kind, logits), y)

    # bf16 autocast over the forward and the loss (the backward follows the forward's dtypes), as docs/mixed-precision.md
    # recommends; fp32 otherwise
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.get("autocast") == "bf16"
                else contextlib.nullcontext())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(x, y):
        sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_of(runner(x), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        sync()
        t3 = time.perf_counter()
        c3 = time.process_time()
        return t1 - t0, t2 - t1, t3 - t2, c3 - c0, float(loss.item())

    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    losses, times = [], []
    total = cfg["warmup"] + cfg["steps"]
    wall0 = time.perf_counter()
    for i in range(total):
        x, y = batches[i % len(batches)]
        fwd, bwd, opt, cpu_s, loss = step(x, y)
        losses.append(loss)
        if i >= cfg["warmup"]:
            times.append((fwd, bwd, opt, cpu_s))
    wall = time.perf_counter() - wall0

    if cuda:
        mem_peak, mem_how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        gc.collect()
        with TensorMemory() as counted:
            for i in range(total, total + MEMORY_STEPS):
                step(*batches[i % len(batches)])
        mem_peak, mem_how = counted.peak, f"peak live tensor bytes over {MEMORY_STEPS} step(s) (tensor_memory.py)"

    def med(values):
        return 1e3 * statistics.median(values)

    return {
        "model": model_label(cfg), "mode": label(mode, clipping), "batch": batch,
        "seq": seq if kind in ("gpt", "cls") and seq else None, "params": n_params,
        "device": str(device), "threads": torch.get_num_threads(), "untie": cfg.get("untie", False), "torch": torch.__version__,
        "opacus": opacus_version, "steps": cfg["steps"], "warmup": cfg["warmup"], "wall_s": wall,
        "ms_step": med([sum(t[:3]) for t in times]), "ms_min": 1e3 * min(sum(t[:3]) for t in times),
        "cpu_ms_step": med([t[3] for t in times]),
        "ms_fwd": med([t[0] for t in times]), "ms_bwd": med([t[1] for t in times]),
        "ms_opt": med([t[2] for t in times]),
        "mem_peak": mem_peak, "mem_how": mem_how,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


# --------------------------------------------------------------------------- driver
def model_label(cfg: dict) -> str:
    """A configuration's model name in the tables: the model, with the autocast dtype when there is one."""
    return cfg["model"] + (f"-{cfg['autocast']}" if cfg.get("autocast") else "")


def label(mode: str, clipping: str) -> str:
    """A configuration's row name: the mode, with the clipping when it is not flat."""
    return mode if clipping == "flat" else f"{mode}+{clipping}"


def spawn(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ)
    if not cfg.get("plugins"):
        # built-in layer plugins only: an installed package could override a built-in sampler (or fail to load)
        env["DPKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**cfg, "model": model_label(cfg), "mode": label(cfg["mode"], cfg["clipping"]),
                "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return {**cfg, "model": model_label(cfg), "mode": label(cfg["mode"], cfg["clipping"]),
            "error": (tail[-1] if tail else f"exit status {proc.returncode}")[:300]}


def aggregate(results: list[dict]) -> list[dict]:
    """Median over repetitions; ratios taken within each repetition (the same slice of machine time)."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        rows.setdefault((r["model"], r["mode"]), []).append(r)
    base: dict[tuple[str, int], dict] = {(r["model"], r.get("rep", 0)): r for r in results
                                         if r["mode"] == "nonprivate" and "error" not in r}
    out = []
    for (model, mode), reps in rows.items():
        ok = [r for r in reps if "error" not in r]
        if not ok:
            out.append({"model": model, "mode": mode, "error": reps[-1]["error"], "reps": 0})
            continue
        paired = [(r, base[(model, r.get("rep", 0))]) for r in ok if (model, r.get("rep", 0)) in base]

        def ratio(key, paired=paired):
            return statistics.median(r[key] / max(b[key], 1e-9) for r, b in paired) if paired else None

        def med(key, ok=ok):
            return statistics.median(r[key] for r in ok)

        out.append({
            "model": model, "mode": mode, "reps": len(ok), "batch": ok[0]["batch"], "seq": ok[0]["seq"],
            "params": ok[0]["params"], "device": ok[0]["device"], "threads": ok[0]["threads"],
            "untie": ok[0].get("untie", False),
            "ms_step": med("ms_step"), "ms_lo": min(r["ms_step"] for r in ok), "ms_hi": max(r["ms_step"] for r in ok),
            "cpu_ms_step": med("cpu_ms_step"), "ms_min": med("ms_min"),
            "ms_fwd": med("ms_fwd"), "ms_bwd": med("ms_bwd"), "ms_opt": med("ms_opt"),
            "mem_peak": med("mem_peak"), "mem_how": ok[0]["mem_how"],
            "time_ratio": ratio("ms_step"), "cpu_ratio": ratio("cpu_ms_step"), "min_ratio": ratio("ms_min"),
            "mem_ratio": ratio("mem_peak"), "loss_last": med("loss_last"), "error": None,
        })
    return out


def table(rows: list[dict]) -> str:
    def mib(b):
        return f"{b / 2**20:,.1f}"

    def x(v):
        return f"{v:.2f}×" if v is not None else "–"

    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        first = next((r for r in group if not r["error"]), None)
        if first is not None:
            shape = f"batch {first['batch']}" + (f", seq {first['seq']}" if first["seq"] else "")
            tie = ", LM head untied" if first["untie"] else ""
            lines.append(f"\n**{model}** ({first['params'] / 1e6:.2f}M params, {shape}{tie}, {first['device']}, "
                         f"{first['threads']} thread(s), {first['reps']} repetition(s); memory: {first['mem_how']})\n")
        lines.append("| mode | ms/step median (range over reps) | × time | CPU ms/step | × CPU | best ms/step | × best "
                     "| fwd / bwd / step ms | peak MiB | × memory |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in group:
            if r["error"]:
                lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | | | | |")
                continue
            spread = f" ({r['ms_lo']:.1f}–{r['ms_hi']:.1f})" if r["reps"] > 1 else ""
            lines.append(f"| {r['mode']} | {r['ms_step']:.1f}{spread} | {x(r['time_ratio'])} | "
                         f"{r['cpu_ms_step']:.1f} | {x(r['cpu_ratio'])} | {r['ms_min']:.1f} | {x(r['min_ratio'])} | "
                         f"{r['ms_fwd']:.1f} / {r['ms_bwd']:.1f} / {r['ms_opt']:.1f} | {mib(r['mem_peak'])} | "
                         f"{x(r['mem_ratio'])} |")
    return "\n".join(lines)


def dpkit_source() -> str:
    """Where dpkit is imported from, with the git commit when that is a checkout (``+dirty`` if edited)."""
    import importlib.util

    spec = importlib.util.find_spec("dpkit")
    if spec is None or spec.origin is None:
        return "<not installed>"
    pkg = Path(spec.origin).parent
    try:
        rev = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        if rev.returncode != 0:
            return str(pkg)
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        return f"{pkg} @ {rev.stdout.strip()}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return str(pkg)


def environment(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [f"CPU: {cpu} ({os.cpu_count()} logical cores visible)", f"torch {torch.__version__}",
             f"python {platform.python_version()}", f"dpkit from {dpkit_source()}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    try:
        import opacus

        parts.append(f"opacus {opacus.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def workload(args: argparse.Namespace, clippings: list[str]) -> str:
    """The saved file's name: the model group, an untied head, any shape given, more than one thread, a device
    other than the CPU, any clipping but flat alone (``cpu-small``, ``gpt2-cpu-32x64-2t``, ``gpt2-small-16x256-cuda``,
    ``cpu-small-flat+per_layer``)."""
    parts = [args.model] + (["untied"] if args.untie else [])
    if args.batch or args.seq:
        parts.append(f"{args.batch or 'default'}x{args.seq or 'default'}")
    if args.threads and args.threads > 1:
        parts.append(f"{args.threads}t")
    if args.device != "cpu":
        parts.append(args.device.split(":")[0])
    if args.autocast:
        parts.append(args.autocast)
    if clippings != ["flat"]:
        parts.append("+".join(clippings))
    return "-".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-small",
                        choices=["gpt2-small", "gpt2-tiny", "convnet", "cpu-small", "gpt2-cpu", "convnet-cpu", "hf-gpt2", "hf-bert"])
    parser.add_argument("--batch", type=int, help="examples per step (default: the model's)")
    parser.add_argument("--seq", type=int, help="tokens per example for the GPT models (default: the model's)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help=f"comma-separated dpkit modes (default {DEFAULT_MODES}); non-private always runs")
    parser.add_argument("--clipping", default="flat",
                        help="comma-separated dpkit clippings, each dpkit mode runs with each: flat (default), "
                             "per_layer; Opacus runs flat only")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--opacus", action="store_true", help="add Opacus hooks and ghost columns (if installed)")
    parser.add_argument("--repeat", type=int, default=1, help="round-robin repetitions of every configuration")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each worker (default: torch's)")
    parser.add_argument("--autocast", choices=["bf16"], help="run the forward and the loss under bf16 autocast")
    parser.add_argument("--untie", action="store_true",
                        help="GPT models: give the LM head its own weight instead of the token embedding's")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--plugins", action="store_true",
                        help="let dpkit load installed plugin packages (default: built-in plugins only)")
    parser.add_argument("--json", type=Path, help="also write every raw result and the summary here")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help="also write the printed table to DIR/<workload>.md, replacing that workload's last run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_config(json.loads(args.worker))), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from bench_models import GROUPS, SPECS

    modes = ["nonprivate"] + [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "nonprivate"]
    bad = [m for m in modes if m not in ("nonprivate", *DPKIT_MODES, *OPACUS_MODES)]
    if bad:
        parser.error(f"unknown mode(s) {bad}; choose from {DPKIT_MODES} (and {OPACUS_MODES}, or just --opacus)")
    clippings = [c.strip() for c in args.clipping.split(",") if c.strip()]
    if not clippings or any(c not in CLIPPINGS for c in clippings):
        parser.error(f"--clipping: choose from {CLIPPINGS}")
    runs = [("nonprivate", "flat")] + [(m, c) for m in modes[1:] for c in (clippings if m in DPKIT_MODES else ["flat"])]
    if args.opacus:
        try:
            import opacus  # noqa: F401  (the benchmark's optional comparison, never dpkit's)

            runs += [(m, "flat") for m in OPACUS_MODES if m not in modes]
        except ImportError:
            print("--opacus: opacus is not installed; skipping its columns", file=sys.stderr)

    configs = []
    for name in GROUPS[args.model]:
        _, _, batch, seq = SPECS[name]
        configs.append({"model": name, "batch": args.batch or batch, "seq": args.seq or seq,
                        "steps": args.steps, "warmup": args.warmup, "device": args.device,
                        "threads": args.threads, "untie": args.untie, "autocast": args.autocast,
                        # transformers' Conv1D has its samplers in the dpkit-transformers plugin
                        "plugins": args.plugins or SPECS[name][0] in ("hf", "hf-cls")})
    print(f"# {environment(args.device)}", file=sys.stderr)
    results = []
    t0 = time.perf_counter()
    for rep in range(args.repeat):
        for cfg in configs:
            for mode, clipping in runs:
                r = spawn({**cfg, "mode": mode, "clipping": clipping}, args.timeout)
                r["rep"] = rep
                results.append(r)
                msg = r.get("error") or f"{r['ms_step']:.1f} ms/step, peak {r['mem_peak'] / 2**20:.1f} MiB"
                print(f"[rep {rep + 1}/{args.repeat}] {cfg['model']:<12} {r['mode']:<18} {msg}", file=sys.stderr,
                      flush=True)
    summary = aggregate(results)
    report = "\n".join([f"# {environment(args.device)}",
                        f"# command: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}",
                        f"# total wall time {time.perf_counter() - t0:.0f} s", table(summary)])
    print(report)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / f"{workload(args, clippings)}.md").write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(args.device), "argv": sys.argv,
                                         "results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
