"""nn.Conv1d/2d/3d samplers against torch.func: strides, padding (modes), dilation, groups, bias."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpkit.layers import conv
from dpkit.testing import check_grad_sampler, check_norm_sampler

LAYERS = {1: (nn.Conv1d, (2, 4, 9)), 2: (nn.Conv2d, (2, 4, 7, 6)), 3: (nn.Conv3d, (2, 4, 5, 6, 5))}
CONFIGS = {
    "plain": {},
    "stride": {"stride": 2},
    "padding": {"padding": 1},
    "same": {"padding": "same"},
    "same-even-kernel": {"padding": "same", "kernel_size": 2},
    "valid": {"padding": "valid"},
    "dilation": {"dilation": 2, "padding": 2},
    "groups": {"groups": 2},
    "depthwise-no-bias": {"groups": 4, "bias": False, "stride": 2},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
    "circular": {"padding": 2, "padding_mode": "circular"},
    "replicate-same": {"padding": "same", "padding_mode": "replicate", "dilation": 2},
}


@pytest.fixture(params=["kernel", "patches"])
def grad_path(request, monkeypatch):
    """Every per-example weight gradient by the weight-gradient kernel, or by patches (whatever the width)."""
    monkeypatch.setattr(conv, "_FEW_CHANNELS", 0 if request.param == "kernel" else 10**6)
    return request.param


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_grad(nd, config, K, grad_path):
    cls, shape = LAYERS[nd]
    layer = cls(4, 8, **{"kernel_size": 3, **config})
    check_grad_sampler(layer, torch.randn(shape), K=K, sampler=conv.grad_sampler, batch_sizes=(0, 1, 3))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("route", ["instantiated", "ghost", "gram"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_norm(nd, config, K, route, monkeypatch):
    """Each route to the weight's norms, forced, on every configuration it serves (Gram matrices: stride 1)."""
    cls, shape = LAYERS[nd]
    layer = cls(4, 8, **{"kernel_size": 3, **config})
    if route == "gram" and config.get("stride", 1) != 1:
        pytest.skip("the Gram route serves stride 1 only")
    monkeypatch.setattr(conv, "_norm_route", lambda *a: route)
    check_norm_sampler(layer, torch.randn(shape), K=K, sampler=conv.norm_sampler, batch_sizes=(0, 1, 3))


def test_asymmetric_tuples_2d():
    layer = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    check_grad_sampler(layer, torch.randn(2, 4, 9, 7), K=2, sampler=conv.grad_sampler)
    check_norm_sampler(layer, torch.randn(2, 4, 9, 7), K=2, sampler=conv.norm_sampler)


@pytest.mark.parametrize("groups", [1, 2])
def test_norm_ghost_path(groups):
    # many channels over few positions: T·(p+d) < p·d, so each group's norm takes the ghost route
    layer = nn.Conv2d(16, 32, 3, padding=1, groups=groups)
    check_norm_sampler(layer, torch.randn(2, 16, 3, 3), K=2, sampler=conv.norm_sampler)


