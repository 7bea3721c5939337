"""The DP step as a visible pipeline: norms → clip factors → clipped sum → noise → scale.

Each backward pass adds its examples' clipped sum to an accumulator (virtual
steps are several backward passes); ``optimizer.step()`` privatizes the
accumulated sum once. Nothing stands between the clipped sum and the noise.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from dpkit import distributed
from dpkit.errors import PrivacyUsageError
from dpkit.hookspecs import Clipper, NoiseMechanism
from dpkit.layers import RowSum


class NonFiniteGradientError(PrivacyUsageError):
    """A per-example gradient is NaN or Inf; the engine tells a loss scale's overflow from a real one."""


def per_example_norms(grad_samples: dict[nn.Parameter, Tensor], params: Sequence[nn.Parameter], batch: int
                      ) -> Tensor:
    """``[P, B]`` L2 norms (at least float32) of each parameter's per-example gradient (0 for a parameter without)."""
    first = next(iter(grad_samples.values()), None)
    device = first.device if first is not None else None
    dtype = torch.promote_types(first.dtype, torch.float32) if first is not None else torch.float32
    norms = torch.zeros(len(params), batch, device=device, dtype=dtype)
    for i, p in enumerate(params):
        g = grad_samples.get(p)
        if g is not None:
            norms[i] = g.reshape(batch, -1 if batch else 0).to(dtype).norm(dim=1)
    return norms


def flat_norms(norms: Tensor) -> Tensor:
    """``[P, B]`` per-parameter norms → ``[B]`` whole-model norms."""
    return norms.square().sum(0).sqrt()


def clipped_sum(grad_samples: dict[nn.Parameter, Tensor], params: Sequence[nn.Parameter], factors: Tensor
                ) -> dict[nn.Parameter, Tensor]:
    """Σ_i f_i g_i per parameter; ``factors`` is ``[B]`` or ``[P, B]`` (per-layer clipping)."""
    out = {}
    for i, p in enumerate(params):
        g = grad_samples.get(p)
        if g is None:
            continue
        f = factors[i] if factors.dim() == 2 else factors
        out[p] = torch.tensordot(f.to(g.dtype), g, dims=1)
    return out


