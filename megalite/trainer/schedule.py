"""Schedules decide the order of forward and backward passes over the micro-batches of a step.
Without pipeline parallelism the schedule is plain gradient accumulation."""
from __future__ import annotations

from typing import Callable, List

import torch


def accumulate(forward_backward: Callable[[int], torch.Tensor], num_micro: int,
               sync_next_backward: Callable[[bool], None]) -> List[torch.Tensor]:
    """Run ``forward_backward(m)`` for each micro-batch; gradients are reduced across replicas
    only during the last backward, so the earlier ones cost no communication."""
    losses = []
    for m in range(num_micro):
        sync_next_backward(m == num_micro - 1)
        losses.append(forward_backward(m))
    return losses
