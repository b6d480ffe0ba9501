"""Packed, blended datasets indexed by global sample number.

Every sample is a pure function of (data, seed, sample number): no per-rank state, no iterator
position. That is what makes any (dp, grad_accum, micro) layout see the same samples per step,
and what makes resuming exact: the trainer only needs the step number.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..config.schema import DataConfig
from .corpus import ensure_dataset, prepared_prefixes
from .inputs import DataError
from .megatron import MegatronTokens, is_megatron
from .tokenizer import Tokenizer, load_tokenizer, parse_spec

if TYPE_CHECKING:
    import torch


class IndexedTokens:
    """A prepared dataset: tokens memory-mapped (never loaded whole), document offsets in RAM.
    Opening it checks every file against the others, so a cut or mismatched file is named in
    one line (``DataError``) instead of failing later inside numpy or json."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tokenizer_file = prefix + ".tokenizer.json"
        self.meta = _read_meta(prefix + ".meta.json")
        self.offsets: np.ndarray = _read_offsets(prefix + ".idx.npy")
        dtype = np.dtype(self.meta["dtype"])
        bin_size = os.path.getsize(prefix + ".bin")
        num_tokens = int(self.offsets[-1])
        if bin_size != num_tokens * dtype.itemsize or num_tokens != self.meta["num_tokens"]:
            raise DataError(f"{prefix}.bin: {bin_size} bytes, but {prefix}.idx.npy and "
                            f".meta.json say {num_tokens} and {self.meta['num_tokens']} tokens "
                            f"of {dtype}; the dataset is cut or mixed, prepare it again")
        self.tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r") if bin_size else \
            np.zeros(0, dtype)
        self.num_docs = int(self.offsets.size - 1)
        self.doc_lengths: np.ndarray = np.diff(self.offsets)
        self.vocab_size = int(self.meta["vocab_size"])
        self.eod_id = int(self.meta["eod_id"])
        if not os.path.isfile(self.tokenizer_file):
            raise DataError(f"{self.tokenizer_file} not found; prepare the dataset again")
        self._tokenizer: Optional[Tokenizer] = None

    @property
    def tokenizer(self) -> Tokenizer:
        """Loaded on first use: most consumers only need vocab_size/eod_id from the meta."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_file)
        return self._tokenizer

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (ending with eod), a view into the memmap."""
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def doc_slice(self, i: int, start: int, count: int) -> np.ndarray:
        """Tokens ``[start, start+count)`` of document ``i``, a view into the memmap."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[min(lo + start, hi):min(lo + start + count, hi)]


_META_KEYS = {"dtype": str, "vocab_size": int, "eod_id": int, "num_docs": int, "num_tokens": int}


def _read_meta(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); the file is cut or corrupt, prepare "
                        "the dataset again") from None
    if not isinstance(meta, dict):
        bad = list(_META_KEYS)
    else:
        bad = [k for k, t in _META_KEYS.items() if not isinstance(meta.get(k), t)]
    if bad or meta["dtype"] not in ("uint16", "uint32", "int32", "int64"):
        raise DataError(f"{path}: missing or bad field(s) {', '.join(bad) or 'dtype'}; not a "
                        "megalite dataset meta file, prepare the dataset again")
    return meta


def _read_offsets(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise DataError(f"{path}: not a .npy file (no numpy magic bytes); the file is "
                            "corrupt, prepare the dataset again")
    try:
        offsets = np.load(path, allow_pickle=False)  # never unpickle: loading must not run code
    except (ValueError, OSError, EOFError) as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: holds Python objects, which megalite never loads "
                            "(unpickling can run code); prepare the dataset again") from None
        raise DataError(f"{path}: not a readable .npy index ({e}); the file is cut or corrupt, "
                        "prepare the dataset again") from None
    if offsets.ndim != 1 or offsets.dtype != np.int64 or offsets.size < 2 or offsets[0] != 0 \
            or (np.diff(offsets) < 0).any():
        raise DataError(f"{path}: not a document index (expected increasing int64 offsets "
                        "starting at 0); prepare the dataset again")
    return offsets


def _tokenizer_kind(cfg: DataConfig) -> str:
    try:
        return parse_spec(cfg.tokenizer)[0]
    except ValueError as e:
        raise DataError(f"data.tokenizer: {e}") from None


def open_tokens(prefix: str, cfg: DataConfig) -> "IndexedTokens | MegatronTokens":
    """The dataset at ``prefix``: megalite's (PREFIX.meta.json) or Megatron's (.bin + .idx)."""
    if is_megatron(prefix):
        if _tokenizer_kind(cfg) != "file":
            raise DataError(f"data.tokenizer={cfg.tokenizer}: {prefix}.bin/.idx is a Megatron "
                            "dataset, which carries no tokenizer; set --data.tokenizer to the "
                            "tokenizer.json it was made with")
        return MegatronTokens(prefix, cfg.tokenizer, cfg.megatron_append_eod)
    return IndexedTokens(prefix)


def tokenizer_file(prefix: str, cfg: DataConfig) -> str:
    """The tokenizer.json of the dataset at ``prefix`` (copied into every checkpoint)."""
    return cfg.tokenizer if is_megatron(prefix) else prefix + ".tokenizer.json"


def check_data(cfg: DataConfig) -> None:
    """What can go wrong with the data, checked without preparing anything and without
    starting a process group: the datasets of data.paths opened and checked file by file
    (source=prepared), or data.tokenizer (otherwise). Raises ``DataError``."""
    if cfg.source != "prepared":
        if _tokenizer_kind(cfg) == "file":
            load_tokenizer(cfg.tokenizer)  # a tokenizer.json without an eod token is refused
        return
    for prefix in prepared_prefixes(cfg):
        t = open_tokens(prefix, cfg)
        t.tokenizer  # noqa: B018 -- loads it: a cut tokenizer.json is named here


def _parse_split(split: str) -> Tuple[float, float]:
    try:
        parts = [float(x) for x in str(split).split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts.append(0.0)
    if len(parts) != 2 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"bad data.split {split!r}: expected two non-negative relative weights "
                         "'train,val' with a positive sum, e.g. '98,2'")
    return parts[0], parts[1]


def split_documents(num_docs: int, split: str, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Train/val document ids (sorted). Splitting by document, not by sample, keeps validation
    text unseen in training; a seeded permutation avoids taking e.g. only the last files."""
    wt, wv = _parse_split(split)
    n_val = int(round(num_docs * wv / (wt + wv)))
    if wv > 0 and num_docs >= 2:
        n_val = max(1, n_val)
    if wt > 0:
        n_val = min(n_val, max(num_docs - 1, 0))
    perm = np.random.default_rng([seed, 0x5B1D]).permutation(num_docs)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


