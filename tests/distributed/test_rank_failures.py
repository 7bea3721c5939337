"""A rank that raises and stays alive, or a rank that is killed: the surviving rank fails in the step's collective
with torch's named error (a timeout, a closed connection), and releases nothing (docs/faults.md)."""
from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 4  # the process group's: short, so that the surviving rank's wait ends in seconds


def _survivor(rank: int, fault: str) -> dict:
    import warnings

    from torch import nn

    import dpkit
    from tests.distributed._workers import build, data

    model = build("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=dpkit.DPDataLoader(data(), 0.3, distributed=True),
                                     noise_multiplier=1.0, max_grad_norm=1.0, criterion=nn.CrossEntropyLoss(),
                                     noise_seed=5)
    batches = iter(private.data_loader)
    for step in range(2):
        x, y, _ = next(batches)
        private.optimizer.zero_grad()
        private.criterion(model(x), y).backward()
        if step == 1 and rank == 1:
            if fault == "killed":
                os._exit(17)
            time.sleep(TIMEOUT_S + 4)  # raised and stayed alive: the other rank waits in the step's collective
            return {"raised": True}
        before = [p.detach().clone() for p in model.parameters()]
        try:
            private.optimizer.step()
        except Exception as err:  # torch's error: a timeout, or the peer's closed connection
            unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            return {"error": f"{type(err).__name__}: {err}", "unchanged": unchanged,
                    "ledger_steps": private.ledger.steps, "steps": private.steps}
    return {"error": None}


def _entry(rank: int, world: int, folder: str, fault: str) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    torch.save(_survivor(rank, fault), os.path.join(folder, f"{rank}.pt"))
    os._exit(0)  # the group is broken: destroying it would wait on the failed rank


@pytest.mark.parametrize("fault", ["raised", "killed"])
def test_the_surviving_rank_fails_by_name_and_releases_nothing(fault):
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_entry, args=(2, folder, fault), nprocs=2, start_method="spawn", join=False)
        for process in context.processes:  # each on its own: context.join() would end rank 0 when rank 1 dies
            process.join(timeout=120)
        assert [p.exitcode for p in context.processes] == [0, 17 if fault == "killed" else 0]
        survivor = torch.load(os.path.join(folder, "0.pt"), weights_only=False)
    assert survivor["error"] is not None, "rank 0 released a step its peer never joined"
    assert survivor["unchanged"] and survivor["steps"] == 1 and survivor["ledger_steps"] == 1
