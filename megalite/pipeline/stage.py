"""Cutting a model into pipeline stages.

The model is a sequence of units ``embed -> block_0 .. block_{L-1} -> head``. With pp ranks and
v chunks per rank there are pp*v virtual stages; virtual stage s = c*pp + r is chunk c of rank r
(interleaving: rank r holds the non-adjacent chunks r, r+pp, ...). The embedding rides on the
first virtual stage, the final norm + head (+ loss) on the last. A ``PipelineStage`` keeps the
full model's parameter names (``layers.7.attn.q_proj.weight``), so initialisation, checkpoints
and the TP plan are unchanged by the cut.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from megalite.models.documents import DocumentContext, batch_context
from megalite.models.transformer import CausalLM, KVCache


def split_layers(num_layers: int, pp: int, v: int = 1,
                 layers_per_stage: Sequence[int] = ()) -> List[range]:
    """Layer ranges of the pp*v virtual stages, in virtual-stage order."""
    stages = pp * v
    counts = list(layers_per_stage) or [num_layers // stages] * stages
    if len(counts) != stages or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"pipeline: cannot split {num_layers} layers into pp*v = {stages} "
                         f"stages as {counts or 'equal parts'}; give pp*v positive counts "
                         f"summing to {num_layers} (parallel.layers_per_stage)")
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


class PipelineStage(nn.Module):
    """This rank's chunks of the model (same attribute and parameter names as ``CausalLM``)."""

    def __init__(self, model: CausalLM, chunks: List[range], first: bool, last: bool):
        super().__init__()
        self.args = model.args
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for r in chunks for i in r})
        self.head = model.head if last else None
        self.chunks = chunks

    @classmethod
    def cut(cls, model: CausalLM, pp: int, pp_rank: int, v: int = 1,
            layers_per_stage: Sequence[int] = ()) -> "PipelineStage":
        ranges = split_layers(model.args.num_layers, pp, v, layers_per_stage)
        mine = [ranges[c * pp + pp_rank] for c in range(v)]
        return cls(model, mine, first=pp_rank == 0, last=pp_rank == pp - 1)

    def forward(self, tokens: torch.Tensor, caches: Optional[List[KVCache]] = None,
                **batch: torch.Tensor) -> torch.Tensor:
        """The whole model on one stage (pp = 1): tokens [b, s] -> logits, like ``CausalLM``."""
        if len(self.chunks) != 1 or not (self.is_first(0) and self.is_last(0)):
            raise RuntimeError("PipelineStage.forward needs the whole model on one stage; "
                               "a pipelined model runs through forward_chunk")
        doc = batch_context({"tokens": tokens, **batch}, self.args) if not caches else None
        return self.forward_chunk(0, tokens, caches, doc)

    def units(self) -> List[nn.Module]:
        """This rank's layer units in forward order (chunk by chunk)."""
        return [u for u in (self.embed, *self.layers.values(), self.head) if u is not None]

    def is_first(self, chunk: int) -> bool:
        """Is (this rank, chunk) the first virtual stage (it embeds tokens)?"""
        return chunk == 0 and self.embed is not None

    def is_last(self, chunk: int) -> bool:
        """Is (this rank, chunk) the last virtual stage (it produces logits)?"""
        return chunk == len(self.chunks) - 1 and self.head is not None

    def forward_chunk(self, chunk: int, x: torch.Tensor,
                      caches: Optional[List[KVCache]] = None,
                      doc: Optional[DocumentContext] = None) -> torch.Tensor:
        """tokens [b, s] (first virtual stage) or hidden [b, s, h] -> hidden or logits;
        ``doc``: the micro-batch's packed-document positions and mask, which every stage
        builds from the tokens, or an encoder's padding mask and segment ids
        (``models.documents.batch_context``)."""
        if self.is_first(chunk):
            positions = doc.positions if doc is not None else None
            types = doc.token_types if doc is not None else None
            x = self.embed(x, caches[0].length if caches else 0, positions, types)
        for i in self.chunks[chunk]:
            x = self.layers[str(i)](x, caches[i] if caches else None, doc)
        if self.is_last(chunk):
            x = self.head(x)
        return x
