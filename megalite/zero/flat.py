"""One flat buffer per group of parameters, sharded over the data-parallel group.

A ``FlatGroup`` holds a contiguous run of one layer unit's parameters (at most one bucket of
them) in one flat tensor, padded to a multiple of the shard count; shard rank ``r`` owns elements
``[r*S, (r+1)*S)``. Each parameter is a view of the flat tensor, so

- one collective moves a whole group (all-reduce, reduce-scatter of its gradient, all-gather of
  its parameters), and
- ZeRO-3 frees a group's parameters by shrinking the flat tensor's storage to nothing and brings
  them back by re-growing it and all-gathering the shards into it: the parameters (views) never
  change identity, so modules, optimizer segments and hooks stay valid.

``segments`` are the parts of parameters that fall inside this rank's shard: the optimizer steps
them, the gradient norm sums them, nothing else needs to know where the shard boundaries fall.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from megalite.parallel import comm

# Writing gathered values into the flat tensor must not bump the parameters' version counter:
# autograd saved them in forward and checks the version in backward (same values by then).
# The version is captured when the context is made and restored when it exits; gloo's async
# all-gather copies into the output from its own thread when the work completes, so the context
# must exit after ``wait()``, not when the call returns.
_preserve = getattr(torch.autograd.grad_mode, "_unsafe_preserve_version_counter", None)


def preserve_version(t: torch.Tensor):
    return _preserve(t) if _preserve is not None else contextlib.nullcontext()


class _Done:
    def wait(self) -> None:
        pass


class GradState:
    """A group's gradient storage and bookkeeping for the current step (see ``zero/grads.py``
    for the two policies that use it)."""
    __slots__ = ("full", "shard", "bucket", "pending", "launched", "filled", "seen")
    full: Optional[torch.Tensor]  # full-size accumulation buffer (FullGrads), else None
    shard: torch.Tensor  # the owned, reduced gradient shard the optimizer reads
    bucket: Optional[torch.Tensor]  # ShardGrads: the bucket being filled
    pending: int  # FullGrads: contributions still to come this step
    launched: bool  # FullGrads: reduction started this step
    filled: int  # ShardGrads: members with a contribution in the bucket
    seen: bytearray  # which members hold a contribution (in the bucket; FullGrads: this step)

    def __init__(self, shard: torch.Tensor, full: Optional[torch.Tensor] = None):
        self.full, self.shard, self.bucket = full, shard, None
        self.pending, self.launched, self.filled, self.seen = 0, False, 0, bytearray()


@dataclass
class Segment:
    """The part of parameter ``index`` that lies in this rank's shard."""
    index: int  # parameter index within the group
    start: int  # offset within the shard
    param_start: int  # offset within the flattened parameter
    numel: int


class FlatGroup:
    __slots__ = ("names", "params", "offsets", "used", "numel", "shards", "rank", "shard_numel",
                 "lo", "hi", "segments", "flat", "shard", "gathered", "handle", "_version",
                 "index", "num_grads", "grad", "unit")

    def __init__(self, names: List[str], params: List[nn.Parameter], shards: int, rank: int,
                 unit: int = 0):
        self.names, self.params = names, params
        self.unit = unit  # index of the layer unit the group belongs to (forward order)
        self.offsets, off = [], 0
        for p in params:
            self.offsets.append(off)
            off += p.numel()
        self.used = off
        self.numel = -(-off // shards) * shards  # padded to a multiple of the shard count
        self.shards, self.rank = shards, rank
        self.shard_numel = self.numel // shards
        self.lo = rank * self.shard_numel
        self.hi = self.lo + self.shard_numel
        self.segments: List[Segment] = []
        for i, (p, o) in enumerate(zip(params, self.offsets)):
            a, b = max(o, self.lo), min(o + p.numel(), self.hi)
            if a < b:
                self.segments.append(Segment(i, a - self.lo, a - o, b - a))
        self.flat: Optional[torch.Tensor] = None  # full parameters (views point into it)
        self.shard: Optional[torch.Tensor] = None  # ZeRO-3: this rank's persistent shard
        self.gathered = True
        self.handle = None  # an all-gather in flight
        self._version = None  # version-counter guard held while an all-gather writes
        self.index: dict = {}  # parameter -> its position in ``params`` (after materialize)
        self.num_grads = 0  # members that receive gradients
        self.grad: Optional[GradState] = None  # set by the engine's gradient policy

    # ---- parameters -----------------------------------------------------------------------
    def materialize(self, fill, dtype: torch.dtype, device) -> List[nn.Parameter]:
        """Allocate the flat tensor, fill each parameter's values (``fill(name, shape)``),
        return the new parameters (views)."""
        self.flat = torch.zeros(self.numel, dtype=dtype, device=device)
        new = []
        with torch.no_grad():
            for name, p, o in zip(self.names, self.params, self.offsets):
                view = self.flat[o:o + p.numel()].view(p.shape)
                view.copy_(fill(name, p.shape))
                new.append(nn.Parameter(view, requires_grad=p.requires_grad))
        self.params = new
        self.index = {p: i for i, p in enumerate(new)}
        self.num_grads = sum(p.requires_grad for p in new)
        return new

    def keep_shard_only(self) -> None:
        """ZeRO-3: keep this rank's shard, free the full flat storage."""
        self.shard = self.flat[self.lo:self.hi].clone()
        self.free()

    @property
    def full_bytes(self) -> int:
        return self.numel * self.flat.element_size()

    def owned(self) -> torch.Tensor:
        """This rank's shard of the parameters (ZeRO-3: the persistent shard)."""
        return self.shard if self.shard is not None else self.flat[self.lo:self.hi]

    def free(self) -> None:
        self.flat.untyped_storage().resize_(0)
        self.gathered = False

    def gather(self, group, meter=None, async_op: bool = False) -> None:
        """ZeRO-3: re-grow the flat storage and all-gather every rank's shard into it."""
        if self.gathered or self.handle is not None:
            return
        self.flat.untyped_storage().resize_(self.full_bytes)
        self._version = preserve_version(self.flat)
        self._version.__enter__()
        handle = comm.all_gather_into(self.flat, self.shard, group, meter, async_op=async_op)
        self.handle = handle if handle is not None else _Done()  # None: done (or no peers)
        if not async_op:
            self.wait()

    def wait(self) -> None:
        if self.handle is not None:
            self.handle.wait()
            self._version.__exit__(None, None, None)
            self.handle = None
            self.gathered = True

    def all_gather_params(self, group, meter=None):
        """ZeRO-1/2 after the optimizer step: every rank's updated shard into the full flat
        (between steps: no saved graph refers to the parameters, the version may move)."""
        # in place: the input is this rank's chunk of the output (NCCL documents it; gloo is
        # checked by the ZeRO tests' equality with plain data parallelism)
        return comm.all_gather_into(self.flat, self.flat[self.lo:self.hi], group, meter,
                                    async_op=True)

    # ---- views of a flat tensor laid out like the parameters -------------------------------
    def param_views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return [flat[o:o + p.numel()].view(p.shape) for p, o in zip(self.params, self.offsets)]

    def segment_views(self, shard: torch.Tensor) -> List[torch.Tensor]:
        return [shard[s.start:s.start + s.numel] for s in self.segments]

    def values(self, full: torch.Tensor) -> dict:
        """name -> a parameter's values, from a full flat tensor laid out like this group."""
        return {n: v.detach().clone() for n, v in zip(self.names, self.param_views(full))}
