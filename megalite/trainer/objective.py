"""What a model family trains on, as the trainer sees it: datasets and one batch dict per
micro-batch. Decoders (gpt, llama) take causal-LM windows (``tokens``, ``labels`` shifted by
one); the encoder (bert) takes masked-LM samples (``tokens`` with [MASK]s, ``labels`` -100 but at
masked positions, ``token_types``, ``attention_mask``; ``data.mlm``). Either way the executor
divides the summed token loss by the loss-bearing tokens of the global batch, so any micro-batch
split trains the same model."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from megalite.config.schema import Config
from megalite.data import build_datasets, micro_batch
from megalite.data.mlm import build_mlm_datasets, mlm_micro_batch


def masked_lm(cfg: Config) -> bool:
    return cfg.model.family == "bert"


def datasets(cfg: Config, num_train_samples: int, num_val_samples: int):
    """(train, val, tokenizer) for this run's family."""
    build = build_mlm_datasets if masked_lm(cfg) else build_datasets
    return build(cfg.data, cfg.train.seed, num_train_samples, num_val_samples)


def batch(cfg: Config, dataset, step: int, micro: int, dp_rank: int, micro_batch_size: int,
          grad_accum: int, dp: int, start: Optional[int], device: torch.device
          ) -> Dict[str, torch.Tensor]:
    """Micro-batch ``micro`` of global batch ``step`` for data-parallel rank ``dp_rank``."""
    if masked_lm(cfg):
        out = mlm_micro_batch(dataset, step, micro, dp_rank, micro_batch_size, grad_accum, dp,
                              start)
    else:
        x, y = micro_batch(dataset, step, micro, dp_rank, micro_batch_size, grad_accum, dp,
                           start)
        out = {"tokens": x, "labels": y}
    return {k: v.to(device) for k, v in out.items()}
