"""Run a function on W gloo ranks on 127.0.0.1 and collect what each rank returns."""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, folder: str, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        result = fn(*args)
    except BaseException as err:  # the parent re-raises it with the rank
        result = RuntimeError(f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
    torch.save(result, os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


def run(fn, world: int, *args) -> list:
    """``fn(*args)`` on each of ``world`` ranks; the list of their results, rank by rank."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_entry, args=(world, _free_port(), folder, fn, args), nprocs=world,
                           start_method="spawn")
        results = [torch.load(os.path.join(folder, f"{r}.pt"), weights_only=False) for r in range(world)]
    for r in results:
        if isinstance(r, RuntimeError):
            raise r
    return results
