"""How the batches are sampled: decided first, since σ is calibrated on the sample rate and every check sees both."""
from __future__ import annotations

import warnings

import attrs
import torch
from torch.utils.data import DataLoader

from dpkit.data import DPDataLoader, TruncatedPoissonLoader, check_loader
from dpkit.distributed import digest
from dpkit.engine.guards import number
from dpkit.errors import PrivacyUsageError
from dpkit.events import DpEvent, PoissonSampledEvent, TruncatedPoissonSampledEvent


@attrs.frozen
class Sampling:
    """The loader to train on (dpkit's Poisson twin of the user's), the sample rate q, and the expected batch
    size that a "mean" loss is divided by (never the realised one, which the noise scale would reveal).
    ``truncation``: ``(dataset size, max batch size)`` of a :class:`dpkit.data.TruncatedPoissonLoader`."""

    loader: DataLoader | None
    sample_rate: float
    expected_batch_size: float | None
    poisson: bool
    truncation: tuple[int, int] | None = None

    def event(self, event: DpEvent) -> DpEvent:
        """A step's event as this sampling makes it: a Poisson step becomes a truncated one under truncation."""
        if self.truncation is None:
            return event
        if not (isinstance(event, PoissonSampledEvent) and event.sample_rate == self.sample_rate):
            raise PrivacyUsageError(
                f"the step's privacy event {event!r} is not a Poisson step at the loader's rate {self.sample_rate}, "
                "so dpkit cannot count it under the TruncatedPoissonLoader's truncation. Use noise='gaussian'.")
        return TruncatedPoissonSampledEvent(self.truncation[0], self.sample_rate, self.truncation[1], event.event)


def resolve(loader: DataLoader | None, *, poisson: bool, sample_rate, expected_batch_size, loss_reduction: str,
            secure_mode: bool, world_size: int, noise_seed: int | None = None) -> Sampling:
    if loader is None:
        if sample_rate is None:
            raise ValueError("give data_loader=, or sample_rate= (and expected_batch_size=) for a loop that "
                             "samples its own batches")
        q = number(sample_rate, "sample_rate", 0, low_ok=False)
        if q > 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if expected_batch_size is None and loss_reduction == "mean":
            raise ValueError(
                "with data_loader=None and loss_reduction='mean', give expected_batch_size= (q times the "
                "dataset size): dividing by the actual batch size would reveal it through the noise scale.")
        _warn_own_sampling(secure_mode, "data_loader=None")
        if world_size > 1:
            warnings.warn(
                f"data_loader=None under torch.distributed: sample_rate={q:g} and expected_batch_size are taken as "
                "global, and dpkit cannot check that the ranks' batches together form one Poisson sample with "
                "each example on one rank at most; dpkit.DPDataLoader(..., distributed=True) does.", stacklevel=5)
        size = None if expected_batch_size is None else number(expected_batch_size, "expected_batch_size", 0,
                                                               low_ok=False)
        return Sampling(None, q, size, poisson)
    if sample_rate is not None or expected_batch_size is not None:
        raise ValueError("sample_rate= and expected_batch_size= go with data_loader=None; with a data loader "
                         "dpkit takes them from the loader (q = batch_size / len(dataset)).")
    n = check_loader(loader, poisson, world_size=world_size,
                     warn=isinstance(loader, DPDataLoader) or not poisson)  # else from_data_loader warns, once
    if poisson:
        if not isinstance(loader, DPDataLoader):
            loader = DPDataLoader.from_data_loader(loader, secure_mode=secure_mode, distributed=world_size > 1,
                                                   generator=_sampling_generator(noise_seed, secure_mode, world_size))
        elif secure_mode and not loader.secure_mode:
            raise PrivacyUsageError("secure_mode=True with a DPDataLoader that samples from a seeded generator; "
                                    "build it with DPDataLoader(..., secure_mode=True) or pass a plain DataLoader.")
        elif loader.world_size != world_size:
            raise PrivacyUsageError(
                f"the DPDataLoader samples for world size {loader.world_size}, and torch.distributed runs with "
                f"{world_size}: every rank would draw from the whole dataset, so the global batch would "
                "not be the Poisson sample the accountant counts. Build it with DPDataLoader(..., "
                "distributed=True) after init_process_group, or pass a plain DataLoader.")
        if isinstance(loader, TruncatedPoissonLoader):
            return Sampling(loader, loader.sample_rate, loader.expected_batch_size, poisson,
                            (n, loader.max_batch_size))
        return Sampling(loader, loader.sample_rate, loader.sample_rate * n, poisson)
    batch_size = loader.batch_size * world_size  # each rank's loader yields its own share
    _warn_own_sampling(secure_mode, "poisson_sampling='unproven'")
    warnings.warn("poisson_sampling='unproven': batches are not Poisson-sampled, but the privacy accounting "
                  "assumes they are; the reported epsilon is not a proven bound for shuffled fixed-size batches, "
                  "and may be several times too small (arXiv 2411.10614).", stacklevel=5)
    return Sampling(loader, min(1.0, batch_size / n), float(batch_size), poisson)


def _warn_own_sampling(secure_mode: bool, why: str) -> None:
    if secure_mode:
        warnings.warn(f"secure_mode=True with {why}: the noise comes from the OS's CSPRNG, but the batches come "
                      "from your own sampling, which secure mode does not cover; sample them with a CSPRNG "
                      "(dpkit.secure.uniform) or let dpkit's loader do it.", stacklevel=6)


def _sampling_generator(noise_seed: int | None, secure_mode: bool, world_size: int) -> torch.Generator | None:
    """Under torch.distributed, the batches' generator from ``noise_seed`` (else rank 0 draws a seed from the OS), so
    that a run with a seed is reproducible; one process samples from torch's global generator as before. Whoever
    knows the seed knows the noise already (docs/privacy.md): deriving the sampling from it reveals nothing more."""
    if secure_mode or noise_seed is None or world_size == 1:
        return None
    return torch.Generator().manual_seed(digest(("dpkit sampling", int(noise_seed))))