class PackedSamples:
    """Documents concatenated in a seeded per-epoch order and cut into samples of seq_len+1
    tokens that overlap by one (the last input token's label starts the next sample), so no
    token is wasted and no padding is needed; then the sample order is shuffled too.

    The order is a stable prefix: sample i does not depend on ``num_samples`` (so not on
    train.steps). The stream is cut into blocks of ``block_size`` samples, about one epoch of
    documents each, and each block is permuted by its own seeded generator; extending a run
    only appends blocks, it never reorders samples a shorter run has (or has not yet) seen."""

    def __init__(self, tokens: "IndexedTokens | MegatronTokens", doc_ids: Sequence[int],
                 seq_len: int, num_samples: int, seed: int) -> None:
        self.tokens, self.seq_len, self.num_samples = tokens, int(seq_len), int(num_samples)
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        per_epoch = int(tokens.doc_lengths[doc_ids].sum()) if doc_ids.size else 0
        if per_epoch < self.seq_len + 1:
            raise ValueError(f"{tokens.prefix}: this split has {per_epoch} tokens in "
                             f"{doc_ids.size} documents, fewer than one sample of seq_len+1 = "
                             f"{self.seq_len + 1}; use more data, a smaller data.seq_len or a "
                             "different data.split")
        self.block_size = (per_epoch - 1) // self.seq_len  # whole samples in one epoch
        num_blocks = max(1, -(-self.num_samples // self.block_size))
        # the last block is permuted whole, so the stream must reach its last sample
        needed = num_blocks * self.block_size * self.seq_len + 1
        self.num_epochs = max(1, -(-needed // per_epoch))
        order = [np.random.default_rng([seed, 0xD0C, e]).permutation(doc_ids)
                 for e in range(self.num_epochs)]
        self.doc_order: np.ndarray = np.concatenate(order)
        lengths = tokens.doc_lengths[self.doc_order]
        self.stream_starts = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.stream_starts[1:])
        blocks = [b * self.block_size
                  + np.random.default_rng([seed, 0x5A4, b]).permutation(self.block_size)
                  for b in range(num_blocks)]
        self.sample_order: np.ndarray = np.concatenate(blocks)[:self.num_samples]

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, j: int) -> np.ndarray:
        """Unshuffled sample ``j``: stream positions [j*seq_len, j*seq_len + seq_len + 1)."""
        need = self.seq_len + 1
        out = np.empty(need, dtype=np.int64)
        start = int(j) * self.seq_len
        # Document holding the first token (found per sample: no num_samples-sized index).
        k = int(np.searchsorted(self.stream_starts, start, side="right")) - 1
        off, filled = start - int(self.stream_starts[k]), 0
        while filled < need:  # loops over documents, not tokens
            d = self.tokens.doc_slice(int(self.doc_order[k]), off, need - filled)
            out[filled:filled + d.size] = d
            filled += d.size
            k, off = k + 1, 0
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.raw(int(self.sample_order[i]))


class BlendedSamples:
    """Mixes datasets by weight. Sample i comes from the dataset furthest behind its target
    share (Megatron's rule), so every prefix of the sample sequence has the exact proportions
    up to one sample, and the mix does not depend on the batch layout."""

    def __init__(self, datasets: Sequence[object], weights: Sequence[float],
                 num_samples: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"BlendedSamples needs one weight per dataset, got "
                             f"{len(datasets)} datasets and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"blending weights must be non-negative with a positive sum: "
                             f"{list(weights)}")
        self.datasets, self.weights, self.num_samples = list(datasets), w / w.sum(), num_samples
        share = self.weights.tolist()
        counts = [0] * len(share)
        ds_index: List[int] = []
        smp_index: List[int] = []
        rest = range(1, len(share))
        for i in range(1, num_samples + 1):  # sequential by nature; kept to plain Python ops
            best, best_err = 0, share[0] * i - counts[0]
            for k in rest:
                err = share[k] * i - counts[k]
                if err > best_err:
                    best, best_err = k, err
            ds_index.append(best)
            smp_index.append(counts[best])
            counts[best] += 1
        self.dataset_index = np.asarray(ds_index, dtype=np.int64)
        self.sample_index = np.asarray(smp_index, dtype=np.int64)
        for d, c in enumerate(counts):
            if c > len(self.datasets[d]):  # type: ignore[arg-type]
                raise ValueError(f"blended dataset {d} needs {c} samples but has "
                                 f"{len(self.datasets[d])}")  # type: ignore[arg-type]
        self.counts = counts

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]  # type: ignore


def _tokenizer_digest(t: "IndexedTokens | MegatronTokens") -> str:
    path = t.tokenizer_file
    if not os.path.exists(path):
        return f"{t.vocab_size}:{t.eod_id}"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _part_size(total: int, share: float, num_parts: int) -> int:
    return total if num_parts == 1 else int(math.ceil(share * total)) + 1


def open_blend(cfg: DataConfig) -> Tuple[List["IndexedTokens | MegatronTokens"], List[float]]:
    """The datasets of the config (built-in corpora prepared on first use) and their blending
    weights, checked to share one tokenizer."""
    prefixes = ensure_dataset(cfg)
    weights = list(cfg.weights) if cfg.weights else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"data.weights has {len(weights)} entries but data.paths has "
                         f"{len(prefixes)}; give one weight per path (or none)")
    tokens = [open_tokens(p, cfg) for p in prefixes]
    ref = _tokenizer_digest(tokens[0])
    for t in tokens[1:]:
        if (t.vocab_size, t.eod_id) != (tokens[0].vocab_size, tokens[0].eod_id) or \
                _tokenizer_digest(t) != ref:
            raise ValueError(f"datasets {tokens[0].prefix} and {t.prefix} use different "
                             "tokenizers; blend only datasets prepared with the same one")
    return tokens, weights


