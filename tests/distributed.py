"""``run_distributed(fn, world_size, ...)``: run ``fn(*args)`` on ``world_size`` spawned gloo
ranks and return each rank's result.

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port), one torch
thread, and a deadline: a hang fails the test within ``timeout_s`` instead of blocking CI. The
first failing rank's traceback is re-raised in pytest. Spawning costs seconds per world, so put
several checks inside one ``fn``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from typing import Any, Callable, List

from megalite.launcher.local import free_port


def _worker(fn, rank, world_size, port, args, kwargs, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        # plain pickle: tensors travel by value, not as shared memory this rank (about to
        # exit) would have to keep serving until the parent reads them
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 120.0,
                    **kwargs) -> List[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, kwargs, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: List[Any] = [None] * world_size
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no result within "
                                   f"{timeout_s:.0f} s (a hang?)") from None
            if not ok:
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return out
