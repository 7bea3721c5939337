"""Data for DP training: Poisson-sampled batches, K augmented copies, users' examples, physical micro-batches,
the samplers correlated-noise mechanisms require (cyclic Poisson for BandMF, shuffled epochs for the tree), and
fixed-shape truncated Poisson batches."""
from dpkit.data._loaders import (ByUser, CyclicPoissonBatchSampler, CyclicPoissonLoader, DPDataLoader, Multiplicity,
                                 PoissonBatchSampler, ShuffledBatchLoader, ShuffledBatchSampler, check_loader,
                                 collate_copies, split_batch)
from dpkit.data.truncated import TruncatedPoissonBatchSampler, TruncatedPoissonLoader

__all__ = ["ByUser", "CyclicPoissonBatchSampler", "CyclicPoissonLoader", "DPDataLoader", "Multiplicity",
           "PoissonBatchSampler", "ShuffledBatchLoader", "ShuffledBatchSampler", "TruncatedPoissonBatchSampler",
           "TruncatedPoissonLoader", "check_loader", "collate_copies", "split_batch"]
