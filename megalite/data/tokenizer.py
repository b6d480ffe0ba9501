"""Tokenizers: raw UTF-8 bytes, a locally trained byte-level BPE, or an existing HF tokenizer.json.

Everything the trainer needs from a tokenizer is ``vocab_size`` (to size the embedding), ``eod_id``
(the separator appended after every document when packing) and ``encode``/``decode``. A tokenizer
is saved next to every prepared dataset so a dataset can always be decoded without knowing how
it was made.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, List, Optional, Tuple

import numpy as np

from .inputs import DataError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
"""Special tokens accepted as end-of-document marker of a foreign tokenizer.json, in order."""

_SPEC_HELP = "expected 'bytes', 'bpe:VOCAB' (e.g. 'bpe:4096') or the path of an existing " \
    "Hugging Face tokenizer.json"


class Tokenizer:
    """Common interface; subclasses implement the encoding. ``encode_docs`` is a fast path used
    by ``prepare`` so tokens go straight into numpy arrays instead of long Python lists."""

    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def save(self, path: str) -> None:
        raise NotImplementedError

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """Encode several texts; subclasses may override with a faster batched path."""
        return [self.encode(t) for t in texts]

    def encode_docs(self, texts: List[str], dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens of ``texts`` each followed by ``eod_id``, flat, plus each document's length."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for x in ids:
            n = len(x)
            flat[pos:pos + n] = x
            flat[pos + n] = self.eod_id
            pos += n + 1
        return flat, lengths


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are UTF-8 bytes and 256 is end-of-document: needs no training, never fails."""

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eod_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        # eod and out-of-range ids cannot be bytes; drop them rather than crash on model output.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "bytes"}, f)

    def encode_docs(self, texts: List[str], dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
        raw = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) + 1 for b in raw), dtype=np.int64, count=len(raw))
        flat = np.full(int(lengths.sum()), self.eod_id, dtype=dtype)
        ends = np.cumsum(lengths)
        for b, end in zip(raw, ends):
            if b:
                flat[end - 1 - len(b):end - 1] = np.frombuffer(b, dtype=np.uint8)
        return flat, lengths


class HFTokenizer(Tokenizer):
    """Wraps a Hugging Face ``tokenizers.Tokenizer`` (trained here or loaded from a file)."""

    def __init__(self, tok: "object", source: str = "<memory>") -> None:
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        eod: Optional[int] = None
        for name in EOD_CANDIDATES:
            eod = tok.token_to_id(name)
            if eod is not None:
                break
        if eod is None:
            raise DataError(f"tokenizer {source} has no end-of-document token; expected one of "
                             f"{', '.join(EOD_CANDIDATES)}")
        self.eod_id = int(eod)

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str) -> None:
        self._tok.save(path)


def parse_spec(spec: str) -> Tuple[str, object]:
    """Validate a tokenizer spec early (before reading any input) and split it into
    ``("bytes", None)``, ``("bpe", vocab)`` or ``("file", path)``."""
    s = str(spec).strip()
    if s == "bytes":
        return "bytes", None
    m = re.fullmatch(r"bpe:(\d+)", s)
    if m:
        vocab = int(m.group(1))
        if vocab < 258:
            raise DataError(f"bad tokenizer spec {spec!r}: a byte-level BPE needs a vocab of at "
                             "least 258 (256 bytes + <|endoftext|> + one merge)")
        return "bpe", vocab
    if s.endswith(".json") and os.path.isfile(s):
        return "file", s
    missing = "no such file; " if s.endswith(".json") else ""
    raise DataError(f"bad tokenizer spec {spec!r}: {missing}{_SPEC_HELP}")


def _train_bpe(vocab: int, texts: Iterable[str]) -> HFTokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes and round-trips."""
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers

    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)  # streamed: texts may be a generator
    return HFTokenizer(tok, f"bpe:{vocab}")


def train_tokenizer(spec: str, texts: Iterable[str]) -> Tokenizer:
    """Build the tokenizer named by ``spec``; ``texts`` is only consumed for ``bpe:N``."""
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return _train_bpe(int(arg), texts)  # type: ignore[arg-type]
    return load_tokenizer(str(arg))


def load_tokenizer(path: str) -> Tokenizer:
    """Load a file written by ``Tokenizer.save`` (or any HF tokenizer.json)."""
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path} does not exist")
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.read(64)
    if '"bytes"' in head:
        try:
            with open(path, "r", encoding="utf-8") as f:
                if json.load(f).get("type") == "bytes":
                    return ByteTokenizer()
        except (ValueError, AttributeError) as e:
            raise DataError(f"cannot load tokenizer file {path}: {e}") from None
    from tokenizers import Tokenizer as _HF
    try:
        tok = _HF.from_file(path)
    except Exception as e:  # the Rust error alone does not say which file
        raise DataError(f"cannot load tokenizer file {path}: {e}") from None
    return HFTokenizer(tok, path)
