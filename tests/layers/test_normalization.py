"""LayerNorm, GroupNorm, InstanceNorm1d/2d/3d and RMSNorm samplers against torch.func."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpkit.layers import normalization
from dpkit.testing import check_grad_sampler, check_norm_sampler

INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
CASES = {  # name: (layer factory, example input shape)
    "layer-2d": (lambda: nn.LayerNorm(5), (4, 5)),
    "layer-seq": (lambda: nn.LayerNorm(5), (4, 3, 5)),
    "layer-multi-dim": (lambda: nn.LayerNorm((3, 5)), (4, 2, 3, 5)),
    "layer-no-bias": (lambda: nn.LayerNorm(5, bias=False), (4, 3, 5)),
    "layer-no-affine": (lambda: nn.LayerNorm(5, elementwise_affine=False), (4, 5)),
    "group-2d": (lambda: nn.GroupNorm(2, 4), (4, 4)),
    "group-1d": (lambda: nn.GroupNorm(2, 4), (4, 4, 6)),
    "group-one-group": (lambda: nn.GroupNorm(1, 4), (4, 4, 3, 3)),
    "group-3d-per-channel": (lambda: nn.GroupNorm(4, 4), (4, 4, 2, 2, 2)),
    "instance-1d": (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 6)),
    "instance-2d": (lambda: nn.InstanceNorm2d(3, affine=True), (4, 3, 4, 4)),
    "instance-3d": (lambda: nn.InstanceNorm3d(3, affine=True), (4, 3, 3, 3, 3)),
    "instance-running-train": (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (4, 3, 4, 4)),
    "instance-running-eval": (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval(), (4, 3, 4, 4)),
    "rms-default-eps": (lambda: nn.RMSNorm(5), (4, 3, 5)),
    "rms-multi-dim-eps": (lambda: nn.RMSNorm((3, 5), eps=1e-3), (4, 2, 3, 5)),
    "rms-no-affine": (lambda: nn.RMSNorm(5, elementwise_affine=False), (4, 5)),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor, tuple[int, ...]]:
    """The layer with random affine parameters (and running statistics), an example input, and batch sizes."""
    make, shape = CASES[name]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    # torch's own InstanceNorm forward cannot take an empty batch
    return layer, torch.randn(shape), (1, 3) if isinstance(layer, INSTANCE) else (0, 1, 3)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_grad_and_norm(name, K):
    layer, x, batch_sizes = build(name)
    check_grad_sampler(layer, x, K=K, sampler=normalization.grad_sampler, batch_sizes=batch_sizes)
    check_norm_sampler(layer, x, K=K, sampler=normalization.norm_sampler, batch_sizes=batch_sizes)


@pytest.mark.parametrize("name", ["layer-seq", "group-1d", "instance-2d", "rms-default-eps"])
def test_norm_bf16(name):
    layer, x, batch_sizes = build(name)
    check_norm_sampler(layer, x, K=2, sampler=normalization.norm_sampler, batch_sizes=batch_sizes, dtype=torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_grad_and_norm_in_chunks_of_rows(name, rows, monkeypatch):
    """A chunk of one or two rows: chunks that split an example's K = 3 copies still add up to its gradient."""
    layer, x, batch_sizes = build(name)
    monkeypatch.setattr(normalization, "_CHUNK", rows * x[0].numel())
    check_grad_sampler(layer, x, K=3, sampler=normalization.grad_sampler, batch_sizes=batch_sizes)
    check_norm_sampler(layer, x, K=3, sampler=normalization.norm_sampler, batch_sizes=batch_sizes)


@pytest.mark.parametrize("sampler", [normalization.grad_sampler, normalization.norm_sampler])
@pytest.mark.parametrize("name", CASES)
def test_inputs_left_untouched(name, sampler):
    """The weight's product overwrites the sampler's own x̂, never the record it was handed."""
    layer, x, _ = build(name)
    x = torch.randn(3, *x.shape[1:])
    g = torch.randn(layer(x).shape)
    x0, g0 = x.clone(), g.clone()
    sampler(layer, [x], g)
    assert torch.equal(x, x0) and torch.equal(g, g0)


@pytest.mark.parametrize("name", ["layer-seq", "group-1d", "instance-2d", "rms-default-eps"])
def test_grad_narrow_input_wide_backprops(name):
    """A bf16 x̂ against float32 output gradients: the product is promoted (no in-place downcast)."""
    layer, x, _ = build(name)
    x = torch.randn(3, *x.shape[1:])
    g = torch.randn(layer(x).shape)
    wide = normalization.grad_sampler(layer, [x.bfloat16().float()], g)
    narrow = normalization.grad_sampler(layer.bfloat16(), [x.bfloat16()], g)
    for p_wide, p_narrow in zip(wide.values(), narrow.values()):
        assert p_narrow.dtype == torch.float32
        torch.testing.assert_close(p_narrow, p_wide, rtol=2e-2, atol=2e-2)


def test_unbatched_instance_norm_is_refused():
    layer = nn.InstanceNorm1d(3, affine=True)
    with pytest.raises(ValueError, match="InstanceNorm1d.*batch dim"):
        normalization.grad_sampler(layer, [torch.randn(3, 6)], torch.randn(3, 6))


def test_registered(builtin_table):
    pairs = [("dpkit_grad_samplers", normalization.grad_sampler), ("dpkit_norm_samplers", normalization.norm_sampler)]
    for hook, fn in pairs:
        table = builtin_table(hook)
        for cls in (nn.LayerNorm, nn.GroupNorm, *INSTANCE, nn.RMSNorm):
            assert (table[cls].value, table[cls].provider) == (fn, "dpkit.layers.normalization")
