"""Independent CPU noise streams, one per fixed-size chunk of a buffer, drawn on several threads.

torch draws a seeded CPU stream serially (one Mersenne Twister, ``normal_`` under its lock), so on a multi-core
CPU the noise draw stays as slow as on one core. Here each chunk of ``STREAM`` coordinates of the ``call``-th
draw has its own generator, and threads draw the chunks side by side. The layout depends only on the buffer's
size and the call's number, never on the thread count, so a run is the same at any ``torch.get_num_threads()``.

**Independent by construction.** A chunk's generator is torch's CPU MT19937 with its whole 624-word state set
from Philox4x64-10 (numpy's counter-based generator) under the 128-bit key ``seed`` at the counter
``(0, chunk, call, TAG)``: Philox is a bijection of its counter under a key, so two chunks, two calls or two
seeds (two ranks, whose seeds differ) never get the same state, and no seed is hashed down to torch's 32 bits
(``manual_seed`` keeps only those: n streams seeded that way collide with probability n²/2³³). Two MT19937
streams of different states overlap only if one state lies within the other's first draws, with probability
about draws/2¹⁹⁹³⁷. A checkpoint holds the seed and the number of calls: nothing else is needed to resume.

The state is written into the byte layout of torch's ``CPUGeneratorImpl`` state (the 64-bit seed, ``left``,
``seeded``, ``next``, then the 624 words as 64-bit slots). :func:`_template` checks that layout against a freshly
seeded generator before the first use and refuses to draw if a torch version changed it.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

STREAM = 1 << 18  # coordinates per stream: a chunk's generator costs about 20 µs to build, its draw about 1 ms
_BUFFER = 1 << 15  # coordinates drawn at a time into a reused buffer: at torch's grain size, so add_ stays serial
_TAG = int.from_bytes(b"dpkit gaussian", "little") & (2**64 - 1)  # the counter's last word: this use of the key
_WORDS = slice(24, 24 + 624 * 8)  # the MT19937 state in torch's CPU generator state, 624 uint64 slots
_MASK = 2**64 - 1

_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (size, process id): a forked child has the pool object but not its threads
_pool_lock = threading.Lock()


@functools.cache
def _template() -> np.ndarray:
    """A fresh CPU generator's state bytes, once its layout is confirmed: seed 5's MT19937 initialisation
    (``x[i] = 1812433253 (x[i-1] ^ x[i-1] >> 30) + i``), left 1, seeded, next 0."""
    state = torch.Generator().manual_seed(5).get_state().numpy().copy()
    x = [5]
    for i in range(1, 624):
        x.append((1812433253 * (x[-1] ^ (x[-1] >> 30)) + i) & 0xFFFFFFFF)
    head = state[:24].view(np.uint64)
    fields = state[8:16].view(np.int32)
    if (len(state) < _WORDS.stop or int(head[0]) != 5 or fields.tolist() != [1, 1] or int(head[2]) != 0
            or state[_WORDS].view(np.uint64).tolist() != x):
        raise RuntimeError(
            f"torch {torch.__version__} lays out its CPU generator's state differently from what dpkit's parallel "
            "noise streams expect (dpkit/noise/_streams.py), so they cannot be seeded. Use a torch version dpkit "
            "supports, or a CUDA device, or secure_mode=True (which draws from the OS).")
    return state


def generator(seed: int, chunk: int, call: int) -> torch.Generator:
    """The CPU generator of chunk ``chunk`` of the ``call``-th draw under ``seed`` (module docstring)."""
    key = np.array([seed & _MASK, (seed >> 64) & _MASK], dtype=np.uint64)
    counter = np.array([0, chunk, call, _TAG], dtype=np.uint64)
    words = np.random.Philox(key=key, counter=counter).random_raw(312).view(np.uint32)  # 624 words
    state = _template().copy()
    state[_WORDS].view(np.uint64)[:] = words
    gen = torch.Generator()
    gen.set_state(torch.from_numpy(state))
    return gen


def _draw(part: Tensor, dtype: torch.dtype, std: float, gen: torch.Generator) -> None:
    buffer = torch.empty(min(_BUFFER, part.numel()), dtype=dtype)
    for piece in part.split(_BUFFER):
        piece.add_(buffer[: piece.numel()].normal_(0, std, generator=gen))


def _threads(jobs: int) -> ThreadPoolExecutor | None:
    """A pool of ``torch.get_num_threads()`` workers (rebuilt when that changes, and in a forked child), or None for
    one thread or job."""
    global _pool, _pool_key
    size = min(torch.get_num_threads(), os.cpu_count() or 1)
    if size < 2 or jobs < 2:
        return None
    key = (size, os.getpid())
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[1] == key[1]:
                _pool.shutdown(wait=False)
            _pool, _pool_key = ThreadPoolExecutor(size, thread_name_prefix="dpkit-noise"), key
        return _pool


def add(out: Tensor, *, std: float, seed: int, call: int, dtype: torch.dtype) -> None:
    """``out += N(0, std²)`` in ``dtype`` on every coordinate of the flat CPU tensor ``out``, in place: chunk ``k``
    from :func:`generator` ``(seed, k, call)``, the chunks on torch's thread count."""
    parts = out.split(STREAM)
    pool = _threads(len(parts))
    if pool is None:
        for k, part in enumerate(parts):
            _draw(part, dtype, std, generator(seed, k, call))
        return
    # Each job builds its own generator: the generators are independent, the threads share nothing but ``out``,
    # of which each writes its own chunk. An exception in a job is raised here, before anything is released.
    list(pool.map(lambda k: _draw(parts[k], dtype, std, generator(seed, k, call)), range(len(parts))))
