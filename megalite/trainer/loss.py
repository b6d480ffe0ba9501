"""The training loss of a layout: summed token cross-entropy of one micro-batch.

The executor divides by the number of loss-bearing tokens of the whole global batch (over
micro-batches and data-parallel ranks), so masks that change the count per micro-batch
(padding, document or BERT-style masking) still train exactly what one process trains. With
TP the vocab-parallel loss works on this rank's slice of the (padded) vocabulary: full-
vocabulary logits never exist.
"""
from __future__ import annotations

from typing import Callable

import torch

from megalite.models.transformer import ModelArgs, lm_loss
from megalite.parallel.dims import ParallelDims
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import pad_vocab

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE = -100  # labels that carry no loss


def loss_sum_fn(args: ModelArgs, dims: ParallelDims, vocab_multiple: int = 64) -> LossFn:
    """(logits, labels) -> the sum of the token losses (fp32 scalar), labels -100 ignored."""
    if dims.tp == 1:
        return lambda logits, labels: lm_loss(logits, labels, reduction="sum")
    local = pad_vocab(args.vocab_size, dims.tp, vocab_multiple) // dims.tp

    def tp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, dims.tp_group, dims.tp_rank * local,
                                            args.vocab_size, dims.meter, reduction="sum")

    return tp_loss


def loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of a micro-batch carry loss."""
    return (labels != IGNORE).sum()
