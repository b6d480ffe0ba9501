"""Document masking for packed sequences: Megatron-LM's ``--reset-attention-mask``,
``--reset-position-ids`` and ``--eod-mask-loss`` (``get_ltor_masks_and_position_ids``).

A training sample packs several documents, each ending with the end-of-document token (EOD).
With the flags off the model reads a sample as one text; with them on, as the documents it holds:

* ``reset_attention_mask``: token i attends to key j only when j <= i and both lie in the same
  document — block-diagonal causal. The EOD closes its document (it sees its own document; the
  token after it starts the next).
* ``reset_position_ids``: positions restart at 0 after every EOD (GPT-2's learned positions at
  the embedding, LLaMA's RoPE in every layer).
* ``eod_mask_loss``: no loss where the INPUT token is EOD (predicting the first token of the next
  document from the previous one). Expressed as label -100, so the executor's normalisation over
  the global batch's loss-bearing tokens counts only the kept tokens.

Everything is rebuilt from the tokens, which every pipeline stage holds, so no mask travels
between stages. For a position its document is the number of EODs strictly before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

IGNORE_INDEX = -100


@dataclass
class DocumentContext:
    """What the layers need to see a packed micro-batch as separate documents."""

    positions: Optional[torch.Tensor]  # [b, s] int64, restarting after each EOD; None: 0..s-1
    attend: Optional[torch.Tensor]  # [b, 1, s, s] bool, True = query i may attend key j
    blocked: Optional[torch.Tensor]  # ~attend (the fused softmax's convention); None with it
    token_types: Optional[torch.Tensor] = None  # [b, s] encoder segment ids (bert)


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] int64: the number of EOD tokens strictly before each position."""
    eod = (tokens == eod_id).long()
    return eod.cumsum(-1) - eod


def document_context(tokens: torch.Tensor, eod_id: Optional[int], reset_attention_mask: bool,
                     reset_position_ids: bool) -> Optional[DocumentContext]:
    """Positions and attention mask of ``tokens`` [b, s]; None when neither flag is on (the
    model's plain causal path, unchanged)."""
    if eod_id is None or not (reset_attention_mask or reset_position_ids):
        return None
    b, s = tokens.shape
    docs = document_ids(tokens, eod_id)  # [b, s]
    positions = attend = blocked = None
    if reset_position_ids:
        index = torch.arange(s, device=tokens.device).expand(b, s)
        # the index of each document's first token, carried forward over the document
        starts = torch.where(torch.cat([torch.ones_like(docs[:, :1], dtype=torch.bool),
                                        docs[:, 1:] != docs[:, :-1]], dim=1), index, 0)
        positions = index - starts.cummax(dim=1).values
    if reset_attention_mask:
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        same_doc = docs[:, :, None] == docs[:, None, :]  # [b, s, s]
        attend = (same_doc & causal).unsqueeze(1)  # [b, 1, s, s]
        blocked = ~attend
    return DocumentContext(positions, attend, blocked)


def context_for(tokens: torch.Tensor, args) -> Optional[DocumentContext]:
    """``document_context`` with the flags and EOD id a model was built with (``ModelArgs``)."""
    return document_context(tokens, args.eod_id, args.reset_attention_mask,
                            args.reset_position_ids)


def batch_context(batch: Dict[str, torch.Tensor], args) -> Optional[DocumentContext]:
    """What a micro-batch's layers need beyond the tokens: for a decoder its packed documents
    (``context_for``); for an encoder (bert) the padding mask — every query attends to the
    batch's real tokens, [b, 1, 1, s] — and the segment ids, from the batch's
    ``attention_mask`` (1 = token, 0 = padding) and ``token_types``."""
    if not args.is_encoder:
        return context_for(batch["tokens"], args)
    mask, types = batch.get("attention_mask"), batch.get("token_types")
    if mask is None and types is None:
        return None
    attend = None if mask is None else mask.bool()[:, None, None, :]
    return DocumentContext(None, attend, None if attend is None else ~attend, types)


def mask_eod_labels(batch: Dict[str, torch.Tensor], args) -> Dict[str, torch.Tensor]:
    """The micro-batch with label -100 where the input token is EOD when the model was built
    with ``eod_mask_loss`` (a new dict; the caller's tensors are not modified)."""
    if not args.eod_mask_loss or args.eod_id is None:
        return batch
    labels = batch["labels"].masked_fill(batch["tokens"] == args.eod_id, IGNORE_INDEX)
    return {**batch, "labels": labels}
