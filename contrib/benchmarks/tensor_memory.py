#!/usr/bin/env python
"""Peak live tensor bytes on the CPU: what ``torch.cuda.max_memory_allocated`` would say, without a GPU.

The process's resident set (RSS) does not predict GPU memory: it holds the torch libraries, glibc's caches and
freed pages that were not returned. This module counts tensor storage bytes instead::

    from tensor_memory import TensorMemory      # contrib/benchmarks on sys.path

    with TensorMemory() as mem:                 # counts every tensor alive now, then tracks
        train_step()                            # zero_grad, forward, loss, backward, optimizer.step
    print(mem.peak, mem.entry, mem.live)        # bytes: the peak, and the live total at entry and now
    print(mem.peak_op)                          # the aten op whose output reached the peak, e.g. "aten.mm.default"

``mem.reset_peak()`` sets the peak to the live total, like ``torch.cuda.reset_peak_memory_stats``. To see
where a peak comes from, read ``mem.peak_op``, or reset the peak between the phases of a step.

How it counts. At entry it finds every tensor reachable from Python (``gc.get_objects``: parameters,
buffers, gradients, optimizer state, batches) and counts each distinct storage once. While inside, a
``TorchDispatchMode`` sees every aten op, factory functions and the autograd engine's backward ops included,
and counts the storage of each output it has not seen (views share their base's storage, so they add
nothing; a storage resized by an ``out=`` or ``resize_`` op is recounted). A ``weakref.finalize`` on each
counted storage subtracts its bytes when the storage is really freed. PyTorch keeps a storage's Python object
alive as long as the C++ storage lives, so a storage held only by the autograd graph (activations saved for
backward), by a hook's record or by a flat buffer stays counted until the last holder lets go. The mode keeps
no reference to any tensor, so it does not change what it measures; it only slows the ops (Python per op),
so time steps outside it.

Against ``torch.cuda.max_memory_allocated`` (same quantity: the peak of bytes held by live tensors, not the
allocator's reserved cache), this count differs in three ways, all small for the models here:

* CUDA rounds each allocation up to a multiple of 512 bytes; this counts exact storage bytes.
* Scratch memory that a kernel allocates for itself (cuBLAS/cuDNN workspaces, a composite kernel's
  temporaries that never become an op's output) is in CUDA's count and not here. Outputs of every op,
  including those inside autograd's backward formulas, are here.
* At entry only tensors reachable from Python are found: enter with no autograd graph alive (at the start of
  a training step, as above). Storages resized from Python (``UntypedStorage.resize_``, as FSDP2 does) are
  not seen, nor are tensors without a storage of their own (sparse layouts, wrapper subclasses).

Run ``python contrib/benchmarks/tensor_memory.py --self-check`` to check the count on a chain of Linear layers
against a hand count and against the allocator events of ``torch.profiler`` (exits 1 on a mismatch).
"""
from __future__ import annotations

import argparse
import gc
import sys
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Context manager counting live tensor storage bytes and their peak (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}  # storage id (its C++ address) -> bytes counted
        self.live = 0
        self.peak = 0
        self.entry = 0
        self.peak_op: str | None = None  # None while the peak is the live total at entry (or at a reset)

    def _count(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses without storage of their own
            return
        if storage.device.type == "meta":
            return
        key, nbytes = storage._cdata, storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            weakref.finalize(storage, self._free, key).atexit = False
            old = 0
        elif old == nbytes:
            return
        self._sizes[key] = nbytes
        self.live += nbytes - old
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        """Set the peak to the bytes live now (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.live
        self.peak_op = None

    def __enter__(self) -> TensorMemory:
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # not isinstance: no lazy attribute is touched
                self._count(obj)
        self.entry = self.live
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        peak = self.peak
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        if self.peak > peak:
            self.peak_op = str(func)
        return out


# --------------------------------------------------------------------------- self-check
def _profiler_peak(run: Any) -> int:
    """Peak, above the start, of the CPU allocator's running total (torch.profiler's memory events) over run()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for ev in sorted(events, key=lambda e: e.start_ns()):
        total += ev.nbytes()
        peak = max(peak, total)
    return peak


def self_check() -> bool:
    """One SGD step of a chain of bias-free Linear layers, counted three ways: here, by hand, by the profiler.

    With ``depth`` weights of ``w`` bytes and activations of ``a`` bytes (``w > 2a``): after backward the step
    holds the weights, their gradients, the input and the last output ``h``; the update ``weight -= lr * grad``
    then makes one ``w``-sized product at a time (``aten.mul``), which is the peak. Backward holds less: gradients arrive one
    layer at a time while the saved activations are released. On return ``h`` is freed.
    """
    torch.manual_seed(0)
    batch, width, depth = 64, 256, 3
    layers = [torch.nn.Linear(width, width, bias=False) for _ in range(depth)]
    x = torch.randn(batch, width)

    def step() -> None:
        h = x
        for layer in layers:
            h = layer(h)
        h.square().sum().backward()
        with torch.no_grad():
            for layer in layers:
                layer.weight -= 0.1 * layer.weight.grad

    w, a = width * width * 4, batch * width * 4
    hand = {"entry": depth * w + a, "peak": (2 * depth + 1) * w + 2 * a, "exit": 2 * depth * w + a,
            "peak op": "aten.mul.Tensor"}
    gc.collect()
    with TensorMemory() as mem:
        step()
    counted = {"entry": mem.entry, "peak": mem.peak, "exit": mem.live, "peak op": mem.peak_op}
    for layer in layers:
        layer.weight.grad = None
    gc.collect()
    # the profiler sees every CPU allocation in the window, scalars wrapped into tensors inside ops included
    profiled = _profiler_peak(step)
    ok = counted == hand
    def show(value: Any) -> str:
        return f"{value:,} bytes" if isinstance(value, int) else str(value)

    for key in hand:
        print(f"{key:>7}: counted {show(counted[key]):>15}, by hand {show(hand[key]):>15}")
    above = mem.peak - mem.entry
    close = abs(profiled - above) <= 64
    print(f"peak above entry: counted {above:,} bytes, torch.profiler's allocator events {profiled:,}")
    return ok and close


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-check", action="store_true", help="check the count on a hand-countable case")
    args = parser.parse_args(argv)
    if not args.self_check:
        parser.print_help()
        return
    ok = self_check()
    print("self-check", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
