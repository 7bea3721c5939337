"""Run a function on W gloo ranks on 127.0.0.1 and collect what each rank returns."""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, folder: str, fn, args: tuple) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    # A file store in the launch's own folder: two launches at once (pytest-xdist) cannot meet on one TCP port,
    # as they could when each picked a "free" port and bound it later.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        result = fn(*args)
    except BaseException as err:  # the parent re-raises it with the rank
        result = RuntimeError(f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
    torch.save(result, os.path.join(folder, f"{rank}.pt"))
    dist.barrier()  # every rank done with its collectives before the group goes (gloo aborts otherwise, now and then)
    dist.destroy_process_group()


def run(fn, world: int, *args) -> list:
    """``fn(*args)`` on each of ``world`` ranks; the list of their results, rank by rank."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_entry, args=(world, folder, fn, args), nprocs=world,
                           start_method="spawn")
        results = [torch.load(os.path.join(folder, f"{r}.pt"), weights_only=False) for r in range(world)]
    for r in results:
        if isinstance(r, RuntimeError):
            raise r
    return results