def build_datasets(cfg: DataConfig, seed: int, num_train_samples: int,
                   num_val_samples: int) -> Tuple[object, Optional[object], Tokenizer]:
    """(train, val, tokenizer) for the config. val is None when the split gives it no documents
    or no validation samples are asked for."""
    return blend_parts(cfg, seed, num_train_samples, num_val_samples,
                       lambda t, ids, n, s: PackedSamples(t, ids, cfg.seq_len, n, s))


def blend_parts(cfg: DataConfig, seed: int, num_train_samples: int, num_val_samples: int,
                make: Callable[..., object]) -> Tuple[object, Optional[object], Tokenizer]:
    """(train, val, tokenizer): ``make(tokens, doc_ids, num_samples, seed)`` samples of each
    dataset's train / validation documents, blended by data.weights (``BlendedSamples``)."""
    tokens, weights = open_blend(cfg)
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    train_parts: List[object] = []
    val_parts: List[object] = []
    for k, t in enumerate(tokens):
        train_ids, val_ids = split_documents(t.num_docs, cfg.split, seed + k)
        # The greedy blend never takes more than ceil(share*N)+1 samples from one dataset.
        n_tr = _part_size(num_train_samples, share[k], len(tokens))
        train_parts.append(make(t, train_ids, n_tr, seed + k))
        if val_ids.size and num_val_samples > 0:
            n_va = _part_size(num_val_samples, share[k], len(tokens))
            val_parts.append(make(t, val_ids, n_va, seed + k + 7919))
    train: object = train_parts[0] if len(tokens) == 1 else \
        BlendedSamples(train_parts, weights, num_train_samples)
    val: Optional[object] = None
    if len(val_parts) == len(tokens):
        val = val_parts[0] if len(tokens) == 1 else \
            BlendedSamples(val_parts, weights, num_val_samples)
    return train, val, tokens[0].tokenizer


