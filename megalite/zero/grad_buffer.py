"""Flat gradient storage with bucketed, asynchronous data-parallel all-reduce.

Every parameter's gradient lives in one flat buffer (``param.main_grad`` is its view), cut into
buckets of about ``bucket_mb``. Parameters are laid out in reverse order of registration, which is
roughly the order backward produces their gradients, so the first bucket fills first.

- When the gradient dtype equals the parameter dtype, ``param.grad`` *is* the view: autograd
  accumulates micro-batches into the buffer in place, with no copy.
- Otherwise (bf16 parameters, fp32 gradients) a post-accumulate hook adds ``param.grad`` into
  ``main_grad`` and frees it, so accumulation happens in fp32.

On the last micro-batch of a step (``sync_next_backward(True)``), the hook counts down each
bucket; a bucket whose gradients are all ready is pre-divided by dp and all-reduced
asynchronously while backward carries on. ``finish()`` waits for all of them. ZeRO stages 1-2
replace the all-reduce with a reduce-scatter of the same buckets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from megalite.parallel import comm


@dataclass
class _Bucket:
    data: torch.Tensor  # view of the flat buffer
    params: List[nn.Parameter]
    pending: int = 0
    handle: Optional[object] = None
    launched: bool = False


@dataclass
class GradBuffer:
    params: List[nn.Parameter]
    dtype: torch.dtype
    dp_group: Optional[object] = None
    bucket_mb: float = 25.0
    meter: Optional[comm.CommMeter] = None
    buckets: List[_Bucket] = field(default_factory=list, init=False)

    def __post_init__(self):
        self.dp_size = comm.group_size(self.dp_group)
        order = list(reversed(self.params))
        numel = sum(p.numel() for p in order)
        device = order[0].device if order else torch.device("cpu")
        self.buffer = torch.zeros(numel, dtype=self.dtype, device=device)
        self._bucket_of: Dict[nn.Parameter, _Bucket] = {}
        bucket_numel = max(1, int(self.bucket_mb * 2**20 / self.buffer.element_size()))
        offset, start, members = 0, 0, []
        for p in order:
            p.main_grad = self.buffer[offset:offset + p.numel()].view_as(p)
            if p.dtype == self.dtype:
                p.grad = p.main_grad  # autograd accumulates straight into the buffer
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
            offset += p.numel()
            members.append(p)
            if offset - start >= bucket_numel or p is order[-1]:
                self._add_bucket(start, offset, members)
                start, members = offset, []
        self._sync = False

    def _add_bucket(self, start: int, end: int, members: List[nn.Parameter]) -> None:
        bucket = _Bucket(self.buffer[start:end], members)
        self.buckets.append(bucket)
        for p in members:
            self._bucket_of[p] = bucket

    def sync_next_backward(self, enabled: bool) -> None:
        """Reduce during the coming backward (the last micro-batch of a step) or not."""
        self._sync = enabled and self.dp_size > 1
        if self._sync:
            for b in self.buckets:
                b.pending = len(b.params)

    @torch.no_grad()
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if p.grad is not p.main_grad:
            p.main_grad.add_(p.grad)
            p.grad = None
        if self._sync:
            bucket = self._bucket_of[p]
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.data.div_(self.dp_size)  # sum of grad/dp == mean, on every backend
        bucket.handle = comm.all_reduce(bucket.data, self.dp_group, self.meter, async_op=True)
        bucket.launched = True

    def finish(self) -> None:
        """Wait for every bucket's reduction, first launching those not launched during backward
        (parameters without a gradient, or a schedule that reduces only at the end)."""
        if self.dp_size == 1:
            return
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
        self._sync = False

    def reduce_partial(self, tp_group, meter: Optional[comm.CommMeter] = None) -> None:
        """Sum over the TP group the gradients of replicated parameters that each TP rank only
        partly computed (``tp_partial_grad``: sequence-parallel norms, replicated kv heads),
        in one all-reduce. Sums commute, so doing it after the dp reduction is equivalent."""
        partial = [p for p in self.params if getattr(p, "tp_partial_grad", False)]
        if not partial or comm.group_size(tp_group) == 1:
            return
        flat = torch.cat([p.main_grad.reshape(-1) for p in partial])
        comm.all_reduce(flat, tp_group, meter)
        offset = 0
        for p in partial:
            p.main_grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def zero(self) -> None:
        """Start a step: zero gradients, no reduction in flight."""
        self.buffer.zero_()
        self._sync = False
        for b in self.buckets:
            b.launched, b.handle = False, None
        for p in self.params:
            if p.dtype == self.dtype:
                p.grad = p.main_grad
