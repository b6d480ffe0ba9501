"""Point-to-point transfers between pipeline ranks, and the rules that keep them from stalling
on NCCL.

NCCL is stricter than gloo: it ignores tags (the k-th send from A to B meets the k-th receive
on B from A of the same communicator), it runs every operation of a communicator in order on
one stream, and a large send does not finish until its receive is running on the peer. A
``batch_isend_irecv`` is one NCCL group: its operations run together and it finishes when all
of them have; its one work handle covers them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

from megalite.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Op:
    """One send (``send``) or receive of ``tensor`` to / from global rank ``peer`` over
    ``group`` (the direction's ``ParallelDims.p2p_groups`` entry); ``tag`` names the transfer
    (gloo matches on it, NCCL only on order)."""
    send: bool
    tensor: torch.Tensor
    peer: int
    tag: int
    group: Optional[object] = None


class Work(Protocol):
    def wait(self) -> object: ...

    def is_completed(self) -> bool: ...


class Transport(Protocol):
    """Posts operations of one group together and returns one handle for all of them."""

    def post(self, ops: List[Op]) -> Work: ...


class _Batch:
    """The works of one batch as one handle (gloo returns one per operation, NCCL one)."""

    def __init__(self, works: list):
        self.works = [w for w in works if w is not None]

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


class TorchTransport:
    """``torch.distributed.batch_isend_irecv``: on NCCL one group on the communicator of the
    operations' process group (a lone ``dist.send`` would open a new two-rank communicator)."""

    def post(self, ops: List[Op]) -> Work:
        return _Batch(dist.batch_isend_irecv([
            dist.P2POp(dist.isend if op.send else dist.irecv, op.tensor, op.peer, op.group,
                       op.tag) for op in ops]))


@dataclass
class P2P:
    """One step's transfers of a pipeline rank, each direction on its own process group.

    A send is posted as soon as its tensor exists, a receive when it is needed, and waited for
    at once. With one stream per direction and no tags needed (each direction is first in,
    first out), a blocked send holds up only later sends the same way, which the peer receives
    later anyway: NCCL runs what gloo runs (``tests/test_nccl_replay.py`` replays every
    schedule under NCCL's rules).

    Freeing sent activations (their values; the autograd graph stays) needs the send's
    ``wait()``: torch keeps a sent tensor alive until then. On CPU ``wait()`` blocks, so a send
    is waited for once ``is_completed()`` says it is done (polled at every transfer) or when
    the step ends — and gloo's send works report done only after ``wait()`` (measured, torch
    2.13), so on CPU a step keeps its sent activations until its end. On CUDA
    (``stream_ordered``) ``wait()`` only makes later work wait for the send, and the memory is
    reused in stream order; but waiting for a send at once, or at the
    very next receive, makes this rank's later transfers wait for the peer to reach its
    receive, and the interleaved schedule stalls (the replay shows it). So a send is waited for
    at the second receive posted after it, which the replay shows never stalls.
    """
    dims: ParallelDims
    num_micro: int
    transport: Transport
    stream_ordered: bool = False
    inflight: List[Tuple[Work, torch.Tensor]] = field(default_factory=list)  # oldest first
    _aged: int = 0  # how many of ``inflight`` were posted before the last receive

    def _peer(self, pp_rank: int) -> int:
        """Global rank of this rank's peer at pipeline rank ``pp_rank``."""
        return self.dims.rank_of(pp_rank % self.dims.pp, self.dims.dp_rank, self.dims.tp_rank)

    def _group(self, src_pp: int, dst_pp: int) -> Optional[object]:
        return self.dims.p2p_groups.get((src_pp % self.dims.pp, dst_pp % self.dims.pp))

    def _tag(self, vstage: int, micro: int, kind: int) -> int:
        return (vstage * self.num_micro + micro) * 2 + kind

    def send(self, tensor: torch.Tensor, to_pp: int, vstage: int, micro: int, kind: int) -> None:
        """Post a send of ``tensor`` (from virtual stage ``vstage``) now."""
        self.dims.meter.record("p2p", tensor)
        op = Op(True, tensor, self._peer(to_pp), self._tag(vstage, micro, kind),
                self._group(self.dims.pp_rank, to_pp))
        self.inflight.append((self.transport.post([op]), tensor))
        if not self.stream_ordered:
            self._free_completed()

    def recv(self, shape, dtype, device, from_pp: int, vstage: int, micro: int,
             kind: int) -> torch.Tensor:
        """Post this receive and wait for it."""
        buf = torch.empty(shape, dtype=dtype, device=device)
        op = Op(False, buf, self._peer(from_pp), self._tag(vstage, micro, kind),
                self._group(from_pp, self.dims.pp_rank))
        work = self.transport.post([op])
        if self.stream_ordered:
            self._free_oldest(self._aged)
            self._aged = len(self.inflight)
        else:
            self._free_completed()
        work.wait()
        return buf

    def flush(self) -> None:
        """Wait for every send of the step."""
        self._free_oldest(len(self.inflight))
        self._aged = 0

    def _free_oldest(self, count: int) -> None:
        """Wait for the ``count`` oldest in-flight sends and free their values."""
        for work, tensor in self.inflight[:count]:
            work.wait()
            free_values(tensor)
        self.inflight = self.inflight[count:]

    def _free_completed(self) -> None:
        """Free the values of the sends that are done."""
        still = []
        for work, tensor in self.inflight:
            if work.is_completed():
                work.wait()
                free_values(tensor)
            else:
                still.append((work, tensor))
        self.inflight = still


def free_values(tensor: torch.Tensor) -> None:
    """Drop a sent activation's values, keep its autograd graph (Megatron's
    ``deallocate_output_tensor``)."""
    tensor.data = torch.empty((1,), dtype=tensor.dtype, device=tensor.device)
