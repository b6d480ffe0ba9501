"""Where every parameter sits: one record per parameter, kept by its full name.

The plan fills a ``ParamTable`` while it rewrites the meta-device model (which dim tensor
parallelism splits, which replicated parameters get only a partial gradient per TP rank, which
parameter is a pipeline stage's copy of the tied embedding); ``build_model`` adds each
parameter's global shape. Everyone who needs a fact about a parameter — the ZeRO engine (partial
sums, tied-copy sync), the optimizer (which gradients the norm counts, weight decay), checkpoints
(global shapes, which replica writes) — reads ``table.info(name)``. Parameters are re-created
when a meta model is materialised, so nothing is stored on the tensors themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ParamInfo:
    """The facts about one parameter that parallelism needs."""
    global_shape: Tuple[int, ...]
    """Shape in the single-process model (TP-merged, without vocabulary padding)."""
    tp_dim: Optional[int] = None
    """Dim split into tp equal chunks, or None when every TP rank holds the whole tensor."""
    partial_grad: bool = False
    """Replicated over TP, but each TP rank's gradient is only a part (sequence-parallel norms,
    replicated kv heads): summed over the TP group before the optimizer step."""
    tied_copy: bool = False
    """A last pipeline stage's copy of the tied input embedding: its gradient is summed with
    the embedding's, and norms and checkpoints count the embedding only."""

    @property
    def tp_replicated(self) -> bool:
        """Every TP rank holds the same values (norms and checkpoints count TP rank 0 only)."""
        return self.tp_dim is None


@dataclass
class ParamTable:
    tp_rank: int = 0
    tp_size: int = 1
    shard_dim: Dict[str, int] = field(default_factory=dict)
    """Parameters split over TP ranks: name -> the dim cut into tp_size equal chunks."""
    partial_grad: Set[str] = field(default_factory=set)
    """Replicated parameters whose gradient on each rank is only a part."""
    tied_copy: Set[str] = field(default_factory=set)
    """A pipeline stage's copy of the tied embedding (``head.output.weight`` on the last)."""
    global_shape: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def info(self, name: str) -> ParamInfo:
        return ParamInfo(tuple(self.global_shape.get(name, ())), self.shard_dim.get(name),
                         name in self.partial_grad, name in self.tied_copy)

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
