"""The CPU noise streams: Philox-keyed MT19937 states, independent per seed, chunk and call; the same at any thread
count; Gaussian with no correlation between chunks, calls or ranks."""
from __future__ import annotations

import itertools
import os
import signal
import types

import numpy as np
import pytest
import torch
from scipy import stats

from dpkit import distributed
from dpkit.noise import _streams
from dpkit.noise.gaussian import GaussianNoise

M64 = 2**64 - 1


def philox4x64(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x64-10 (Salmon et al. 2011, Random123's constants), written out: one block of four 64-bit words."""
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2E7470EE14C6C93 * c[0], 0xCA5A826395121157 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & M64, (p0 >> 64) ^ c[3] ^ k[1], p0 & M64]
        k = [(k[0] + 0x9E3779B97F4A7C15) & M64, (k[1] + 0xBB67AE8584CAA73B) & M64]
    return c


def mt19937(state: list[int], n: int) -> list[int]:
    """The first ``n`` outputs of MT19937 (Matsumoto & Nishimura 1998) from the 624-word ``state``, twisting first."""
    mt, out = list(state), []
    while len(out) < n:
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        for y in mt:
            y ^= y >> 11
            y ^= (y << 7) & 0x9D2C5680
            y ^= (y << 15) & 0xEFC60000
            out.append(y ^ (y >> 18))
    return out[:n]


def reference_words(seed: int, chunk: int, call: int) -> list[int]:
    """Chunk ``chunk``'s state: Philox blocks at counters (1, 2, ...; chunk, call, TAG) under key (seed low, high),
    each 64-bit word split into two 32-bit words, low first."""
    words = []
    for block in range(1, 79):
        for w in philox4x64([block, chunk, call, _streams._TAG], [seed & M64, (seed >> 64) & M64]):
            words += [w & 0xFFFFFFFF, w >> 32]
    return words


@pytest.mark.parametrize("seed, chunk, call", [(0, 0, 0), (12345, 3, 7), (2**62 + 5, 1, 0), (-1, 0, 2)])
def test_a_chunks_generator_is_mt19937_from_the_philox_words(seed, chunk, call):
    gen = _streams.generator(seed, chunk, call)
    # an int64 torch.randint takes two 32-bit outputs per value; modulo 2³¹ keeps the second's low 31 bits
    drawn = torch.randint(0, 2**31, (350,), generator=gen, dtype=torch.int64).tolist()  # past a second twist
    assert drawn == [y & 0x7FFFFFFF for y in mt19937(reference_words(seed, chunk, call), 700)[1::2]]


def test_no_two_chunks_calls_or_ranks_share_a_stream():
    seeds = [distributed.rank_seed(2024, rank) for rank in range(4)] + [0, 1, 2**32, 2**32 + 1]
    states = {}
    for seed, chunk, call in itertools.product(seeds, range(4), range(3)):
        words = _streams.generator(seed, chunk, call).get_state()[_streams._WORDS].numpy().tobytes()
        assert words not in states, f"{(seed, chunk, call)} has the state of {states[words]}"
        states[words] = (seed, chunk, call)
    # torch's own seeding keeps 32 bits: these seeds would collide there, not here
    one, other = (torch.Generator().manual_seed(s).get_state()[_streams._WORDS] for s in (1, 2**32 + 1))
    assert torch.equal(one, other)


def test_the_draw_is_the_same_at_any_thread_count():
    n = 3 * _streams.STREAM + 123
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(GaussianNoise(seed=9).add(torch.zeros(n), std=1.5))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_chunks_calls_and_ranks_are_gaussian_and_uncorrelated():
    S = _streams.STREAM
    noise = GaussianNoise(seed=distributed.rank_seed(77, 0))
    first, second = noise.add(torch.zeros(3 * S), std=2.0), noise.add(torch.zeros(3 * S), std=2.0)
    other_rank = GaussianNoise(seed=distributed.rank_seed(77, 1)).add(torch.zeros(3 * S), std=2.0)
    rows = torch.stack([*first.view(3, S), *second.view(3, S), *other_rank.view(3, S)]).double() / 2.0
    assert rows.std(1).sub(1).abs().max() < 0.01 and rows.mean(1).abs().max() < 0.01
    assert stats.kstest(first.numpy() / 2.0, "norm").pvalue > 1e-4
    corr = torch.corrcoef(rows)
    off = corr[~torch.eye(len(rows), dtype=torch.bool)]
    assert off.abs().max() < 5 / S**0.5  # about 5 standard errors: no two streams move together
    shifted = torch.corrcoef(torch.stack([first[:-1], first[1:]]).double())[0, 1]  # nor neighbours within one
    assert abs(shifted) < 5 / S**0.5


def test_a_changed_generator_layout_is_refused(monkeypatch):
    class Moved:  # a generator whose state bytes are not where dpkit writes the words
        def manual_seed(self, seed):
            return self

        def get_state(self):
            return torch.zeros(5056, dtype=torch.uint8)

    monkeypatch.setattr(_streams, "torch", types.SimpleNamespace(Generator=Moved, __version__="9.9"))
    with pytest.raises(RuntimeError, match="lays out its CPU generator's state differently"):
        _streams._template.__wrapped__()


def test_a_failing_chunk_fails_the_draw(monkeypatch):
    """An error in a worker reaches the caller (the step then releases nothing), with every thread count."""
    def broken(seed, chunk, call):
        raise OSError(f"chunk {chunk}")

    monkeypatch.setattr(_streams, "generator", broken)
    with pytest.raises(OSError, match="chunk"):
        GaussianNoise(seed=1).add(torch.zeros(2 * _streams.STREAM), std=1.0)


def test_numpy_philox_agrees_with_the_reference():
    """The words come from numpy's Philox: pinned here to the written-out cipher (counter incremented first)."""
    raw = np.random.Philox(key=np.array([5, 6], dtype=np.uint64),
                           counter=np.array([0, 2, 3, 4], dtype=np.uint64)).random_raw(8).tolist()
    assert raw == philox4x64([1, 2, 3, 4], [5, 6]) + philox4x64([2, 2, 3, 4], [5, 6])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_draws_on_its_own_threads():
    """A DataLoader-style fork after a draw: the child, whose copy of the pool has no threads, draws the same."""
    GaussianNoise(seed=3).add(torch.zeros(2 * _streams.STREAM), std=1.0)  # the parent's pool exists
    expected = GaussianNoise(seed=3).add(torch.zeros(2 * _streams.STREAM), std=1.0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: draw, report whether it matches, exit without pytest's teardown
        try:
            ok = torch.equal(GaussianNoise(seed=3).add(torch.zeros(2 * _streams.STREAM), std=1.0), expected)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    signal.alarm(60)  # a child stuck on the parent's dead threads would hang the test
    try:
        _, status = os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1" and status == 0
    finally:
        signal.alarm(0)
        os.close(read)
