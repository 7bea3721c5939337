"""nn.Embedding and nn.EmbeddingBag samplers against torch.func: index shapes, padding_idx, bag modes, offsets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpkit.errors import UnsupportedLayerError
from dpkit.layers import embedding
from dpkit.testing import check_grad_sampler, check_norm_sampler

V = 10


def indices(*shape: int) -> torch.Tensor:
    x = torch.randint(0, V, shape)
    x.view(-1)[:2] = torch.tensor([0, V - 1])  # the checks draw indices over the example's range: all of it
    return x


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("shape", [(4,), (4, 5), (4, 2, 3)], ids=["N", "NT", "NAB"])
@pytest.mark.parametrize("padding_idx", [None, 0, 3, -1])
def test_embedding(shape, padding_idx, K):
    layer = nn.Embedding(V, 4, padding_idx=padding_idx)
    check_grad_sampler(layer, indices(*shape), K=K, sampler=embedding.grad_sampler)
    check_norm_sampler(layer, indices(*shape), K=K, sampler=embedding.norm_sampler)


def test_embedding_repeated_rows_norm():
    """Every lookup hits one of two rows: the norm must add repeats before squaring."""
    layer = nn.Embedding(2, 3)
    check_norm_sampler(layer, torch.tensor([[0, 1] * 8]), K=2, sampler=embedding.norm_sampler)
    check_norm_sampler(layer, torch.tensor([[0, 1] * 8]), K=2, sampler=embedding.norm_sampler, dtype=torch.bfloat16)


def test_embedding_int32_non_contiguous_index():
    layer = nn.Embedding(V, 4)
    idx = indices(5, 4).int().t()  # [4, 5], non-contiguous, int32
    g = torch.randn(5, 4, 4).transpose(0, 1)
    grads = embedding.grad_sampler(layer, [idx], g)[layer.weight]
    norms = embedding.norm_sampler(layer, [idx], g)[layer.weight]
    torch.testing.assert_close(grads.flatten(1).norm(dim=1), norms)


@pytest.mark.parametrize("flag", ["scale_grad_by_freq", "sparse"])
def test_refused_flags_name_the_layer(flag):
    layer = nn.Embedding(V, 4, **{flag: True})
    for sampler in (embedding.grad_sampler, embedding.norm_sampler):
        with pytest.raises(UnsupportedLayerError, match=f"Embedding.*{flag}=True"):
            sampler(layer, [indices(4, 3)], torch.randn(4, 3, 4))


def bags(include_last_offset: bool):
    """Flat indices with offsets: bags of 0 to 3 lookups (empty bags included)."""

    def make(rows: int):
        lengths = torch.randint(0, 4, (rows,))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return torch.randint(0, V, (int(offsets[-1]),)), offsets if include_last_offset else offsets[:-1]

    return make


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets", "offsets-last"])
def test_embedding_bag(layout, mode, padding_idx, K):
    last = layout == "offsets-last"
    layer = nn.EmbeddingBag(V, 4, mode=mode, padding_idx=padding_idx, include_last_offset=last)
    example = indices(4, 3) if layout == "2d" else bags(last)
    check_grad_sampler(layer, example, K=K, sampler=embedding.grad_sampler)
    check_norm_sampler(layer, example, K=K, sampler=embedding.norm_sampler)


def weighted_bags(rows: int):
    flat, offsets = bags(False)(rows)
    return flat, offsets, torch.randn(flat.shape)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("layout", ["2d", "offsets"])
def test_embedding_bag_per_sample_weights(layout, K):
    layer = nn.EmbeddingBag(V, 4, mode="sum", padding_idx=1)
    example = (indices(4, 3), None, torch.randn(4, 3)) if layout == "2d" else weighted_bags
    check_grad_sampler(layer, example, K=K, sampler=embedding.grad_sampler)
    check_norm_sampler(layer, example, K=K, sampler=embedding.norm_sampler)


def test_embedding_bag_max_repeated_row():
    """Bags that repeat a row tie for the max: its gradient must reach that row once per feature, not twice."""
    layer = nn.EmbeddingBag(3, 4, mode="max")
    example = lambda rows: torch.tensor([1, 1, 2]).repeat(rows, 1)  # noqa: E731
    check_grad_sampler(layer, example, K=2, sampler=embedding.grad_sampler)
    check_norm_sampler(layer, example, K=2, sampler=embedding.norm_sampler)


def test_registered(builtin_table):
    for hook, fn in [("dpkit_grad_samplers", embedding.grad_sampler), ("dpkit_norm_samplers", embedding.norm_sampler)]:
        table = builtin_table(hook)
        for cls in (nn.Embedding, nn.EmbeddingBag):
            assert (table[cls].value, table[cls].provider) == (fn, "dpkit.layers.embedding")


CALLS = {
    "embedding": (lambda: nn.Embedding(V, 4, padding_idx=2), lambda: [indices(6, 5)]),
    "bag-sum-weighted": (lambda: nn.EmbeddingBag(V, 4, mode="sum", padding_idx=1),
                         lambda: [indices(6, 3), None, torch.randn(6, 3).double()]),
    "bag-mean-offsets": (lambda: nn.EmbeddingBag(V, 4, mode="mean"), lambda: list(bags(False)(6))),
    "bag-max": (lambda: nn.EmbeddingBag(V, 4, mode="max"), lambda: [indices(6, 3)]),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("overwrite", [True, False])
def test_weighted_sum_writes_the_weighted_sum_of_per_row_gradients(call, overwrite):
    """bk's direct sum as rows added in place (``RowSum``) equals Σ_r w_r ∇_r, written over or added to a buffer."""
    torch.manual_seed(0)
    layer, activations = CALLS[call][0]().double(), CALLS[call][1]()
    out = layer(*activations)
    g, w = torch.randn_like(out), torch.rand(out.shape[0]).double()
    per_row = embedding.grad_sampler(layer, activations, g)[layer.weight]
    want = torch.tensordot(w, per_row, dims=1)
    rows = embedding.weighted_sum(layer, activations, g, w)[layer.weight]
    start = torch.randn(V, 4).double()
    buffer = start.clone()
    rows.into(buffer, overwrite=overwrite)
    torch.testing.assert_close(buffer, want if overwrite else start + want)
    torch.testing.assert_close(rows.dense(), want)
