"""Masked-LM samples for BERT pre-training, indexed by global sample number like the GPT data.

Sample i is ``[CLS] A [SEP] B [SEP]``, padded with [PAD] to seq_len, where A and B are two
consecutive segments of one chunk of ONE document (never two documents packed together). Each
document (less the end-of-document token prepare appends: [SEP] for a WordPiece tokenizer) is cut
into chunks of ``seq_len - 3`` tokens, the BERT/Megatron target length; a document's last chunk
and a short document give a shorter, padded sample. A chunk is split into A and B at a point
drawn uniformly among its inner positions, so both are non-empty; a one-token chunk has nothing
to split and gives ``[CLS] A [SEP]`` (B empty, no second [SEP]; segment ids all 0), the layout of
a single sentence in BERT. There is no next-sentence task, so B always follows A.

Then masked-LM collation (Devlin et al. 2019): 15% of the positions that are neither special
tokens nor padding are chosen (at least one; the count rounded stochastically, so from 7
candidates up its expectation is exactly 15%), of those 80% become [MASK], 10% a random
non-special token and 10% stay; labels are the original ids at chosen positions and -100
elsewhere.

Every random choice of sample i (which chunk, where A ends, which positions, what they become)
comes from generators seeded by (seed, epoch) and (seed, i) only: any (dp, grad_accum, micro)
layout sees the same samples, and a run resumes exactly from the step number. The chunk order
is a stable prefix (one seeded permutation per epoch), so sample i does not depend on how many
samples the run asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np

from ..config.schema import DataConfig
from .corpus import prepared_prefixes
from .dataset import (IndexedTokens, blend_parts, check_data, eval_batch_indices,
                      micro_batch_indices, tokenizer_file)
from .inputs import DataError
from .megatron import MegatronTokens
from .tokenizer import Tokenizer, load_tokenizer, parse_spec

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
"""Label of every position the masked-LM loss ignores (torch's cross_entropy default)."""
MASK_PROB = 0.15
"""Share of the non-special tokens of a sample that the masked-LM loss predicts."""
MASK_SPLIT = (0.8, 0.1, 0.1)
"""Of the chosen tokens: share replaced by [MASK], by a random token, left unchanged."""
KEYS = ("tokens", "labels", "token_types", "attention_mask")
"""What a masked-LM sample holds: int64 arrays [seq_len] each."""
_NEED = ("pad_id", "cls_id", "sep_id", "mask_id")


def check_mlm_tokenizer(tok: Tokenizer, where: str) -> None:
    """Refuse (``DataError``, one line) a tokenizer without BERT's special tokens."""
    missing = [n[:-3] for n in _NEED if getattr(tok, n) is None]
    if missing:
        raise DataError(f"{where}: masked-LM needs the tokens [PAD] [CLS] [SEP] [MASK], this "
                        f"tokenizer has no {' '.join(f'[{m.upper()}]' for m in missing)}; "
                        "use data.tokenizer=wordpiece:VOCAB or a BERT tokenizer.json")


def check_mlm_data(cfg: DataConfig) -> None:
    """What can be checked before any dataset is prepared and before a process group: the
    tokenizer the masked-LM data will use has BERT's special tokens. Raises ``DataError``."""
    if cfg.source == "prepared":
        check_data(cfg)  # the datasets themselves, and a Megatron dataset's data.tokenizer
        for prefix in prepared_prefixes(cfg):
            path = tokenizer_file(prefix, cfg)
            check_mlm_tokenizer(load_tokenizer(path), path)
        return
    try:
        kind, arg = parse_spec(cfg.tokenizer)
    except ValueError as e:
        raise DataError(f"data.tokenizer: {e}") from None
    if kind == "file":
        check_mlm_tokenizer(load_tokenizer(str(arg)), f"data.tokenizer={cfg.tokenizer}")
    elif kind != "wordpiece":
        raise DataError(f"data.tokenizer={cfg.tokenizer}: masked-LM needs the tokens [PAD] "
                        "[CLS] [SEP] [MASK], which a bytes or BPE tokenizer does not have; use "
                        "data.tokenizer=wordpiece:VOCAB (e.g. wordpiece:8192) or a BERT "
                        "tokenizer.json")


def pack_pair(a: np.ndarray, b: Optional[np.ndarray], seq_len: int, cls_id: int, sep_id: int,
              pad_id: int) -> Dict[str, np.ndarray]:
    """``[CLS] a [SEP] b [SEP]`` padded with [PAD] to ``seq_len`` (``[CLS] a [SEP]`` when b is
    None or empty): tokens, token_types (0 for [CLS] a [SEP], 1 for b [SEP]) and
    attention_mask (1 real token, 0 padding), int64 [seq_len]. The caller truncates."""
    nb = 0 if b is None else int(len(b))
    used = len(a) + 2 + (nb + 1 if nb else 0)
    if used > seq_len:
        raise ValueError(f"a pair of {len(a)} + {nb} tokens does not fit seq_len {seq_len}")
    tokens = np.full(seq_len, pad_id, dtype=np.int64)
    types = np.zeros(seq_len, dtype=np.int64)
    tokens[0] = cls_id
    tokens[1:1 + len(a)] = a
    tokens[1 + len(a)] = sep_id
    if nb:
        s = 2 + len(a)
        tokens[s:s + nb] = b  # type: ignore[index]
        tokens[s + nb] = sep_id
        types[s:s + nb + 1] = 1
    mask = np.zeros(seq_len, dtype=np.int64)
    mask[:used] = 1
    return {"tokens": tokens, "token_types": types, "attention_mask": mask}


def mask_tokens(tokens: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
                mask_id: int, random_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(masked tokens, labels): BERT's 15% of the ``candidates`` positions (bool [seq]) with
    80/10/10 replacement; labels hold the original id where chosen, IGNORE_INDEX elsewhere."""
    pos = np.flatnonzero(candidates)
    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    if pos.size == 0:  # e.g. a chunk of [UNK] only: nothing to predict
        return tokens.copy(), labels
    # stochastic rounding: E[k] = 15% of the candidates exactly, whatever their number
    k = int(np.floor(MASK_PROB * pos.size + rng.random()))
    k = min(pos.size, max(1, k))
    chosen = np.sort(rng.choice(pos, size=k, replace=False))
    labels[chosen] = tokens[chosen]
    out = tokens.copy()
    r = rng.random(k)
    to_mask = r < MASK_SPLIT[0]
    to_random = (r >= MASK_SPLIT[0]) & (r < MASK_SPLIT[0] + MASK_SPLIT[1])
    out[chosen[to_mask]] = mask_id
    out[chosen[to_random]] = random_ids[rng.integers(0, random_ids.size, int(to_random.sum()))]
    return out, labels


def content_lengths(tokens: "IndexedTokens | MegatronTokens") -> np.ndarray:
    """Tokens of each document without the end-of-document token ending it (prepare appends
    one to every document; a Megatron dataset may hold one), int64 [num_docs]."""
    stored = np.diff(tokens.offsets)  # [num_docs], tokens in .bin (no appended Megatron eod)
    ends = tokens.offsets[1:][stored > 0] - 1
    last = np.full(stored.size, -1, dtype=np.int64)
    last[stored > 0] = np.asarray(tokens.tokens[ends], dtype=np.int64)
    return (stored - (last == tokens.eod_id)).astype(np.int64)


class MLMSamples:
    """Masked-LM samples of the documents ``doc_ids`` of ``tokens`` (see the module doc).
    ``__getitem__(i)`` is a dict of int64 numpy arrays [seq_len]: KEYS."""

    def __init__(self, tokens: "IndexedTokens | MegatronTokens", doc_ids: Sequence[int],
                 seq_len: int, seed: int, num_samples: int, tokenizer: Tokenizer) -> None:
        check_mlm_tokenizer(tokenizer, tokens.tokenizer_file)
        if seq_len < 4:
            raise DataError(f"data.seq_len={seq_len}: a masked-LM sample [CLS] A [SEP] B [SEP] "
                            "needs seq_len >= 4")
        self.tokens, self.seq_len, self.seed = tokens, int(seq_len), int(seed)
        self.num_samples, self.tokenizer = int(num_samples), tokenizer
        self.special = np.asarray(tokenizer.special_ids(), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), self.special)
        chunk = self.seq_len - 3
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        content = content_lengths(tokens)[doc_ids]
        per_doc = -(-content // chunk)  # chunks of each document; 0 for an empty one
        self.chunk_doc = np.repeat(doc_ids, per_doc)
        first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # index of the doc's chunk 0
        self.chunk_start = (np.arange(self.chunk_doc.size) - first) * chunk
        self.chunk_len = np.minimum(chunk, np.repeat(content, per_doc) - self.chunk_start)
        self.num_chunks = int(self.chunk_doc.size)
        if self.num_chunks == 0:
            raise DataError(f"{tokens.prefix}: this split has no tokens in its {doc_ids.size} "
                            "documents; use more data or a different data.split")
        num_epochs = max(1, -(-self.num_samples // self.num_chunks))
        self.order = np.concatenate([
            np.random.default_rng([self.seed, 0x3A5C, e]).permutation(self.num_chunks)
            for e in range(num_epochs)])[:self.num_samples]

    def __len__(self) -> int:
        return self.num_samples

    def document(self, i: int) -> int:
        """Id of the document sample ``i`` comes from."""
        return int(self.chunk_doc[self.order[i]])

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        i = int(i) % self.num_samples
        c = int(self.order[i])
        n = int(self.chunk_len[c])
        ids = np.asarray(self.tokens.doc_slice(int(self.chunk_doc[c]),
                                               int(self.chunk_start[c]), n), dtype=np.int64)
        rng = np.random.default_rng([self.seed, 0x3A5D, i])
        cut = int(rng.integers(1, n)) if n >= 2 else n  # A and B both non-empty when possible
        tok = self.tokenizer
        s = pack_pair(ids[:cut], ids[cut:], self.seq_len, tok.cls_id, tok.sep_id,  # type: ignore
                      tok.pad_id)  # type: ignore[arg-type]
        candidates = (s["attention_mask"] == 1) & ~np.isin(s["tokens"], self.special)
        s["tokens"], s["labels"] = mask_tokens(s["tokens"], candidates, rng,
                                               tok.mask_id, self.random_ids)  # type: ignore
        return s


def build_mlm_datasets(cfg: DataConfig, seed: int, num_train_samples: int, num_val_samples: int
                       ) -> Tuple[object, Optional[object], Tokenizer]:
    """(train, val, tokenizer) of masked-LM samples, as ``build_datasets``: the same datasets
    (built-in corpora prepared and cached the same way), the same train/val document split,
    blended by data.weights. val is None when the split gives it no documents or no validation
    samples are asked for."""
    check_mlm_data(cfg)
    return blend_parts(cfg, seed, num_train_samples, num_val_samples,  # one tokenizer: checked
                       lambda t, ids, n, s: MLMSamples(t, ids, cfg.seq_len, s, n, t.tokenizer))


def stack_samples(dataset: object, idx: np.ndarray) -> Dict[str, "torch.Tensor"]:
    """The samples ``idx`` of ``dataset`` as int64 tensors [len(idx), seq_len], one per key."""
    import torch

    rows = [dataset[int(i)] for i in idx]  # type: ignore[index]
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in KEYS}


def mlm_micro_batch(dataset: object, step: int, micro: int, dp_rank: int,
                    micro_batch_size: int, grad_accum: int, dp: int,
                    start: Optional[int] = None) -> Dict[str, "torch.Tensor"]:
    """Micro-batch ``micro`` of rank ``dp_rank`` at ``step``: the samples ``micro_batch``
    (dataset.py) takes for the same arguments, as a dict of int64 [micro_batch_size, seq_len]
    tensors (KEYS)."""
    idx = micro_batch_indices(len(dataset), step, micro, dp_rank,  # type: ignore[arg-type]
                              micro_batch_size, grad_accum, dp, start)
    return stack_samples(dataset, idx)


def mlm_eval_batch(dataset: object, it: int, dp_rank: int, micro_batch_size: int,
                   dp: int) -> Dict[str, "torch.Tensor"]:
    """Validation micro-batch ``it`` of rank ``dp_rank``, the samples ``eval_batch`` takes."""
    idx = eval_batch_indices(len(dataset), it, dp_rank, micro_batch_size,  # type: ignore
                             dp)
    return stack_samples(dataset, idx)
