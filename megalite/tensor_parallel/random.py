"""Dropout randomness under tensor parallelism.

Where activations are replicated over the TP group (without sequence parallelism: the embedding
and residual dropouts) every TP rank must draw the same mask, so those use the ordinary torch
generator, seeded identically on the TP ranks of a replica. Where activations are split —
attention probabilities (heads split) and, with sequence parallelism, the embedding and residual
dropouts (sequence split) — each TP rank draws its own mask from a separate stream. A forward
pre/post hook pair swaps that stream in around the module (Megatron's RNG tracker, by hooks, so
the model code stays plain).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn


class SplitRegionRNG:
    """The per-TP-rank random stream used inside split-activation modules."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state() if self.cuda else None
        self._saved: List[tuple] = []

    def reseed(self, seed: int) -> None:
        """Seed the stream (per step, so a resumed run draws the same masks)."""
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None)
        torch.manual_seed(seed)
        self._store_and_restore(outer)

    def _store_and_restore(self, outer) -> None:
        self.state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state() if self.cuda else None
        torch.set_rng_state(outer[0])
        if self.cuda:
            torch.cuda.set_rng_state(outer[1])

    def snapshot(self) -> tuple:
        """The stream's state, for activation recomputation to replay (``models.recompute``)."""
        return self.state, self.cuda_state

    def restore(self, snap: tuple) -> None:
        self.state, self.cuda_state = snap

    def _enter(self, module, args) -> None:
        self._saved.append((torch.get_rng_state(),
                            torch.cuda.get_rng_state() if self.cuda else None))
        torch.set_rng_state(self.state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state)

    def _exit(self, module, args, output) -> None:
        self._store_and_restore(self._saved.pop())

    def cover(self, module: nn.Module) -> None:
        """Draw ``module``'s randomness from this stream."""
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)


def cover_split_regions(model: nn.Module, rng: SplitRegionRNG, sequence_parallel: bool) -> None:
    """Attention (split heads) always; with SP also the embedding and residual dropouts."""
    from megalite.models.transformer import Attention

    for name, module in model.named_modules():
        if isinstance(module, Attention):
            rng.cover(module)
        elif sequence_parallel and isinstance(module, nn.Dropout) and (
                name.endswith(".drop")):
            rng.cover(module)
