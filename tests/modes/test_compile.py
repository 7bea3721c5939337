"""torch.compile under dpkit: the compiled model's clipped step is the uncompiled one's, or the step is refused.

The backend is ``aot_eager``: Dynamo's capture, graph breaks and guards and AOTAutograd's forward and backward
graphs, as with inductor, without generating and compiling C++ (tens of seconds per graph on a small CPU).
contrib/benchmarks/bench_compile.py measures inductor. Clipping is active in every case (max_grad_norm is far
below the gradients' norms), so a compiled graph that bypassed dpkit would give a different update.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import dpkit
from dpkit.errors import PrivacyUsageError

BACKEND = "aot_eager"
T = 6  # the GPT's sequence length, equal to the first batch's size


class Scale(nn.Module):
    """A layer without a sampler: auto makes it a torch.func unit."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


class TinyGPT(nn.Module):
    """Embeddings, a causal attention block, an MLP and a head. Positions are looked up as ``arange(T)``, a
    ``[T, d]`` output broadcast over the batch: with ``T`` equal to the batch size only the batch trace tells
    that it is not the batch, so a trace lost under compile would clip positions as if they were examples."""

    def __init__(self, V: int = 13, d: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, V, bias=False)

    def forward(self, idx):
        B, L = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(L))
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, -1))
        return self.head(x + self.mlp(self.ln2(x))).transpose(1, 2)


class OutsideUse(nn.Module):
    """The head reads the embedding's weight outside the embedding's forward: dpkit cannot clip that use."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix = nn.Embedding(11, 6), nn.Linear(6, 6)

    def forward(self, x):
        return F.linear(torch.tanh(self.mix(self.emb(x))), self.emb.weight).transpose(1, 2)


def make(kind: str, mode: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return TinyGPT()
    if kind == "outside":
        return OutsideUse()
    middle = [Scale(7)] if mode == "auto" else []  # bk refuses a layer without a sampler
    # The input is [B, 1, 5]: the Linears' [B, 5] inputs have fewer dimensions than the model's, so only the
    # batch trace, through the compiled Flatten, tells that they are the batch's.
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 7), *middle, nn.ReLU(), nn.Linear(7, 3))


def batch(kind: str, rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(rows, 1, 5, generator=gen), torch.randint(0, 3, (rows,), generator=gen)
    vocab = 13 if kind == "gpt" else 11
    return torch.randint(0, vocab, (rows, T), generator=gen), torch.randint(0, vocab, (rows, T), generator=gen)


def attach(module: nn.Module, params, mode: str = "bk", clipping: str = "flat"):
    optimizer = torch.optim.SGD(params, lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        private = dpkit.make_private(module=module, optimizer=optimizer, data_loader=None, sample_rate=0.5,
                                     expected_batch_size=6, noise_multiplier=0.0, max_grad_norm=0.01,
                                     grad_sample_mode=mode, clipping=clipping, criterion=nn.CrossEntropyLoss())
    return private, optimizer


def train(kind: str, mode: str, clipping: str, how: str) -> list[list[torch.Tensor]]:
    """Each step's parameter update, on batches of 6 then 4 rows (Poisson batches vary in size)."""
    model = make(kind, mode)
    target = torch.compile(model, backend=BACKEND) if how == "compile first" else model
    private, optimizer = attach(target, model.parameters(), mode, clipping)
    run = target
    if how == "torch.compile after":
        run = torch.compile(model, backend=BACKEND)
    elif how == "model.compile after":
        model.compile(backend=BACKEND)
    criterion = private.criterion
    if how == "compiled criterion":  # issue 22.9: torch's "donated buffers" error, then recompile-limit warnings
        criterion = torch.compile(private.criterion, backend=BACKEND)
    updates = []
    for step, rows in enumerate((6, 4)):
        x, y = batch(kind, rows, step)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        criterion(run(x), y).backward()
        optimizer.step()
        updates.append([b - p.detach() for b, p in zip(before, model.parameters())])
    private.detach()
    return updates


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same(got, want) -> None:
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind, how, mode, clipping", [
    ("mlp", "compile first", "bk", "flat"),
    ("mlp", "model.compile after", "auto", "per_layer"),
    ("gpt", "compile first", "auto", "flat"),
    ("gpt", "torch.compile after", "bk", "per_layer"),
    ("gpt", "compiled criterion", "auto", "flat"),
])
def test_compiled_step_is_the_uncompiled_step(kind, how, mode, clipping):
    torch._dynamo.utils.counters.clear()
    got = train(kind, mode, clipping, how)
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # something was compiled
    assert_same(got, train(kind, mode, clipping, "eager"))


def test_clipping_is_active_so_a_bypass_would_show():
    """The cases above would pass vacuously if the clipped step were the plain one: it is not."""
    model = make("mlp", "bk")
    x, y = batch("mlp", 6, 0)
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    clipped = train("mlp", "bk", "flat", "eager")[0]
    norm = lambda ts: torch.sqrt(sum(t.square().sum() for t in ts)).item()  # noqa: E731
    assert norm(clipped) <= 0.01 + 1e-12 < 0.1 < norm(plain)


def test_a_graph_compiled_before_make_private_is_not_reused():
    """Dynamo guards on the module's hooks: a graph traced without dpkit's hooks must not run under dpkit."""
    model = make("mlp", "bk")
    compiled = torch.compile(model, backend=BACKEND)
    x, y = batch("mlp", 6, 0)
    F.cross_entropy(compiled(x), y).backward()  # warms the cache without dpkit
    model.zero_grad(set_to_none=True)
    private, optimizer = attach(compiled, model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    private.criterion(compiled(x), y).backward()
    optimizer.step()
    private.detach()
    assert_same([[b - p.detach() for b, p in zip(before, model.parameters())]], train("mlp", "bk", "flat", "eager")[:1])


def test_outside_use_is_refused_under_compile():
    """A gradient reaching a planned parameter outside its unit is refused, compiled as uncompiled."""
    model = make("outside", "bk")
    compiled = torch.compile(model, backend=BACKEND)
    private, optimizer = attach(compiled, model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch("outside", 6, 0)
    with pytest.raises(PrivacyUsageError, match=r"emb\.weight.*use outside"):
        private.criterion(compiled(x), y).backward()
    with pytest.raises(PrivacyUsageError, match="refused"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    private.detach()


def test_fullgraph_is_refused_before_the_forward_runs():
    """dpkit's hooks are graph breaks, which fullgraph=True forbids: Dynamo refuses, naming dpkit's reason."""
    model = make("mlp", "bk")
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    private, _ = attach(compiled, model.parameters())
    x, y = batch("mlp", 6, 0)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="compile without fullgraph=True"):
        compiled(x)
    assert not private.capturer.captures
    private.detach()


def test_compiled_autograd_is_refused_with_its_name():
    # Was: "a backward pass of this step stopped with an error" when no error happened (issue 22.9).
    from torch._dynamo import compiled_autograd

    model = make("mlp", "bk")
    private, optimizer = attach(model, model.parameters())
    x, y = batch("mlp", 6, 0)
    with compiled_autograd._enable(torch.compile(backend=BACKEND)):
        private.criterion(model(x), y).backward()
    with pytest.raises(PrivacyUsageError, match="ran under compiled autograd"):
        optimizer.step()
    assert private.steps == 0
    optimizer.zero_grad()
    private.criterion(model(x), y).backward()  # without it, the run goes on
    optimizer.step()
    assert private.steps == 1
    private.detach()
