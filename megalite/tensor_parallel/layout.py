"""What a tensor-parallel plan did to each parameter, recorded by name (parameters are re-created
when a meta-device model is materialised, so attributes on them would be lost)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Set

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ShardLayout:
    tp_rank: int = 0
    tp_size: int = 1
    shard_dim: Dict[str, int] = field(default_factory=dict)
    """Parameters split over TP ranks: name -> the dim cut into tp_size equal chunks."""
    partial_grad: Set[str] = field(default_factory=set)
    """Replicated parameters whose gradient on each rank is only a part (sequence-parallel norms,
    replicated kv projections, ...): summed over the TP group before the optimizer step."""

    def local(self, name: str, full: torch.Tensor, local_shape: torch.Size) -> torch.Tensor:
        """This rank's slice of a parameter's full value. Rows beyond the full size (vocabulary
        padding) are zeros: they are never looked up and never get probability mass."""
        dim = self.shard_dim.get(name)
        if dim is None:
            return full
        padded = local_shape[dim] * self.tp_size
        if full.shape[dim] < padded:
            pad = [0, 0] * (full.dim() - 1 - dim) + [0, padded - full.shape[dim]]
            full = F.pad(full, pad)
        return full.chunk(self.tp_size, dim)[self.tp_rank]

    def annotate(self, model: nn.Module) -> None:
        """Mark parameters for the trainer: ``tp_sharded`` (norm counted on every rank) and
        ``tp_partial_grad`` (gradient summed over the TP group)."""
        for name, p in model.named_parameters():
            p.tp_sharded = name in self.shard_dim
            p.tp_partial_grad = name in self.partial_grad
