"""Autograd-aware collectives of tensor (and sequence) parallelism.

Each op is a pair of conjugate collectives: what the forward does, the backward undoes in the
gradient's space. With ``p`` ranks in ``group`` and activations batch-first ``[b, s, h]``:

======================  ==========================================  ================================
op                      forward                                     backward
======================  ==========================================  ================================
``reduce_from_tp`` (g)  all-reduce (sum)                            identity
``reduce_scatter_seq``  reduce-scatter along the sequence dim       all-gather along it
``gather_from_tp``      all-gather along ``dim``                    keep own chunk of ``dim``
======================  ==========================================  ================================

Megatron-LM's f and g (Shoeybi et al. 2019): ``Y = GeLU(f(X) A) B`` then ``Z = g(Y)`` makes one
all-reduce per direction. f (identity forward, all-reduce backward) is fused into the
column-parallel layer (``layers.column_parallel``), whose backward overlaps that all-reduce
with the weight-gradient matmuls; it uses ``start_all_reduce`` / ``start_reduce_scatter``.
Sequence parallelism (Korthikanti et al. 2022) replaces f by ḡ (all-gather of the
sequence-split activation forward, reduce-scatter backward: fused there too) and g by
``reduce_scatter_seq``: the same bytes, but the activations between the blocks live split
along the sequence. ``gather_from_tp`` collects vocabulary-sharded logits for generation.

Every collective goes through :mod:`megalite.parallel.comm`, so a ``meter`` counts the bytes.
A ``group`` of None or of size 1 makes every op the identity. Forwards never modify their input:
all-reduces run on a copy.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist

from megalite.parallel import comm
from megalite.parallel.comm import CommMeter

__all__ = ["reduce_from_tp", "gather_from_tp", "reduce_scatter_seq", "split_along",
           "gather_along", "reduce_scatter_along", "all_reduce_copy", "start_all_reduce",
           "start_reduce_scatter", "tp_rank_of"]


def tp_rank_of(group) -> int:
    """This process's rank inside ``group`` (0 when there is no group)."""
    return 0 if comm.group_size(group) == 1 else dist.get_rank(group)


def _check_divisible(x: torch.Tensor, dim: int, world: int) -> None:
    size = x.shape[dim]
    if size % world != 0:
        raise ValueError(f"tensor parallel: dim {dim} of shape {tuple(x.shape)} has size {size}, "
                         f"not divisible by the group size {world}")


def split_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk ``x_r`` of ``x = [x_0 ... x_{p-1}]`` along ``dim`` (a contiguous copy)."""
    world = comm.group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    _check_divisible(x, dim, world)
    return x.chunk(world, dim)[tp_rank_of(group)].contiguous()


def gather_along(x: torch.Tensor, group, dim: int,
                 meter: Optional[CommMeter] = None) -> torch.Tensor:
    """``[x_0 ... x_{p-1}]`` concatenated along ``dim``: one all-gather on dim 0 of ``x`` with
    ``dim`` moved to the front."""
    world = comm.group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] * world, *front.shape[1:]))
    comm.all_gather_into(out, front, group, meter)
    return out.movedim(0, dim).contiguous() if dim != 0 else out


def reduce_scatter_along(x: torch.Tensor, group, dim: int,
                         meter: Optional[CommMeter] = None) -> torch.Tensor:
    """This rank's chunk along ``dim`` of ``sum_r x^(r)`` (the sum over ranks)."""
    return start_reduce_scatter(x, group, dim, meter)()


def start_reduce_scatter(x: torch.Tensor, group, dim: int,
                         meter: Optional[CommMeter] = None) -> Callable[[], torch.Tensor]:
    """Start ``reduce_scatter_along(x, group, dim)`` asynchronously; the returned call waits
    for it and gives the result."""
    world = comm.group_size(group)
    if world == 1:
        return lambda: x
    dim = dim % x.dim()
    _check_divisible(x, dim, world)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    work = comm.reduce_scatter_into(out, front, group, meter, async_op=True)

    def wait(_input: torch.Tensor = front) -> torch.Tensor:  # input alive until done
        work.wait()
        return out.movedim(0, dim).contiguous() if dim != 0 else out

    return wait


def all_reduce_copy(x: torch.Tensor, group, meter: Optional[CommMeter] = None) -> torch.Tensor:
    """``sum_r x^(r)`` in a new tensor (``x`` is left alone)."""
    if comm.group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    comm.all_reduce(out, group, meter)
    return out


def start_all_reduce(x: torch.Tensor, group,
                     meter: Optional[CommMeter] = None) -> Callable[[], torch.Tensor]:
    """Start an in-place sum of ``x`` over ``group`` asynchronously (``x`` must be a tensor the
    caller owns); the returned call waits for it and gives ``x``."""
    work = comm.all_reduce(x, group, meter, async_op=True)

    def wait() -> torch.Tensor:
        if work is not None:
            work.wait()
        return x

    return wait


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group, meter) -> torch.Tensor:
        return all_reduce_copy(x, group, meter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        return grad, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group, dim: int, meter) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return gather_along(x, group, dim, meter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return split_along(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group, dim: int, meter) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.meter = group, dim, meter
        return reduce_scatter_along(x, group, dim, meter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return gather_along(grad, ctx.group, ctx.dim, ctx.meter), None, None, None


def reduce_from_tp(x: torch.Tensor, group, meter: Optional[CommMeter] = None) -> torch.Tensor:
    """g: forward ``Y = sum_r X^(r)`` (all-reduce of partial sums), backward identity."""
    return x if comm.group_size(group) == 1 else _ReduceFromTP.apply(x, group, meter)


def gather_from_tp(x: torch.Tensor, group, dim: int = -1,
                   meter: Optional[CommMeter] = None) -> torch.Tensor:
    """Forward ``X_r -> [X_0 ... X_{p-1}]`` (all-gather along ``dim``); backward keeps this
    rank's chunk of the (replicated) gradient."""
    return x if comm.group_size(group) == 1 else _Gather.apply(x, group, dim, meter)


def reduce_scatter_seq(x: torch.Tensor, group, meter: Optional[CommMeter] = None,
                       dim: int = 1) -> torch.Tensor:
    """Forward ``Y_r = (sum_q X^(q))_r``: reduce-scatter ``[b, s, h]`` partial sums to
    ``[b, s/p, h]``; backward all-gather of the chunk gradients along ``dim``."""
    return x if comm.group_size(group) == 1 else _ReduceScatterSeq.apply(x, group, dim, meter)
