"""Distributed step time and gradient bytes: non-private DDP and FSDP2 against dpkit on the same model and data.

Spawns ``--world`` ranks (gloo on 127.0.0.1, one torch thread each, or NCCL on one GPU per rank with ``--cuda``),
trains the GPT-style model of ``bench_models.py`` with each setting in turn, alternating, and reports per step:
the median time, its ratio to the non-private run of the same wrapper, and the bytes of gradient communication
(all-reduce and reduce-scatter payloads; FSDP2's parameter all-gathers are the same with and without dpkit and
are counted apart). DDP's own reducer goes through a comm hook that calls ``torch.distributed.all_reduce``, so
that one wrapper of ``torch.distributed``'s functions counts DDP's, FSDP2's and dpkit's collectives alike. Peak memory is allocated tensor bytes (CUDA only).

    python contrib/benchmarks/bench_distributed.py                  # 2 CPU ranks, GPT 2x128, batch 16x64
    python contrib/benchmarks/bench_distributed.py --world 3 --steps 8
"""
from __future__ import annotations

import argparse
import collections
import datetime
import inspect
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import GPT, GPTConfig  # noqa: E402

SETTINGS = [("ddp", None), ("ddp", "auto"), ("ddp", "bk"), ("ddp", "ghost"),
            ("fsdp", None), ("fsdp", "auto"), ("fsdp", "bk"), ("fsdp", "ghost")]
COUNTED = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor")


def _count_collectives(bytes_by_kind: collections.Counter) -> None:
    """Wrap torch.distributed's collectives (as FSDP2 and dpkit call them) to add up their payloads."""
    for name in COUNTED:
        original = getattr(dist, name, None)
        if original is None:
            continue

        signature = inspect.signature(original)
        payload = list(signature.parameters)[0 if name == "all_reduce" else 1]  # the tensor sent

        def counted(*args, _original=original, _name=name, _sig=signature, _payload=payload, **kwargs):
            tensor = _sig.bind(*args, **kwargs).arguments[_payload]
            if isinstance(tensor, torch.Tensor):
                bytes_by_kind["gather" if _name == "all_gather_into_tensor" else "grad"] += (
                    tensor.numel() * tensor.element_size())
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _ddp_hook(state, bucket):
    """DDP's own all-reduce, through torch.distributed's Python function, so that the wrapper counts it."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook(state, bucket)


def _model(wrap: str, args, device) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.layers, d=args.width, heads=4, vocab=256, ctx=args.seq)).to(device)
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def _run(wrap: str, mode: str | None, args, device, counter: collections.Counter) -> tuple[list[float], int, int]:
    import dpkit

    model = _model(wrap, args, device)
    if wrap == "ddp":
        model.register_comm_hook(None, _ddp_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    private = None
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=None, noise_multiplier=1.0,
                                         max_grad_norm=1.0, grad_sample_mode=mode, criterion=criterion,
                                         sample_rate=0.01, expected_batch_size=args.batch * args.world)
        criterion = private.criterion
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(0, 256, (args.batch, args.seq), generator=g).to(device)
    times, grad_bytes, peak = [], 0, 0
    for step in range(args.warmup + args.steps):
        counter.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(x)
        criterion(logits.transpose(1, 2), x).backward()  # one loss per sequence: [B, V, T] against [B, T]
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            grad_bytes = counter["grad"]
    if private is not None:
        private.detach()
    return times, grad_bytes, peak


def _rank(rank: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.cuda else torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(minutes=5))
    counter: collections.Counter = collections.Counter()
    _count_collectives(counter)
    results = {s: ([], 0, 0) for s in SETTINGS}
    for _ in range(args.rounds):  # alternate the settings, so that load drifts hit them all alike
        for wrap, mode in SETTINGS:
            times, grad_bytes, peak = _run(wrap, mode, args, device, counter)
            old = results[(wrap, mode)]
            results[(wrap, mode)] = (old[0] + times, grad_bytes, max(old[2], peak))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="examples per rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/bench_distributed_{os.getpid()}.pt"
    mp.start_processes(_rank, args=(args, port, out), nprocs=args.world, start_method="spawn")
    results = torch.load(out)
    os.remove(out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = "cuda" if args.cuda else f"cpu, {args.threads} thread(s) per rank"
    lines = [f"# Distributed step: {args.world} ranks ({device}), GPT {args.layers}x{args.width}, "
             f"batch {args.batch}x{args.seq} per rank, median of {args.rounds}x{args.steps} steps, commit {commit}",
             "", "| wrapper | dpkit mode | step (ms) | ratio | gradient bytes / step | bytes ratio | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for wrap, mode in SETTINGS:
        times, grad_bytes, peak = results[(wrap, mode)]
        base_times, base_bytes, _ = results[(wrap, None)]
        median, base = statistics.median(times), statistics.median(base_times)
        lines.append(f"| {wrap} | {mode or 'non-private'} | {1000 * median:.1f} | {median / base:.2f}x | "
                     f"{grad_bytes:,} | {grad_bytes / base_bytes if base_bytes else float('nan'):.3f} | "
                     f"{peak / 2**20 if peak else float('nan'):.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
