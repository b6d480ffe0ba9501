"""``checkpoint.async_save``: a checkpoint is written while training goes on.

The save copies this rank's boxes to host memory (the only part on the step's critical path) and
hands the copy to one writer thread, whose collectives (DCP's planning, the manifest's gather)
run on a gloo group of their own, created once at start-up by every rank — as torchtitan does —
so they never interleave with the training's collectives, on gloo or NCCL alike. One save is in
flight at a time: the next save, the end of training and a preemption wait for it, and its
error (a full disk) surfaces there.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Optional

import torch.distributed as dist

from megalite.zero.state import ShardEntry


def staged(entries: Dict[str, ShardEntry]) -> Dict[str, ShardEntry]:
    """A host copy of the boxes this rank writes (replicas are another rank's to write)."""
    return {key: ShardEntry(e.global_shape, list(e.boxes),
                            [t.detach().to("cpu", copy=True) for t in e.tensors])
            for key, e in entries.items() if not e.replica}


class AsyncSaver:
    def __init__(self, world_size: int):
        # a collective: every rank builds its Trainer, hence this, at start-up
        self.group = (dist.new_group(backend="gloo")
                      if dist.is_initialized() and world_size > 1 else None)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megalite-ckpt")
        self.pending: Optional[Future] = None

    def submit(self, save: Callable[..., str], *args, **kwargs) -> None:
        self.wait()
        self.pending = self.pool.submit(save, *args, **kwargs)

    def wait(self) -> Optional[str]:
        """The in-flight save's checkpoint path (None if none); re-raises its error."""
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Wait for the in-flight save, then end the writer thread (``Trainer.fit`` does, when
        training ends)."""
        try:
            self.wait()
        finally:
            self.pool.shutdown()


__all__ = ["AsyncSaver", "staged"]
