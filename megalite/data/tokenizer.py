"""Tokenizers: raw UTF-8 bytes, a locally trained byte-level BPE or BERT-style WordPiece, or an
existing HF tokenizer.json.

Everything the trainer needs from a tokenizer is ``vocab_size`` (to size the embedding), ``eod_id``
(the separator appended after every document when packing) and ``encode``/``decode``; masked-LM
data also needs the BERT special tokens (``pad_id``, ``cls_id``, ``sep_id``, ``mask_id``, None
where a tokenizer has no such token) and ``special_ids()``. A BERT-style tokenizer has no
end-of-document token of its own: its [SEP] serves as one. A tokenizer is saved next to every
prepared dataset so a dataset can always be decoded without knowing how it was made.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..config.validate import MIN_BPE_VOCAB, MIN_WORDPIECE_VOCAB
from .inputs import DataError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
"""Special tokens accepted as end-of-document marker of a foreign tokenizer.json, in order
([SEP] last: a BERT tokenizer separates documents with it)."""
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens of a ``wordpiece:N`` tokenizer, ids 0-4 in this order (as BERT's)."""

_SPEC_HELP = "expected 'bytes', 'bpe:VOCAB' (e.g. 'bpe:4096'), 'wordpiece:VOCAB' (e.g. " \
    "'wordpiece:8192') or the path of an existing Hugging Face tokenizer.json"


class Tokenizer:
    """Common interface; subclasses implement the encoding. ``encode_docs`` is a fast path used
    by ``prepare`` so tokens go straight into numpy arrays instead of long Python lists."""

    vocab_size: int
    eod_id: int
    pad_id: Optional[int] = None
    cls_id: Optional[int] = None
    sep_id: Optional[int] = None
    mask_id: Optional[int] = None

    def special_ids(self) -> List[int]:
        """Sorted ids of every special token (eod, the BERT specials, added special tokens):
        tokens that stand for no text, so masked-LM never chooses them."""
        named = (self.eod_id, self.pad_id, self.cls_id, self.sep_id, self.mask_id)
        return sorted({int(i) for i in named if i is not None})

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
        self.pad_id, _, self.cls_id, self.sep_id, self.mask_id = (
            tok.token_to_id(name) for name in BERT_SPECIALS)
        self.unk_id: Optional[int] = tok.token_to_id("[UNK]")

    def special_ids(self) -> List[int]:
        """Also [UNK] and every added token marked special in the tokenizer.json."""
        ids = set(super().special_ids())
        if self.unk_id is not None:
            ids.add(int(self.unk_id))
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}, tokenizers >= 0.14
        ids.update(int(i) for i, t in added.items() if t.special)
        return sorted(ids)

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
    ``("bytes", None)``, ``("bpe", vocab)``, ``("wordpiece", vocab)`` or ``("file", path)``."""
    s = str(spec).strip()
    if s == "bytes":
        return "bytes", None
    m = re.fullmatch(r"bpe:(\d+)", s)
    if m:
        vocab = int(m.group(1))
        if vocab < MIN_BPE_VOCAB:
            raise DataError(f"bad tokenizer spec {spec!r}: a byte-level BPE needs a vocab of at "
                             f"least {MIN_BPE_VOCAB} (256 bytes + <|endoftext|> + one merge)")
        return "bpe", vocab
    m = re.fullmatch(r"wordpiece:(\d+)", s)
    if m:
        vocab = int(m.group(1))
        if vocab < MIN_WORDPIECE_VOCAB:
            raise DataError(f"bad tokenizer spec {spec!r}: a WordPiece vocab needs at least "
                             f"{MIN_WORDPIECE_VOCAB} entries (5 specials + the alphabet + pieces)")
        return "wordpiece", vocab
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


_CONTINUATION = 0xF0000
"""Word-inner characters are trained as these private-use characters (see _train_wordpiece)."""


class _Continuation(dict):
    """``str.translate`` table: a character c < U+20000 -> c + U+F0000 (planes 15-16)."""

    def __missing__(self, c: int) -> int:
        self[c] = c + _CONTINUATION
        return self[c]


def _train_wordpiece(vocab: int, texts: Iterable[str]) -> HFTokenizer:
    """BERT-style WordPiece, cased: BERT's normaliser without lowercasing (code and names keep
    their case), split on whitespace and punctuation, ``##`` continuation pieces; characters
    outside the learnt alphabet become [UNK]. The saved file encodes pairs as BERT does
    (``[CLS] A [SEP] B [SEP]``) when a Hugging Face user asks for special tokens.

    The vocabulary is what ``tokenizers``' WordPieceTrainer learns (BPE merges where a piece
    inside a word is a different symbol than at its start), but deterministic: that trainer
    numbers the ``##`` symbols in hash-map order, which breaks ties between equally frequent
    merges differently from run to run (two nodes preparing the same corpus would disagree).
    So the word-inner characters are mapped to private-use characters, a plain BPE (whose
    alphabet is numbered in sorted order) learns the merges, and ``##`` is put back. Words with
    a character at or above U+20000 are left out of training (rare; still encoded, as [UNK]
    where their characters were never seen)."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(lowercase=False)
    pre = pre_tokenizers.BertPreTokenizer()
    table = _Continuation()

    def marked() -> Iterator[str]:
        for text in texts:
            words = pre.pre_tokenize_str(normalizer.normalize_str(text))
            yield " ".join(w[0] + w[1:].translate(table) for w, _ in words
                           if max(w) < "\U00020000")

    bpe = _HF(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(BERT_SPECIALS),
                                  show_progress=False, min_frequency=2)
    bpe.train_from_iterator(marked(), trainer=trainer)  # streamed: texts may be a generator

    def unmark(piece: str) -> str:
        plain = "".join(chr(ord(c) - _CONTINUATION) if c >= "\U000F0000" else c for c in piece)
        return "##" + plain if piece[0] >= "\U000F0000" else plain

    pieces = {p if p in BERT_SPECIALS else unmark(p): i for p, i in bpe.get_vocab().items()}
    tok = _HF(models.WordPiece(pieces, unk_token="[UNK]"))
    tok.add_special_tokens(list(BERT_SPECIALS))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return HFTokenizer(tok, f"wordpiece:{vocab}")


def train_tokenizer(spec: str, texts: Iterable[str]) -> Tokenizer:
    """Build the tokenizer named by ``spec``; ``texts`` is only consumed for ``bpe:N`` and
    ``wordpiece:N``."""
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return _train_bpe(int(arg), texts)  # type: ignore[arg-type]
    if kind == "wordpiece":
        return _train_wordpiece(int(arg), texts)  # type: ignore[arg-type]
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
