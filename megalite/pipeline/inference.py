"""Generation on a pipelined model: a forward-only pass where the hidden state travels stage by
stage (the sequence length changes from call to call, so shapes come from the tokens every rank
holds), and the last stage's logits are broadcast to every pipeline rank so all of them sample
the same next token."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite.models.transformer import KVCache
from megalite.parallel.dims import ParallelDims
from megalite.pipeline.stage import PipelineStage
from megalite.tensor_parallel.collectives import gather_from_tp
from megalite.tensor_parallel.plan import FullLogits, sequence_parallel_off


class PipelineLogits(nn.Module):
    """A pipelined (and possibly tensor-parallel) model seen as a plain LM. Every rank of the
    model-parallel group calls it with the same tokens."""

    def __init__(self, stage: PipelineStage, dims: ParallelDims):
        super().__init__()
        self.stage, self.dims, self.args = stage, dims, stage.args

    def forward(self, tokens: torch.Tensor, caches: Optional[List[KVCache]] = None):
        dims, stage = self.dims, self.stage
        b, s = tokens.shape
        dtype = next(stage.parameters()).dtype
        peer = lambda pp_rank: dims.rank_of(pp_rank % dims.pp, dims.dp_rank, dims.tp_rank)
        x = None
        with sequence_parallel_off(stage):
            for vstage in range(dims.pp * len(stage.chunks)):
                chunk, owner = divmod(vstage, dims.pp)
                if owner != dims.pp_rank:
                    continue
                if vstage == 0:
                    x = tokens
                else:
                    x = torch.empty(b, s, self.args.hidden_size, dtype=dtype, device=tokens.device)
                    dist.recv(x, peer(owner - 1))
                x = stage.forward_chunk(chunk, x, caches)
                if not stage.is_last(chunk):
                    dist.send(x.contiguous(), peer(owner + 1))
        vocab = self.args.vocab_size
        if dims.is_last_stage:
            logits = gather_from_tp(x, dims.tp_group, dim=-1)[..., :vocab].contiguous()
        else:
            logits = torch.empty(b, s, vocab, dtype=dtype, device=tokens.device)
        if dims.pp_group is not None:
            dist.broadcast(logits, peer(dims.pp - 1), group=dims.pp_group)
        return logits


def inference_view(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """The model as generation expects it: full-vocabulary logits from ``model(tokens, caches)``."""
    if dims.pp > 1:
        return PipelineLogits(model, dims)
    if dims.tp > 1:
        return FullLogits(model, dims)
    return model
