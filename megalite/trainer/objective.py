"""What a run trains on, as the trainer sees it: datasets and one batch dict per micro-batch.

- Decoders (gpt, llama): causal-LM windows (``tokens``, ``labels`` shifted by one).
- The encoder (bert) pre-training: masked-LM samples (``tokens`` with [MASK]s, ``labels`` -100
  but at masked positions, ``token_types``, ``attention_mask``; ``data.mlm``).
- Fine-tuning (``finetune.train`` set): labelled examples from JSON lines (``data.classification``):
  ``tokens``/``token_types``/``attention_mask`` [b, s] and ``labels`` [b]; sample i is example
  i mod n (shuffled per epoch when training), so validation wraps around its file.
Either way the executor divides the summed loss by the loss-bearing tokens (or examples) of the
global batch, so any micro-batch split trains the same model."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from megalite.config.schema import Config
from megalite.data import (build_datasets, check_data, ensure_dataset, micro_batch,
                           tokenizer_file)
from megalite.data.classification import encode_examples, load_classification_jsonl
from megalite.data.dataset import micro_batch_indices
from megalite.data.inputs import DataError
from megalite.data.mlm import build_mlm_datasets, check_mlm_data, mlm_micro_batch
from megalite.data.tokenizer import load_tokenizer


def masked_lm(cfg: Config) -> bool:
    return cfg.model.family == "bert" and not finetuning(cfg)


def finetuning(cfg: Config) -> bool:
    return cfg.finetune.train is not None


def prepare(cfg: Config) -> List[str]:
    """Check (and prepare, cached) this run's data: one ``DataError`` line when it is bad. The
    prepared dataset prefixes, none when fine-tuning on files."""
    if finetuning(cfg):
        for path in filter(None, (cfg.finetune.train, cfg.finetune.eval)):
            examples = _load(cfg, path)
            if max(examples.labels) >= cfg.model.num_labels:
                raise DataError(f"{path}: label {max(examples.labels)} but model.num_labels="
                                f"{cfg.model.num_labels}; raise it to the number of classes")
        return []
    prefixes = ensure_dataset(cfg.data)
    (check_mlm_data if masked_lm(cfg) else check_data)(cfg.data)
    return prefixes


def _load(cfg: Config, path: str):
    f = cfg.finetune
    return load_classification_jsonl(path, f.text_field, f.text_pair_field, f.label_field,
                                     f.task)


def tokenizer_path(cfg: Config, prefixes: List[str]) -> str:
    """The tokenizer file a checkpoint carries."""
    return cfg.data.tokenizer if finetuning(cfg) else tokenizer_file(prefixes[0], cfg.data)


class LabelledExamples:
    """A classification file as arrays. Sample i of a run is example ``perm_e[i mod n]`` of
    epoch ``e = i // n``, one seeded permutation per epoch (so layout-independent and resumable
    like the corpus data); ``size`` samples (every epoch needed)."""

    def __init__(self, arrays: Dict[str, np.ndarray], seed: int, size: int, shuffle: bool):
        self.arrays, self.seed, self.size, self.shuffle = arrays, seed, size, shuffle
        self.n = len(arrays["labels"])
        self._orders: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def rows(self, idx: np.ndarray) -> Dict[str, torch.Tensor]:
        epoch, pos = idx // self.n, idx % self.n
        if self.shuffle:
            pos = np.array([self._order(int(e))[p] for e, p in zip(epoch, pos)], dtype=np.int64)
        return {k: torch.from_numpy(v[pos]) for k, v in self.arrays.items()}

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation; this dataset's last two are kept (the current epoch
        and the next: a batch may straddle them)."""
        order = self._orders.pop(epoch, None)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self._orders[epoch] = order  # the most recent last
        while len(self._orders) > 2:
            del self._orders[next(iter(self._orders))]
        return order


def datasets(cfg: Config, num_train_samples: int, num_val_samples: int):
    """(train, val, tokenizer) for this run."""
    if finetuning(cfg):
        tok = load_tokenizer(cfg.data.tokenizer)
        train = labelled_examples(cfg, tok, num_train_samples, training=True)
        val = labelled_examples(cfg, tok, num_val_samples, training=False) \
            if cfg.finetune.eval else None
        return train, val, tok
    build = build_mlm_datasets if masked_lm(cfg) else build_datasets
    return build(cfg.data, cfg.train.seed, num_train_samples, num_val_samples)


def labelled_examples(cfg: Config, tokenizer, size: int, training: bool) -> LabelledExamples:
    """``finetune.train`` (shuffled per epoch by train.seed) or ``finetune.eval`` (in file
    order, wrapping around the file) encoded by ``tokenizer``, ``size`` samples."""
    path = cfg.finetune.train if training else cfg.finetune.eval
    arrays = encode_examples(tokenizer, _load(cfg, path), cfg.data.seq_len)
    return LabelledExamples(arrays, cfg.train.seed if training else 0, size, shuffle=training)


def batch(cfg: Config, dataset, step: int, micro: int, dp_rank: int, micro_batch_size: int,
          grad_accum: int, dp: int, start: Optional[int], device: torch.device
          ) -> Dict[str, torch.Tensor]:
    """Micro-batch ``micro`` of global batch ``step`` for data-parallel rank ``dp_rank``
    (``start`` None: evaluation, wrapping around the validation set)."""
    if isinstance(dataset, LabelledExamples):
        out = dataset.rows(micro_batch_indices(len(dataset), step, micro, dp_rank,
                                               micro_batch_size, grad_accum, dp, start))
    elif masked_lm(cfg):
        out = mlm_micro_batch(dataset, step, micro, dp_rank, micro_batch_size, grad_accum, dp,
                              start)
    else:
        x, y = micro_batch(dataset, step, micro, dp_rank, micro_batch_size, grad_accum, dp,
                           start)
        out = {"tokens": x, "labels": y}
    return {k: v.to(device) for k, v in out.items()}