@pytest.mark.parametrize("K, width, batch", [(1, 16, 7), (3, 32, 4)])
def test_norm_instantiated_in_chunks_of_examples(K, width, batch, monkeypatch):
    """A wide layer over a few positions: the instantiated norms (not the ghost ones), and the gradients of all the
    examples outgrow the record, so they are formed 3 examples at a time: as many gradients as the record holds
    entries (input and output gradient, 2·K·width·36 an example, against width²·9 a gradient)."""
    layer = nn.Conv2d(width, width, 3, padding=1)
    assert conv._norm_route(layer, torch.zeros(K, width, 6, 6), torch.zeros(K, width, 6, 6), K) == "instantiated"
    chunks = []
    kernel = conv.weight_grads
    monkeypatch.setattr(conv, "weight_grads", lambda *a: chunks.append(a[1].shape[0] // K) or kernel(*a))
    check_norm_sampler(layer, torch.randn(batch, width, 6, 6), K=K, sampler=conv.norm_sampler,
                       batch_sizes=(batch,))
    assert max(chunks) == 3


def test_patch_grads_in_chunks_of_examples(monkeypatch):
    """Patches of a narrow layer with few outputs outgrow the record (36 entries a position an example, against
    4 + 2 in it), so they are formed one example at a time."""
    layer = nn.Conv2d(4, 2, 3, padding=1)
    chunks = []
    inner = conv._chunk_patch_grads
    monkeypatch.setattr(conv, "_chunk_patch_grads", lambda *a: chunks.append(a[1].shape[0] // a[3]) or inner(*a))
    check_grad_sampler(layer, torch.randn(5, 4, 6, 6), K=2, sampler=conv.grad_sampler, batch_sizes=(5,))
    assert chunks and max(chunks) == 1


@pytest.mark.parametrize("K, batch, most", [(2, 3, 1), (1, 3, 3)])
def test_gram_norms_in_chunks_of_examples(K, batch, most, monkeypatch):
    """The Gram matrices of a chunk hold no more entries than the record: one example at a time where they
    outgrow an example's record (K = 2: 34² + 2·24² entries against 2·128·4), the whole batch at once where they
    do not (K = 1: 18² + 2·8² against 128·4)."""
    layer = nn.Conv2d(64, 64, 3, padding=1)
    chunks = []
    inner = conv._chunk_gram_sq_norms
    monkeypatch.setattr(conv, "_chunk_gram_sq_norms", lambda *a: chunks.append(a[1].shape[0] // a[3]) or inner(*a))
    monkeypatch.setattr(conv, "_norm_route", lambda *a: "gram")
    check_norm_sampler(layer, torch.randn(batch * K, 64, 2, 2), K=K, sampler=conv.norm_sampler,
                       batch_sizes=(batch,))
    assert max(chunks) == most


def test_weight_grads_by_width(monkeypatch):
    """Patches for fewer than 8 input channels a group and several examples, the kernel otherwise."""
    used = []
    for name in ("_patch_grads", "_kernel_grads"):
        inner = getattr(conv, name)
        monkeypatch.setattr(conv, name, lambda *a, _n=name, _f=inner: used.append(_n) or _f(*a))
    for layer, rows in [(nn.Conv2d(3, 16, 3), 2), (nn.Conv2d(16, 16, 3, groups=4), 2), (nn.Conv2d(3, 16, 3), 1),
                        (nn.Conv2d(8, 16, 3), 2)]:
        conv.weight_grads(layer, torch.randn(rows, layer.in_channels, 5, 5), torch.randn(rows, 16, 3, 3), 1)
    assert used == ["_patch_grads", "_patch_grads", "_kernel_grads", "_kernel_grads"]


@pytest.mark.parametrize("shape, route", [
    ((64, 8, 8), "gram"),  # a late layer of a CIFAR net: wide, few positions
    ((32, 16, 16), "instantiated"),
    ((3, 32, 32), "instantiated"),
    ((256, 2, 2), "ghost"),
])
def test_norm_route_by_shape(shape, route):
    C, H, W = shape
    layer = nn.Conv2d(C, 64, 3, padding=1)
    x, g = torch.zeros(4, C, H, W), torch.zeros(4, 64, H, W)
    assert conv._norm_route(layer, x, g, 1) == route


def test_norm_bf16():
    layer = nn.Conv2d(4, 8, 3, padding=1)
    check_norm_sampler(layer, torch.randn(2, 4, 6, 6), K=2, sampler=conv.norm_sampler, dtype=torch.bfloat16)


def test_patches_match_conv():
    """The unfold that both samplers share reproduces the forward: weight · patches + bias = output."""
    layer = nn.Conv3d(4, 6, (3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2).double()
    x = torch.randn(3, 4, 6, 7, 5, dtype=torch.float64)
    cols = conv.patches(layer, x)
    cols = cols.reshape(3, 2, cols.shape[1] // 2, cols.shape[2])  # [B, groups, C/G·∏k, L]
    w = layer.weight.reshape(2, 3, -1)
    out = torch.einsum("goi,bgil->bgol", w, cols).reshape(3, 6, -1) + layer.bias[:, None]
    torch.testing.assert_close(out, layer(x).reshape(3, 6, -1))


def test_unbatched_input_is_refused():
    layer = nn.Conv1d(4, 8, 3)
    with pytest.raises(ValueError, match="Conv1d.*batch dim"):
        conv.grad_sampler(layer, [torch.randn(4, 9)], torch.randn(8, 7))


def test_registered(builtin_table):
    for hook, fn in [("dpkit_grad_samplers", conv.grad_sampler), ("dpkit_norm_samplers", conv.norm_sampler)]:
        table = builtin_table(hook)
        for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            assert (table[cls].value, table[cls].provider) == (fn, "dpkit.layers.conv")
