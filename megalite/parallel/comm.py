"""The one thin layer every collective goes through, so bytes can be counted per kind.

A ``group`` of None (or of size 1) means "no peers": every function is then a no-op, which is
how the single-process reference runs the same code path as the parallel one.

gloo (CPU) has no native flat all-gather or reduce-scatter: its ``all_gather_into_tensor``
gathers into a temporary tensor and copies every chunk out, its ``reduce_scatter_tensor``
all-reduces a clone of the whole input and copies this rank's chunk out. On gloo, therefore:

- ``all_gather_into`` broadcasts each rank's chunk of the output in place from its owner (one
  broadcast per rank, asynchronous together): the same bytes per rank as a ring all-gather, no
  temporary, no copy (4.6 -> 2.8 ms for a 7 MB group here);
- ``reduce_scatter_into`` with the output being this rank's chunk of the input (in place, as
  ZeRO's flat groups call it) all-reduces the input itself: what gloo does anyway, without the
  clone and the copy (9.3 -> 6.0 ms). The input then holds the sum in every chunk.

The meter counts them as the all-gather and reduce-scatter they are, at the usual wire factor
(gloo's reduce-scatter really sends what an all-reduce sends, with or without this shortcut).
Results are bitwise those of gloo's own collectives (the same all-reduce; copies).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Optional

import torch
import torch.distributed as dist


# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Bytes a rank sends per byte of message in the ring/tree algorithms of NCCL and gloo, for a
# group of n: an all-reduce is a reduce-scatter plus an all-gather.
_WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
         "reduce_scatter": lambda n: (n - 1) / n}


class CommMeter:
    """Per kind of collective since the last ``take()``: ``bytes`` is the message size (for
    all-gather and reduce-scatter the full, gathered size), ``wire`` the bytes one rank sends
    (``bytes`` x 2(n-1)/n for an all-reduce, x (n-1)/n for all-gather and reduce-scatter)."""

    def __init__(self):
        self.bytes: Dict[str, int] = defaultdict(int)
        self.wire: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)

    def record(self, kind: str, tensor: torch.Tensor, group=None) -> None:
        size = tensor.numel() * tensor.element_size()
        self.bytes[kind] += size
        n = group_size(group)
        self.wire[kind] += size * _WIRE[kind](n) if kind in _WIRE else size
        self.calls[kind] += 1

    def take(self, wire: bool = False) -> Dict[str, int]:
        """Message bytes per kind (with ``wire``, also the wire bytes as ``wire.<kind>``);
        resets the counts."""
        out = dict(self.bytes)
        if wire:
            out.update({f"wire.{k}": int(round(v)) for k, v in self.wire.items()})
        self.bytes.clear()
        self.wire.clear()
        self.calls.clear()
        return out


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


_GLOO: Dict[object, bool] = {}


def _gloo(group) -> bool:
    if group not in _GLOO:
        _GLOO[group] = dist.get_backend(group) == "gloo"
    return _GLOO[group]


class _Works:
    """Several collectives' works as one."""

    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


def _chunk_of(out: torch.Tensor, full: torch.Tensor, group) -> bool:
    """Is ``out`` this rank's dim-0 chunk of the contiguous ``full``?"""
    n = group_size(group)
    return (full.is_contiguous() and out.is_contiguous() and out.numel() * n == full.numel()
            and out.data_ptr() == full.data_ptr()
            + dist.get_rank(group) * out.numel() * full.element_size())


def all_reduce(tensor: torch.Tensor, group, meter: Optional[CommMeter] = None,
               op=dist.ReduceOp.SUM, async_op: bool = False):
    """In-place all-reduce over ``group``; returns the work handle when ``async_op``."""
    if group_size(group) == 1:
        return None
    if meter is not None:
        meter.record("all_reduce", tensor, group)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group, meter: Optional[CommMeter] = None) -> None:
    """In-place broadcast from global rank ``src`` over ``group``."""
    if group_size(group) == 1:
        return
    if meter is not None:
        meter.record("broadcast", tensor, group)
    dist.broadcast(tensor, src=src, group=group)


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group,
                    meter: Optional[CommMeter] = None, async_op: bool = False):
    """``output`` (every rank's ``tensor`` concatenated along dim 0). The meter counts the
    gathered (full) size as the message and (n-1)/n of it as wire bytes: in a ring an all-reduce
    of N bytes is a reduce-scatter plus an all-gather of N, so AG + RS send what one AR sends."""
    if group_size(group) == 1:
        output.copy_(tensor.reshape(output.shape))
        return None
    if meter is not None:
        meter.record("all_gather", output, group)
    if _gloo(group) and output.is_contiguous():
        return _gather_by_broadcasts(output, tensor, group, async_op)
    return _all_gather(output, tensor.contiguous(), group=group, async_op=async_op)


def _gather_by_broadcasts(output: torch.Tensor, tensor: torch.Tensor, group, async_op: bool):
    chunks = output.chunk(group_size(group))
    mine = chunks[dist.get_rank(group)]
    if mine.data_ptr() != tensor.data_ptr():
        mine.copy_(tensor.reshape(mine.shape))
    works = _Works([dist.broadcast(c, src=dist.get_global_rank(group, r), group=group,
                                   async_op=True) for r, c in enumerate(chunks)])
    if async_op:
        return works
    works.wait()
    return None


def reduce_scatter_into(output: torch.Tensor, tensor: torch.Tensor, group,
                        meter: Optional[CommMeter] = None, async_op: bool = False):
    """``output`` <- this rank's dim-0 chunk of the sum over ranks of ``tensor``. The meter
    counts the full (input) size, the same convention as ``all_gather_into``."""
    if group_size(group) == 1:
        output.copy_(tensor.reshape(output.shape))
        return None
    if meter is not None:
        meter.record("reduce_scatter", tensor, group)
    if _gloo(group) and _chunk_of(output, tensor, group):  # in place: the input is summed
        return dist.all_reduce(tensor, group=group, async_op=async_op)
    return _reduce_scatter(output, tensor.contiguous(), group=group, async_op=async_op)