def _shaped(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Consecutive views of a flat buffer, shaped as ``params``."""
    return [view.view(p.shape) for p, view in zip(params, torch.split(flat, [p.numel() for p in params]))]


def privatize(flats: Sequence[tuple[Tensor, list[nn.Parameter]]], noise: NoiseMechanism, std: float,
              denominator: float = 1, *, across_ranks: bool = False) -> dict[nn.Parameter, Tensor]:
    """(clipped sum + noise) / denominator for every parameter, in place in the accumulator's flat buffers.

    One draw per buffer (all parameters of one device and dtype) rather than one per parameter: the same
    distribution, coordinates being independent. The results are views of the buffers, shaped as the parameters.
    ``across_ranks``: the sum of every rank's buffer, each rank noising its own slice (``dpkit.distributed``).
    """
    out = {}
    for flat, group in flats:
        if distributed.is_sharded(group[0]):  # FSDP2, at any world size; the accumulator keeps such groups apart
            out.update(distributed.noised_shards(flat, group, noise, std, denominator))
            continue
        noisy = distributed.noised_sum(flat, noise, std) if across_ranks else noise.add(flat, std=std)
        if denominator != 1:
            noisy = noisy.div_(denominator)
        out.update(zip(group, _shaped(noisy, group)))
    return out


class StepAccumulator:
    """Clipped sums and example counts of the backward passes since the last step.

    The sums live in one flat buffer per device and dtype, as views shaped like the parameters: each layer's
    sum is added in place as soon as it is formed and then freed, and the step noises the buffers in place,
    so the sums never take more memory than the gradients of non-private training. The buffers are at least
    float32: bf16/fp16 parameters accumulate and take their noise in float32, then round once.
    """

    def __init__(self, params: Sequence[nn.Parameter], clipper: Clipper, K: int):
        self.params = list(params)
        self._sharded = [distributed.is_sharded(p) for p in self.params]  # a parameter's kind is fixed: asked once
        self.clipper = clipper
        self.K = K
        self._views: dict[nn.Parameter, Tensor] = {}  # per parameter, a view into self.flats
        self.flats: list[tuple[Tensor, list[nn.Parameter]]] = []
        self._written: set[int] = set()  # ids of the parameters whose view holds a sum (the rest is garbage)
        self._parts: dict[nn.Parameter, Tensor] = {}  # streamed sums of the pass in flight, before the buffers exist
        self.examples = 0
        self.backward_passes = 0
        self.observed: list[Tensor] = []  # the clipper's norms of each pass, shown to it at the step

    def clip_factors(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        """``[P, B]`` per-parameter norms → the clipper's norms (``[B]`` flat, or as given) and its factors.

        A non-finite per-example gradient is refused: clipped or not, it would make the whole step NaN, so one
        example would decide whether the released model is usable.
        """
        finite = torch.isfinite(norms).all(0) if norms.dim() == 2 else torch.isfinite(norms)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"example(s) {bad[:10]} of this batch of {finite.numel()} have a non-finite gradient (NaN or Inf), "
                "so this backward pass is refused before anything is released. Look for bad inputs, log(0) in the "
                "loss, or overflow (a lower learning rate, bf16 instead of fp16), then call optimizer.zero_grad() "
                "to drop the batch and go on.")
        clipper_norms = norms if getattr(self.clipper, "per_layer", False) else flat_norms(norms)
        factors = self.clipper.factors(clipper_norms)
        self.observed.append(clipper_norms)
        return clipper_norms, factors

    def add(self, sums: dict[nn.Parameter, Tensor] | Iterable[tuple[nn.Parameter, Tensor]], batch: int) -> None:
        """Add one backward pass's clipped sum over ``batch`` examples (a dict, or pairs formed one at a time)."""
        self.add_sums(sums)
        self.examples += batch
        self.backward_passes += 1

    def stream(self, sums: Iterable[tuple[nn.Parameter, Tensor]]) -> None:
        """One layer's clipped sums, formed while the backward pass is still running (streaming).

        Before the step's buffers exist they are kept per parameter, as autograd keeps ``.grad``: allocating
        every parameter's buffer at the first layer would add a whole model's gradient to the backward pass's
        peak, when all activations are still alive. The pass's end (``add``) moves them into the buffers.
        """
        if self.flats:
            self.add_sums(sums)
            return
        for p, s in sums:
            s = s.dense() if isinstance(s, RowSum) else s
            self._parts[p] = self._parts[p] + s if p in self._parts else s

    def add_sums(self, sums: dict[nn.Parameter, Tensor] | Iterable[tuple[nn.Parameter, Tensor]]) -> None:
        """Add clipped sums into the buffers, with the streamed parts, without counting a backward pass."""
        if not self.flats:
            self._allocate()
        while self._parts:  # popped, so each is freed once copied
            p, part = self._parts.popitem()
            self._add_one(p, part)
        for p, s in sums.items() if isinstance(sums, dict) else sums:
            self._add_one(p, s)

    def _add_one(self, p: nn.Parameter, s: Tensor | RowSum) -> None:
        first = id(p) not in self._written  # the first sum of the step overwrites: the buffer is not zeroed beforehand
        if isinstance(s, RowSum):
            s.into(self._views[p], overwrite=first)
        elif first:
            self._views[p].copy_(s)
        else:
            self._views[p].add_(s)
        self._written.add(id(p))

    def current(self) -> dict[nn.Parameter, Tensor]:
        """The running sums of the parameters that have one."""
        return {p: view for p, view in self._views.items() if id(p) in self._written}

    def buffers(self) -> list[tuple[Tensor, list[nn.Parameter]]]:
        """The flat buffers and their parameters, with zeros for parameters that got no sum (no examples)."""
        for p, view in self._views.items():
            if id(p) not in self._written:
                view.zero_()
                self._written.add(id(p))
        return self.flats

    def _allocate(self) -> None:
        groups: dict[tuple[torch.device, torch.dtype, bool], list[nn.Parameter]] = {}
        for p, sharded in zip(self.params, self._sharded):
            key = (p.device, torch.promote_types(p.dtype, torch.float32), sharded)
            groups.setdefault(key, []).append(p)
        for (device, dtype, _), group in groups.items():
            flat = torch.empty(sum(p.numel() for p in group), device=device, dtype=dtype)
            self._views.update(zip(group, _shaped(flat, group)))
            self.flats.append((flat, group))

    def add_backward(self, grad_samples: dict[nn.Parameter, Tensor], rows: int
                     ) -> tuple[Tensor, Tensor, dict[nn.Parameter, Tensor]]:
        """Clip one backward pass's per-example gradients (K-summed) into the running sum.

        Returns the clipper's norms, the factors and the per-example gradients (K-averaged).
        """
        batch = rows // self.K
        if self.K != 1:
            grad_samples = {p: g / self.K for p, g in grad_samples.items()}
        norms, factors = self.clip_factors(per_example_norms(grad_samples, self.params, batch))
        self.add(clipped_sum(grad_samples, self.params, factors), batch)
        return norms, factors, grad_samples

    def reset(self) -> None:
        """Forget the sums; the buffers are not reused (the last step's gradients are views of them)."""
        self._views = {}
        self.flats = []
        self._parts = {}
        self._written = set()
        self.examples = 0
        self.backward_passes = 0
        self.observed = []
