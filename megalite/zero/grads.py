"""Gradient accumulation and reduction of one ``FlatGroup``: two small policies.

``FullGrads`` (ZeRO-0, ZeRO-1, ZeRO-2 with ``zero2_accumulate=full``): every micro-batch
accumulates into a full-size buffer laid out like the group — a member's first contribution of
the step is copied in, later ones added, so the buffer is never zeroed as a whole (members
without a gradient this step are zeroed at the launch; a split backward, whose W passes add
into the buffer themselves, starts from zeros); once the step's last contribution is in, one
all-reduce (no sharding) or one reduce-scatter into the owned chunk.

``ShardGrads`` (ZeRO-2 ``shard``, ZeRO-3): each contribution is copied into a transient bucket;
when every member has contributed the bucket is reduce-scattered in place and its owned chunk
added into the persistent owned-shard gradient. A member that contributes
again before the bucket is launched (split backward: a micro-batch's B pass can come before the
previous one's W pass) is added, not overwritten — the reduction is linear, and every dp replica
runs the same actions in the same order, so all issue the same collectives. A bucket is launched
when every member has contributed, or when the step's last contribution arrives.

Reductions SUM over dp: the executor already divided the loss by the global batch's token
count, so each rank's gradient is its share of the global mean's gradient.

Both are driven by the engine: ``on_grad`` per contribution (it says whether the group is ready
to reduce), ``launch`` returns the collective's work and the bucket to finish, ``complete``
folds a finished bucket in.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from megalite.parallel import comm
from megalite.zero.flat import FlatGroup, GradState


class FullGrads:
    sharded = False  # gradients live full-size until the step's reduction

    def __init__(self, dtype: torch.dtype, group, dp: int, shards: int, meter=None):
        self.dtype, self.group, self.dp, self.shards, self.meter = dtype, group, dp, shards, meter

    def allocate(self, g: FlatGroup) -> GradState:
        full = torch.zeros(g.numel, dtype=self.dtype, device=g.flat.device)
        st = GradState(full=full, shard=full[g.lo:g.hi])
        for p, view in zip(g.params, g.param_views(full)):
            p.main_grad = view
        return st

    def begin(self, g: FlatGroup, num_micro: int, split: bool) -> None:
        st = g.grad
        st.pending = g.num_grads * num_micro  # the whole step's contributions
        st.launched = False
        if split:  # W passes add deferred weight gradients into main_grad: from zeros
            st.full.zero_()
        st.seen = bytearray([split]) * len(g.params)  # members already holding a gradient
        for p in g.params:  # autograd hands each contribution over in p.grad (None also
            p.grad = None  # tells a split B pass's hook of a deferred weight from one)

    def on_grad(self, g: FlatGroup, p: nn.Parameter) -> bool:
        st = g.grad
        if p.grad is not None:  # None: a W pass added it into main_grad
            i = g.index[p]
            if st.seen[i]:
                p.main_grad.add_(p.grad)
            else:  # the step's first: copied (what adding it to zeros gives, in one pass)
                p.main_grad.copy_(p.grad)
                st.seen[i] = 1
            p.grad = None
        st.pending -= 1
        return st.pending == 0

    def needs_launch(self, g: FlatGroup) -> bool:
        return not g.grad.launched

    def launch(self, g: FlatGroup) -> Tuple[Optional[object], Optional[torch.Tensor]]:
        st = g.grad
        st.launched = True
        for i, seen in enumerate(st.seen):  # members without a gradient this step
            if not seen:
                g.params[i].main_grad.zero_()
        if self.dp == 1:
            return None, None
        if self.shards == 1:
            return comm.all_reduce(g.grad.full, self.group, self.meter, async_op=True), None
        return comm.reduce_scatter_into(g.grad.shard, g.grad.full, self.group, self.meter,
                                        async_op=True), None

    def complete(self, g: FlatGroup, bucket: Optional[torch.Tensor]) -> None:
        pass

    def bucket_bytes(self, g: FlatGroup) -> int:
        return 0


class ShardGrads:
    sharded = True  # only the owned shard persists

    def __init__(self, dtype: torch.dtype, group, meter=None):
        self.dtype, self.group, self.meter = dtype, group, meter

    def allocate(self, g: FlatGroup) -> GradState:
        return GradState(shard=torch.zeros(g.shard_numel, dtype=self.dtype,
                                           device=g.flat.device))

    def begin(self, g: FlatGroup, num_micro: int, split: bool) -> None:
        g.grad.shard.zero_()
        g.grad.bucket, g.grad.filled = None, 0
        g.grad.pending = g.num_grads * num_micro  # the whole step's contributions

    def on_grad(self, g: FlatGroup, p: nn.Parameter) -> bool:
        st = g.grad
        if st.bucket is None:  # only the padding needs zeros: each member writes its part
            st.bucket = torch.empty(g.numel, dtype=self.dtype, device=p.device)
            st.bucket[g.used:].zero_()
            st.filled, st.seen = 0, bytearray(len(g.params))
        i = g.index[p]
        view = st.bucket[g.offsets[i]:g.offsets[i] + p.numel()].view_as(p)
        if st.seen[i]:  # a second contribution before the launch: add
            view.add_(p.grad)
        else:
            view.copy_(p.grad)
            st.seen[i] = 1
            st.filled += 1
        p.grad = None
        st.pending -= 1  # full bucket, or the step's last contribution (split backward: a
        return st.filled == g.num_grads or st.pending == 0  # bucket may hold only some)

    def needs_launch(self, g: FlatGroup) -> bool:
        return g.grad.bucket is not None

    def launch(self, g: FlatGroup) -> Tuple[Optional[object], Optional[torch.Tensor]]:
        st = g.grad
        bucket, st.bucket = st.bucket, None
        for i, seen in enumerate(st.seen):  # members without a gradient in this bucket
            if not seen:
                o = g.offsets[i]
                bucket[o:o + g.params[i].numel()].zero_()
        work = comm.reduce_scatter_into(bucket[g.lo:g.hi], bucket, self.group, self.meter,
                                        async_op=True)
        return work, bucket

    def complete(self, g: FlatGroup, bucket: Optional[torch.Tensor]) -> None:
        if bucket is not None:
            g.grad.shard.add_(bucket[g.lo:g.hi])

    def bucket_bytes(self, g: FlatGroup) -> int:
        b = g.grad.bucket
        return 0 if b is None else b.numel() * b.element_size()
