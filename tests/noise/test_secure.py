"""dpkit.secure: uniforms and normals from os.urandom alone, at full float64 resolution."""
from __future__ import annotations

import os
import random

import pytest
import torch
from scipy import stats

from dpkit import secure


def fake_urandom(seed: int):
    """A replayable stand-in for os.urandom."""
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def test_uniform_is_float64_in_the_unit_interval():
    u = secure.uniform(100_000, device="cpu")
    assert u.dtype == torch.float64 and u.shape == (100_000,) and u.device.type == "cpu"
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    assert secure.uniform(0).shape == (0,)


def test_uniform_has_53_random_bits_each():
    ints = secure.uniform(50_000) * 2.0 ** 53
    assert torch.equal(ints, ints.floor())  # multiples of 2**-53
    bits = (ints.to(torch.int64)[:, None] >> torch.arange(53)) & 1
    assert ((bits.double().mean(0) - 0.5).abs() < 0.02).all()  # every one of the 53 bits is a fair coin


def test_uniform_is_uniform():
    assert stats.kstest(secure.uniform(200_000).numpy(), "uniform").pvalue > 1e-4


def test_draws_come_from_os_urandom_alone(monkeypatch):
    monkeypatch.setattr(os, "urandom", fake_urandom(1))
    first = secure.uniform(10), secure.normal(11)
    monkeypatch.setattr(os, "urandom", fake_urandom(1))
    torch.manual_seed(123)  # torch's own generators play no part
    assert all(torch.equal(a, b) for a, b in zip(first, (secure.uniform(10), secure.normal(11))))


def test_normal_is_standard_normal():
    z = secure.normal(200_001)
    assert z.dtype == torch.float64 and z.shape == (200_001,)
    assert abs(z.mean().item()) < 0.01
    assert z.std().item() == pytest.approx(1.0, rel=0.01)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def test_normal_dtype():
    assert secure.normal(7, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_normal_is_finite_at_the_extreme_uniforms(monkeypatch, byte):
    """u = 0 and u = 1 - 2**-53: Box-Muller's logarithm must see neither 0 nor a negative number."""
    monkeypatch.setattr(os, "urandom", lambda n: bytes([byte]) * n)
    assert torch.isfinite(secure.normal(4)).all()
