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


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_grad_and_norm(nd, config, K):
    cls, shape = LAYERS[nd]
    layer = cls(4, 8, **{"kernel_size": 3, **config})
    check_grad_sampler(layer, torch.randn(shape), K=K, sampler=conv.grad_sampler, batch_sizes=(0, 2))
    check_norm_sampler(layer, torch.randn(shape), K=K, sampler=conv.norm_sampler, batch_sizes=(0, 2))


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
    assert not conv._ghost_cheaper(layer, torch.zeros(K, width, 6, 6), K)
    chunks = []
    kernel = conv.weight_grads
    monkeypatch.setattr(conv, "weight_grads", lambda *a: chunks.append(a[1].shape[0] // K) or kernel(*a))
    check_norm_sampler(layer, torch.randn(batch, width, 6, 6), K=K, sampler=conv.norm_sampler,
                       batch_sizes=(batch,))
    assert max(chunks) == 3


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
