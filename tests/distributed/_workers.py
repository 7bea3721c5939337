"""What each rank runs (importable, so that spawned processes find it), and its single-process twin."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit import distributed

N, T, V, CLASSES = 24, 5, 20, 3


class Tiny(nn.Module):
    """Embedding, Linear, LayerNorm and a head: one layer of each kind dpkit samples, over sequences."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.mix = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.mix(self.embed(x)))).mean(1))


class TiedTiny(Tiny):
    """The head shares the embedding's weight (a tied LM head), a module sharing the Parameter."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, V, bias=False)
        self.head.weight = self.embed.weight


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, V, (N, T), generator=g), torch.randint(0, CLASSES, (N,), generator=g),
                         torch.arange(N))


def build(wrap: str, weights_seed: int = 1, tied: bool = False) -> nn.Module:
    torch.manual_seed(weights_seed)
    model = TiedTiny() if tied else Tiny()
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in () if tied else (model.embed, model.mix, model.head):  # tied weights: one group
            fully_shard(layer)
        return fully_shard(model)
    return model


def _name(n: str) -> str:
    return n.removeprefix("module.")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def train(wrap: str = "ddp", mode: str = "auto", sigma: float = 0.0, steps: int = 3, q: float = 0.3, K: int = 1,
          clipping: str = "flat", reduction: str = "mean", secure: bool = False, seed: int = 7,
          noise_seed: int | None = 11, batch_size_per_rank: int | None = None, state: dict | None = None,
          weights_seed: int = 1, loader: str = "dp", tied: bool = False, physical: int | None = None,
          evaluate: bool = False, scaler: bool = False) -> dict:
    """``steps`` private steps; returns each step's gradient and batch, the final weights, ε and the state."""
    model = build("none" if wrap == "ddp-after" else wrap, weights_seed, tied)
    if state is not None:
        model.load_state_dict({(n if wrap == "ddp" else _name(n)): v for n, v in state["model"].items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    dataset = data()
    world = distributed.world_size()
    if batch_size_per_rank is not None:
        sampler = torch.utils.data.DistributedSampler(dataset) if loader == "distributed_sampler" else None
        loader = DataLoader(dataset, batch_size=batch_size_per_rank, sampler=sampler)
    elif loader == "local":  # a DPDataLoader that samples the whole dataset on each rank
        loader = dpkit.DPDataLoader(dataset, sample_rate=q)
    else:
        loader = dpkit.DPDataLoader(dataset, sample_rate=q, distributed=world > 1, secure_mode=secure,
                                    generator=None if secure else torch.Generator().manual_seed(seed))
    kwargs = {"clipping_kwargs": {"count_noise_multiplier": 2.0}} if clipping == "adaptive" else {}
    if scaler:  # a loss scale of 2**10 in float32: divided out, the step is the one without
        kwargs["grad_scaler"] = scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=0.1,
            grad_sample_mode=mode, clipping=clipping, loss_reduction=reduction, criterion=nn.CrossEntropyLoss(),
            secure_mode=secure, noise_seed=None if secure else noise_seed, augmentation_multiplicity=K, **kwargs)
    model, optimizer, loader, criterion = private
    if wrap == "ddp-after":  # the mistake: wrapped after make_private saw the bare model
        model = nn.parallel.DistributedDataParallel(model)
    if state is not None:
        private.load_state_dict(state)
    noised = []  # the sizes the noise mechanism is asked to noise
    add = private.noise.add
    private.noise.add = lambda t, *, std: (noised.append(t.numel()), add(t, std=std))[1]
    grads, batches = [], []
    pieces = dpkit.BatchMemoryManager(private, physical) if physical else None
    batch: list[int] = []
    for x, y, i in pieces if pieces else loader:
        if K > 1:
            x, y = x.repeat_interleave(K, 0), y.repeat_interleave(K, 0)
        optimizer.zero_grad()
        if scaler:
            scaler.scale(criterion(model(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()  # the scale grows every step, on each rank alike: no overflow ever skips one
        else:
            criterion(model(x), y).backward()
            optimizer.step()
        batch += i.tolist()
        if pieces and private.gate.virtual:
            continue  # a virtual step: the batch goes on
        grads.append({_name(n): _full(p.grad) for n, p in model.named_parameters()})
        batches.append(batch)
        if evaluate:  # a forward without backward between steps (FSDP2 leaves the root's parameters gathered)
            with torch.no_grad():
                model(x)
        batch = []
        if len(batches) == steps:
            break
    return {"grads": grads, "batches": batches, "params": {_name(n): _full(p) for n, p in model.named_parameters()},
            "epsilon": private.epsilon(1e-5) if sigma > 0 else None, "ledger": private.ledger.state_dict(),
            "sample_rate": private.sample_rate, "expected_batch_size": private.expected_batch_size,
            "state": {**private.state_dict(), "model": model.state_dict()}, "clip": private.clipper.max_grad_norm,
            "noised": noised}


def sample(steps: int, q: float, secure: bool = False, seed: int = 3) -> list[list[int]]:
    """The example indices of this rank's batches, without training."""
    loader = dpkit.DPDataLoader(data(), sample_rate=q, distributed=True, secure_mode=secure, steps=steps,
                                generator=None if secure else torch.Generator().manual_seed(seed))
    return [i.tolist() for _, _, i in loader]


def many(calls: list[tuple[str, dict]]) -> list:
    """Each ``(function name, kwargs)`` in turn; an error is returned in place of its result."""
    out = []
    for name, kwargs in calls:
        try:
            out.append(globals()[name](**kwargs))
        except Exception as err:  # refusals are results too
            out.append(err)
    return out


def own_sampling() -> list[str]:
    """The warnings of make_private(data_loader=None) under torch.distributed."""
    model = build("ddp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=None, sample_rate=0.2, expected_batch_size=4.8,
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    private.detach()
    return [str(w.message) for w in caught]
