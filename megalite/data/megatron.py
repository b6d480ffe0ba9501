"""Megatron-LM indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``), read in place.

This is the format megatron-core's ``IndexedDatasetBuilder`` writes (and Megatron's
``tools/preprocess_data.py``). The ``.idx`` file, little-endian::

    magic    9 bytes   b"MMIDIDX\\x00\\x00"
    version  uint64    1
    dtype    uint8     code of the token dtype (table below)
    S        uint64    number of sequences
    D        uint64    number of entries of document_indices (documents + 1)
    sequence_lengths   int32[S]   tokens per sequence
    sequence_pointers  int64[S]   byte offset of each sequence in .bin
    document_indices   int64[D]   sequence index where each document starts; the last is S
    (sequence_modes    int8[S]    multimodal datasets only; ignored)

``.bin`` holds the tokens of all sequences back to back. Both files are memory-mapped, nothing
is converted or copied. Such a dataset carries no tokenizer (``data.tokenizer`` names the one it
was made with) and no end-of-document token of its own: ``preprocess_data.py --append-eod``
writes it into the sequences; otherwise ``data.megatron_append_eod=true`` has one (the
tokenizer's eod id) inserted after every document, as megalite's own datasets have.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .inputs import DataError
from .tokenizer import Tokenizer, load_tokenizer

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
_HEAD_TOKENS = 1 << 20  # checked against the vocabulary on opening (2-8 MB read)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
"""megatron.core.datasets.indexed_dataset.DType: code -> numpy dtype."""


def is_megatron(prefix: str) -> bool:
    """A Megatron dataset is a .bin + .idx pair without megalite's .meta.json."""
    return (not os.path.exists(prefix + ".meta.json") and os.path.exists(prefix + ".bin")
            and os.path.exists(prefix + ".idx"))


@dataclass
class MegatronIndex:
    """The parsed .idx file; the arrays are views into its memory map."""
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], bytes
    document_indices: np.ndarray  # int64 [num_docs + 1], sequence ids


def read_index(path: str) -> MegatronIndex:
    """Parse and check a Megatron ``.idx`` file; a malformed one raises ``DataError``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(MAGIC):
        raise DataError(f"{path}: not a Megatron index file (expected {_HEADER.size} header "
                        f"bytes starting with {MAGIC!r}); the file is cut or of another format")
    _, version, code, num_seqs, num_doc_idx = _HEADER.unpack(head)
    if version != 1:
        raise DataError(f"{path}: Megatron index version {version}, only version 1 is known")
    if code not in DTYPE_CODES:
        raise DataError(f"{path}: unknown token dtype code {code} (known: "
                        f"{', '.join(f'{k}={v.__name__}' for k, v in DTYPE_CODES.items())})")
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind == "f":
        raise DataError(f"{path}: tokens of dtype {dtype} are not token ids; a text dataset "
                        "stores integers")
    need = _HEADER.size + num_seqs * 12 + num_doc_idx * 8
    if size not in (need, need + num_seqs):  # + int8 sequence modes of a multimodal dataset
        raise DataError(f"{path}: {size} bytes, but its header ({num_seqs} sequences, "
                        f"{num_doc_idx} document indices) needs {need}; the file is cut or "
                        "corrupt, write it again")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    off = _HEADER.size
    lengths = np.frombuffer(buf, np.int32, num_seqs, off)
    pointers = np.frombuffer(buf, np.int64, num_seqs, off + 4 * num_seqs)
    doc_idx = np.frombuffer(buf, np.int64, num_doc_idx, off + 12 * num_seqs)
    if num_doc_idx < 1 or doc_idx[0] != 0 or doc_idx[-1] != num_seqs or \
            (np.diff(doc_idx) < 0).any() or (lengths < 0).any():
        raise DataError(f"{path}: inconsistent document indices or sequence lengths; the "
                        "file is corrupt, write it again")
    return MegatronIndex(dtype, lengths, pointers, doc_idx)


class MegatronTokens:
    """A Megatron dataset behind the interface of ``IndexedTokens``: document i is the tokens
    of its sequences, plus ``eod_id`` when ``append_eod``."""

    def __init__(self, prefix: str, tokenizer_path: str, append_eod: bool) -> None:
        self.prefix, self.tokenizer_file, self.append_eod = prefix, tokenizer_path, append_eod
        index = read_index(prefix + ".idx")
        itemsize = index.dtype.itemsize
        seq_starts = np.zeros(index.sequence_lengths.size + 1, dtype=np.int64)
        np.cumsum(index.sequence_lengths, out=seq_starts[1:])
        # the builder writes sequences back to back; anything else is not this format
        if not np.array_equal(index.sequence_pointers, seq_starts[:-1] * itemsize):
            raise DataError(f"{prefix}.idx: sequence pointers are not contiguous; the file is "
                            "corrupt, write it again")
        bin_size = os.path.getsize(prefix + ".bin")
        if bin_size != int(seq_starts[-1]) * itemsize:
            raise DataError(f"{prefix}.bin: {bin_size} bytes, but {prefix}.idx says "
                            f"{int(seq_starts[-1])} tokens of {index.dtype} "
                            f"({int(seq_starts[-1]) * itemsize} bytes); the file is cut or "
                            "belongs to another index")
        # an empty .bin cannot be memory-mapped; it has no samples either way
        self.tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r") if bin_size \
            else np.zeros(0, index.dtype)
        self.offsets: np.ndarray = seq_starts[index.document_indices]  # token offsets of docs
        self.num_docs = int(self.offsets.size - 1)
        self.doc_lengths: np.ndarray = np.diff(self.offsets) + int(append_eod)
        self._tokenizer: Optional[Tokenizer] = load_tokenizer(tokenizer_path)
        self.vocab_size = self._tokenizer.vocab_size
        self.eod_id = self._tokenizer.eod_id
        self._check_ids(self.tokens[:_HEAD_TOKENS], "its first tokens")
        self.meta = {"format": "megatron-indexed", "dtype": str(index.dtype),
                     "num_docs": self.num_docs, "num_tokens": int(seq_starts[-1]),
                     "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                     "append_eod": append_eod}

    @property
    def tokenizer(self) -> Tokenizer:
        assert self._tokenizer is not None
        return self._tokenizer

    def _check_ids(self, ids: np.ndarray, where: str) -> None:
        """Token ids outside the tokenizer's vocabulary mean the data was made with another
        tokenizer; say so rather than fail inside the embedding."""
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise DataError(f"{self.prefix}.bin: token id {bad} in {where} is outside the "
                            f"vocabulary (size {self.vocab_size}) of data.tokenizer "
                            f"{self.tokenizer_file}; set the tokenizer the data was made with")

    def doc_slice(self, i: int, start: int, count: int) -> np.ndarray:
        """Tokens ``[start, start+count)`` of document ``i`` (its eod counted when appended)."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        part = self.tokens[min(lo + start, hi):min(lo + start + count, hi)]
        self._check_ids(part, f"document {i}")  # opening checked only the first tokens
        if self.append_eod and start + count > hi - lo and start <= hi - lo:
            return np.concatenate([part.astype(np.int64), [self.eod_id]])
        return part

    def doc(self, i: int) -> np.ndarray:
        return self.doc_slice(i, 0, int(self.doc_lengths[i]))
