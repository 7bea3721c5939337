"""Ranks that fall out of step are refused on every rank, naming the rank; ranks that disagree name the argument."""
from __future__ import annotations

from tests.distributed import _launch


def _skipping_rank(skipper: int) -> str:
    import warnings

    import torch
    from torch import nn

    import dpkit
    from dpkit.errors import PrivacyUsageError
    from tests.distributed._workers import build, data

    model = build("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=dpkit.DPDataLoader(data(), 0.3, distributed=True),
                                     noise_multiplier=0.0, max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
    batches = iter(private.data_loader)

    def step():
        x, y, _ = next(batches)
        private.optimizer.zero_grad()
        private.criterion(model(x), y).backward()
        private.optimizer.step()

    step()
    if torch.distributed.get_rank() == skipper:
        next(batches)  # "zero_grad() and go on" on one rank only: its next batch pairs with the others' current
    try:
        step()
    except PrivacyUsageError as err:
        return str(err)
    return "released"


def _differing_sigma(_) -> str:
    import warnings

    import torch
    from torch import nn

    import dpkit
    from tests.distributed._workers import build, data

    model = build("none")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=dpkit.DPDataLoader(data(), 0.3, distributed=True),
                               noise_multiplier=1.0 + torch.distributed.get_rank(), max_grad_norm=1.0,
                               criterion=nn.CrossEntropyLoss())
    except dpkit.PrivacyUsageError as err:
        return str(err)
    return "made"


def _loader_on_one_rank(_) -> str:
    import warnings

    import torch
    from torch import nn

    import dpkit
    from tests.distributed._workers import build, data

    model = build("none")
    loader = dict(data_loader=None, sample_rate=0.3, expected_batch_size=6) if torch.distributed.get_rank() == 0 \
        else dict(data_loader=torch.utils.data.DataLoader(data(), batch_size=6))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **loader,
                               noise_multiplier=1.0, max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
    except dpkit.PrivacyUsageError as err:
        return str(err)
    return "made"


def test_ranks_that_differ_in_the_data_loader_name_it():
    # Was: a message about seeds, from the first collective the two ranks paired up wrongly (issue 22.9).
    for message in _launch.run(_loader_on_one_rank, 2, None):
        assert "data_loader: rank 0 'NoneType' / rank 1 'DataLoader'" in message and "seed" not in message


def test_a_rank_that_skips_a_batch_is_refused_on_every_rank():
    for message in _launch.run(_skipping_rank, 2, 1):
        assert "differ between rank 0 and rank(s) [1]" in message and "skipped" in message


def test_ranks_that_differ_in_sigma_name_the_argument():
    for message in _launch.run(_differing_sigma, 2, None):
        assert "noise_multiplier: rank 0 1.0 / rank 1 2.0" in message


def _batches_of_runs(seeds) -> list:
    import warnings

    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    import dpkit
    from tests.distributed._workers import build, data

    out = []
    for seed in seeds:
        model = build("none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(data(), batch_size=4), noise_multiplier=1.0,
                                         max_grad_norm=1.0, criterion=nn.CrossEntropyLoss(), noise_seed=seed)
        batches = iter(private.data_loader)
        out.append([next(batches)[2].tolist() for _ in range(3)])
        private.detach()
    return out


def test_a_seeded_distributed_run_samples_the_same_batches_again():
    """Issue 22: a plain DataLoader's Poisson twin took rank 0's os.urandom, so no run could be repeated."""
    for first, again, other in _launch.run(_batches_of_runs, 2, [5, 5, 6]):
        assert first == again and first != other


def _freezing_rank(freezer: int) -> str:
    import warnings

    import torch
    from torch import nn

    import dpkit
    from dpkit.errors import PrivacyUsageError
    from tests.distributed._workers import build, data

    model = nn.parallel.DistributedDataParallel(build("none"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=dpkit.DPDataLoader(data(), 0.3, distributed=True),
                                     noise_multiplier=0.0, max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
        if torch.distributed.get_rank() == freezer:
            model.module.mix.requires_grad_(False)  # after make_private, on one rank only
        x, y, _ = next(iter(private.data_loader))
        private.optimizer.zero_grad()
        private.criterion(model(x), y).backward()
        try:
            private.optimizer.step()
        except PrivacyUsageError as err:
            return str(err)
    return "released"


def test_a_rank_that_freezes_a_parameter_alone_is_refused_on_every_rank():
    """Issue 22: under DDP this ended in a gloo 'Connection reset' that killed the other rank."""
    for message in _launch.run(_freezing_rank, 2, 1):
        assert "trainable parameters differ between rank 0 and rank(s) [1]" in message


def _fsdp_freezing_other_parameters(_) -> str:
    import warnings

    import torch
    from torch import nn

    import dpkit
    from tests.distributed._workers import build, data

    model = build("fsdp")
    frozen = model.norm.weight if torch.distributed.get_rank() == 0 else model.norm.bias  # one shape, [8]
    frozen.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=dpkit.DPDataLoader(data(), 0.3, distributed=True),
                               noise_multiplier=0.0, max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
    except dpkit.PrivacyUsageError as err:
        return str(err)
    return "made"


def test_fsdp_ranks_that_freeze_different_parameters_of_one_shape_are_refused():
    """Issue 22.9: only the number of trainable tensors was compared, so this passed make_private and gloo aborted
    at the reduce-scatter."""
    for message in _launch.run(_fsdp_freezing_other_parameters, 2, None):
        assert "trainable names" in message and "rank 0" in message and "rank 1" in message
