"""Generation on a pipelined model: a forward-only pass where the hidden state travels stage by
stage (the sequence length changes from call to call, so shapes come from the tokens every rank
holds), and the last stage's logits are broadcast to every pipeline rank so all of them sample
the same next token. The transfers take the training's path (``p2p.P2P``: each direction on its
``ParallelDims.p2p_groups`` group), so generating after training opens no new communicator —
a plain ``dist.send`` on NCCL would create a two-rank one per pair of ranks."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite.models.transformer import KVCache
from megalite.parallel.dims import ParallelDims
from megalite.pipeline.p2p import P2P, TorchTransport
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
        p2p = P2P(dims, 1, TorchTransport())
        x = None
        with sequence_parallel_off(stage):
            for vstage in range(dims.pp * len(stage.chunks)):
                chunk, owner = divmod(vstage, dims.pp)
                if owner != dims.pp_rank:
                    continue
                if vstage == 0:
                    x = tokens
                else:
                    x = p2p.recv((b, s, self.args.hidden_size), dtype, tokens.device,
                                 owner - 1, vstage - 1, 0, 0)
                x = stage.forward_chunk(chunk, x, caches)
                if not stage.is_last(chunk):
                    p2p.send(x.contiguous(), owner + 1, vstage, 0, 0)
        p2p.flush()
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
