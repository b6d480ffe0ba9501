"""The parallel plan of a run: tensor parallelism by module replacement, then the pipeline cut
(pp = 1 too: the whole model is then one stage, so every layout trains through the same
executor). Both act on the meta-device model before anything is allocated
(``models.build_model``)."""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from megalite.config.schema import ParallelConfig
from megalite.models.transformer import CausalLM
from megalite.parallel.dims import ParallelDims
from megalite.pipeline.stage import PipelineStage
from megalite.tensor_parallel.layout import ShardLayout
from megalite.tensor_parallel.plan import parallelize


def model_plan(dims: ParallelDims, cfg: ParallelConfig):
    """A ``build_model`` plan for this rank: returns (its module, its shard layout)."""

    def plan(model: CausalLM) -> Tuple[nn.Module, ShardLayout]:
        layout = parallelize(model, dims, cfg.sequence_parallel, cfg.vocab_multiple)
        stage = PipelineStage.cut(model, dims.pp, dims.pp_rank, cfg.virtual_stages,
                                  cfg.layers_per_stage)
        return stage, layout

    return plan