def _stack(dataset: object, idx: np.ndarray) -> Tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    x = torch.from_numpy(np.stack([dataset[int(i)] for i in idx]))  # type: ignore[index]
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def micro_batch(dataset: object, step: int, micro: int, dp_rank: int, micro_batch_size: int,
                grad_accum: int, dp: int, start: Optional[int] = None
                ) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """(inputs, labels), int64 [micro_batch_size, seq_len], of micro-batch ``micro`` of rank
    ``dp_rank`` at ``step``: a fixed slice of the step's global samples, so the union over ranks
    and micro-batches is the same for every layout with the same global batch.

    ``start``: the sample number where the step's global batch begins (the samples consumed
    before it); default ``step`` x the global batch. A run resumed with another global batch
    passes the checkpoint's consumed samples + (step - resumed step) x its global batch, so the
    data continues with the next sample."""
    return _stack(dataset, micro_batch_indices(len(dataset), step, micro,  # type: ignore
                                               dp_rank, micro_batch_size, grad_accum, dp, start))


def micro_batch_indices(num_samples: int, step: int, micro: int, dp_rank: int,
                        micro_batch_size: int, grad_accum: int, dp: int,
                        start: Optional[int] = None) -> np.ndarray:
    """Global sample numbers of ``micro_batch``'s micro-batch (same arguments), int64."""
    g = micro_batch_size * grad_accum * dp
    base = step * g if start is None else start
    first = base + (dp_rank * grad_accum + micro) * micro_batch_size
    if first + micro_batch_size > num_samples:
        raise IndexError(f"step {step} needs samples up to {first + micro_batch_size} but the "
                         f"training set was built with {num_samples}; build it for more steps")
    return np.arange(first, first + micro_batch_size)


def eval_batch_indices(num_samples: int, it: int, dp_rank: int, micro_batch_size: int,
                       dp: int) -> np.ndarray:
    """Global sample numbers of ``eval_batch``'s micro-batch (same arguments), int64."""
    first = (it * dp + dp_rank) * micro_batch_size
    return np.arange(first, first + micro_batch_size) % num_samples


def eval_batch(dataset: object, it: int, dp_rank: int, micro_batch_size: int,
               dp: int) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Validation micro-batch ``it`` of rank ``dp_rank``: consecutive samples, wrapping around,
    so every evaluation looks at the same samples."""
    return _stack(dataset, eval_batch_indices(len(dataset), it, dp_rank,  # type: ignore
                                              micro_batch_size, dp))
