"""Activation recomputation (Korthikanti et al. 2022): a policy on layer units.

``apply_recompute(stage, mode, layers, rng)`` marks the transformer blocks of a model or pipeline
stage; nothing else in the model changes:

- ``full``: the block's forward runs under ``torch.utils.checkpoint`` (non-reentrant), so the
  block keeps only its input and is re-run inside its own backward. ``layers = k`` limits it to
  the first k blocks of each stage or virtual chunk (Megatron's ``--recompute-method block``);
  0 means every block.
- ``selective``: only core attention (``Attention.core``: QKᵀ, softmax, dropout, ·V) is re-run;
  projections, norms and the MLP keep what they save.

The policy wraps the *instance's* ``forward`` (or ``core``): hooks registered on the unit — ZeRO-3's
gather before the forward, free after, its pre-backward gather — run once around the call and are
not re-run by recomputation, which happens inside the unit's backward after that gather (no extra
prefetch, no early free). Hooks of modules *inside* the block (the TP split-region RNG swap, SP
dropouts) do re-run, which is what makes the RNG replay work:

Exactness: ``torch.utils.checkpoint`` restores the default generators (CPU and the inputs'
device) to their state at the forward, so dropout on replicated activations draws the same masks.
Dropout on split activations draws from the per-TP-rank stream (``SplitRegionRNG``), whose state
lives outside torch's generators: the forward context snapshots it, the recomputation runs from
that snapshot and puts the stream back where it was afterwards, so later forwards (1F1B runs the
next micro-batch's forward after this backward) draw exactly as without recomputation. Losses and
gradients are then bit-identical to ``none`` (tests/test_recompute.py).

No parallel package is imported here: ``rng`` is anything with ``snapshot()`` / ``restore(s)``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def _blocks_by_chunk(stage: nn.Module) -> List[List[nn.Module]]:
    """The blocks of each stage chunk (a ``PipelineStage``) or of the whole model
    (``CausalLM``), in forward order."""
    layers = stage.layers
    if isinstance(layers, nn.ModuleDict):
        return [[layers[str(i)] for i in chunk] for chunk in stage.chunks]
    return [list(layers)]


class _ReplaySplitStream:
    """``context_fn`` of one checkpointed call: snapshot the split-region stream at the
    forward, replay from the snapshot in the recomputation, restore the stream after it."""

    def __init__(self, rng: Any):
        self.rng, self.snap = rng, None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.snap = self.rng.snapshot()
        yield

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        now = self.rng.snapshot()
        self.rng.restore(self.snap)
        try:
            yield
        finally:
            self.rng.restore(now)

    def __call__(self) -> Tuple[Any, Any]:
        return self.forward(), self.recompute()


def checkpointed(fn: Callable, rng: Optional[Any] = None) -> Callable:
    """``fn`` re-run in backward instead of keeping what it saves (grad mode only: under
    ``no_grad`` — eval, generation — it is ``fn``)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        contexts = (lambda: _ReplaySplitStream(rng)()) if rng is not None else None
        extra = {"context_fn": contexts} if contexts is not None else {}
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **extra,
                          **kwargs)

    return run


def apply_recompute(stage: nn.Module, mode: str, layers: int = 0,
                    rng: Optional[Any] = None) -> List[str]:
    """Apply ``mode`` to ``stage``'s blocks (in place); returns what each block does, in
    forward order ("full", "selective" or "none") for the start-up report."""
    if mode not in MODES:
        raise ValueError(f"model.recompute={mode!r}: use one of {', '.join(MODES)}")
    out = []
    for chunk in _blocks_by_chunk(stage):
        for j, block in enumerate(chunk):
            kind = mode
            if mode == "full" and layers and j >= layers:
                kind = "none"
            if kind == "full":
                block.forward = checkpointed(block.forward, rng)
            elif kind == "selective":
                block.attn.core = checkpointed(block.attn.core, rng)
            out.append(kind)
    return out
